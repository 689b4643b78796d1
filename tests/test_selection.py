"""What is reported is what was selected (issue 16): the best-validation checkpoint is the one tested,
the search picks on validation, and an export of a split holds that split's users.

Every test sets up a case where the right and the wrong choice differ (best epoch not the last one,
validation and test rankings that disagree, valid targets that are not the test targets), so a
selection bug cannot pass by coincidence.
"""
import copy
import json
import os

import numpy as np
import pytest
import torch

from recbole_t2diff.ann import exact_top_k, recall_ndcg
from recbole_t2diff.export import export_embeddings
from recbole_t2diff.hyper import Search
from recbole_t2diff.quick_start import evaluate_checkpoint, load_data_and_model, run

from conftest import TINY_MODEL, scratch_run


def test_the_best_validation_epoch_is_the_one_tested_even_when_it_is_not_the_last(tiny_path, workdir):
    """Validation is scripted to peak at epoch 0 of 3; the test metrics must be epoch 0's weights'."""
    scripted_scores = iter([0.9, 0.1, 0.2])
    valid_results, final_weights, seen = [], {}, {}

    def on_trainer(trainer):
        evaluate, fit = trainer.evaluate, trainer.fit
        seen["trainer"] = trainer

        def scripted_valid_epoch(valid_data, show_progress=False):
            valid_results.append(dict(evaluate(valid_data, load_best_model=False)))
            return next(scripted_scores), valid_results[-1]

        def recording_fit(*args, **kwargs):
            outcome = fit(*args, **kwargs)
            final_weights.update(copy.deepcopy(trainer.model.state_dict()))
            return outcome

        def recording_evaluate(data, *args, **kwargs):
            seen["last_loader"] = data
            return evaluate(data, *args, **kwargs)

        trainer._valid_epoch, trainer.fit, trainer.evaluate = scripted_valid_epoch, recording_fit, recording_evaluate

    result = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 3, "learning_rate": 0.01},
                 on_trainer=on_trainer)
    assert result["best_valid_score"] == 0.9 and dict(result["best_valid_result"]) == valid_results[0]
    assert dict(evaluate_checkpoint(result["saved_model_file"], "valid")) == valid_results[0]  # the file holds epoch 0
    assert dict(result["test_result"]) == dict(evaluate_checkpoint(result["saved_model_file"], "test"))

    trainer = seen["trainer"]  # the weights training ended with (epoch 2), on the same test loader
    trainer.model.load_state_dict(final_weights)
    last_epoch = trainer.evaluate(seen["last_loader"], load_best_model=False)
    assert dict(last_epoch) != dict(result["test_result"]), "the last epoch must score differently, or the reload is not tested"


def test_show_progress_reaches_the_test_evaluation_and_the_result_names_its_model(tiny_path, workdir):
    flags = []

    def on_trainer(trainer):
        evaluate = trainer.evaluate
        trainer.evaluate = lambda data, *args, **kwargs: flags.append(kwargs.get("show_progress")) or evaluate(data, *args, **kwargs)

    result = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 1, "show_progress": True},
                 saved=False, on_trainer=on_trainer)
    assert flags == [True, True]  # the epoch's validation, then the test
    assert result["model"] == "T2Diff"


def fake_result(valid, test):
    return {"model": "T2Diff", "best_valid_score": valid, "valid_score_bigger": True,
            "best_valid_result": {"ndcg@10": valid}, "test_result": {"ndcg@10": test}}


@pytest.mark.parametrize("bigger", [True, False])
def test_the_search_picks_the_best_validation_score_where_test_disagrees(tmp_path, bigger):
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.001,0.002,0.003]\n")
    # learning rate -> (valid, test): validation ranks 0.002 first, test ranks it last.
    outcomes = {0.001: (0.30, 0.50), 0.002: (0.40, 0.10), 0.003: (0.20, 0.60)}
    if not bigger:  # a loss-like valid metric: the smallest wins (0.002 again)
        outcomes = {lr: (1 - valid, test) for lr, (valid, test) in outcomes.items()}
    search = Search("T2Diff", "tiny", str(tmp_path / "space.hyper"), argv=[])

    def objective(config_dict, config_file_list):
        return {**fake_result(*outcomes[config_dict["learning_rate"]]), "valid_score_bigger": bigger}

    search.objective_function = objective
    search.run()
    best_params, best = search.best_trial()
    assert len(search.trials) == 3 and best_params == {"learning_rate": 0.002}
    assert search.best_params == {"learning_rate": 0.002}  # RecBole's own bookkeeping agrees
    search.export_result(str(tmp_path / "out.result"))
    text = (tmp_path / "out.result").read_text()
    number = [params for params, _ in search.trials].index({"learning_rate": 0.002}) + 1
    assert f"best trial {number}: learning_rate:0.002\n  valid score: {outcomes[0.002][0]:.6f}\n" in text


def test_ties_on_validation_go_to_the_earliest_trial(tmp_path):
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.001,0.002]\n")
    search = Search("T2Diff", "tiny", str(tmp_path / "space.hyper"), argv=[])
    search.objective_function = lambda config_dict, files: fake_result(0.5, config_dict["learning_rate"])
    search.run()
    assert search.best_trial()[0] == search.trials[0][0]


def test_a_one_trial_search_selects_its_trial(tmp_path):
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.001]\n")
    search = Search("T2Diff", "tiny", str(tmp_path / "space.hyper"), argv=[])
    search.objective_function = lambda config_dict, files: fake_result(0.5, 0.4)
    search.run()
    assert search.best_trial() == search.trials[0]


@pytest.fixture(scope="module")
def trained(tiny_path, tmp_path_factory):
    with scratch_run(tmp_path_factory.mktemp("selection_run")):
        return run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL})


def split_targets(loader):
    """The target item of every sequence of a leave-one-out split, in loader order."""
    return torch.cat([batch[0]["item_id"] for batch in loader]).numpy()


def test_export_of_the_valid_split_holds_the_valid_users(trained, tmp_path, workdir):
    paths, items, users, targets = export_embeddings(trained["saved_model_file"], str(tmp_path), split="valid")
    _, model, _, _, valid, test = load_data_and_model(trained["saved_model_file"])
    assert np.array_equal(targets, split_targets(valid))
    assert not np.array_equal(targets, split_targets(test)), "valid and test targets must differ, or the split is not tested"
    model.eval()
    with torch.no_grad():
        first_batch = model.full_sort_predict(next(iter(valid))[0]).numpy()
    np.testing.assert_allclose(users[: len(first_batch)] @ items.T, first_batch, rtol=1e-4, atol=1e-4)
    recall, ndcg = recall_ndcg(exact_top_k(items, users, 10), targets, 10)
    valid_metrics = evaluate_checkpoint(trained["saved_model_file"], "valid")
    assert recall == pytest.approx(valid_metrics["recall@10"], abs=1e-4)
    assert ndcg == pytest.approx(valid_metrics["ndcg@10"], abs=1e-4)
    assert '"split": "valid"' in open(paths["ids"]).read()


def test_a_builtin_model_exports_its_item_embedding_and_sequence_vectors(tiny_path, tmp_path, workdir):
    result = run("SASRec", "tiny", config_dict={"data_path": tiny_path, "epochs": 1, "hidden_size": 16, "inner_size": 32,
                                                "n_layers": 1, "show_progress": False, "state": "WARNING"})
    _, items, users, targets = export_embeddings(result["saved_model_file"], str(tmp_path), split="valid")
    _, model, _, _, valid, _ = load_data_and_model(result["saved_model_file"])
    torch.testing.assert_close(torch.from_numpy(items), model.item_embedding.weight.detach())
    model.eval()
    batch = next(iter(valid))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(batch).numpy()
    np.testing.assert_allclose(users[: len(scores)] @ items.T, scores, rtol=1e-4, atol=1e-4)
    assert np.array_equal(targets, split_targets(valid))


def test_export_writes_what_it_returns_and_can_write_again(trained, tmp_path, workdir):
    for _ in range(2):  # a second export into the same folder overwrites the first
        paths, items, users, targets = export_embeddings(trained["saved_model_file"], str(tmp_path))
    assert set(paths) == {"items", "users", "targets", "ids"}
    for name, array, dtype in (("items", items, np.float32), ("users", users, np.float32), ("targets", targets, np.int64)):
        assert paths[name] == str(tmp_path / f"{name}.npy")
        stored = np.load(paths[name])
        assert stored.dtype == dtype and np.array_equal(stored, array)
    ids = json.load(open(paths["ids"]))
    assert paths["ids"] == str(tmp_path / "ids.json")
    assert {key: ids[key] for key in ("model", "dataset", "split")} == {"model": "T2Diff", "dataset": "tiny", "split": "test"}
    assert len(ids["item_tokens"]) == len(items) and ids["item_tokens"][0] == "[PAD]"
    assert set(ids) == {"model", "dataset", "split", "item_tokens", "note"}


def test_a_run_without_saving_reports_no_file_and_counts_trainable_parameters(tiny_path, workdir):
    seen = {}
    result = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 1}, saved=False,
                 on_trainer=lambda trainer: seen.update(model=trainer.model))
    assert result["saved_model_file"] is None and not list(workdir.glob("saved/*"))
    assert result["params"] == sum(p.numel() for p in seen["model"].parameters() if p.requires_grad)
    assert set(result) == {"model", "best_valid_score", "valid_score_bigger", "best_valid_result", "test_result",
                           "saved_model_file", "params", "xhat_quality"}


def test_other_parameters_come_back_with_the_weights(trained, tmp_path, workdir, monkeypatch):
    """RecBole models may keep state outside the state dict (``other_parameter``): both reload paths hand it back."""
    from recbole_t2diff import quick_start
    from recbole_t2diff.checkpoint import save_checkpoint

    config, model, dataset, *_ = load_data_and_model(trained["saved_model_file"])
    monkeypatch.setattr(model, "other_parameter", lambda: {"scale": torch.tensor(3.0)})
    path = str(tmp_path / "with_other.pth")
    save_checkpoint(path, config, model, dataset.identity)
    received = []
    monkeypatch.setattr(type(model), "load_other_parameter", lambda self, other: received.append(other))
    load_data_and_model(path)
    trainer = type("Trainer", (), {"saved_model_file": path, "device": torch.device("cpu"), "model": model})()
    quick_start.load_best_model(trainer)
    assert [set(r) for r in received] == [{"scale"}, {"scale"}] and all(float(r["scale"]) == 3.0 for r in received)


def test_a_gpu_checkpoint_loads_on_a_machine_without_one(trained, workdir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the checkpoint would stay on it")
    config, model, *_ = load_data_and_model(trained["saved_model_file"], {"device": "cuda"})
    assert config["device"] == torch.device("cpu") and next(model.parameters()).device.type == "cpu"


def test_a_checkpoint_from_several_processes_reloads_in_one(trained, tmp_path, workdir):
    payload = torch.load(trained["saved_model_file"], weights_only=True)
    settings = payload["config"]["settings"]
    assert (settings["single_spec"], settings["local_rank"]) == (True, 0)
    settings["single_spec"], settings["local_rank"] = False, 1  # as rank 1 of a gloo run wrote it
    path = tmp_path / "rank1.pth"
    torch.save(payload, path)
    config = load_data_and_model(str(path))[0]
    assert (config["single_spec"], config["local_rank"]) == (True, 0)


def test_each_rank_builds_its_model_from_the_seed_plus_its_rank(tiny_data):
    from conftest import make_model

    seed = tiny_data[0]["seed"]
    rank_1 = make_model(tiny_data, local_rank=1).state_dict()
    assert all(torch.equal(rank_1[k], v) for k, v in make_model(tiny_data, seed=seed + 1).state_dict().items())
    assert not all(torch.equal(rank_1[k], v) for k, v in make_model(tiny_data).state_dict().items())


def test_every_rank_reloads_the_file_rank_0_saved(monkeypatch):
    from recbole_t2diff import quick_start

    sent = []

    def broadcast(objects, src):
        sent.append((list(objects), src))
        objects[0] = "rank0.pth"

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast)
    trainer = type("Trainer", (), {"config": {"single_spec": False}, "saved_model_file": "rank1.pth"})()
    quick_start._share_checkpoint_name(trainer)
    assert trainer.saved_model_file == "rank0.pth" and sent == [(["rank1.pth"], 0)]
    alone = type("Trainer", (), {"config": {"single_spec": True}, "saved_model_file": "mine.pth"})()
    quick_start._share_checkpoint_name(alone)
    assert alone.saved_model_file == "mine.pth" and len(sent) == 1


def test_a_rank_of_a_distributed_evaluation_joins_its_process_group(trained, workdir, monkeypatch):
    from recbole_t2diff.config import Config

    class Joined(Exception):
        pass

    def join(self):
        raise Joined(self["local_rank"])

    monkeypatch.setattr(Config, "_init_device", join)
    with pytest.raises(Joined):
        load_data_and_model(trained["saved_model_file"], {"local_rank": 1, "nproc": 2, "world_size": 2})
    load_data_and_model(trained["saved_model_file"])  # one process: no group to join


def test_only_rank_0_of_a_distributed_run_writes_checkpoints(trained, tmp_path, workdir, caplog):
    from recbole_t2diff.checkpoint import load_checkpoint
    from recbole_t2diff.quick_start import make_trainer

    config, model, dataset, *_ = load_data_and_model(trained["saved_model_file"])
    config["checkpoint_dir"] = str(tmp_path)
    trainer = make_trainer(config, model, dataset)
    assert os.path.basename(trainer.saved_model_file).startswith("T2Diff-") and trainer.saved_model_file.startswith(str(tmp_path))
    trainer.best_valid_score = 0.25
    with caplog.at_level("INFO"):
        trainer._save_checkpoint(3)
    assert f"Saving current: {trainer.saved_model_file}" in caplog.text
    stored = load_checkpoint(trainer.saved_model_file)
    assert (stored["epoch"], stored["best_valid_score"]) == (3, 0.25)
    elsewhere = str(tmp_path / "elsewhere.pth")
    trainer._save_checkpoint(4, verbose=False, saved_model_file=elsewhere)
    assert load_checkpoint(elsewhere)["epoch"] == 4
    for single_spec, rank, writes in [(False, 1, False), (False, 0, True), (True, 1, True)]:
        target = str(tmp_path / f"{single_spec}-{rank}.pth")
        trainer.config["single_spec"], trainer.config["local_rank"] = single_spec, rank
        trainer._save_checkpoint(5, saved_model_file=target)
        assert os.path.exists(target) == writes, (single_spec, rank)


def test_a_cpu_rank_of_a_distributed_run_gets_ddp_without_devices(trained, workdir):
    import socket

    from torch.nn.parallel import DistributedDataParallel

    from recbole_t2diff.quick_start import make_trainer

    config, model, dataset, *_ = load_data_and_model(trained["saved_model_file"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        config["single_spec"] = False
        trainer = make_trainer(config, model, dataset)
        assert isinstance(trainer.distributed_model, DistributedDataParallel) and trainer.distributed_model.module is model
        assert trainer.model is model and config["single_spec"] is False and trainer.checkpoint_dataset is dataset
        assert type(trainer).__name__ == "Trainer"  # RecBole's trainer for a sequential model, with safe checkpoints
    finally:
        torch.distributed.destroy_process_group()
        config["single_spec"] = True
    assert not isinstance(getattr(make_trainer(config, model, dataset), "distributed_model", None), DistributedDataParallel)


def test_each_model_type_gets_recboles_trainer_for_it(monkeypatch):
    from recbole.trainer import KGTrainer, TraditionalTrainer, Trainer
    from recbole.utils import ModelType

    from recbole_t2diff import quick_start

    monkeypatch.setattr(quick_start, "_safe_trainer_class", lambda trainer_class: lambda config, model, dataset: trainer_class)
    for model_type, model, expected in [(ModelType.TRADITIONAL, "Pop", TraditionalTrainer),
                                        (ModelType.KNOWLEDGE, "CKE", KGTrainer), (ModelType.SEQUENTIAL, "T2Diff", Trainer)]:
        assert quick_start.make_trainer({"MODEL_TYPE": model_type, "model": model, "single_spec": True}, None) is expected

"""run, load_data_and_model and evaluate_checkpoint (quick_start.py) on the tiny data: what is reported is what
was selected (the best-validation checkpoint is the one tested, and reloads to the same metrics), the same seed gives
the same metrics, built-in models run through the same functions, Ctrl-C says what it kept, x̂'s quality is reported."""

import copy
import os
import re

import pytest
import torch

from recbole_t2diff.checkpoint import load_checkpoint, settings_digest
from recbole_t2diff.errors import UsageError
from recbole_t2diff.quick_start import evaluate_checkpoint, load_data_and_model, run

from helpers import TINY_MODEL


def tiny_run(tiny_path, **overrides):
    return run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, **overrides})


def test_checkpoint_reload_gives_the_same_test_metrics(trained_t2diff, workdir):
    result = trained_t2diff
    assert result["saved_model_file"] and os.path.isfile(result["saved_model_file"])
    assert dict(evaluate_checkpoint(result["saved_model_file"], "test")) == dict(result["test_result"])
    assert dict(evaluate_checkpoint(result["saved_model_file"], "valid")) == dict(result["best_valid_result"])


def test_same_seed_same_metrics_other_seed_other_metrics(trained_t2diff, tiny_path, workdir):
    first, second = trained_t2diff, tiny_run(tiny_path)  # the shared run, trained earlier in another folder
    assert dict(first["test_result"]) == dict(second["test_result"])
    assert dict(first["best_valid_result"]) == dict(second["best_valid_result"])
    assert dict(tiny_run(tiny_path, seed=7)["test_result"]) != dict(first["test_result"])


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

    result = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 3, "learning_rate": 0.01}, on_trainer=on_trainer)
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

    result = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 1, "show_progress": True}, saved=False, on_trainer=on_trainer)
    assert flags == [True, True]  # the epoch's validation, then the test
    assert result["model"] == "T2Diff"


def test_a_run_without_saving_reports_no_file_and_counts_trainable_parameters(tiny_path, workdir):
    seen = {}
    result = run(
        "T2Diff",
        "tiny",
        config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 1},
        saved=False,
        on_trainer=lambda trainer: seen.update(model=trainer.model),
    )
    assert result["saved_model_file"] is None and not list(workdir.glob("saved/*"))
    assert result["params"] == sum(p.numel() for p in seen["model"].parameters() if p.requires_grad)
    assert set(result) == {"model", "best_valid_score", "valid_score_bigger", "best_valid_result", "test_result", "saved_model_file", "params", "xhat_quality"}


def test_builtin_models_run_through_the_same_function(tiny_path, workdir):
    result = run("GRU4Rec", "tiny", config_dict={"data_path": tiny_path, "epochs": 1, "show_progress": False, "state": "WARNING"})
    assert result["model"] == "GRU4Rec"
    assert set(result["test_result"]) == {f"{m}@{k}" for m in ("recall", "mrr", "ndcg", "hit") for k in (2, 10, 20)}  # the protocol
    assert dict(evaluate_checkpoint(result["saved_model_file"])) == dict(result["test_result"])


def test_each_model_type_gets_recboles_trainer_for_it(monkeypatch):
    from recbole.trainer import KGTrainer, TraditionalTrainer, Trainer
    from recbole.utils import ModelType

    from recbole_t2diff import quick_start

    monkeypatch.setattr(quick_start, "_safe_trainer_class", lambda trainer_class: lambda config, model, dataset: trainer_class)
    for model_type, model, expected in [
        (ModelType.TRADITIONAL, "Pop", TraditionalTrainer),
        (ModelType.KNOWLEDGE, "CKE", KGTrainer),
        (ModelType.SEQUENTIAL, "T2Diff", Trainer),
    ]:
        assert quick_start.make_trainer({"MODEL_TYPE": model_type, "model": model, "single_spec": True}, None) is expected


# ---- reloading a checkpoint -----------------------------------------------------------------------------------


def test_other_parameters_come_back_with_the_weights(trained_t2diff, tmp_path, workdir, monkeypatch):
    """RecBole models may keep state outside the state dict (``other_parameter``): both reload paths hand it back."""
    from recbole_t2diff import quick_start
    from recbole_t2diff.checkpoint import save_checkpoint

    config, model, dataset, *_ = load_data_and_model(trained_t2diff["saved_model_file"])
    monkeypatch.setattr(model, "other_parameter", lambda: {"scale": torch.tensor(3.0)})
    path = str(tmp_path / "with_other.pth")
    save_checkpoint(path, config, model, dataset.identity)
    received = []
    monkeypatch.setattr(type(model), "load_other_parameter", lambda self, other: received.append(other))
    load_data_and_model(path)
    trainer = type("Trainer", (), {"saved_model_file": path, "device": torch.device("cpu"), "model": model})()
    quick_start.load_best_model(trainer)
    assert [set(r) for r in received] == [{"scale"}, {"scale"}] and all(float(r["scale"]) == 3.0 for r in received)


def test_a_gpu_checkpoint_loads_on_a_machine_without_one(trained_t2diff, workdir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the checkpoint would stay on it")
    config, model, *_ = load_data_and_model(trained_t2diff["saved_model_file"], {"device": "cuda"})
    assert config["device"] == torch.device("cpu") and next(model.parameters()).device.type == "cpu"


def test_checkpoints_from_before_a_new_knob_still_load(trained_t2diff, tmp_path, workdir):
    checkpoint = torch.load(trained_t2diff["saved_model_file"], weights_only=True)
    for knob in ("sampler", "diffusion_scale"):  # as written by a version without these knobs
        del checkpoint["config"]["settings"][knob]
    checkpoint["settings_sha256"] = settings_digest(checkpoint["config"])  # which signed the settings it had
    old = tmp_path / "old.pth"
    torch.save(checkpoint, old)
    assert dict(evaluate_checkpoint(str(old))) == dict(trained_t2diff["test_result"])


def test_a_checkpoint_can_be_evaluated_with_the_few_step_sampler(trained_t2diff, workdir):
    ddim = evaluate_checkpoint(trained_t2diff["saved_model_file"], "test", {"sampler": "ddim", "infer_steps": 2})
    assert set(ddim) == set(trained_t2diff["test_result"])
    again = evaluate_checkpoint(trained_t2diff["saved_model_file"], "test", {"sampler": "ddim", "infer_steps": 2})
    assert dict(ddim) == dict(again)
    with pytest.raises(UsageError, match="infer_steps=9"):
        evaluate_checkpoint(trained_t2diff["saved_model_file"], "test", {"sampler": "ddim", "infer_steps": 9})


# ---- Ctrl-C --------------------------------------------------------------------------------------------------


def interrupt_at_epoch(epoch):
    """An on_trainer hook: Ctrl-C when training epoch ``epoch`` starts."""

    def hook(trainer):
        train_epoch = trainer._train_epoch

        def interrupted(train_data, epoch_idx, *args, **kwargs):
            if epoch_idx == epoch:
                raise KeyboardInterrupt
            return train_epoch(train_data, epoch_idx, *args, **kwargs)

        trainer._train_epoch = interrupted

    return hook


def test_ctrl_c_during_training_says_what_was_kept(tiny_path, workdir, capsys):
    from recbole_t2diff.cli import exit_on_usage_error

    settings = {"data_path": tiny_path, **TINY_MODEL, "epochs": 5}
    with pytest.raises(KeyboardInterrupt) as info:
        run("T2Diff", "tiny", config_dict=settings, on_trainer=interrupt_at_epoch(2))
    saved = [os.path.abspath(os.path.join("saved", name)) for name in os.listdir("saved")]
    assert len(saved) == 1 and load_checkpoint(saved[0])["epoch"] in (0, 1)
    assert re.fullmatch(
        rf"training stopped by Ctrl-C; kept {re.escape(saved[0])}, the best model so far \(epoch {load_checkpoint(saved[0])['epoch']}, "
        rf"valid NDCG@10 \d\.\d{{4}}\); evaluate it with evaluate_checkpoint\('{re.escape(saved[0])}'\)",
        str(info.value),
    ), str(info.value)
    with pytest.raises(SystemExit) as exit_info, exit_on_usage_error():
        raise info.value
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 130 and lines == [f"interrupted: {info.value}"]
    assert evaluate_checkpoint(saved[0])  # the kept file is whole
    with pytest.raises(KeyboardInterrupt, match="training stopped by Ctrl-C; no checkpoint was kept"):
        run("T2Diff", "tiny", config_dict=settings, on_trainer=interrupt_at_epoch(0))


def test_ctrl_c_after_training_says_the_checkpoint_is_kept(tiny_path, workdir, monkeypatch):
    from recbole_t2diff import quick_start

    def interrupted(trainer):
        raise KeyboardInterrupt

    monkeypatch.setattr(quick_start, "load_best_model", interrupted)
    with pytest.raises(KeyboardInterrupt, match=r"^the test evaluation stopped by Ctrl-C; kept .*saved/T2Diff-.*\.pth, the best model so far \(epoch 0,"):
        run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 1})


# ---- x̂'s quality, measured after training -----------------------------------------------------------------------


@pytest.mark.parametrize("rel_error, warned", [(0.985, True), (1.02, True), (0.975, False), (1.03, False)])
def test_a_run_warns_when_the_diffusion_module_learned_to_copy_the_last_item(tiny_path, workdir, monkeypatch, rel_error, warned):
    import logging

    from recbole_t2diff.model.t2diff import T2Diff

    measured, warnings = [], []
    quality = T2Diff.xhat_quality
    monkeypatch.setattr(T2Diff, "xhat_quality", lambda self, loader: measured.append(quality(self, loader)) or {**measured[0], "xhat_rel_error": rel_error})
    monkeypatch.setattr(logging.Logger, "warning", lambda self, message, *args, **kwargs: warnings.append(message))
    result = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 1}, saved=False)
    assert 0 < measured[0]["xhat_rel_error"] and 0 <= measured[0]["xhat_hit@1"] <= measured[0]["xhat_hit@10"] <= 1
    assert result["xhat_quality"]["xhat_rel_error"] == rel_error
    assert any("learned to copy the last item" in w for w in warnings) == warned


def test_a_run_without_a_generated_item_reports_no_xhat_quality_and_never_warns(tiny_path, workdir):
    result = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 1, "x_hat_source": "copy_last"}, saved=False)
    assert result["xhat_quality"]["xhat_rel_error"] == 1.0  # the copy is the unit; a control is not warned about
    assert (
        run("SASRec", "tiny", config_dict={"data_path": tiny_path, "epochs": 1, "show_progress": False, "state": "WARNING"}, saved=False)["xhat_quality"]
        is None
    )

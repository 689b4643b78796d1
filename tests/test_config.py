"""Model registry, property-file loading and priorities, knob validation, the compat patches (anomaly mode, ensure_dir)."""
import re
import sys

import pytest
import torch

from recbole_t2diff.config import Config, get_model
from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.t2diff import T2Diff


def test_registry_resolves_our_model_and_builtins():
    assert get_model("T2Diff") is T2Diff
    assert get_model("SASRec").__name__ == "SASRec"
    assert get_model(T2Diff) is T2Diff


def test_anomaly_mode_is_off_after_any_model_lookup():
    """Importing RecBole's sequential models switches it on (sine.py): compat.install() imported them and switched it off."""
    assert "recbole.model.sequential_recommender.sine" in sys.modules
    get_model("GRU4Rec")
    get_model("SINE")
    assert not torch.is_anomaly_enabled()


def test_compat_install_is_idempotent():
    from recbole.utils import ensure_dir

    from recbole_t2diff import compat

    patched = ensure_dir.__code__
    compat.install()
    assert ensure_dir.__code__ is patched and not torch.is_anomaly_enabled()


@pytest.mark.parametrize("name,hint", [("sasrec", "did you mean --model=SASRec"), ("NoSuchModel", "RecBole built-in")])
def test_unknown_models_get_a_helpful_error(name, hint):
    with pytest.raises(UsageError, match=hint):
        get_model(name)


def test_package_properties_load_and_user_values_win():
    config = Config(model="T2Diff", dataset="ml-100k")
    assert config["session_len"] == 10 and config["n_steps"] == 50 and config["beta_schedule"] == "exp"
    assert config["valid_metric"] == "NDCG@10" and config["topk"] == [2, 10, 20]
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"} and config["eval_args"]["order"] == "TO"
    assert config["MAX_ITEM_LIST_LENGTH"] == 50 and config["train_neg_sample_args"]["distribution"] == "none"
    assert "rating" not in config["load_col"]["inter"]
    overridden = Config(model="T2Diff", dataset="ml-100k", config_dict={"session_len": 5, "topk": [10]})
    assert overridden["session_len"] == 5 and overridden["topk"] == [10]


def test_command_line_overrides_property_files(monkeypatch):
    config = Config(model="T2Diff", dataset="ml-100k", config_dict={"n_steps": 3}, argv=["--n_steps=7", "--learning_rate=0.01"])
    assert config["n_steps"] == 7 and config["learning_rate"] == 0.01


def test_the_config_reads_no_command_line_but_its_argv(monkeypatch):
    """A script hands its settings over as argv; the process's own command line (pytest's, here) is never read."""
    monkeypatch.setattr(sys, "argv", ["run_recbole.py", "--n_steps=7"])
    assert Config(model="T2Diff", dataset="ml-100k")["n_steps"] == 50
    assert Config(model="T2Diff", dataset="ml-100k", argv=None).cmd_config_dict == {}


def test_other_model_types_keep_recboles_defaults():
    config = Config(model="BPR", dataset="ml-100k")  # a general model trained with sampled negatives
    assert config["train_neg_sample_args"]["distribution"] == "uniform"
    assert "LS" not in config["eval_args"]["split"]


def test_builtin_models_get_the_same_protocol():
    config = Config(model="SASRec", dataset="ml-1m", config_dict={"data_path": "/nowhere"})
    assert config["valid_metric"] == "NDCG@10" and config["metrics"] == ["Recall", "MRR", "NDCG", "Hit"]
    assert config["hidden_size"] == 64  # RecBole's own SASRec.yaml still loads


@pytest.mark.parametrize(
    "knobs,message",
    [
        ({"session_len": 50}, "session_len=50: it must be smaller than MAX_ITEM_LIST_LENGTH=50"),
        ({"n_steps": 0}, "n_steps=0: it must be an integer >= 1"),
        ({"beta_schedule": "cosine"}, "unknown beta_schedule 'cosine'"),
        ({"beta_a": 0.5}, "outside (0, 1)"),
        ({"reverse_coef": "ddim"}, "reverse_coef=ddim"),
        ({"n_heads": 3}, "n_heads=3: it must divide embedding_size=64"),
        ({"unet_mult": [2, 4, 8, 16]}, "first factor must be 1"),
        ({"loss_type": "BPR"}, "BPR needs sampled negatives"),
        ({"loss_type": "NLL"}, "loss_type=NLL"),
        ({"softmax_negatives": 0}, "softmax_negatives=0"),
        ({"train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}}, "should be None when the loss_type is CE"),
        ({"n_steps": 2.5}, "n_steps=2.5"),
    ],
)
def test_invalid_knobs_fail_before_loading_data(knobs, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        Config(model="T2Diff", dataset="ml-100k", config_dict=knobs)


def test_float_knobs_from_a_search_are_accepted_as_integers(tiny_data):
    from conftest import make_model

    config = Config(model="T2Diff", dataset="ml-100k", config_dict={"n_steps": 20.0, "session_len": 5.0})
    T2Diff.check_config(config)  # hyperopt's quniform gives floats: accepted, not rejected
    model = make_model(tiny_data, n_steps=20.0, session_len=5.0)  # ... and used as the integers they stand for
    assert (model.n_steps, model.session_len) == (20, 5) and type(model.n_steps) is type(model.session_len) is int
    assert model.diffusion.alphas_cumprod.shape == (21,)  # one entry per step, plus index 0


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(UsageError, match="config file .* does not exist"):
        Config(model="T2Diff", dataset="ml-100k", config_file_list=[str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize(
    "knobs,message",
    [
        ({"sampler": "ddim", "infer_steps": 0}, "infer_steps=0"),
        ({"sampler": "ddim", "infer_steps": 60}, "infer_steps=60 with sampler=ddim: it must lie in 1..n_steps=50"),
        ({"sampler": "ddpm"}, "infer_steps=1 with sampler=ddpm: the ddpm chain always runs all n_steps=50; set infer_steps: ~"),
        ({"sampler": "euler"}, "sampler=euler"),
        ({"sampler": "ddim", "ddim_eta": 2}, "ddim_eta=2"),
    ],
)
def test_invalid_sampler_settings(knobs, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        Config(model="T2Diff", dataset="ml-100k", config_dict=knobs)


def test_recbole_ensure_dir_survives_a_folder_made_by_a_parallel_run(tmp_path, monkeypatch):
    import os

    from recbole.utils import ensure_dir  # the name RecBole's logger and trainer imported

    made = tmp_path / "log"
    made.mkdir()
    monkeypatch.setattr(os.path, "exists", lambda path: False)  # the other run created it after this one looked
    ensure_dir(str(made))  # RecBole's own version raises FileExistsError here
    ensure_dir(str(tmp_path / "log" / "T2Diff"))
    assert (tmp_path / "log" / "T2Diff").is_dir()


# ---- the keys and processes of RecBole's distributed mode (tests/test_distributed.py runs 2 real processes) ----

def test_distributed_settings_fill_recboles_keys():
    from recbole_t2diff.quick_start import distributed_settings

    assert distributed_settings(2) == {"nproc": 2, "world_size": 2, "ip": "localhost", "port": "5678", "offset": 0}
    assert distributed_settings(2, world_size=4, ip="10.0.0.1", port=29500, group_offset=2) == {
        "nproc": 2, "world_size": 4, "ip": "10.0.0.1", "port": "29500", "offset": 2}
    assert distributed_settings(3, world_size=1)["world_size"] == 1  # one machine's share of a larger group, as given
    assert distributed_settings(3, world_size=0)["world_size"] == 3  # unset: this machine's processes


def test_each_rank_gets_its_settings_and_only_global_rank_0_reports(monkeypatch, tmp_path):
    from recbole_t2diff import quick_start

    destroyed, calls = [], []
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: destroyed.append(True))

    class Results(list):
        put = list.append

    def function(config_dict, tag):
        calls.append((config_dict, tag))
        return f"result of {config_dict['local_rank']}"

    settings = {"nproc": 2, "offset": 0}
    for rank, offset, given in [(0, 0, {"epochs": 1}), (1, 0, None), (1, 1, None), (0, 2, None)]:
        results = Results()
        quick_start._rank_main(rank, function, {**settings, "offset": offset}, "config_dict",
                               {"config_dict": given, "tag": "x"}, results)
        assert calls[-1] == ({**(given or {}), **settings, "offset": offset, "local_rank": rank}, "x")
        assert results == (["result of 0"] if rank + offset == 0 else [])
    assert len(destroyed) == 4

    # spawn: every rank runs, rank 0's result comes back, and the shared folders exist first.
    monkeypatch.chdir(tmp_path)
    ranks = []

    def fake_spawn(target, args, nprocs, join):
        assert join is True, "spawn waits for every rank before reading rank 0's result"
        for rank in range(nprocs):
            ranks.append(rank)
            target(rank, *args)

    monkeypatch.setattr(quick_start.mp, "spawn", fake_spawn)
    contexts, get_context = [], quick_start.mp.get_context
    monkeypatch.setattr(quick_start.mp, "get_context", lambda method: contexts.append(method) or get_context(method))
    config = {"model": "T2Diff", "checkpoint_dir": str(tmp_path / "ckpt")}
    assert quick_start.spawn(function, 2, settings, config, "config_dict", config_dict=None, tag="y") == "result of 0"
    assert ranks == [0, 1] and (tmp_path / "log" / "T2Diff").is_dir() and (tmp_path / "ckpt").is_dir()
    assert contexts == ["spawn"]  # torch is not fork-safe once it has run
    assert quick_start.spawn(function, 2, {**settings, "offset": 2}, config, "config_dict", config_dict=None, tag="y") is None


def test_run_with_several_processes_hands_its_arguments_to_every_rank(monkeypatch, tmp_path):
    from recbole_t2diff import quick_start

    spawned, single, checked = [], [], []
    monkeypatch.setattr(quick_start, "spawn", lambda *args, **kwargs: spawned.append((args, kwargs)) or "rank 0")
    monkeypatch.setattr(quick_start, "_run", lambda *args: single.append(args) or "alone")
    monkeypatch.setattr(quick_start, "ensure_dataset", lambda config: checked.append(config["dataset"]))
    files, knobs = [str(tmp_path / "fixed.yaml")], {"n_steps": 3}
    (tmp_path / "fixed.yaml").write_text("epochs: 1\n")

    assert quick_start.run("T2Diff", "ml-100k", files, knobs, saved=False, verbose=False, nproc=2, world_size=4, ip="10.0.0.2",
                           port=29500, group_offset=2) == "rank 0"
    (function, nproc, settings, config, key), kwargs = spawned[-1]
    assert (function, nproc, key) == (quick_start._run, 2, "config_dict")
    assert settings == quick_start.distributed_settings(2, 4, "10.0.0.2", 29500, 2)
    assert (config["model"], config["dataset"], config["n_steps"], config["epochs"], config["world_size"]) == (
        "T2Diff", "ml-100k", 3, 1, 4)  # checked once here, with the distributed keys, before any process starts
    assert kwargs == {"model": "T2Diff", "dataset": "ml-100k", "config_file_list": files, "config_dict": knobs, "argv": None,
                      "saved": False, "verbose": False}
    assert checked == ["ml-100k"]

    quick_start.run("T2Diff", "ml-100k", nproc=2)
    assert spawned[-1][0][2] == {"nproc": 2, "world_size": 2, "ip": "localhost", "port": "5678", "offset": 0}
    quick_start.run("T2Diff", "ml-100k", world_size=2)  # one process here, one on another machine
    assert len(spawned) == 3 and single == []
    assert quick_start.run("T2Diff", "ml-100k", world_size=1) == "alone"
    assert single[-1] == ("T2Diff", "ml-100k", None, None, None, True, True, None)
    quick_start.run("T2Diff", "ml-100k", argv=["--epochs=1"], nproc=2)  # the command line reaches every rank
    (_, _, _, config, _), kwargs = spawned[-1]
    assert kwargs["argv"] == ["--epochs=1"] and config["epochs"] == 1

"""The Config (config.py): the model registry, the property files and their priorities, the yaml files it reads,
and the knobs it checks before any data is loaded."""

import re
import sys

import pytest

from recbole_t2diff.config import Config, get_model
from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.t2diff import T2Diff

from helpers import one_line_error


def test_registry_resolves_our_model_and_builtins():
    assert get_model("T2Diff") is T2Diff
    assert get_model("SASRec").__name__ == "SASRec"
    assert get_model(T2Diff) is T2Diff


@pytest.mark.parametrize("name,hint", [("sasrec", "did you mean --model=SASRec"), ("NoSuchModel", "RecBole built-in")])
def test_unknown_models_get_a_helpful_error(name, hint):
    with pytest.raises(UsageError, match=hint):
        get_model(name)


def test_a_model_name_that_is_a_path_is_an_unknown_model():
    one_line_error(Config, model="../x", dataset="ml-100k", match="unknown model '../x'")


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


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(UsageError, match="config file .* does not exist"):
        Config(model="T2Diff", dataset="ml-100k", config_file_list=[str(tmp_path / "missing.yaml")])


def test_a_yaml_syntax_error_gets_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: 3\nlearning_rate: [0.1\n")
    one_line_error(Config, model="T2Diff", dataset="ml-100k", config_file_list=[str(tmp_path / "bad.yaml")], match="bad.yaml' is not valid yaml at line 3")


@pytest.mark.parametrize("tagged", ["!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!python/tuple [1, 2]"])
def test_a_python_yaml_tag_gets_one_line(tmp_path, tagged):
    (tmp_path / "mine.yaml").write_text(f"epochs: 1\ntopk: {tagged}\n")
    one_line_error(
        Config,
        model="T2Diff",
        dataset="ml-100k",
        config_file_list=[str(tmp_path / "mine.yaml")],
        match=r"mine.yaml' line 2: the tag !!python/\S+ asks for a Python object.*drop the tag",
    )


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


def test_unknown_backend_is_rejected(tiny_path):
    with pytest.raises(UsageError, match="unknown dist_backend 'mpi'"):
        Config(
            model="T2Diff",
            dataset="tiny",
            config_dict={
                "data_path": tiny_path,
                "dist_backend": "mpi",
                "local_rank": 0,
                "nproc": 1,
                "world_size": 1,
                "ip": "localhost",
                "port": "1",
                "offset": 0,
            },
        )

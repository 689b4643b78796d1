"""Settings (settings.py): an unknown key, a value of the wrong kind, Python code in a setting string, a cache that
would be a pickle, a dataset name that is a path and a bad override of a checkpoint are each refused in one line, never
ignored or eval()ed."""

import re
import shutil

import pytest

import recbole_t2diff.properties as properties_module
from recbole_t2diff.config import Config
from recbole_t2diff.quick_start import evaluate_checkpoint, load_data_and_model, run
from recbole_t2diff.settings import known_keys

from helpers import CODE, TINY_MODEL, one_line_error


# ---- unknown keys: a misspelt key names the nearest known one ----------------------------------------------


@pytest.mark.parametrize(
    "typo,known", [("lamda_diff", "lambda_diff"), ("sesion_len", "session_len"), ("unet_level", "unet_levels"), ("learning_rte", "learning_rate")]
)
def test_a_misspelt_key_names_the_nearest_known_key(typo, known, monkeypatch, tmp_path):
    expected = f"unknown setting '{typo}'.*did you mean '{known}'"
    one_line_error(Config, model="T2Diff", dataset="ml-100k", config_dict={typo: 2}, match=expected)
    (tmp_path / "mine.yaml").write_text(f"{typo}: 2\n")
    one_line_error(Config, model="T2Diff", dataset="ml-100k", config_file_list=[str(tmp_path / "mine.yaml")], match=expected)
    one_line_error(Config, model="T2Diff", dataset="ml-100k", argv=[f"--{typo}=2"], match=expected)


def test_deliberate_extra_keys_pass_when_listed():
    config = Config(model="SASRec", dataset="ml-100k", config_dict={"my_flag": 3, "extra_keys": ["my_flag"]})
    assert config["my_flag"] == 3
    one_line_error(Config, model="SASRec", dataset="ml-100k", config_dict={"my_flag": 3}, match="extra_keys")


def test_a_knob_added_to_a_property_file_is_accepted_at_once(tmp_path, monkeypatch):
    properties = tmp_path / "properties"
    shutil.copytree(properties_module.properties_dir(), properties)
    with open(properties / "model" / "T2Diff.yaml", "a") as f:
        f.write("brand_new_knob: 1\n")
    (properties / "model" / "FutureModel.yaml").write_text("future_knob: 2\n")  # a model registered later
    monkeypatch.setattr(properties_module, "properties_dir", lambda: properties)
    known_keys.cache_clear()
    try:
        config = Config(model="T2Diff", dataset="ml-100k", config_dict={"brand_new_knob": 3, "future_knob": 4})
        assert config["brand_new_knob"] == 3 and config["future_knob"] == 4
    finally:
        known_keys.cache_clear()


# ---- values ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argument,message",
    [
        ("--learning_rate=-1", "learning_rate=-1: it must be a number > 0"),
        ("--learning_rate=abc", "learning_rate=abc: it must be a number"),
        ("--embedding_size=abc", "embedding_size=abc: it must be a number"),
        ("--train_batch_size=0", "train_batch_size=0: it must be a whole number >= 1"),
        ("--eval_batch_size=0", "eval_batch_size=0: it must be a whole number >= 1"),
        ("--epochs=0", "epochs=0: it must be a whole number >= 1"),
        ("--mask_diag=yes", "mask_diag=yes: it must be True or False"),
    ],
)
def test_bad_values_get_one_line(argument, message):
    one_line_error(Config, model="T2Diff", dataset="ml-100k", argv=[argument], match=re.escape(message))


@pytest.mark.parametrize("key,value", [("save_dataset", True), ("save_dataloaders", True), ("dataset_save_path", "x.pth")])
def test_settings_that_write_pickle_caches_are_rejected(key, value):
    one_line_error(Config, model="T2Diff", dataset="ml-100k", config_dict={key: value}, match=f"{key}=.* not supported")


@pytest.mark.parametrize("name", ["/etc", "../../../../etc/passwd", "../../../../../name", "a\\b", "..", ""])
def test_a_dataset_name_that_is_a_path_is_refused_before_anything_is_written(tmp_path, monkeypatch, name):
    workdir = tmp_path / "a" / "b" / "c"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    one_line_error(run, "T2Diff", name, config_dict=TINY_MODEL, match=f"dataset name {re.escape(repr(name))} is not a folder name")
    assert [str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")] == ["a", "a/b", "a/b/c"]


# ---- setting strings are literals: nothing eval()s them -------------------------------------------------------


@pytest.mark.parametrize("source", ["command line", "config_dict"])
def test_a_setting_string_runs_no_code(tmp_path, monkeypatch, source):
    marker = tmp_path / "marker"
    value = CODE.format(marker=marker)
    if source == "command line":
        kwargs = {"argv": [f"--learning_rate={value}"]}
    else:
        kwargs = {"config_dict": {"learning_rate": value}}
    one_line_error(
        Config,
        model="T2Diff",
        dataset="ml-100k",
        **kwargs,
        match=r"setting learning_rate=.* is Python code \(a function call\): settings are read as literals only",
    )
    assert not marker.exists()


@pytest.mark.parametrize(
    "text,value",
    [
        ("0.002", 0.002),
        ("[10,20]", [10, 20]),
        ("{'distribution':'uniform','sample_num':1}", {"distribution": "uniform", "sample_num": 1}),
        ("SASRec", "SASRec"),
        ("None", None),
        ("True", True),
        ("true", True),
        ("FALSE", False),
        ("none", "none"),
        ("~", "~"),
        ("0,1", (0, 1)),
        ("-1", -1),
        ("1e-3", 0.001),
        ("ml-1m", "ml-1m"),
        ("amazon-beauty", "amazon-beauty"),
        ("NDCG@10", "NDCG@10"),
        ("../shared/data", "../shared/data"),
        ("data/ml", "data/ml"),
        ("my.yaml", "my.yaml"),
        ("a b", "a b"),
        ("'2*3'", "2*3"),
        ("", ""),
    ],
)
def test_setting_strings_are_read_as_recbole_read_them(text, value):
    """What RecBole's eval() gave for literals and plain words (its NameError and SyntaxError kept the text)."""
    from recbole_t2diff.settings import parse_setting

    parsed = parse_setting("key", text, "on the command line")
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    "text,problem",
    [
        ("2*3", "arithmetic"),
        ("2019-12-31", "arithmetic"),
        ("[Recall,NDCG]", "unquoted words"),
        ("Recall,NDCG", "unquoted words"),
        ("{distribution:'uniform'}", "unquoted words"),
        ("os.environ['HOME']", r"Python code \(indexing\)"),
        ("lambda: 1", r"Python code \(a lambda\)"),
        ("[x for x in 'ab']", r"Python code \(a comprehension\)"),
        ("f'{1}'", r"Python code \(an f-string\)"),
        ("open('x')", r"Python code \(a function call\)"),
        ("1 if x else 2", "a conditional"),
        ("__builtins__", r"Python code \(the name __builtins__\)"),
        ("x.__class__", r"Python code \(the name __class__\)"),
    ],
)
def test_code_and_expressions_are_refused_not_kept_as_text(text, problem):
    """eval() computed or ran these (or kept a list with unquoted words as one string): refused in one line."""
    one_line_error(Config, model="T2Diff", dataset="ml-100k", argv=[f"--topk={text}"], match=rf"setting topk=.* \(on the command line\) is .*{problem}")


# ---- a checkpoint's overrides are settings too ----------------------------------------------------------------


def test_a_misspelt_override_of_a_checkpoint_is_refused(trained_t2diff, workdir):
    one_line_error(
        evaluate_checkpoint,
        trained_t2diff["saved_model_file"],
        "test",
        {"infer_step": 2},
        match=r"unknown setting 'infer_step' \(overrides\).*did you mean 'infer_steps'",
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"topk": [0]}, r"topk=\[0\]: it must be a whole number >= 1"),
        ({"topk": "[10,0]"}, "topk=.*it must be a whole number >= 1"),
        ({"eval_batch_size": 0}, "eval_batch_size=0: it must be a whole number >= 1"),
        ({"metrics": ["MAE"]}, r"metrics=\['MAE'\]: it must be a list of RecBole metric names of the kind .*\(ranking\)"),
        ({"sampler": "__import__('os')"}, r"sampler=.* \(in overrides\) is Python code"),
        ({"embedding_size": 32}, r"overrides \{'embedding_size': 32\} change the model's shape.*size mismatch"),
    ],
)
def test_a_bad_override_gets_one_line(trained_t2diff, workdir, overrides, message):
    one_line_error(evaluate_checkpoint, trained_t2diff["saved_model_file"], "test", overrides, match=message)


def test_an_override_of_the_right_kind_is_read_as_config_dict_reads_it(trained_t2diff, workdir):
    config = load_data_and_model(trained_t2diff["saved_model_file"], {"topk": "5", "eval_batch_size": 32.0})[0]
    assert config["topk"] == [5] and config["eval_batch_size"] == 32 and isinstance(config["eval_batch_size"], int)

"""Issue 14: no file runs code it was not meant to, no run overwrites another, no knob or data line is silently ignored."""
import enum
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import recbole_t2diff.checkpoint as checkpoint_module
import recbole_t2diff.properties as properties_module
from recbole_t2diff.checkpoint import load_checkpoint, save_checkpoint
from recbole_t2diff.config import Config
from recbole_t2diff.convert import convert_checkpoint
from recbole_t2diff.errors import UsageError
from recbole_t2diff.export import export_embeddings
from recbole_t2diff.model.t2diff import T2Diff
from recbole_t2diff.hyper import Search
from recbole_t2diff.quick_start import evaluate_checkpoint, load_data_and_model, prepare, run
from recbole_t2diff.settings import known_keys

from conftest import REPO, TINY_MODEL, RunsCommand, scratch_run, write_tiny_dataset

ENTRY_POINTS = {
    "load_data_and_model": load_data_and_model,
    "evaluate_checkpoint": evaluate_checkpoint,
    "export_embeddings": lambda path: export_embeddings(path, os.path.join(os.path.dirname(path), "export")),
}


def one_line_error(call, *args, match=None, **kwargs):
    """The call fails with a one-line UsageError (matching ``match``); returns the message."""
    with pytest.raises(UsageError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    if match is not None:
        assert re.search(match, message), message
    return message


def write_crafted(path, marker, form):
    if form == "torch-zip":
        torch.save({"config": RunsCommand(marker), "state_dict": {}}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(RunsCommand(marker), f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A T2Diff run on a private copy of the tiny dataset (tests below change copies of it, not this one)."""
    data = write_tiny_dataset(str(tmp_path_factory.mktemp("trust_data")))
    with scratch_run(tmp_path_factory.mktemp("trust_run")):
        result = run("T2Diff", "tiny", config_dict={"data_path": data, **TINY_MODEL})
    return {**result, "data_path": data}


def resealed(payload):
    """``payload`` with the SHA-256 of its settings recomputed, as the maker of a crafted file would do."""
    payload["settings_sha256"] = checkpoint_module.settings_digest(payload["config"])
    return payload


# --- 1. checkpoint loading never unpickles ---------------------------------------------------------

@pytest.mark.parametrize("form", ["torch-zip", "raw-pickle"])
def test_the_crafted_files_do_run_code_when_unpickled(tmp_path, form):
    """Control: the crafted files are live, so their marker staying absent below means something."""
    path, marker = tmp_path / "evil.pth", tmp_path / "marker"
    write_crafted(path, marker, form)
    torch.load(path, weights_only=False) if form == "torch-zip" else pickle.load(open(path, "rb"))
    assert marker.exists()


@pytest.mark.parametrize("form", ["torch-zip", "raw-pickle"])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_crafted_checkpoint_runs_no_code(tmp_path, workdir, form, entry):
    path, marker = tmp_path / "evil.pth", tmp_path / "marker"
    write_crafted(path, marker, form)
    one_line_error(ENTRY_POINTS[entry], str(path), match="not in the safe format.*--trust_checkpoint")
    assert not marker.exists()


def test_a_safe_format_file_cannot_smuggle_code_through_a_setting(trained, tmp_path, workdir):
    """RecBole's KD_DAGFM eval()s its ``teacher`` setting: a checkpoint may only name a class there."""
    payload = torch.load(trained["saved_model_file"], weights_only=True)
    marker = tmp_path / "marker"
    payload["config"]["model"] = payload["config"]["settings"]["model"] = "KD_DAGFM"
    payload["config"]["settings"]["teacher"] = f"__import__('os').system('touch {marker}')"
    torch.save(resealed(payload), tmp_path / "crafted.pth")
    one_line_error(evaluate_checkpoint, str(tmp_path / "crafted.pth"), match="teacher=.* is not a model class name")
    assert not marker.exists()


def test_converting_needs_an_explicit_opt_in(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "marker"
    write_crafted(path, marker, "torch-zip")
    one_line_error(convert_checkpoint, str(path), match="trust_checkpoint=True")
    assert not marker.exists()


@pytest.mark.parametrize("content", [{"state_dict": {}}, {"config": {}}, ["config", "state_dict"]], ids=["no config", "no state_dict", "a list"])
def test_converting_a_file_that_is_no_checkpoint_says_so(tmp_path, content):
    torch.save(content, tmp_path / "other.pth")
    one_line_error(convert_checkpoint, str(tmp_path / "other.pth"), trust_checkpoint=True, match="is not a RecBole checkpoint")


@pytest.mark.spawns
@pytest.mark.slow
def test_the_convert_command_needs_an_explicit_opt_in(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "marker"
    write_crafted(path, marker, "torch-zip")
    cli = subprocess.run([sys.executable, "-m", "recbole_t2diff.convert", str(path)], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    lines = [line for line in cli.stderr.splitlines() if line.strip()]
    assert cli.returncode == 1 and len(lines) == 1 and "--trust_checkpoint" in lines[0], cli.stderr
    assert not marker.exists()


def test_an_old_format_checkpoint_is_refused_then_converted_on_request(trained, tmp_path, workdir, monkeypatch):
    new = load_checkpoint(trained["saved_model_file"])
    old = tmp_path / "old.pth"  # as written before the safe format, here by rank 1 of a distributed run: the Config object pickled
    new["config"]["single_spec"], new["config"]["local_rank"] = False, 1
    torch.save({"config": new["config"], "state_dict": new["state_dict"], "other_parameter": {"scale": torch.tensor(3.0)}}, old)
    one_line_error(evaluate_checkpoint, str(old), match=f"convert it once: python -m recbole_t2diff.convert --trust_checkpoint {re.escape(str(old))}")
    received = []
    with monkeypatch.context() as patch:
        patch.setattr(T2Diff, "load_other_parameter", lambda self, other: received.append(other))
        converted = convert_checkpoint(str(old), trust_checkpoint=True)
    assert converted == str(tmp_path / "old-safe.pth") and [set(r) for r in received] == [{"scale"}] and float(received[0]["scale"]) == 3.0
    stored = load_checkpoint(converted)
    assert stored["converted_from"] == str(old) and (stored["config"]["single_spec"], stored["config"]["local_rank"]) == (True, 0)
    assert dict(evaluate_checkpoint(converted)) == dict(trained["test_result"])


def test_settings_are_stored_as_plain_data_and_come_back_as_they_were(tmp_path):
    from recbole.utils.enum_type import InputType, ModelType

    from recbole_t2diff.checkpoint import _plain, _restore

    settings = {"int": np.int64(3), "float": np.float32(0.5), "flag": np.bool_(True), "name": np.str_("x"), "pair": (1, 2.5, None),
                "type": ModelType.SEQUENTIAL, "device": torch.device("cpu"), "nested": {"inputs": [InputType.POINTWISE]},
                "tensor": torch.ones(2)}
    plain = _plain(settings, "settings")
    assert [type(plain[k]) for k in ("int", "float", "flag", "name", "pair")] == [int, float, bool, str, list]
    torch.save(plain, tmp_path / "plain.pth")
    restored = _restore(torch.load(tmp_path / "plain.pth", weights_only=True))  # plain data only: loads without unpickling code
    assert torch.equal(restored.pop("tensor"), torch.ones(2))
    assert restored == {"int": 3, "float": 0.5, "flag": True, "name": "x", "pair": [1, 2.5, None], "type": ModelType.SEQUENTIAL,
                        "device": torch.device("cpu"), "nested": {"inputs": [InputType.POINTWISE]}}
    for value in ({1: "a"}, object(), {"a": {2}}, [object()], enum.Enum("Colour", "RED").RED):  # RecBole's enums only
        one_line_error(_plain, value, "my_key", match="setting my_key=.* cannot be stored in a checkpoint")


def stored_and_model(trained):
    """The trained run's checkpoint as read back, and its model rebuilt: what save_checkpoint is called with."""
    return load_checkpoint(trained["saved_model_file"]), load_data_and_model(trained["saved_model_file"])[1]


def test_a_checkpoint_names_the_setting_it_cannot_store(trained, tmp_path, monkeypatch):
    stored, model = stored_and_model(trained)
    path = str(tmp_path / "new.pth")
    stored["config"]["my_setting"] = object()
    one_line_error(save_checkpoint, path, stored["config"], model, stored["data"], match="setting my_setting=")
    del stored["config"].final_config_dict["my_setting"]
    one_line_error(save_checkpoint, path, stored["config"], model, stored["data"], epoch=object(), match="setting epoch=")
    monkeypatch.setattr(model, "other_parameter", lambda: {"state": object()})
    one_line_error(save_checkpoint, path, stored["config"], model, stored["data"], match="setting other_parameter=")
    assert os.listdir(tmp_path) == []


def test_a_reloaded_config_is_the_stored_one_and_reads_nothing_else(trained, tmp_path):
    stored, model = stored_and_model(trained)
    path = str(tmp_path / "again.pth")
    save_checkpoint(path, stored["config"], model, stored["data"])  # written here, not by the shared fixture: under
    payload = torch.load(path, weights_only=True)                   # mutmut a fixture's calls count for its first test only
    assert (payload["config"]["model"], payload["config"]["dataset"]) == ("T2Diff", "tiny")
    config = load_checkpoint(path)["config"]
    assert (config.model, config.dataset, config.model_class) == ("T2Diff", "tiny", T2Diff)
    assert config.parameters == payload["config"]["parameters"] and config.parameters["Dataset"]  # RecBole's groups of keys
    assert "learning_rate" in str(config)  # RecBole's printout reads the groups
    assert config.file_config_dict == config.variable_config_dict == config.cmd_config_dict == {}  # no file or command line again


def test_the_temporary_file_is_written_beside_the_checkpoint(trained, tmp_path, monkeypatch):
    """os.replace is atomic only within one file system: the temporary file goes in the checkpoint's folder."""
    stored, model = stored_and_model(trained)
    written, save = [], torch.save
    monkeypatch.setattr(checkpoint_module.torch, "save", lambda payload, file: written.append(file) or save(payload, file))
    save_checkpoint(str(tmp_path / "sub" / "best.pth"), stored["config"], model, stored["data"])
    assert os.path.dirname(written[0]) == str(tmp_path / "sub") and os.listdir(tmp_path / "sub") == ["best.pth"]


@pytest.mark.parametrize("error,reason", [(EOFError(), "EOFError"), (RuntimeError("bad magic number\nsee the docs"), "bad magic number")])
def test_an_unreadable_file_is_named_with_the_first_line_of_the_reason(tmp_path, monkeypatch, error, reason):
    (tmp_path / "x.pth").write_bytes(b"PK")

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoint_module.torch, "load", fails)
    one_line_error(load_checkpoint, str(tmp_path / "x.pth"), match=f"damaged or not a checkpoint \\({reason}\\): use a .pth file")


def test_the_data_fingerprint_covers_every_table_and_sequence_field():
    import pandas as pd

    from recbole_t2diff.checkpoint import _column_arrays, data_identity

    plain = np.array([1.0, 2.0])
    assert [part is plain for part in _column_arrays(plain)] == [True]
    sequences = np.empty(3, dtype=object)
    sequences[:] = [np.array([4, 5]), np.array([6]), np.array([], dtype=np.int64)]
    lengths, flat = _column_arrays(sequences)
    assert lengths.tolist() == [2, 1, 0] and flat.tolist() == [4, 5, 6] and flat.dtype == np.int64
    mixed = np.empty(2, dtype=object)
    mixed[:] = [np.array(["a", None], dtype=object), "b"]  # object cells are hashed as their text
    assert _column_arrays(mixed)[1].tolist() == ["a", "None", "b"]
    empty = _column_arrays(np.array([], dtype=object))
    assert [part.shape for part in empty] == [(0,), (0,)]

    class Data:  # what data_identity reads of a RecBole dataset; item_feat None and no user_feat attribute at all
        field2id_token = {"item_id": np.array(["[PAD]", "a"])}

        def __init__(self, **tables):
            self.inter_feat, self.item_feat = pd.DataFrame({"item_id": [1]}), None
            self.__dict__.update(tables)

    base = data_identity(Data())
    assert base["tokens"] == {"item_id": ["[PAD]", "a"]}
    with_users = data_identity(Data(user_feat=pd.DataFrame({"age": [30]})))
    fingerprints = {base["fingerprint"], with_users["fingerprint"], data_identity(Data(user_feat=pd.DataFrame({"age": [31]})))["fingerprint"],
                    data_identity(Data(item_feat=pd.DataFrame({"genre": [2]})))["fingerprint"],
                    data_identity(Data(item_feat=pd.DataFrame({"genre": [3]})))["fingerprint"]}
    assert len(fingerprints) == 5


def test_data_that_lost_a_token_field_is_refused_by_name():
    from recbole_t2diff.checkpoint import check_data

    stored = {"tokens": {"genre": ["[PAD]", "drama"]}, "fingerprint": "f"}
    one_line_error(check_data, "x.pth", stored, {"tokens": {}, "fingerprint": "f"},
                   match="checkpoint 'x.pth' was trained on other data: field genre is missing")
    one_line_error(check_data, "x.pth", stored, {"tokens": {"genre": ["[PAD]"]}, "fingerprint": "f"},
                   match="field genre maps its ids to other tokens \\(2 ids at training, 1 now\\)")
    check_data("x.pth", stored, {"tokens": {"genre": ["[PAD]", "drama"], "new": ["[PAD]"]}, "fingerprint": "f"})


# --- 2. RecBole's pickle caches are never read -------------------------------------------------------

def test_a_dropped_cache_file_is_never_unpickled(tmp_path, workdir):
    data = write_tiny_dataset(str(tmp_path / "data"))
    marker = tmp_path / "marker"
    os.makedirs("saved")
    for name in ("tiny-SequentialDataset.pth", "tiny-for-T2Diff-dataloader.pth"):  # the files RecBole reads when present
        write_crafted(os.path.join("saved", name), marker, "raw-pickle")
    result = run("T2Diff", "tiny", config_dict={"data_path": data, **TINY_MODEL, "epochs": 1})
    assert result["test_result"] and not marker.exists()


@pytest.mark.parametrize("key,value", [("save_dataset", True), ("save_dataloaders", True), ("dataset_save_path", "x.pth")])
def test_settings_that_write_pickle_caches_are_rejected(key, value):
    one_line_error(Config, model="T2Diff", dataset="ml-100k", config_dict={key: value}, match=f"{key}=.* not supported")


# --- 3. checkpoint names are unique, writes atomic -------------------------------------------------

def test_runs_started_in_the_same_second_keep_their_own_checkpoints(tiny_path, workdir, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "get_local_time", lambda: "Nov-30-2026_12-00-00")  # one second for both
    first = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "seed": 1})
    second = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "seed": 2})
    assert first["saved_model_file"] != second["saved_model_file"]
    assert sorted(os.listdir("saved")) == sorted(os.path.basename(r["saved_model_file"]) for r in (first, second))
    assert dict(evaluate_checkpoint(first["saved_model_file"])) == dict(first["test_result"])
    assert dict(evaluate_checkpoint(second["saved_model_file"])) == dict(second["test_result"])


def test_a_failed_write_leaves_the_previous_checkpoint_whole(trained, tmp_path, monkeypatch):
    path = tmp_path / "best.pth"
    shutil.copy(trained["saved_model_file"], path)
    before = path.read_bytes()
    loaded = load_checkpoint(str(path))
    _, model, *_ = load_data_and_model(trained["saved_model_file"])

    def dies_half_way(payload, file):
        with open(file, "wb") as f:
            f.write(b"PK half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(path), loaded["config"], model, loaded["data"])
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["best.pth"]


# --- 4. a checkpoint is tied to its data and its weights are checked --------------------------------

def trained_on_own_copy(tmp_path):
    data = write_tiny_dataset(str(tmp_path / "data"))
    result = run("T2Diff", "tiny", config_dict={"data_path": data, **TINY_MODEL, "epochs": 1})
    return result["saved_model_file"], os.path.join(data, "tiny", "tiny.inter")


def test_reordered_or_changed_data_is_refused(tmp_path, workdir):
    model_file, inter = trained_on_own_copy(tmp_path)
    original = open(inter).read().splitlines()
    header, rows = original[0], original[1:]
    with open(inter, "w") as f:  # the same interactions, rows in another order: ids are re-mapped
        f.write("\n".join([header] + rows[::-1]) + "\n")
    one_line_error(evaluate_checkpoint, model_file,
                   match=f"checkpoint '{re.escape(model_file)}' was trained on other data: field item_id maps its ids to other tokens")
    one_line_error(export_embeddings, model_file, str(tmp_path / "export"), match="trained on other data")
    user, item, time = rows[-1].split("\t")
    with open(inter, "w") as f:  # same order, one timestamp moved (still the user's last)
        f.write("\n".join([header] + rows[:-1] + [f"{user}\t{item}\t{float(time) + 0.5}"]) + "\n")
    one_line_error(evaluate_checkpoint, model_file, match="the interactions differ")
    with open(inter, "w") as f:
        f.write("\n".join(original) + "\n")
    assert evaluate_checkpoint(model_file)  # the data it was trained on still evaluates


def test_damaged_weights_are_refused(trained, tmp_path):
    path = tmp_path / "damaged.pth"
    shutil.copy(trained["saved_model_file"], path)
    with zipfile.ZipFile(path) as archive:  # the largest tensor record, where a flipped bit goes unnoticed by the zip reader
        record = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda info: info.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = np.frombuffer(bytes(raw[record.header_offset + 26: record.header_offset + 30]), dtype="<u2")
    start = record.header_offset + 30 + int(name_length) + int(extra_length)
    raw[start + record.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    one_line_error(load_checkpoint, str(path), match="is damaged: its weights do not match the SHA-256")


@pytest.mark.parametrize("kind", ["truncated", "text", "state-dict only", "missing", "empty dict", "other dict", "list"])
def test_files_that_are_not_checkpoints_get_one_line(trained, tmp_path, kind):
    path = tmp_path / "x.pth"
    if kind == "truncated":
        blob = open(trained["saved_model_file"], "rb").read()
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "text":
        path.write_text("user_id:token\titem_id:token\n")
    elif kind == "state-dict only":
        torch.save(load_checkpoint(trained["saved_model_file"])["state_dict"], path)
    elif kind != "missing":
        torch.save({"empty dict": {}, "other dict": {"weights": torch.ones(1), "epoch": 3}, "list": [torch.ones(1)]}[kind], path)
    message = one_line_error(load_checkpoint, str(path))
    assert {"truncated": "damaged or not a checkpoint", "text": "damaged or not a checkpoint", "state-dict only": "holds only weights",
            "missing": "does not exist"}.get(kind, "is not a recbole_t2diff checkpoint (no 'recbole_t2diff checkpoint 1' format tag)") in message


# --- 5. exporting a built-in model ------------------------------------------------------------------

def test_a_builtin_model_exports(tiny_path, workdir, tmp_path):
    result = run("SASRec", "tiny", config_dict={"data_path": tiny_path, "hidden_size": 8, "inner_size": 16, "n_layers": 1,
                                                 "n_heads": 1, "epochs": 1, "show_progress": False, "state": "WARNING"})
    paths, items, users, targets = export_embeddings(result["saved_model_file"], str(tmp_path / "export"))
    _, model, *_ = load_data_and_model(result["saved_model_file"])
    np.testing.assert_array_equal(items, model.item_embedding.weight.detach().numpy())
    assert users.shape == (len(targets), 8) and len(json.load(open(paths["ids"]))["item_tokens"]) == len(items)


# --- 6. run_hyper checks its output path first ------------------------------------------------------

@pytest.mark.spawns
@pytest.mark.slow
def test_run_hyper_rejects_an_unwritable_output_file_before_any_trial(tmp_path):
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.001,0.01]\n")
    result = subprocess.run([sys.executable, os.path.join(REPO, "run_hyper.py"), "--params_file=space.hyper",
                             f"--output_file={tmp_path}/missing/dir/x"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO},
                            capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "missing/dir does not exist" in lines[0], result.stderr
    assert "trial" not in result.stdout


# --- 7. unknown keys ---------------------------------------------------------------------------------

@pytest.mark.parametrize("typo,known", [("lamda_diff", "lambda_diff"), ("sesion_len", "session_len"), ("unet_level", "unet_levels"),
                                        ("learning_rte", "learning_rate")])
def test_a_misspelt_key_names_the_nearest_known_key(typo, known, monkeypatch, tmp_path):
    expected = f"unknown setting '{typo}'.*did you mean '{known}'"
    one_line_error(Config, model="T2Diff", dataset="ml-100k", config_dict={typo: 2}, match=expected)
    (tmp_path / "mine.yaml").write_text(f"{typo}: 2\n")
    one_line_error(Config, model="T2Diff", dataset="ml-100k", config_file_list=[str(tmp_path / "mine.yaml")], match=expected)
    one_line_error(Config, model="T2Diff", dataset="ml-100k", argv=[f"--{typo}=2"], match=expected)


def test_a_misspelt_key_in_a_params_file_fails_before_any_trial(tmp_path):
    (tmp_path / "space.hyper").write_text("lamda_diff choice [0.1,1.0]\n")
    one_line_error(Search, "T2Diff", "ml-100k", str(tmp_path / "space.hyper"), argv=[], match="did you mean 'lambda_diff'")


def test_a_misspelt_override_of_a_checkpoint_is_refused(trained, workdir):
    one_line_error(evaluate_checkpoint, trained["saved_model_file"], "test", {"infer_step": 2},
                   match=r"unknown setting 'infer_step' \(overrides\).*did you mean 'infer_steps'")


def test_deliberate_extra_keys_pass_when_listed():
    config = Config(model="SASRec", dataset="ml-100k", config_dict={"my_flag": 3, "extra_keys": ["my_flag"]})
    assert config["my_flag"] == 3
    one_line_error(Config, model="SASRec", dataset="ml-100k", config_dict={"my_flag": 3}, match="extra_keys")


def test_recboles_own_keys_are_known_and_the_scripts_options_are_no_settings(monkeypatch):
    assert {"learning_rate", "eval_args", "encoding", "world_size", "hidden_size", "dist_backend"} <= known_keys()
    module = load_script("run_recbole.py")
    runs = []
    monkeypatch.setattr(module, "run", lambda *args, **kwargs: runs.append((args, kwargs)))
    module.main(["--config_files=", "--nproc=1", "--group_offset=0", "--encoding=utf-8"])
    (args, kwargs), = runs
    assert kwargs["argv"] == ["--encoding=utf-8"] and (kwargs["config_file_list"], kwargs["nproc"], kwargs["group_offset"]) == (None, 1, 0)
    assert Config(model="T2Diff", dataset="ml-100k", argv=kwargs["argv"])["encoding"] == "utf-8"


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


# --- 8. one line instead of a traceback ---------------------------------------------------------------

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


@pytest.mark.spawns
@pytest.mark.slow
def test_epochs_zero_leaves_no_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "run_recbole.py"), "--epochs=0"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "epochs=0" in lines[0], result.stderr
    assert not (tmp_path / "saved").exists()


def test_a_yaml_syntax_error_gets_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: 3\nlearning_rate: [0.1\n")
    one_line_error(Config, model="T2Diff", dataset="ml-100k", config_file_list=[str(tmp_path / "bad.yaml")],
                   match="bad.yaml' is not valid yaml at line 3")


HEADER = "user_id:token\titem_id:token\ttimestamp:float"


@pytest.mark.parametrize(
    "case,lines,message",
    [
        ("header only", [HEADER], "has a header but no interaction lines"),
        ("no timestamp column", ["user_id:token\titem_id:token"] + [f"{u}\t{i}" for u in range(1, 9) for i in range(1, 9)],
         "no loaded column 'timestamp'"),
        ("one interaction per user", [HEADER] + [f"{u}\t{u % 7 + 1}\t{u}" for u in range(1, 40)],
         "no user with the 4 interactions.*39 of 39 users have one interaction only"),
        ("non-numeric timestamps", [HEADER] + [f"{u}\t{i}\tday{i}" for u in range(1, 9) for i in range(1, 9)],
         "64 malformed line.*timestamp='day1' is not a valid value.*more than max_malformed_lines=10"),
    ],
)
def test_unusable_data_files_get_one_line(tmp_path, workdir, case, lines, message):
    os.makedirs(tmp_path / "data" / "bad")
    (tmp_path / "data" / "bad" / "bad.inter").write_text("\n".join(lines) + "\n")
    one_line_error(run, "T2Diff", "bad", config_dict={"data_path": str(tmp_path / "data"), **TINY_MODEL}, match=message)


# --- 9. malformed and duplicate data lines ------------------------------------------------------------

def tiny_with_extra_lines(tmp_path, extra):
    data = write_tiny_dataset(str(tmp_path / "data"))
    with open(os.path.join(data, "tiny", "tiny.inter"), "a") as f:
        f.write("\n".join(extra) + "\n")
    return data


def test_malformed_lines_are_dropped_and_reported_not_ingested(tmp_path, workdir, caplog):
    data = tiny_with_extra_lines(tmp_path, ["5\tBROKEN", "6\t7\t8\t9"])
    with caplog.at_level(logging.WARNING):
        dataset, *_ = prepare(Config(model="T2Diff", dataset="tiny", config_dict={"data_path": data, **TINY_MODEL}))
    assert "2 malformed line(s) (line " in caplog.text and "2 fields, the header has 3" in caplog.text
    assert "4 fields, the header has 3" in caplog.text
    clean, *_ = prepare(Config(model="T2Diff", dataset="tiny", config_dict={"data_path": write_tiny_dataset(str(tmp_path / "clean")), **TINY_MODEL}))
    assert len(dataset.inter_feat) == len(clean.inter_feat) and "BROKEN" not in dataset.field2id_token["item_id"]
    assert list(dataset.field2id_token["item_id"]) == list(clean.field2id_token["item_id"])
    one_line_error(prepare, Config(model="T2Diff", dataset="tiny", config_dict={"data_path": data, **TINY_MODEL, "max_malformed_lines": 1}),
                   match="2 malformed line.*more than max_malformed_lines=1")


def test_duplicate_lines_are_counted(tmp_path, workdir, caplog):
    first, second = open(os.path.join(write_tiny_dataset(str(tmp_path / "rows")), "tiny", "tiny.inter")).read().splitlines()[1:3]
    data = tiny_with_extra_lines(tmp_path, [first, second])
    with caplog.at_level(logging.WARNING):
        prepare(Config(model="T2Diff", dataset="tiny", config_dict={"data_path": data, **TINY_MODEL}))
    assert "2 duplicate interaction line(s)" in caplog.text


# === Issue 28: no setting string runs code, no mistyped flag is ignored, no bad input ends in a traceback ===

CODE = "__import__('os').system('touch {marker}') or 0.002"


def load_script(name):
    """run_recbole.py or run_hyper.py as a module, so that main() runs in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), os.path.join(REPO, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_error(module, argv, monkeypatch, capsys, code=1):
    """main() of a script module exits with ``code`` and one stderr line; returns that line."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        module.main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert info.value.code == code and len(lines) == 1, lines
    return lines[0]


# --- 10. setting strings are literals: nothing eval()s them ------------------------------------------

@pytest.mark.parametrize("source", ["command line", "config_dict"])
def test_a_setting_string_runs_no_code(tmp_path, monkeypatch, source):
    marker = tmp_path / "marker"
    value = CODE.format(marker=marker)
    if source == "command line":
        kwargs = {"argv": [f"--learning_rate={value}"]}
    else:
        kwargs = {"config_dict": {"learning_rate": value}}
    one_line_error(Config, model="T2Diff", dataset="ml-100k", **kwargs,
                   match=r"setting learning_rate=.* is Python code \(a function call\): settings are read as literals only")
    assert not marker.exists()


def test_a_params_file_choice_runs_no_code(tmp_path):
    """Each trial handed the option to RecBole's eval(): the file is refused before any trial."""
    marker = tmp_path / "marker"
    (tmp_path / "space.hyper").write_text(f'learning_rate choice ["{CODE.format(marker=marker)}"]\n')
    one_line_error(Search, "T2Diff", "ml-100k", str(tmp_path / "space.hyper"), argv=[],
                   match=r"learning_rate=.* \(a choice in .*space.hyper, line 1\) is Python code")
    assert not marker.exists()


@pytest.mark.parametrize(
    "text,value",
    [("0.002", 0.002), ("[10,20]", [10, 20]), ("{'distribution':'uniform','sample_num':1}", {"distribution": "uniform", "sample_num": 1}),
     ("SASRec", "SASRec"), ("None", None), ("True", True), ("true", True), ("FALSE", False), ("none", "none"), ("~", "~"),
     ("0,1", (0, 1)), ("-1", -1), ("1e-3", 0.001), ("ml-1m", "ml-1m"), ("amazon-beauty", "amazon-beauty"), ("NDCG@10", "NDCG@10"),
     ("../shared/data", "../shared/data"), ("data/ml", "data/ml"), ("my.yaml", "my.yaml"), ("a b", "a b"), ("'2*3'", "2*3"), ("", "")],
)
def test_setting_strings_are_read_as_recbole_read_them(text, value):
    """What RecBole's eval() gave for literals and plain words (its NameError and SyntaxError kept the text)."""
    from recbole_t2diff.settings import parse_setting

    parsed = parse_setting("key", text, "on the command line")
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    "text,problem",
    [("2*3", "arithmetic"), ("2019-12-31", "arithmetic"), ("[Recall,NDCG]", "unquoted words"), ("Recall,NDCG", "unquoted words"),
     ("{distribution:'uniform'}", "unquoted words"), ("os.environ['HOME']", r"Python code \(indexing\)"),
     ("lambda: 1", r"Python code \(a lambda\)"), ("[x for x in 'ab']", r"Python code \(a comprehension\)"),
     ("f'{1}'", r"Python code \(an f-string\)"), ("open('x')", r"Python code \(a function call\)"), ("1 if x else 2", "a conditional"),
     ("__builtins__", r"Python code \(the name __builtins__\)"), ("x.__class__", r"Python code \(the name __class__\)")],
)
def test_code_and_expressions_are_refused_not_kept_as_text(text, problem):
    """eval() computed or ran these (or kept a list with unquoted words as one string): refused in one line."""
    one_line_error(Config, model="T2Diff", dataset="ml-100k", argv=[f"--topk={text}"], match=rf"setting topk=.* \(on the command line\) is .*{problem}")


def test_a_scripts_own_option_may_look_like_code(monkeypatch, workdir):
    """argparse reads run_hyper.py's --output_file, not RecBole: a file name such as report(1).txt is no setting."""
    module = load_script("run_hyper.py")
    searches = []

    class Searched(Exception):
        pass

    def search(*args, **kwargs):
        searches.append(kwargs["argv"])
        raise Searched

    monkeypatch.setattr(module, "Search", search)
    with pytest.raises(Searched):
        module.main(["--output_file=report(1).txt", "--epochs=1"])
    assert searches == [["--epochs=1"]]
    assert Config(model="T2Diff", dataset="ml-100k", argv=searches[0])["epochs"] == 1


def test_a_key_given_twice_on_the_command_line_gets_one_line(monkeypatch, capsys):
    one_line_error(Config, model="T2Diff", dataset="ml-100k", argv=["--epochs=1", "--epochs=2"],
                   match="--epochs is given twice, as --epochs=1 and --epochs=2")
    module = load_script("run_recbole.py")  # ... and by the script, before anything starts
    monkeypatch.setattr(module, "run", lambda *a, **k: pytest.fail("run started"))
    line = script_error(module, ["run_recbole.py", "--epochs=1", "--epochs=2"], monkeypatch, capsys)
    assert line == "error: --epochs is given twice, as --epochs=1 and --epochs=2: give it once"


@pytest.mark.parametrize("script", ["run_recbole.py", "run_hyper.py"])
@pytest.mark.parametrize("arguments,name", [(["--model=SASRec", "--model=GRU4Rec"], "--model"), (["-m", "SASRec", "--model=GRU4Rec"], "--model"),
                                            (["--dataset=ml-100k", "--epochs=1", "--dataset", "ml-1m"], "--dataset")])
def test_a_scripts_own_option_given_twice_gets_one_line(script, arguments, name, monkeypatch, capsys):
    """argparse alone keeps the last of a repeated option without a word: the script refuses it before anything starts."""
    module = load_script(script)
    monkeypatch.setattr(module, "run" if script == "run_recbole.py" else "Search", lambda *a, **k: pytest.fail("started"))
    line = script_error(module, [script, *arguments], monkeypatch, capsys)
    assert line.startswith(f"error: {name} is given twice") and line.endswith("give it once")


# --- 11. a mistyped flag is refused, not logged and ignored -----------------------------------------

@pytest.mark.parametrize("script", ["run_recbole.py", "run_hyper.py"])
@pytest.mark.parametrize(
    "arguments,message",
    [(["--epochs", "1"], "'--epochs' has no value: .*use --epochs=1"),
     (["--train_batch_size", "256", "--epochs=2"], "use --train_batch_size=256"),
     (["--epochs"], "use --epochs=VALUE"),
     (["--eval_args={'a'=1}"], "has more than one '='"),
     (["epochs=1"], "unexpected argument 'epochs=1'")],
)
def test_an_argument_recbole_would_not_read_is_refused(script, arguments, message, monkeypatch, capsys, tmp_path):
    module = load_script(script)
    started = []
    monkeypatch.setattr(module, "run" if script == "run_recbole.py" else "Search", lambda *a, **k: started.append(a))
    line = script_error(module, [script, f"--output_file={tmp_path}/out", *arguments], monkeypatch, capsys)
    assert line.startswith("error: ") and re.search(message, line), line
    assert not started


def test_the_scripts_own_options_may_take_a_space(monkeypatch):
    module = load_script("run_recbole.py")
    started = []
    monkeypatch.setattr(module, "run", lambda *a, **k: started.append(a))
    monkeypatch.setattr(sys, "argv", ["run_recbole.py", "--dataset", "tiny", "--model", "SASRec", "--epochs=1"])
    module.main()
    assert started == [("SASRec", "tiny")]


# --- 12. one line, not a traceback ---------------------------------------------------------------------

@pytest.mark.parametrize("tagged", ["!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!python/tuple [1, 2]"])
def test_a_python_yaml_tag_gets_one_line(tmp_path, tagged):
    (tmp_path / "mine.yaml").write_text(f"epochs: 1\ntopk: {tagged}\n")
    one_line_error(Config, model="T2Diff", dataset="ml-100k", config_file_list=[str(tmp_path / "mine.yaml")],
                   match=r"mine.yaml' line 2: the tag !!python/\S+ asks for a Python object.*drop the tag")


@pytest.mark.parametrize("name", ["/etc", "../../../../etc/passwd", "../../../../../name", "a\\b", "..", ""])
def test_a_dataset_name_that_is_a_path_is_refused_before_anything_is_written(tmp_path, monkeypatch, name):
    workdir = tmp_path / "a" / "b" / "c"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    one_line_error(run, "T2Diff", name, config_dict=TINY_MODEL, match=f"dataset name {re.escape(repr(name))} is not a folder name")
    assert [str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")] == ["a", "a/b", "a/b/c"]


def test_a_model_name_that_is_a_path_is_an_unknown_model():
    one_line_error(Config, model="../x", dataset="ml-100k", match="unknown model '../x'")


@pytest.mark.parametrize(
    "overrides,message",
    [({"topk": [0]}, r"topk=\[0\]: it must be a whole number >= 1"), ({"topk": "[10,0]"}, "topk=.*it must be a whole number >= 1"),
     ({"eval_batch_size": 0}, "eval_batch_size=0: it must be a whole number >= 1"),
     ({"metrics": ["MAE"]}, r"metrics=\['MAE'\]: it must be a list of RecBole metric names of the kind .*\(ranking\)"),
     ({"sampler": "__import__('os')"}, r"sampler=.* \(in overrides\) is Python code"),
     ({"embedding_size": 32}, r"overrides \{'embedding_size': 32\} change the model's shape.*size mismatch")],
)
def test_a_bad_override_gets_one_line(trained, workdir, overrides, message):
    one_line_error(evaluate_checkpoint, trained["saved_model_file"], "test", overrides, match=message)


def test_an_override_of_the_right_kind_is_read_as_config_dict_reads_it(trained, workdir):
    config = load_data_and_model(trained["saved_model_file"], {"topk": "5", "eval_batch_size": 32.0})[0]
    assert config["topk"] == [5] and config["eval_batch_size"] == 32 and isinstance(config["eval_batch_size"], int)


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
    assert re.fullmatch(rf"training stopped by Ctrl-C; kept {re.escape(saved[0])}, the best model so far \(epoch {load_checkpoint(saved[0])['epoch']}, "
                        rf"valid NDCG@10 \d\.\d{{4}}\); evaluate it with evaluate_checkpoint\('{re.escape(saved[0])}'\)", str(info.value)), str(info.value)
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


def test_converting_a_file_already_in_the_safe_format_says_so(trained, tmp_path, capsys):
    from recbole_t2diff.convert import main

    one_line_error(convert_checkpoint, trained["saved_model_file"], trust_checkpoint=True, match="is already in the safe format.*nothing to convert")
    with pytest.raises(SystemExit) as info:
        main(["--trust_checkpoint", trained["saved_model_file"]])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert info.value.code == 1 and len(lines) == 1 and "already in the safe format" in lines[0], lines


# --- 13. the checkpoint's checksum covers its settings ---------------------------------------------------

def test_an_edited_setting_is_refused(trained, tmp_path, workdir):
    payload = torch.load(trained["saved_model_file"], weights_only=True)
    assert payload["config"]["settings"]["session_len"] == 4
    payload["config"]["settings"]["session_len"] = 3  # weights untouched: they fit, the metrics differ
    torch.save(payload, tmp_path / "edited.pth")
    one_line_error(evaluate_checkpoint, str(tmp_path / "edited.pth"), match="is damaged or edited: its settings do not match the SHA-256")


def test_the_settings_checksum_covers_every_setting_but_where_the_process_runs(trained):
    from recbole_t2diff.checkpoint import UNCHECKED_SETTINGS, settings_digest

    plain = torch.load(trained["saved_model_file"], weights_only=True)["config"]
    before = settings_digest(plain)
    assert before == torch.load(trained["saved_model_file"], weights_only=True)["settings_sha256"]
    for key in sorted(plain["settings"]):
        edited = {**plain, "settings": {**plain["settings"], key: [plain["settings"][key]]}}
        assert (settings_digest(edited) == before) == (key in UNCHECKED_SETTINGS), key
    assert UNCHECKED_SETTINGS <= known_keys() and {"session_len", "seed", "n_steps", "MAX_ITEM_LIST_LENGTH"} <= set(plain["settings"]) - UNCHECKED_SETTINGS
    for part in ("model", "dataset"):
        assert settings_digest({**plain, part: "other"}) != before


def test_a_checkpoint_without_a_settings_checksum_is_refused_then_upgraded_without_unpickling(trained, tmp_path, workdir, monkeypatch):
    payload = torch.load(trained["saved_model_file"], weights_only=True)
    del payload["settings_sha256"]  # as written before settings were checksummed
    old = tmp_path / "old.pth"
    torch.save(payload, old)
    one_line_error(evaluate_checkpoint, str(old), match=f"has no SHA-256 of its settings.*python -m recbole_t2diff.convert {re.escape(str(old))}")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(checkpoint_module.torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    upgraded = convert_checkpoint(str(old))  # no trust needed: nothing is unpickled
    assert upgraded == str(tmp_path / "old-safe.pth") and loads == [True]
    assert dict(evaluate_checkpoint(upgraded)) == dict(trained["test_result"])


# --- 14. misleading messages ---------------------------------------------------------------------------

def test_random_bytes_are_called_no_checkpoint_not_an_old_one(tmp_path):
    import random

    for seed in range(25):
        (tmp_path / "x.pth").write_bytes(random.Random(seed).randbytes(4000))
        message = one_line_error(load_checkpoint, str(tmp_path / "x.pth"), match="is damaged or not a checkpoint")
        assert "trust_checkpoint" not in message and "Weights only" not in message, message


@pytest.mark.parametrize("setting,value,message", [("save_dataloaders", True, "save_dataloaders=True is not supported"),
                                                    ("dataset", "../escape", "dataset name '../escape' is not a folder name")])
def test_a_crafted_checkpoint_setting_writes_nothing(trained, tmp_path, workdir, setting, value, message):
    payload = torch.load(trained["saved_model_file"], weights_only=True)
    if setting == "dataset":
        payload["config"]["dataset"] = value
    payload["config"]["settings"][setting] = value
    torch.save(resealed(payload), tmp_path / "crafted.pth")
    one_line_error(evaluate_checkpoint, str(tmp_path / "crafted.pth"), match=message)
    assert not os.path.exists(workdir / "saved") and not os.path.exists(workdir / "log")


# --- 15. every run has its own log file and tensorboard folder --------------------------------------------

def test_two_runs_in_one_folder_and_second_log_to_their_own_files(tiny_path, workdir, monkeypatch):
    from recbole.utils import logger as recbole_logger
    from recbole.utils import utils as recbole_utils

    from recbole_t2diff import compat

    for module in (recbole_utils, recbole_logger, checkpoint_module):  # one second for both (each imported it by name)
        monkeypatch.setattr(module, "get_local_time", lambda: "Dec-06-2026_12-00-00")
    monkeypatch.setattr(logging.root, "handlers", [])  # as in a script: pytest's capture handlers would keep RecBole from writing a file
    try:
        for seed in (1, 2):
            run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 1, "state": "INFO", "seed": seed})
    finally:
        for handler in compat._RUN_HANDLERS:
            handler.close()
        compat._RUN_HANDLERS.clear()
    logs = sorted(os.listdir(workdir / "log" / "T2Diff"))
    assert len(logs) == 2 and all(name.startswith("T2Diff-tiny-Dec-06-2026_12-00-00-") for name in logs), logs
    texts = [(workdir / "log" / "T2Diff" / name).read_text() for name in logs]
    assert sorted(("seed = 1" in text, "seed = 2" in text) for text in texts) == [(False, True), (True, False)]
    assert sorted(os.listdir(workdir / "log_tensorboard")) == [os.path.splitext(name)[0] for name in logs]


def test_without_a_log_file_tensorboard_folders_are_still_unique(monkeypatch, workdir):
    from recbole.utils import utils as recbole_utils

    from recbole_t2diff.compat import get_tensorboard

    monkeypatch.setattr(recbole_utils, "get_local_time", lambda: "Dec-06-2026_12-00-00")
    writers = [get_tensorboard(logging.getLogger()) for _ in range(2)]
    for writer in writers:
        writer.close()
    assert len(set(os.listdir(workdir / "log_tensorboard"))) == 2

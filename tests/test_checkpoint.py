"""Checkpoints (checkpoint.py): loading one runs no code, a file is tied to its data, its weights and its settings,
names are unique and writes atomic, and a file that is no checkpoint gets one line."""

import enum
import os
import pickle
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch

import recbole_t2diff.checkpoint as checkpoint_module
from recbole_t2diff.checkpoint import load_checkpoint, save_checkpoint
from recbole_t2diff.export import export_embeddings
from recbole_t2diff.model.t2diff import T2Diff
from recbole_t2diff.quick_start import evaluate_checkpoint, load_data_and_model, run
from recbole_t2diff.settings import known_keys

from helpers import TINY_MODEL, one_line_error, scratch_run, write_crafted, write_tiny_dataset


ENTRY_POINTS = {
    "load_data_and_model": load_data_and_model,
    "evaluate_checkpoint": evaluate_checkpoint,
    "export_embeddings": lambda path: export_embeddings(path, os.path.join(os.path.dirname(path), "export")),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A T2Diff run on its own copy of the tiny dataset: these tests tie a checkpoint to its data, so no other test's data reaches it."""
    data = write_tiny_dataset(str(tmp_path_factory.mktemp("checkpoint_data")))
    with scratch_run(tmp_path_factory.mktemp("checkpoint_run")):
        result = run("T2Diff", "tiny", config_dict={"data_path": data, **TINY_MODEL})
    return {**result, "data_path": data}


def resealed(payload):
    """``payload`` with the SHA-256 of its settings recomputed, as the maker of a crafted file would do."""
    payload["settings_sha256"] = checkpoint_module.settings_digest(payload["config"])
    return payload


# ---- loading never unpickles: a crafted file runs no code, settings are stored as plain data -------------


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


@pytest.mark.parametrize(
    "setting,value,message",
    [("save_dataloaders", True, "save_dataloaders=True is not supported"), ("dataset", "../escape", "dataset name '../escape' is not a folder name")],
)
def test_a_crafted_checkpoint_setting_writes_nothing(trained, tmp_path, workdir, setting, value, message):
    payload = torch.load(trained["saved_model_file"], weights_only=True)
    if setting == "dataset":
        payload["config"]["dataset"] = value
    payload["config"]["settings"][setting] = value
    torch.save(resealed(payload), tmp_path / "crafted.pth")
    one_line_error(evaluate_checkpoint, str(tmp_path / "crafted.pth"), match=message)
    assert not os.path.exists(workdir / "saved") and not os.path.exists(workdir / "log")


def test_settings_are_stored_as_plain_data_and_come_back_as_they_were(tmp_path):
    from recbole.utils.enum_type import InputType, ModelType

    from recbole_t2diff.checkpoint import _plain, _restore

    settings = {
        "int": np.int64(3),
        "float": np.float32(0.5),
        "flag": np.bool_(True),
        "name": np.str_("x"),
        "pair": (1, 2.5, None),
        "type": ModelType.SEQUENTIAL,
        "device": torch.device("cpu"),
        "nested": {"inputs": [InputType.POINTWISE]},
        "tensor": torch.ones(2),
    }
    plain = _plain(settings, "settings")
    assert [type(plain[k]) for k in ("int", "float", "flag", "name", "pair")] == [int, float, bool, str, list]
    torch.save(plain, tmp_path / "plain.pth")
    restored = _restore(torch.load(tmp_path / "plain.pth", weights_only=True))  # plain data only: loads without unpickling code
    assert torch.equal(restored.pop("tensor"), torch.ones(2))
    assert restored == {
        "int": 3,
        "float": 0.5,
        "flag": True,
        "name": "x",
        "pair": [1, 2.5, None],
        "type": ModelType.SEQUENTIAL,
        "device": torch.device("cpu"),
        "nested": {"inputs": [InputType.POINTWISE]},
    }
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
    payload = torch.load(path, weights_only=True)  # mutmut a fixture's calls count for its first test only
    assert (payload["config"]["model"], payload["config"]["dataset"]) == ("T2Diff", "tiny")
    config = load_checkpoint(path)["config"]
    assert (config.model, config.dataset, config.model_class) == ("T2Diff", "tiny", T2Diff)
    assert config.parameters == payload["config"]["parameters"] and config.parameters["Dataset"]  # RecBole's groups of keys
    assert "learning_rate" in str(config)  # RecBole's printout reads the groups
    assert config.file_config_dict == config.variable_config_dict == config.cmd_config_dict == {}  # no file or command line again


# ---- a file that is no checkpoint, or a damaged one, gets one line -----------------------------------------


@pytest.mark.parametrize("error,reason", [(EOFError(), "EOFError"), (RuntimeError("bad magic number\nsee the docs"), "bad magic number")])
def test_an_unreadable_file_is_named_with_the_first_line_of_the_reason(tmp_path, monkeypatch, error, reason):
    (tmp_path / "x.pth").write_bytes(b"PK")

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoint_module.torch, "load", fails)
    one_line_error(load_checkpoint, str(tmp_path / "x.pth"), match=f"damaged or not a checkpoint \\({reason}\\): use a .pth file")


def test_random_bytes_are_called_no_checkpoint_not_an_old_one(tmp_path):
    import random

    for seed in range(25):
        (tmp_path / "x.pth").write_bytes(random.Random(seed).randbytes(4000))
        message = one_line_error(load_checkpoint, str(tmp_path / "x.pth"), match="is damaged or not a checkpoint")
        assert "trust_checkpoint" not in message and "Weights only" not in message, message


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
    assert {
        "truncated": "damaged or not a checkpoint",
        "text": "damaged or not a checkpoint",
        "state-dict only": "holds only weights",
        "missing": "does not exist",
    }.get(kind, "is not a recbole_t2diff checkpoint (no 'recbole_t2diff checkpoint 1' format tag)") in message


def test_damaged_weights_are_refused(trained, tmp_path):
    path = tmp_path / "damaged.pth"
    shutil.copy(trained["saved_model_file"], path)
    with zipfile.ZipFile(path) as archive:  # the largest tensor record, where a flipped bit goes unnoticed by the zip reader
        record = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda info: info.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = np.frombuffer(bytes(raw[record.header_offset + 26 : record.header_offset + 30]), dtype="<u2")
    start = record.header_offset + 30 + int(name_length) + int(extra_length)
    raw[start + record.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    one_line_error(load_checkpoint, str(path), match="is damaged: its weights do not match the SHA-256")


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


# ---- unique names and atomic writes: no run overwrites another's checkpoint or leaves half a file ---------


def test_runs_started_in_the_same_second_keep_their_own_checkpoints(tiny_path, workdir, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "get_local_time", lambda: "Nov-30-2026_12-00-00")  # one second for both
    first = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "seed": 1})
    second = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "seed": 2})
    assert first["saved_model_file"] != second["saved_model_file"]
    assert sorted(os.listdir("saved")) == sorted(os.path.basename(r["saved_model_file"]) for r in (first, second))
    assert dict(evaluate_checkpoint(first["saved_model_file"])) == dict(first["test_result"])
    assert dict(evaluate_checkpoint(second["saved_model_file"])) == dict(second["test_result"])


def test_the_temporary_file_is_written_beside_the_checkpoint(trained, tmp_path, monkeypatch):
    """os.replace is atomic only within one file system: the temporary file goes in the checkpoint's folder."""
    stored, model = stored_and_model(trained)
    written, save = [], torch.save
    monkeypatch.setattr(checkpoint_module.torch, "save", lambda payload, file: written.append(file) or save(payload, file))
    save_checkpoint(str(tmp_path / "sub" / "best.pth"), stored["config"], model, stored["data"])
    assert os.path.dirname(written[0]) == str(tmp_path / "sub") and os.listdir(tmp_path / "sub") == ["best.pth"]


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


# ---- a checkpoint is tied to its data ------------------------------------------------------------------------


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
    fingerprints = {
        base["fingerprint"],
        with_users["fingerprint"],
        data_identity(Data(user_feat=pd.DataFrame({"age": [31]})))["fingerprint"],
        data_identity(Data(item_feat=pd.DataFrame({"genre": [2]})))["fingerprint"],
        data_identity(Data(item_feat=pd.DataFrame({"genre": [3]})))["fingerprint"],
    }
    assert len(fingerprints) == 5


def test_data_that_lost_a_token_field_is_refused_by_name():
    from recbole_t2diff.checkpoint import check_data

    stored = {"tokens": {"genre": ["[PAD]", "drama"]}, "fingerprint": "f"}
    one_line_error(
        check_data, "x.pth", stored, {"tokens": {}, "fingerprint": "f"}, match="checkpoint 'x.pth' was trained on other data: field genre is missing"
    )
    one_line_error(
        check_data,
        "x.pth",
        stored,
        {"tokens": {"genre": ["[PAD]"]}, "fingerprint": "f"},
        match="field genre maps its ids to other tokens \\(2 ids at training, 1 now\\)",
    )
    check_data("x.pth", stored, {"tokens": {"genre": ["[PAD]", "drama"], "new": ["[PAD]"]}, "fingerprint": "f"})


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
    one_line_error(
        evaluate_checkpoint, model_file, match=f"checkpoint '{re.escape(model_file)}' was trained on other data: field item_id maps its ids to other tokens"
    )
    one_line_error(export_embeddings, model_file, str(tmp_path / "export"), match="trained on other data")
    user, item, time = rows[-1].split("\t")
    with open(inter, "w") as f:  # same order, one timestamp moved (still the user's last)
        f.write("\n".join([header] + rows[:-1] + [f"{user}\t{item}\t{float(time) + 0.5}"]) + "\n")
    one_line_error(evaluate_checkpoint, model_file, match="the interactions differ")
    with open(inter, "w") as f:
        f.write("\n".join(original) + "\n")
    assert evaluate_checkpoint(model_file)  # the data it was trained on still evaluates

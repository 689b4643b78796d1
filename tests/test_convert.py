"""Converting old checkpoints (convert.py): a pickled file only on an explicit opt-in, an unsigned one without
unpickling, and one line for a file with nothing to convert."""

import re

import pytest
import torch

import recbole_t2diff.checkpoint as checkpoint_module
from recbole_t2diff.checkpoint import load_checkpoint
from recbole_t2diff.convert import convert_checkpoint
from recbole_t2diff.model.t2diff import T2Diff
from recbole_t2diff.quick_start import evaluate_checkpoint

from helpers import one_line_error, run_python, write_crafted


def test_converting_needs_an_explicit_opt_in(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "marker"
    write_crafted(path, marker, "torch-zip")
    one_line_error(convert_checkpoint, str(path), match="trust_checkpoint=True")
    assert not marker.exists()


@pytest.mark.spawns
@pytest.mark.slow
def test_the_convert_command_needs_an_explicit_opt_in(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "marker"
    write_crafted(path, marker, "torch-zip")
    cli, lines = run_python(["-m", "recbole_t2diff.convert", str(path)], tmp_path)
    assert cli.returncode == 1 and len(lines) == 1 and "--trust_checkpoint" in lines[0], cli.stderr
    assert not marker.exists()


@pytest.mark.parametrize("content", [{"state_dict": {}}, {"config": {}}, ["config", "state_dict"]], ids=["no config", "no state_dict", "a list"])
def test_converting_a_file_that_is_no_checkpoint_says_so(tmp_path, content):
    torch.save(content, tmp_path / "other.pth")
    one_line_error(convert_checkpoint, str(tmp_path / "other.pth"), trust_checkpoint=True, match="is not a RecBole checkpoint")


def test_converting_a_file_already_in_the_safe_format_says_so(trained_t2diff, tmp_path, capsys):
    from recbole_t2diff.convert import main

    one_line_error(convert_checkpoint, trained_t2diff["saved_model_file"], trust_checkpoint=True, match="is already in the safe format.*nothing to convert")
    with pytest.raises(SystemExit) as info:
        main(["--trust_checkpoint", trained_t2diff["saved_model_file"]])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert info.value.code == 1 and len(lines) == 1 and "already in the safe format" in lines[0], lines


def test_an_old_format_checkpoint_is_refused_then_converted_on_request(trained_t2diff, tmp_path, workdir, monkeypatch):
    new = load_checkpoint(trained_t2diff["saved_model_file"])
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
    assert dict(evaluate_checkpoint(converted)) == dict(trained_t2diff["test_result"])


def test_a_checkpoint_without_a_settings_checksum_is_refused_then_upgraded_without_unpickling(trained_t2diff, tmp_path, workdir, monkeypatch):
    payload = torch.load(trained_t2diff["saved_model_file"], weights_only=True)
    del payload["settings_sha256"]  # as written before settings were checksummed
    old = tmp_path / "old.pth"
    torch.save(payload, old)
    one_line_error(evaluate_checkpoint, str(old), match=f"has no SHA-256 of its settings.*python -m recbole_t2diff.convert {re.escape(str(old))}")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(checkpoint_module.torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    upgraded = convert_checkpoint(str(old))  # no trust needed: nothing is unpickled
    assert upgraded == str(tmp_path / "old-safe.pth") and loads == [True]
    assert dict(evaluate_checkpoint(upgraded)) == dict(trained_t2diff["test_result"])

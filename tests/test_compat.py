"""RecBole's patches (compat.py): anomaly mode off, a folder made by a parallel run, a log file and a tensorboard
folder per run, RecBole's invalid escape sequences and its calls of deprecated APIs silenced."""

import logging
import os
import subprocess
import sys

import pytest
import torch

import recbole_t2diff.checkpoint as checkpoint_module
from recbole_t2diff.config import get_model
from recbole_t2diff.quick_start import run

from helpers import REPO, TINY_MODEL


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


def test_recbole_ensure_dir_survives_a_folder_made_by_a_parallel_run(tmp_path, monkeypatch):
    import os

    from recbole.utils import ensure_dir  # the name RecBole's logger and trainer imported

    made = tmp_path / "log"
    made.mkdir()
    monkeypatch.setattr(os.path, "exists", lambda path: False)  # the other run created it after this one looked
    ensure_dir(str(made))  # RecBole's own version raises FileExistsError here
    ensure_dir(str(tmp_path / "log" / "T2Diff"))
    assert (tmp_path / "log" / "T2Diff").is_dir()


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


@pytest.mark.spawns
@pytest.mark.slow
def test_recboles_invalid_escape_sequences_print_nothing():
    """Python 3.12+ warns about the ``\\p`` in RecBole's dien.py whenever it compiles it (every run
    where bytecode is not cached): the compat shim silences it, so one-line errors stay one line."""
    probe = "import recbole_t2diff, recbole.model.sequential_recommender.dien as dien\ncompile(open(dien.__file__).read(), dien.__file__, 'exec')\n"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "SyntaxWarning" not in done.stderr, done.stderr


def test_recboles_calls_of_deprecated_apis_warn_nothing(tiny_path, workdir):
    """RecBole's chained ``fillna(inplace=True)`` (pandas >= 2.2) and its ``torch.cuda.amp.GradScaler`` (torch >= 2.4)
    printed three FutureWarnings in every run: compat silences those two, from RecBole's calls only."""
    import warnings

    import pandas as pd

    from recbole_t2diff import compat

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # shown however often they came before in this process
        compat.silence_recboles_warnings()
        run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 1, "seed": 1})
        frame = pd.DataFrame({"a": [1.0, None]})
        frame["a"].fillna(value=0.0, inplace=True)  # the same call from outside RecBole still warns
    from_recbole = [f"{w.filename}: {w.message}" for w in caught if "recbole" in w.filename and "recbole_t2diff" not in w.filename]
    assert from_recbole == []
    if tuple(int(part) for part in pd.__version__.split(".")[:2]) >= (2, 2):  # the pandas that warns about the call at all
        assert any("A value is trying to be set on a copy" in str(w.message) for w in caught)

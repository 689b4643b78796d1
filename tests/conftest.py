"""Fixtures and hooks: a tiny generated dataset in RecBole's atomic format, the data and trained runs shared by the test
files, the `slow` marker on every test that spawns a process. Plain helpers are in helpers.py."""

import functools
import importlib.util
import json
import os

import pytest

from recbole_t2diff.quick_start import prepare, run

from helpers import TINY_MODEL, TINY_SPARCODE, scratch_run, tiny_config, write_tiny_dataset


def pytest_configure(config):
    """hypothesis, faiss and matplotlib come with the test extra, ray with the ray extra, and every one is
    needed (property tests, ANN retrieval, benchmark plots, Ray Tune searches): name what is missing
    instead of failing mid-collection."""
    missing = [name for name in ("hypothesis", "faiss", "matplotlib", "ray") if importlib.util.find_spec(name) is None]
    if missing:
        raise pytest.UsageError(f'the tests need {", ".join(missing)} from the test and ray extras: the README\'s install with ".[test,ray]"')


@functools.lru_cache(maxsize=None)
def _mutmut_durations():
    try:
        with open("mutmut-stats.json") as f:  # mutmut runs the tests from its mutants/ folder
            return json.load(f)["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return {}


def pytest_collection_modifyitems(config, items):
    """A test that spawns a script is slow too (`pytest -m "not slow"`). Under mutmut (scripts/mutation.sh),
    fastest tests first: a mutant's run stops at its first failing test, so the cheap checks (e.g.
    test_knobs) should come before whole training runs."""
    for item in items:
        if item.get_closest_marker("spawns"):
            item.add_marker(pytest.mark.slow)
    if os.environ.get("MUTANT_UNDER_TEST"):
        durations = _mutmut_durations()
        items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("data")))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a scratch folder: RecBole writes log/, saved/ and log_tensorboard/ into the cwd."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_data(tiny_path, tmp_path_factory):
    """(config, train, valid, test) for the tiny dataset with the genre feature loaded."""
    with scratch_run(tmp_path_factory.mktemp("run")):
        config = tiny_config(tiny_path, load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "genre"]})
        _, train, valid, test = prepare(config)
    return config, train, valid, test


@pytest.fixture(scope="session")
def sparcode_data(tiny_path, tmp_path_factory):
    """(config, train, valid, test) for SparCode's tiny preset on the tiny dataset."""
    with scratch_run(tmp_path_factory.mktemp("sparcode")):
        config = tiny_config(tiny_path, model="SparCode", **TINY_SPARCODE)
        _, train, valid, test = prepare(config)
    return config, train, valid, test


@pytest.fixture(scope="session")
def trained_t2diff(tiny_path, tmp_path_factory):
    """One T2Diff run of TINY_MODEL on the tiny data (run's result: checkpoint, metrics), shared by every test that only
    reads it; a test that changes its checkpoint works on a copy, and one that changes its data trains its own."""
    with scratch_run(tmp_path_factory.mktemp("t2diff_run")):
        return run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL})

"""Shared fixtures: a tiny generated dataset in RecBole's atomic format and configs that train in seconds."""
import contextlib
import functools
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

from recbole_t2diff.config import Config
from recbole_t2diff.quick_start import build_model, prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough to train in a second, large enough to have users shorter than the session and
# users whose history overflows MAX_ITEM_LIST_LENGTH.
TINY_MODEL = {
    "embedding_size": 8,
    "n_steps": 4,
    "unet_levels": 2,
    "session_ffn_hidden": [8],
    "MAX_ITEM_LIST_LENGTH": 12,
    "session_len": 4,
    "epochs": 2,
    "train_batch_size": 64,
    "eval_batch_size": 64,
    "show_progress": False,
    "state": "WARNING",
}


def write_tiny_dataset(folder, name="tiny", n_users=40, n_items=30, seed=0):
    """Users walk through items mostly in order (next = previous + 1), so sequences carry signal."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    rows = []
    for user in range(1, n_users + 1):
        length = int(rng.integers(4, 30))
        item = int(rng.integers(1, n_items + 1))
        for t in range(length):
            rows.append(f"{user}\t{item}\t{t}")
            item = item % n_items + 1 if rng.random() < 0.8 else int(rng.integers(1, n_items + 1))
    with open(os.path.join(folder, name, f"{name}.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
    genres = ["a", "b", "c", "d"]
    with open(os.path.join(folder, name, f"{name}.item"), "w") as f:
        f.write("item_id:token\tgenre:token_seq\n")
        for item in range(1, n_items + 1):
            f.write(f"{item}\t{' '.join(genres[: 1 + item % 3])}\n")
    return folder


def pytest_configure(config):
    """hypothesis, faiss and matplotlib come with the test extra, ray with the ray extra, and every one is
    needed (property tests, ANN retrieval, benchmark plots, Ray Tune searches): name what is missing
    instead of failing mid-collection."""
    missing = [name for name in ("hypothesis", "faiss", "matplotlib", "ray") if importlib.util.find_spec(name) is None]
    if missing:
        raise pytest.UsageError(f"the tests need {', '.join(missing)} from the test and ray extras: the README's install with \".[test,ray]\"")


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
    test_knob_bounds) should come before whole training runs."""
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


def tiny_config(tiny_path, model="T2Diff", **overrides):
    return Config(model=model, dataset="tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, **overrides})


@contextlib.contextmanager
def scratch_run(folder):
    """For fixtures wider than a test: run RecBole in ``folder`` (it writes log/, saved/ and log_tensorboard/ into the cwd)."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="session")
def tiny_data(tiny_path, tmp_path_factory):
    """(config, train, valid, test) for the tiny dataset with the genre feature loaded."""
    with scratch_run(tmp_path_factory.mktemp("run")):
        config = tiny_config(tiny_path, load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "genre"]})
        _, train, valid, test = prepare(config)
    return config, train, valid, test


def make_model(tiny_data, **overrides):
    """A fresh T2Diff on the tiny data, with knobs overridden on a copy of the config."""
    config, train, _, _ = tiny_data
    saved = {key: config[key] for key in overrides}
    try:
        for key, value in overrides.items():
            config[key] = value
        torch.manual_seed(0)
        return build_model(config, train)
    finally:
        for key, value in saved.items():
            config[key] = value


def random_ranking_ndcg(n_items, k=10):
    """Expected NDCG@k of a uniformly random full ranking of ``n_items`` items with one relevant item:
    the floor a trained model on the tiny data must clear (it is ~0.15 for its 30 items)."""
    return sum(1 / math.log2(rank + 1) for rank in range(1, k + 1)) / n_items


def first_batch(loader):
    batch = next(iter(loader))
    return batch[0] if isinstance(batch, tuple) else batch


class RunsCommand:
    """Unpickling this object runs ``touch <marker>``: the shape of a malicious checkpoint or cache."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))

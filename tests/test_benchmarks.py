"""Benchmark helpers: the synthetic data generator and the model/variant syntax."""
import os
import sys

import numpy as np

from recbole_t2diff.config import Config
from recbole_t2diff.quick_start import prepare

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from make_synthetic import generate, write  # noqa: E402
from run_benchmark import parse_variant  # noqa: E402


def test_generator_writes_atomic_files_recbole_loads(tmp_path, workdir):
    users, items, positions = generate(items=500, users=60, per_user=20, seed=3)
    assert users.min() == 1 and users.max() == 60 and items.min() >= 1 and items.max() <= 500
    for user in (1, 30, 60):  # each user's positions count 0, 1, 2, ...
        assert np.array_equal(positions[users == user], np.arange((users == user).sum()))
    write(str(tmp_path), "synth", users, items, positions)
    config = Config(model="SASRec", dataset="synth", config_dict={"data_path": str(tmp_path), "state": "WARNING"})
    dataset, train, valid, test = prepare(config)
    # RecBole turns each user's n interactions into n - 1 next-item samples; it adds a padding user id.
    assert dataset.inter_num == len(users) - 60 and dataset.user_num == 61
    assert len(test.dataset) == 60  # leave-one-out: one test sequence per user


def test_generator_is_seeded():
    a, b = generate(100, 10, 10, seed=1), generate(100, 10, 10, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], generate(100, 10, 10, seed=2)[1])


def test_variant_syntax():
    assert parse_variant("SASRec") == ("SASRec", {})
    assert parse_variant("T2Diff-noDP") == ("T2Diff", {"use_drift": False})
    assert parse_variant("T2Diff[lambda_diff=0.1,beta_schedule=log,use_drift=false]") == (
        "T2Diff", {"lambda_diff": 0.1, "beta_schedule": "log", "use_drift": False})

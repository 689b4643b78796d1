"""Benchmark helpers: the synthetic data generator, the model/variant syntax and the runner."""
import csv
import os
import subprocess
import sys
import time

import numpy as np

from recbole_t2diff.config import Config
from recbole_t2diff.quick_start import prepare

from conftest import REPO, TINY_MODEL

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from make_synthetic import generate, write  # noqa: E402
from run_benchmark import parse_variant, stop_when_budget_spent  # noqa: E402


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


def test_time_budget_stops_before_an_epoch_that_would_overrun(monkeypatch):
    import recbole.trainer.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "early_stopping", lambda *args, **kwargs: (0.5, 0, False, True))
    stop_when_budget_spent(minutes=0.5 / 60)  # 0.5 s: two 0.2 s epochs fit, a third would not
    verdicts = []
    for _ in range(2):
        time.sleep(0.2)
        verdicts.append(trainer_module.early_stopping(0.5, 0.4, 0, max_step=10))
    # The first epoch continues; the second stops while still recorded as an improvement.
    assert verdicts == [(0.5, 0, False, True), (0.5, 0, True, True)]


def test_runner_writes_csv_table_and_margin(tmp_path, tiny_path):
    settings = [f"--{k}={v}" for k, v in TINY_MODEL.items() if k not in ("epochs", "state", "show_progress")]
    command = [sys.executable, os.path.join(REPO, "benchmarks", "run_benchmark.py"), "--models=T2Diff,GRU4Rec",
               "--dataset=tiny", "--seeds=1,2", "--jobs=2", "--time_budget=0.0001", "--epochs=4",
               f"--data_path={tiny_path}", f"--out={tmp_path}", *settings]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "tiny.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["variant"], r["seed"]) for r in rows) == [("GRU4Rec", "1"), ("GRU4Rec", "2"), ("T2Diff", "1"), ("T2Diff", "2")]
    assert all(r["epochs_run"] == "1" for r in rows)  # the budget, not --epochs=4, ended every run
    table = (tmp_path / "tiny.md").read_text()
    assert "T2Diff vs the best built-in (GRU4Rec): NDCG@10" in table and "at most 0.0001 min" in table
    assert (tmp_path / "tiny.png").stat().st_size > 0
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.stdout.count("already in") == 4  # resumable: finished runs are not repeated


def test_xhat_diagnosis_chain_row_is_the_normal_evaluation(tiny_path, workdir):
    from recbole_t2diff.quick_start import evaluate_checkpoint, run
    from xhat_diagnosis import diagnose

    result = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL})
    dataset, records = diagnose(result["saved_model_file"], [1, 4, 99])
    assert dataset == "tiny" and [r["x_hat"] for r in records] == ["chain", "removed", "teacher s=1", "teacher s=4"]
    valid = evaluate_checkpoint(result["saved_model_file"], "valid")
    assert records[0]["valid_ndcg@10"] == float(valid["ndcg@10"])
    assert all(r["last_row_rel_error"] > 0 for r in records[2:])

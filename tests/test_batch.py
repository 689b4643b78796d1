"""benchmarks.batch: priorities, search then seeds, resume, abort, stop and --check, with fake workers.

No model trains here: ``Study.command`` is replaced by a tiny python process that logs its start,
prints an ``EPOCH`` line and a ``RESULT`` row whose scores the test sets (or exits 1, or sleeps).
"""

import csv
import json
import os
import sys
import threading
import time

import pytest

from benchmarks import batch
from benchmarks.run_benchmark import Study
from benchmarks.variants import parse_variant
from benchmarks.worker import COLUMNS

FAKE_WORKER = r"""
import json, sys, time
log, spec, settings, variant, seed = sys.argv[1:]
with open(log, "a") as f:
    f.write(f"{variant} {seed}\n")
me = json.load(open(spec)).get(variant, {})
print("EPOCH " + json.dumps({"epoch": 1, "valid": 0.125, "best": 0.125, "best_epoch": 1, "train_s": 0.0, "run_s": 0.0}), flush=True)
time.sleep(me.get("sleep", 0))
if me.get("fail"):
    sys.exit("fake failure of " + variant)
row = {**dict.fromkeys(COLUMNS, 1), "xhat_rel_error": "", "xhat_hit@1": "", "xhat_hit@10": "", "knobs": ""}
row.update({"variant": variant, "seed": int(seed), "settings": settings, "valid_ndcg@10": me.get("valid", 0.1),
            "test_ndcg@10": me.get("test", 0.1), "valid_curve": "[0.1]", "machine": "fake", "date": "2024-01-01",
            "run_s": me.get("run_s", 1)})
print("RESULT " + json.dumps(row), flush=True)
"""


class Fake:
    """The fake workers of one test: ``spec`` sets each variant's scores/failure/sleep, ``started`` lists the runs begun."""

    def __init__(self, folder):
        self.folder, self.log, self.spec_path = folder, str(folder / "started.log"), str(folder / "spec.json")
        self.script = folder / "fake_worker.py"
        self.script.write_text(f"COLUMNS = {COLUMNS!r}\n" + FAKE_WORKER)
        self.set({})

    def set(self, spec):
        with open(self.spec_path, "w") as f:
            json.dump(spec, f)

    def command(self, study, variant, seed):
        settings = json.dumps(parse_variant(variant)[1], sort_keys=True)  # as the real worker records them
        return [sys.executable, "-S", str(self.script), self.log, self.spec_path, settings, variant, str(seed)]

    def started(self):
        if not os.path.isfile(self.log):
            return []
        with open(self.log) as f:
            return [tuple(line.rsplit(" ", 1)) for line in f.read().splitlines()]

    def plan(self, *lines, name="plan.txt"):
        path = self.folder / name
        path.write_text("# a comment line\n" + "\n".join(lines) + "\n")
        return str(path)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    fake = Fake(tmp_path)
    monkeypatch.setattr(Study, "command", lambda study, variant, seed: fake.command(study, variant, seed))
    return fake


def run_batch(plan, jobs=1, **kwargs):
    """A Batch over PLAN, run in this process by ``jobs`` worker threads until nothing is left to start."""
    b = batch.Batch(batch.read_plan(plan), jobs, **kwargs)
    threads = [threading.Thread(target=b.work, args=(dict(os.environ),)) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return b


def rows(path):
    with open(path, newline="") as f:
        return [(r["variant"], int(r["seed"])) for r in csv.DictReader(f)]


SEARCHED = "--models=T2Diff,SASRec,T2Diff-noDiff --dataset=fake --seeds=1,2 --search=learning_rate=0.001,0.003 --out={out}"
SCORES = {  # T2Diff: 0.001 has the best test but 0.003 the best valid; SASRec prefers 0.001
    "T2Diff[learning_rate=0.001]": {"valid": 0.30, "test": 0.50},
    "T2Diff[learning_rate=0.003]": {"valid": 0.40, "test": 0.20},
    "SASRec[learning_rate=0.001]": {"valid": 0.35, "test": 0.30},
    "SASRec[learning_rate=0.003]": {"valid": 0.25, "test": 0.40},
}
TRIALS = [
    ("T2Diff[learning_rate=0.001]", "1"),
    ("T2Diff[learning_rate=0.003]", "1"),
    ("SASRec[learning_rate=0.001]", "1"),
    ("SASRec[learning_rate=0.003]", "1"),
]
SEEDS = [
    ("T2Diff[learning_rate=0.003]", "2"),
    ("SASRec[learning_rate=0.001]", "2"),
    ("T2Diff-noDiff[learning_rate=0.003]", "1"),
    ("T2Diff-noDiff[learning_rate=0.003]", "2"),
]


def test_plan_order_search_before_seeds_and_choice_on_validation(fake, tmp_path):
    """One worker: study 1's search runs, then the seeds of its choices (best valid, not best test; the
    ablation at T2Diff's point, not SASRec's), then study 2, although study 2 was ready first."""
    fake.set(SCORES)
    plan = fake.plan(SEARCHED.format(out=tmp_path / "a"), f"--models=GRU4Rec --dataset=fake --seeds=1 --out={tmp_path / 'b'}")
    b = run_batch(plan)
    assert fake.started() == TRIALS + SEEDS + [("GRU4Rec", "1")]
    assert b.searches[0]["chosen"] == {
        "T2Diff": "T2Diff[learning_rate=0.003]",
        "SASRec": "SASRec[learning_rate=0.001]",
        "T2Diff-noDiff": "T2Diff-noDiff[learning_rate=0.003]",
    }
    assert sorted(rows(tmp_path / "a" / "fake.csv")) == sorted((v, int(s)) for v, s in TRIALS + SEEDS)
    assert rows(tmp_path / "b" / "fake.csv") == [("GRU4Rec", 1)]
    assert b.finished == 9 and not b.failed and b.left() == 0


@pytest.mark.slow
def test_seeds_wait_for_every_search_run_of_the_study(fake, tmp_path):
    """Two workers and a slow search run: no seed run starts before that last search run has ended."""
    fake.set({**SCORES, "SASRec[learning_rate=0.003]": {**SCORES["SASRec[learning_rate=0.003]"], "sleep": 1.5}})
    b = run_batch(fake.plan(SEARCHED.format(out=tmp_path / "a")), jobs=2)
    started = fake.started()
    assert sorted(started[:4]) == sorted(TRIALS) and sorted(started[4:]) == sorted(SEEDS)
    finished = rows(tmp_path / "a" / "fake.csv")
    assert finished.index(("SASRec[learning_rate=0.003]", 1)) == 3  # the slow trial ended before any seed run
    assert b.finished == 8


def test_a_second_batch_over_the_same_csvs_runs_nothing_and_a_finished_search_releases_its_seeds(fake, tmp_path):
    fake.set(SCORES)
    plan = fake.plan(SEARCHED.format(out=tmp_path / "a"), f"--models=GRU4Rec --dataset=fake --seeds=1 --out={tmp_path / 'b'}")
    run_batch(plan)
    os.remove(fake.log)
    again = run_batch(plan)
    assert fake.started() == [] and again.finished == 0 and again.left() == 0
    # Only the search's rows kept: the seeds of its choices are ready at once, nothing else runs.
    path = tmp_path / "a" / "fake.csv"
    with open(path, newline="") as f:
        kept = [r for r in csv.DictReader(f) if (r["variant"], r["seed"]) in TRIALS]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
    third = run_batch(plan)
    assert fake.started() == SEEDS and third.finished == 4


def test_abort_when_the_first_k_runs_to_end_all_failed(fake, tmp_path):
    """Two workers: F1 fails, the slow S runs on, F2 fails: that is 2 first failures, S is killed (stopped,
    not failed) and OK never starts."""
    fake.set({"GRU4Rec": {"fail": True}, "SASRec": {"sleep": 30}, "NARM": {"fail": True}})
    plan = fake.plan(f"--models=GRU4Rec,SASRec,NARM,Caser --dataset=fake --seeds=1 --out={tmp_path}")
    begun = time.time()
    b = run_batch(plan, jobs=2, abort_if_first_fail=2)
    assert time.time() - begun < 20  # S did not sleep its 30 s
    assert sorted(fake.started()) == [("GRU4Rec", "1"), ("NARM", "1"), ("SASRec", "1")]
    assert b.failed == ["fake GRU4Rec seed 1", "fake NARM seed 1"] and b.stopped == ["fake SASRec seed 1"]
    assert not os.path.isfile(tmp_path / "fake.csv") and b.left() == 1  # Caser, never started


def test_no_abort_once_a_run_has_finished(fake, tmp_path):
    fake.set({"SASRec": {"fail": True}, "NARM": {"fail": True}})
    plan = fake.plan(f"--models=GRU4Rec,SASRec,NARM,Caser --dataset=fake --seeds=1 --out={tmp_path}")
    b = run_batch(plan, abort_if_first_fail=2)
    assert [v for v, _ in fake.started()] == ["GRU4Rec", "SASRec", "NARM", "Caser"]
    assert len(b.failed) == 2 and b.finished == 2 and not b.stopped


@pytest.mark.slow
def test_stop_after_stops_runs_unfinished_and_records_only_the_finished(fake, tmp_path, monkeypatch, capsys):
    fake.set({"SASRec": {"sleep": 30}})
    plan = fake.plan(f"--models=GRU4Rec,SASRec --dataset=fake --seeds=1 --out={tmp_path}")
    argv = [plan, "--jobs=2", "--stop_after=0.01"]
    begun = time.time()
    with pytest.raises(SystemExit, match=r"0 run\(s\) failed \(\) and 1 did not finish"):
        batch.main(argv)
    assert time.time() - begun < 20
    out = capsys.readouterr().out
    assert "fake SASRec seed 1 stopped unfinished (not recorded)" in out and "failed:" not in out
    assert "1 runs finished, 0 failed, 1 stopped unfinished" in out
    # The workers' EPOCH lines are progress lines, the stopped run's too (it printed one before it slept).
    assert "[batch]   fake GRU4Rec seed 1 epoch 1: valid NDCG@10 0.1250 (best 0.1250 at 1), 0 s/epoch training, 0 min into the run" in out
    assert "[batch]   fake SASRec seed 1 epoch 1: valid NDCG@10 0.1250" in out
    assert rows(tmp_path / "fake.csv") == [("GRU4Rec", 1)] and (tmp_path / "fake.md").is_file()


@pytest.mark.slow
def test_stop_after_also_stops_a_run_that_was_starting_when_the_others_were_stopped(fake, tmp_path, monkeypatch, capsys):
    """A run taken before the stop whose process starts after it (here: 2 s later) is stopped too, not
    waited for (it would hold a lease of a fixed length past its end)."""
    real, launched = batch.run_worker, []

    def slow_to_start(command, *args, **kwargs):
        time.sleep(2)
        launched.append(command[-2])  # the variant; the fake's own log may be killed before it writes
        return real(command, *args, **kwargs)

    monkeypatch.setattr(batch, "run_worker", slow_to_start)
    fake.set({"SASRec": {"sleep": 30}})
    argv = [fake.plan(f"--models=SASRec --dataset=fake --seeds=1 --out={tmp_path}"), "--jobs=1", "--stop_after=0.01"]
    begun = time.time()
    with pytest.raises(SystemExit, match="1 did not finish"):
        batch.main(argv)
    assert time.time() - begun < 20 and launched == ["SASRec"]
    assert "stopped unfinished" in capsys.readouterr().out


@pytest.mark.parametrize(
    "line, knob",
    [
        ("--models=SASRec,T2Diff[bogus_knob=1] --dataset=ml-100k --seeds=1", "bogus_knob"),
        ("--models=T2Diff,T2Diff-noDiff --dataset=ml-100k --seeds=1 --search=learning_rate=0.001,0.003 --unet_levls=2", "unet_levls"),
    ],
)
def test_check_names_a_misspelt_knob_before_any_run(fake, tmp_path, monkeypatch, capsys, line, knob):
    plan = fake.plan("--models=SASRec --dataset=ml-100k --seeds=1 --learning_rate=0.002", f"{line} --out={tmp_path}")
    argv = [plan, "--check"]
    with pytest.raises(SystemExit) as exit:
        batch.main(argv)
    error = capsys.readouterr().err
    assert exit.value.code == 1 and error.startswith("error: ") and knob in error and error.count("\n") == 1  # one line
    assert fake.started() == [] and not os.path.isfile(tmp_path / "ml-100k.csv")


def test_check_passes_a_good_plan(fake, tmp_path, monkeypatch, capsys):
    plan = fake.plan(
        f"--models=SASRec,T2Diff,T2Diff-noDiff --dataset=ml-100k --seeds=1,2 --search=learning_rate=0.001,0.003 --unet_levels=2 --out={tmp_path}",
        f"--models=GRU4Rec --dataset=ml-100k --seeds=1 --out={tmp_path}",
    )
    argv = [plan, "--check"]
    batch.main(argv)
    # 4 search points + the 3 variants themselves, then GRU4Rec; no run started.
    assert "[batch] 8 configs of 2 studies checked" in capsys.readouterr().out and fake.started() == []


def test_several_plans_run_as_one_pool_in_the_order_given(fake, tmp_path, capsys):
    first = fake.plan(f"--models=GRU4Rec --dataset=fake --seeds=1 --out={tmp_path}", name="first.plan")
    second = fake.plan(f"--models=SASRec,NARM --dataset=fake --seeds=1 --out={tmp_path}", name="second.plan")
    batch.main([second, first, "--jobs=1"])
    assert fake.started() == [("SASRec", "1"), ("NARM", "1"), ("GRU4Rec", "1")]
    assert rows(tmp_path / "fake.csv") == [("SASRec", 1), ("NARM", 1), ("GRU4Rec", 1)]


def test_the_estimate_counts_a_resumed_runs_whole_time(fake, tmp_path, capsys):
    """A run resumed by this batch took its row's run_s (every start together), not the seconds since this batch began it:
    the time left is estimated from that, else a restart of the batch would make every run look minutes long."""
    fake.set({"GRU4Rec": {"run_s": 600.0}, "SASRec": {"run_s": 1200.0}})
    run_batch(fake.plan(f"--models=GRU4Rec,SASRec,NARM --dataset=fake --seeds=1 --out={tmp_path}"))
    finished = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[batch] finished")]
    assert "1 done, about 20 min left at 10.0 min per run" in finished[0]  # SASRec and NARM left, one at a time
    assert "2 done, about 15 min left at 15.0 min per run" in finished[1]


def test_check_of_several_plans_names_the_plan_of_a_bad_line(fake, tmp_path, capsys):
    good = fake.plan(f"--models=GRU4Rec --dataset=ml-100k --seeds=1 --out={tmp_path}", name="good.plan")
    bad = fake.plan(f"--models=SASRec --dataset=ml-100k --seeds=one --out={tmp_path}", name="bad.plan")
    with pytest.raises(SystemExit):
        batch.main([good, bad, "--check"])
    error = capsys.readouterr().err
    assert "bad.plan, line 2" in error and error.count("\n") == 1 and fake.started() == []


@pytest.mark.slow
def test_a_search_whose_run_was_stopped_stays_unfinished(fake, tmp_path, monkeypatch):
    """A search run stopped at the deadline is still to come: no point is chosen from the others, no
    seed runs, and a later batch finishes the search first."""
    fake.set({**SCORES, "SASRec[learning_rate=0.003]": {"sleep": 30}})
    plan = fake.plan(SEARCHED.format(out=tmp_path))
    argv = [plan, "--jobs=4", "--stop_after=0.05"]
    with pytest.raises(SystemExit, match="did not finish"):
        batch.main(argv)
    assert sorted(rows(tmp_path / "fake.csv")) == sorted((v, int(s)) for v, s in TRIALS if not v.startswith("SASRec[learning_rate=0.003"))
    assert "unfinished" in (tmp_path / "fake.md").read_text()  # the table does not present a choice
    fake.set(SCORES)
    b = run_batch(plan, jobs=1)
    assert fake.started()[-5:] == [("SASRec[learning_rate=0.003]", "1"), *SEEDS]  # the missing trial, then the seeds
    assert b.searches


def test_each_validation_line_says_when_the_run_ends_at_the_latest(capsys):
    """RecBole stops after patience + 1 validations without a new best, and at the cap in any case."""
    report = batch.epoch_reporter("ml-100k SASRec seed 1", patience=10, cap=50)
    report({"epoch": 6, "valid": 0.05, "best": 0.06, "best_epoch": 4, "train_s": 120.0, "run_s": 180.0})
    report({"epoch": 45, "valid": 0.07, "best": 0.07, "best_epoch": 45, "train_s": 900.0, "run_s": 1350.0})
    first, second = capsys.readouterr().out.splitlines()
    assert "epoch 6: valid NDCG@10 0.0500 (best 0.0600 at 4), 20 s/epoch training, 3 min into the run" in first
    assert "ends within 9 epoch(s), about 4 min" in first  # 4 + 10 + 1 - 6 epochs of 30 s
    assert "ends within 5 epoch(s)" in second  # the cap comes first
    batch.epoch_reporter("x", patience=None, cap=None)({"epoch": 1, "valid": 0.1, "best": 0.1, "best_epoch": 1, "train_s": 1.0, "run_s": 1.0})
    assert "ends within" not in capsys.readouterr().out


def test_report_writes_the_tables_of_the_rows_there_and_runs_nothing(fake, tmp_path, monkeypatch):
    plan = fake.plan(f"--models=GRU4Rec,SASRec --dataset=fake --seeds=1 --out={tmp_path}")
    fake.set({"SASRec": {"fail": True}})
    run_batch(plan)  # GRU4Rec's row lands, SASRec's run fails; no table yet (main writes it at the end)
    assert not (tmp_path / "fake.md").exists()
    started = len(fake.started())
    argv = [plan, "--report"]
    batch.main(argv)
    assert len(fake.started()) == started  # nothing ran, SASRec's missing run included
    assert "| GRU4Rec | 1 |" in (tmp_path / "fake.md").read_text()

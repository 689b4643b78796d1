"""Benchmark helpers: the synthetic data generator, the model/variant syntax and the runner."""

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from benchmarks.make_synthetic import generate, write
from benchmarks.run_benchmark import Study
from benchmarks.variants import parse_grid, parse_variant, pick, search_trials, split_models, with_settings
from benchmarks.worker import Budget
from recbole_t2diff.config import Config
from recbole_t2diff.errors import UsageError
from recbole_t2diff.quick_start import prepare

from helpers import REPO, TINY_MODEL, TINY_SPARCODE

# The scripts run as `python -m benchmarks.<name>` from the project root; a test's child process runs elsewhere.
SCRIPT_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}


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
        "T2Diff",
        {"lambda_diff": 0.1, "beta_schedule": "log", "use_drift": False},
    )
    assert split_models("T2Diff,SASRec[train_batch_size=512,learning_rate=0.002],T2Diff-noDP") == [
        "T2Diff",
        "SASRec[train_batch_size=512,learning_rate=0.002]",
        "T2Diff-noDP",
    ]
    assert parse_variant("T2Diff-noDP[n_steps=20]") == ("T2Diff", {"use_drift": False, "n_steps": 20})
    with pytest.raises(UsageError, match="T2Diff-noDiff"):
        parse_variant("T2Diff-noDif")


def test_a_preset_is_a_variant_with_its_files_settings_and_is_searched_like_a_model():
    import yaml

    with open(os.path.join(REPO, "properties", "presets", "T2Diff-paper.yaml")) as f:
        paper = yaml.safe_load(f)
    assert parse_variant("T2Diff-paper") == ("T2Diff", paper)
    assert parse_variant("T2Diff-paper[learning_rate=0.003]") == ("T2Diff", {**paper, "learning_rate": 0.003})
    trials = search_trials(["T2Diff", "T2Diff-paper", "T2Diff-noDiff"], [{"learning_rate": 0.001}, {"learning_rate": 0.003}])
    assert trials["T2Diff-paper"] == ["T2Diff-paper[learning_rate=0.001]", "T2Diff-paper[learning_rate=0.003]"]
    assert "T2Diff-noDiff" not in trials  # an ablation takes T2Diff's point
    with pytest.raises(UsageError, match="a preset's name"):
        parse_variant("T2Diff-nopreset")


@pytest.mark.parametrize("variant,overrides", [("T2Diff", ()), ("SASRec", ()), ("T2Diff-noDiff[learning_rate=0.003]", ("--epochs=7",))])
def test_the_tables_read_each_setting_as_recboles_config_does(variant, overrides, tmp_path):
    """The stopping rule a table states comes from the files, settings and overrides the run's Config read, in its order."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("stopping_step: 4\nnormalize_all: True\n")
    study = Study([f"--models={variant}", "--dataset=ml-100k", f"--config_files={mine}", f"--out={tmp_path}", *overrides])
    name, settings = parse_variant(variant)
    config = Config(
        model=name, dataset="ml-100k", config_file_list=[str(mine)], config_dict={**settings, **{o[2:].split("=")[0]: int(o.split("=")[1]) for o in overrides}}
    )
    for key in ("epochs", "stopping_step", "learning_rate", "train_batch_size", "normalize_all", "TIME_FIELD", "MAX_ITEM_LIST_LENGTH", "use_diffusion"):
        assert study.config(variant)[key] == config[key], key
    # the dataset files: RecBole's ml-100k.yaml normalises every float field, ours keeps timestamps
    study = Study([f"--models={variant}", "--dataset=ml-100k", f"--out={tmp_path}", *overrides])
    assert study.config(variant)["normalize_all"] is False


def test_a_study_reads_its_csv_once_and_only_when_it_needs_the_rows(tmp_path, monkeypatch):
    from benchmarks import run_benchmark

    reads = []
    monkeypatch.setattr(run_benchmark, "read_rows", lambda path: reads.append(path) or [])
    study = run_benchmark.Study(["--models=SASRec", "--dataset=ml-100k", f"--out={tmp_path}"])
    assert study.resume_dir("SASRec", 2020).startswith(str(tmp_path)) and reads == []
    assert study.command("SASRec", 2020)[1:3] == ["-m", "benchmarks.worker"] and reads == []  # a worker gets no rows
    assert study.rows == [] and reads == [str(tmp_path / "ml-100k.csv")]  # the parent reads it, once, when it needs it
    study.rows.append({})
    assert len(study.rows) == 1 and len(reads) == 1


def test_a_runs_resume_folder_is_the_one_earlier_versions_named():
    """A batch restarted with newer code goes on from the state its runs left: the folder's name is a hash of the
    variant, the seed, --config_files and the study's --key=value settings (cpu.plan's first study, as cpu.sh runs it)."""
    line = (
        '--models=SASRec,GRU4Rec --dataset=ml-100k --seeds=2020,2021,2022 "--search=learning_rate=0.001,0.003;train_batch_size=512,2048" '
        "--out=results/converged --stopping_step=10 --epochs=50 --resume_root=/work/runs/converged/resume"
    )
    study = Study(shlex.split(line))
    assert study.resume_dir("SASRec[learning_rate=0.003,train_batch_size=2048]", 2021) == "/work/runs/converged/resume/ml-100k/0c20141050ebac51"
    assert study.resume_dir("SASRec[learning_rate=0.003,train_batch_size=2048]", 2022) == "/work/runs/converged/resume/ml-100k/c2703f418092645d"


def test_search_grid_and_its_variant_names():
    grid = parse_grid("learning_rate=0.001,0.002; train_batch_size=512,2048")
    assert grid == [
        {"learning_rate": 0.001, "train_batch_size": 512},
        {"learning_rate": 0.001, "train_batch_size": 2048},
        {"learning_rate": 0.002, "train_batch_size": 512},
        {"learning_rate": 0.002, "train_batch_size": 2048},
    ]
    assert with_settings("SASRec", grid[1]) == "SASRec[learning_rate=0.001,train_batch_size=2048]"
    assert with_settings("T2Diff-noDiff[n_steps=20]", {"loss_type": "BPR"}) == "T2Diff-noDiff[n_steps=20,loss_type=BPR]"
    assert with_settings("GRU4Rec", {}) == "GRU4Rec"
    for variant, point in [("SASRec", grid[2]), ("T2Diff-noDP", grid[3])]:  # names read back to the same settings
        name, settings = parse_variant(with_settings(variant, point))
        assert settings == {**parse_variant(variant)[1], **point}
    with pytest.raises(UsageError, match="key=value1,value2"):
        parse_grid("learning_rate 0.001")


@pytest.mark.slow
def test_time_budget_cuts_the_epoch_at_the_batch_it_runs_out_and_then_stops(monkeypatch):
    import recbole.trainer.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "early_stopping", lambda *args, **kwargs: (0.5, 0, False, True))

    class Trainer:
        def _train_epoch(self, train_data, epoch_idx):
            trained = []
            for batch in train_data:
                time.sleep(0.3)
                trained.append(batch)
            return trained

    trainer, budget = Trainer(), Budget(minutes=0.75 / 60)  # 0.75 s: the third 0.3 s batch runs it out
    budget.apply(trainer)
    assert trainer._train_epoch(list(range(10)), 0) == [0, 1, 2]
    assert budget.epochs == pytest.approx(0.3)
    # The cut epoch is validated and then the fit loop stops, its bookkeeping unchanged.
    assert trainer_module.early_stopping(0.5, 0.4, 0, max_step=10) == (0.5, 0, True, True)


def test_no_budget_trains_whole_epochs(monkeypatch):
    import recbole.trainer.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "early_stopping", lambda *args, **kwargs: (0.5, 0, False, True))
    trainer, budget = type("Trainer", (), {"_train_epoch": lambda self, data, epoch: list(data)})(), Budget()
    budget.apply(trainer)
    assert trainer._train_epoch(range(4), 0) == [0, 1, 2, 3] and trainer._train_epoch(range(4), 1) == [0, 1, 2, 3]
    assert budget.epochs == 2.0 and trainer_module.early_stopping(0.5, 0.4, 0, max_step=10)[2] is False


@pytest.mark.slow
def test_runner_writes_csv_table_and_margin(tmp_path, tiny_path):
    settings = [f"--{k}={v}" for k, v in TINY_MODEL.items() if k not in ("epochs", "state", "show_progress")]
    command = [
        sys.executable,
        "-m",
        "benchmarks.run_benchmark",
        "--models=T2Diff,GRU4Rec",
        "--dataset=tiny",
        "--seeds=1,2",
        "--jobs=2",
        "--time_budget=0.0001",
        "--epochs=4",
        f"--data_path={tiny_path}",
        f"--out={tmp_path}",
        *settings,
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=SCRIPT_ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "tiny.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["variant"], r["seed"]) for r in rows) == [("GRU4Rec", "1"), ("GRU4Rec", "2"), ("T2Diff", "1"), ("T2Diff", "2")]
    assert all(0 < float(r["epochs_run"]) < 1 for r in rows)  # the budget cut the first epoch: not --epochs=4
    table = (tmp_path / "tiny.md").read_text()
    assert "Margins over the best built-in by mean test NDCG@10, **GRU4Rec** (2 seeds)" in table and "had 0.0001 min of wall-clock" in table
    assert re.search(r"\n\| T2Diff \| 2 \| [+-]0\.\d{4} \([+-][\d.]+%\) \| ", table)  # the margin row, with a p-value cell after it
    from matplotlib.image import imread

    plot = imread(str(tmp_path / "tiny.png"))  # a readable PNG with something drawn on it
    assert plot.ndim == 3 and min(plot.shape[:2]) > 100 and plot[..., :3].std() > 0.05
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=SCRIPT_ENV)
    assert again.stdout.count("already in") == 4  # resumable: finished runs are not repeated
    knobs = json.loads(rows[0]["knobs"])  # what the run read of every setting the property files name
    assert knobs["MAX_ITEM_LIST_LENGTH"] == TINY_MODEL["MAX_ITEM_LIST_LENGTH"] and "data_path" not in knobs
    assert ("unet_levels" in knobs) == (rows[0]["variant"] == "T2Diff")


def test_search_without_plain_t2diff_chooses_each_variant_and_ablations_need_it():
    """A search over a T2Diff variant and built-ins only (no ablation) needs no plain T2Diff row."""
    grid = parse_grid("train_batch_size=512,2048")
    scores = {512: 0.2, 2048: 0.1}  # batch 512 wins for every variant
    rows = []

    def run_all(jobs):
        rows.extend({"variant": v, "seed": s, "valid_ndcg@10": scores[parse_variant(v)[1]["train_batch_size"]]} for v, s in jobs)

    def choose(variants, grid, seed, run_all, rows):  # what a study does: every trial with the first seed, then the choice
        trials = search_trials(variants, grid)
        run_all([(t, seed) for v in trials for t in trials[v]])
        return {"chosen": pick(variants, grid, seed, rows, trials)}

    search = choose(["T2Diff[unet_levels=2]", "GRU4Rec"], grid, 7, run_all, rows)
    assert search["chosen"] == {"T2Diff[unet_levels=2]": "T2Diff[unet_levels=2,train_batch_size=512]", "GRU4Rec": "GRU4Rec[train_batch_size=512]"}
    assert len(rows) == 4 and {r["seed"] for r in rows} == {7}
    with pytest.raises(UsageError, match="add T2Diff to --models"):
        choose(["T2Diff[unet_levels=2]", "T2Diff-noDiff"], grid, 7, run_all, rows)
    with pytest.raises(UsageError, match="add SparCode to --models"):
        choose(["T2Diff", "SparCode-dotVQ"], grid, 7, run_all, rows)


def test_an_ablation_takes_its_own_models_chosen_point():
    """SparCode's two-tower reduction runs at SparCode's chosen point, T2Diff's ablation at T2Diff's, each not searched."""
    grid = parse_grid("train_batch_size=512,2048")
    best = {"T2Diff": 512, "SparCode": 2048}
    variants = ["T2Diff", "SparCode", "T2Diff-noDiff", "SparCode-dotVQ"]
    trials = search_trials(variants, grid)
    assert set(trials) == {"T2Diff", "SparCode"}
    rows = [{"variant": t, "seed": 7, "valid_ndcg@10": 0.2 if parse_variant(t)[1]["train_batch_size"] == best[m] else 0.1} for m in trials for t in trials[m]]
    chosen = pick(variants, grid, 7, rows, trials)
    assert chosen["SparCode-dotVQ"] == "SparCode-dotVQ[train_batch_size=2048]" and chosen["T2Diff-noDiff"] == "T2Diff-noDiff[train_batch_size=512]"
    assert parse_variant(chosen["SparCode-dotVQ"]) == ("SparCode", {"interaction": "dot", "score_relu": False, "train_batch_size": 2048})


@pytest.mark.slow
def test_search_picks_each_model_on_validation_and_runs_its_choice_with_every_seed(tmp_path, tiny_path):
    settings = [f"--{k}={v}" for k, v in TINY_MODEL.items() if k not in ("epochs", "state", "show_progress", "learning_rate")]
    command = [
        sys.executable,
        "-m",
        "benchmarks.run_benchmark",
        "--models=T2Diff,GRU4Rec,T2Diff-noDiff",
        "--dataset=tiny",
        "--seeds=1,2",
        "--jobs=2",
        "--search=learning_rate=0.0001,0.01;epochs=1",
        f"--data_path={tiny_path}",
        f"--out={tmp_path}",
        *settings,
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=SCRIPT_ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "tiny.csv", newline="") as f:
        rows = {(r["variant"], int(r["seed"])): r for r in csv.DictReader(f)}
    chosen = {}
    for model in ("T2Diff", "GRU4Rec"):
        trials = [f"{model}[learning_rate={lr},epochs=1]" for lr in ("0.0001", "0.01")]
        chosen[model] = max(trials, key=lambda t: float(rows[(t, 1)]["valid_ndcg@10"]))  # on validation, seed 1
        assert (chosen[model], 2) in rows and not any((t, 2) in rows for t in trials if t != chosen[model])
    ablation = "T2Diff-noDiff" + chosen["T2Diff"][len("T2Diff") :]
    assert (ablation, 1) in rows and (ablation, 2) in rows and len(rows) == 4 + 2 + 2
    table = (tmp_path / "tiny.md").read_text()
    margins, main_table = table.split("## Search")[0].split("| model | seeds | test NDCG@10 |")
    assert all(f"| {v} | 1,2 |" in main_table for v in (chosen["T2Diff"], chosen["GRU4Rec"], ablation))
    assert main_table.count("\n| T2Diff[") == 1 and f"best built-in by mean test NDCG@10, **{chosen['GRU4Rec']}**" in margins
    assert f"| {chosen['T2Diff']} | 2 | " in margins and f"| {ablation} | 2 | " in margins  # every row of ours, ablations too
    assert f"| {chosen['GRU4Rec']} | 2 | " not in margins
    assert "| learning_rate=0.0001, epochs=1 | learning_rate=0.01, epochs=1 |" in table and table.count("**0.") == 2
    # x̂ quality: a number for every T2Diff run with x̂, none for a model without one
    assert all(0 <= float(r["xhat_hit@10"]) <= 1 and float(r["xhat_rel_error"]) > 0 for (v, _), r in rows.items() if v.startswith("T2Diff["))
    assert all(r["xhat_rel_error"] == "" for (v, _), r in rows.items() if not v.startswith("T2Diff["))
    assert all(r["xhat_noise_drop"] != "" for (v, _), r in rows.items() if v.startswith("T2Diff["))
    assert f"| {chosen['T2Diff']} | " in table.split("## x̂ on the validation split")[1]
    stated = re.search(r"Command: `python -m benchmarks.run_benchmark (.*)`", table).group(1)
    assert shlex.split(stated) == command[3:]  # quoted: pasted into a shell, the ";" stays in --search


def test_xhat_quality_of_the_copied_last_item_is_1_and_its_hits_are_the_repeats(tiny_data):
    """x̂ := x_L is the unit of the relative error; and x_L's nearest token is its own, so a hit@1 is exactly
    a user whose next item repeats the last one (made so here for every third user)."""
    from helpers import make_model

    model = make_model(tiny_data, x_hat_source="copy_last")
    interaction = next(iter(tiny_data[2]))[0]
    last = interaction[model.ITEM_SEQ].gather(1, (interaction[model.ITEM_SEQ_LEN] - 1)[:, None]).squeeze(1)
    repeat = torch.arange(len(last)) % 3 == 0
    interaction.interaction[model.ITEM_ID] = torch.where(repeat, last, interaction[model.ITEM_ID])
    repeats = int((interaction[model.ITEM_ID] == last).sum())
    quality = model.xhat_quality([(interaction,)])
    assert quality["xhat_rel_error"] == 1.0 and 0 < repeats < len(last)
    assert quality["xhat_hit@1"] == round(repeats / len(last), 4) and quality["xhat_hit@1"] <= quality["xhat_hit@10"] <= 1
    assert make_model(tiny_data, use_diffusion=False).xhat_quality([(interaction,)]) is None


def test_ndcg_at_10_ranks_as_recboles_full_sort_does():
    from recbole_t2diff.model.generator import _ndcg_at_10

    scores = torch.tensor([[9.0, 1.0, 5.0, 3.0, 4.0], [9.0, 1.0, 5.0, 3.0, 4.0]])
    targets = torch.tensor([2, 3])  # row 0: best once the padding item 0 is masked; row 1: third (behind 2 and 4)
    assert _ndcg_at_10(scores, targets) == pytest.approx(1.0 + 0.5)
    masked = (torch.tensor([1, 1]), torch.tensor([2, 4]))  # row 1's history items 2 and 4 cannot rank
    assert _ndcg_at_10(scores, targets, masked) == pytest.approx(2.0)
    assert _ndcg_at_10(torch.arange(20.0).flip(0)[None], torch.tensor([15])) == 0.0  # 15th: outside the top 10


def test_xhat_noise_drop_is_zero_when_the_tower_ignores_xhat_and_not_when_it_reads_it(tiny_data):
    from helpers import make_model

    loader = tiny_data[2]
    gated = make_model(tiny_data, x_hat_gate=True)  # the gate starts at 0: the session reads x_L, never x̂
    assert gated.xhat_quality(loader)["xhat_noise_drop"] == 0.0
    with torch.no_grad():
        gated.x_hat_gate.fill_(1.0)
    copied = make_model(tiny_data, x_hat_source="copy_last")
    assert gated.xhat_quality(loader)["xhat_noise_drop"] != 0.0 and copied.xhat_quality(loader)["xhat_noise_drop"] != 0.0


@pytest.mark.slow
def test_xhat_diagnosis_chain_row_is_the_normal_evaluation(tiny_path, workdir, monkeypatch):
    from recbole_t2diff.model.t2diff import T2Diff
    from recbole_t2diff.quick_start import evaluate_checkpoint, run
    from benchmarks.xhat_diagnosis import diagnose

    result = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL})
    dataset, records = diagnose(result["saved_model_file"], [1, 4, 99])
    assert dataset == "tiny" and [r["x_hat"] for r in records] == ["chain", "removed", "teacher s=1", "teacher s=4"]
    valid = evaluate_checkpoint(result["saved_model_file"], "valid")
    assert records[0]["valid_ndcg@10"] == float(valid["ndcg@10"])
    # The error is relative to the true last drift: 0 for a denoiser that returns it, 1 for one that predicts 0.
    for estimate, error in ((lambda self, z0, *rest: z0, 0.0), (lambda self, z0, *rest: torch.zeros_like(z0), 1.0)):
        monkeypatch.setattr(T2Diff, "one_step_estimate", estimate)
        _, records = diagnose(result["saved_model_file"], [1, 4])
        assert [r["last_row_rel_error"] for r in records[2:]] == [pytest.approx(error, abs=1e-6)] * 2


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_after_its_last_epoch_and_ends_as_an_uninterrupted_one(tiny_path, workdir, monkeypatch, capfd):
    import itertools

    from benchmarks.resume import Resume
    from benchmarks.worker import RUNS_AT_ONCE, worker

    settings = {k: v for k, v in TINY_MODEL.items() if k not in ("state", "show_progress")}
    overrides = [f"--data_path={tiny_path}", "--state=ERROR", *(f"--{k}={v}" for k, v in {**settings, "epochs": 4, "stopping_step": 10}.items())]
    validations = itertools.count()  # the load at validation n of each run is 1, 2, 3, 4: the resumed run's last two are 3, 4
    monkeypatch.setattr("os.getloadavg", lambda: (next(validations) % 4 + 1.0, 0.0, 0.0))
    monkeypatch.setenv(RUNS_AT_ONCE, "3")
    straight = worker("T2Diff", 5, "tiny", None, resume_dir=str(workdir / "straight"), overrides=overrides)
    assert not (workdir / "straight").exists()  # a finished run leaves no state behind

    save = Resume.save

    def save_then_die(self, trainer, train_data, epoch):
        save(self, trainer, train_data, epoch)
        if epoch == 1:
            raise Interrupted  # killed after the second epoch's state was written

    monkeypatch.setattr(Resume, "save", save_then_die)
    with pytest.raises(Interrupted):
        worker("T2Diff", 5, "tiny", None, resume_dir=str(workdir / "broken"), overrides=overrides)
    assert (workdir / "broken" / "last.pth").is_file()
    monkeypatch.setattr(Resume, "save", save)
    resumed = worker("T2Diff", 5, "tiny", None, resume_dir=str(workdir / "broken"), overrides=overrides)
    assert "resumed after epoch 2" in capfd.readouterr().err
    assert json.loads(resumed["valid_curve"]) == json.loads(straight["valid_curve"]) and len(json.loads(straight["valid_curve"])) == 4
    for key in ("test_ndcg@10", "test_recall@10", "valid_ndcg@10", "epochs_run", "best_epoch", "xhat_rel_error", "runs_at_once", "load_average"):
        assert resumed[key] == straight[key], key
    assert (straight["runs_at_once"], straight["load_average"]) == ("3", 2.5)  # the loads before the interruption count too
    assert straight["step_ratio_sasrec"] > 0 and resumed["step_ratio_sasrec"] > 0  # timed afresh by each process


def test_a_run_stopped_early_at_its_last_saved_epoch_is_not_trained_further(tiny_path, workdir, monkeypatch):
    from benchmarks.resume import Resume
    from benchmarks.worker import worker

    settings = {k: v for k, v in TINY_MODEL.items() if k not in ("state", "show_progress")}
    overrides = [f"--data_path={tiny_path}", "--state=ERROR", *(f"--{k}={v}" for k, v in {**settings, "epochs": 8, "stopping_step": 2}.items())]
    save = Resume.save

    def stop_then_die(self, trainer, train_data, epoch):
        if epoch == 2:  # early stopping fires at the third epoch, and the run is killed before its test
            trainer.cur_step = trainer.stopping_step + 1
        save(self, trainer, train_data, epoch)
        if epoch == 2:
            raise Interrupted

    monkeypatch.setattr(Resume, "save", stop_then_die)
    with pytest.raises(Interrupted):
        worker("GRU4Rec", 5, "tiny", None, resume_dir=str(workdir / "run"), overrides=overrides)
    monkeypatch.setattr(Resume, "save", save)
    row = worker("GRU4Rec", 5, "tiny", None, resume_dir=str(workdir / "run"), overrides=overrides)
    assert row["epochs_run"] == 3 and len(json.loads(row["valid_curve"])) == 3  # not trained on to epoch 8


def test_the_table_says_what_its_rows_shared_the_machine_with():
    from benchmarks.report import sharing

    rows = [
        {"runs_at_once": "2", "load_average": "3.5"},
        {"runs_at_once": "2", "load_average": "1.25"},
        {"runs_at_once": "15", "load_average": ""},
        {"runs_at_once": "", "load_average": ""},
    ]
    assert sharing(rows) == (
        "Sharing: 2 row(s) ran 2 at once, 1-minute load average 1.25–3.5 at their validations; 1 row(s) ran 15 at once; "
        "1 row(s) ran before rows recorded it (2026-12-07) (the load counts work from outside the batch too)."
    )
    assert sharing([{"machine": "m"}]) == "Sharing: 1 row(s) ran before rows recorded it (2026-12-07) (the load counts work from outside the batch too)."
    one = sharing([{"runs_at_once": "1", "load_average": "3.1"}])
    assert one == "Sharing: 1 row(s) ran 1 at once, 1-minute load average 3.1 at their validations (the load counts work from outside the batch too)."


def test_the_table_says_how_many_run_hours_its_csv_took_per_kind_of_machine():
    from benchmarks.report import compute_spent

    rows = [
        {"run_s": "3600", "machine": "x86_64, 2 cores, torch 2.13.0+cpu, CPU"},
        {"run_s": "1800", "machine": "x86_64, AMD EPYC, 2 cores, torch 2.13.0+cpu, CPU, heap-only malloc"},
        {"run_s": "720", "machine": "x86_64, 16 cores, torch 2.11.0+cu130, NVIDIA H200"},
        {"run_s": "", "machine": "m"},
    ]
    assert compute_spent(rows) == (
        "Compute: the CSV's 3 runs took 1.5 run-hours on CPU and 0.2 run-hours on GPU (each run's wall-clock to its test, "
        "summed; runs that shared a machine each count theirs)."
    )
    assert compute_spent([{"machine": "m"}]) == "Compute: no row recorded its run time."


def test_an_in_process_ratio_column_averages_the_runs_that_measured_it():
    from benchmarks.report import in_process_ratio

    assert in_process_ratio([{"step_ratio_sasrec": "0.25"}, {"step_ratio_sasrec": 0.35}]) == "0.30"
    assert in_process_ratio([{"step_ratio_sasrec": "0.3"}, {"step_ratio_sasrec": ""}, {}]) == "0.30 (1 of 3 runs)"
    assert in_process_ratio([{"step_ratio_sasrec": ""}]) == "—"
    assert in_process_ratio([{"index_time_vs_dense": "0.5", "step_ratio_sasrec": "9"}], "index_time_vs_dense") == "0.50"


def test_timings_from_different_machines_are_never_averaged():
    from benchmarks.report import per_machine

    gpu = {"machine": "x86_64, 16 cores, NVIDIA H200", "train_s_per_epoch": "5.4"}
    cpu = {"machine": "x86_64, 2 cores, CPU", "train_s_per_epoch": "123.0"}
    assert per_machine([gpu, {**gpu, "train_s_per_epoch": "5.6"}], "train_s_per_epoch") == "5.5"
    assert per_machine([gpu, cpu, cpu], "train_s_per_epoch") == "mixed machines"


def test_welch_p_values_need_two_seeds_a_side_and_some_spread():
    from scipy import stats

    from benchmarks.report import welch_p

    a, b = [0.061, 0.065, 0.063], [0.070, 0.068, 0.071]
    assert welch_p(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue) and welch_p(a, b) < 0.05
    assert welch_p(a, [0.07]) is None and welch_p([0.1, 0.1], [0.1, 0.1]) is None


def test_cost_is_a_ratio_to_sasrec_on_the_same_machine_and_day_only():
    from benchmarks.report import sasrec_ratio

    def row(variant, seconds, machine="cpu", date="2026-12-06"):
        return {"variant": variant, "train_s_per_epoch": str(seconds), "machine": machine, "date": date}

    variants = ["SASRec[learning_rate=0.003]", "T2Diff"]
    rows = [row(variants[0], 200), row(variants[0], 100, "gpu"), row("T2Diff", 50), row("T2Diff", 10, "gpu", "2026-12-07")]
    assert sasrec_ratio(rows, "T2Diff", variants) == pytest.approx(0.25)  # the GPU row has no SASRec run of its day
    assert sasrec_ratio([row("T2Diff", 50, "gpu")], "T2Diff", variants) is None
    assert sasrec_ratio(rows, "T2Diff", ["T2Diff"]) is None  # no SASRec in the table


def test_a_csv_from_before_a_column_was_added_gets_the_column_and_keeps_its_rows(tmp_path):
    from benchmarks.run_benchmark import read_rows
    from benchmarks.worker import COLUMNS

    old_columns = [c for c in COLUMNS if c != "reads"]
    with open(tmp_path / "ml-100k.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow({**dict.fromkeys(old_columns, "1"), "variant": "SASRec", "seed": "1"})
    study = Study(["--models=T2Diff", "--dataset=ml-100k", "--seeds=1", f"--out={tmp_path}"])
    study.record({**dict.fromkeys(COLUMNS, "2"), "variant": "T2Diff", "seed": "1", "reads": "request time"})
    rows = read_rows(str(tmp_path / "ml-100k.csv"))
    assert [(r["variant"], r["reads"]) for r in rows] == [("SASRec", ""), ("T2Diff", "request time")]
    assert rows[0]["valid_ndcg@10"] == "1" and not (tmp_path / "ml-100k.csv.tmp").exists()


@pytest.mark.spawns
@pytest.mark.slow
def test_serving_cost_is_measured_against_sasrec_and_kept_beside_the_other_inference_results(tmp_path, tiny_path):
    with open(tmp_path / "inference.json", "w") as f:
        json.dump({"runs": {"ml-100k": {"kept": True}}}, f)
    command = [
        sys.executable,
        "-m",
        "benchmarks.serving",
        "--dataset=tiny",
        f"--data_path={tiny_path}",
        "--variants=SASRec,T2Diff",
        "--rounds=1",
        f"--out={tmp_path}",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=SCRIPT_ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    everything = json.load(open(tmp_path / "inference.json"))
    assert everything["runs"] == {"ml-100k": {"kept": True}}
    results = everything["serving"]["tiny"]["results"]
    assert results["SASRec"]["throughput_vs_sasrec"] == results["SASRec"]["latency_vs_sasrec"] == 1.0
    t2diff = results["T2Diff"]
    assert t2diff["throughput_vs_sasrec"] == round(t2diff["users_per_s"] / results["SASRec"]["users_per_s"], 3) > 0
    assert "| T2Diff | — |" in (tmp_path / "serving_tiny.md").read_text()
    load = everything["serving"]["tiny"]["load_average"]  # how busy the machine was, beside the timings
    assert len(load) == 2 and all(isinstance(value, float) for value in load)
    assert f"load average {load[0]} before and {load[1]} after" in (tmp_path / "serving_tiny.md").read_text()
    wrong = subprocess.run(command[:5] + ["--variants=T2Diff,SASRec", f"--out={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, env=SCRIPT_ENV)
    assert wrong.returncode == 1 and "must start with SASRec" in wrong.stderr


@pytest.mark.spawns
@pytest.mark.slow
def test_compiled_serving_times_a_compiled_copy_of_every_model_against_the_compiled_sasrec_apart_from_the_eager_entry(tmp_path, tiny_path):
    with open(tmp_path / "inference.json", "w") as f:
        json.dump({"serving": {"tiny": {"eager": True}}}, f)
    command = [sys.executable, "-m", "benchmarks.serving", "--dataset=tiny", f"--data_path={tiny_path}", "--variants=SASRec,T2Diff-fast"]
    done = subprocess.run(command + ["--rounds=1", f"--out={tmp_path}", "--compile"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=SCRIPT_ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    everything = json.load(open(tmp_path / "inference.json"))
    assert everything["serving"] == {"tiny": {"eager": True}}
    entry = everything["serving_compiled"]["tiny"]
    results = entry["results"]
    assert entry["compiled"] is True and list(results) == ["SASRec", "T2Diff-fast", "SASRec (compiled)", "T2Diff-fast (compiled)"]
    assert results["SASRec (compiled)"]["latency_vs_sasrec"] == 1.0  # a compiled model is measured against the compiled SASRec
    fast = results["T2Diff-fast (compiled)"]
    assert fast["latency_vs_sasrec"] == round(fast["single_user_ms"] / results["SASRec (compiled)"]["single_user_ms"], 3)
    assert fast["preset"] == "properties/presets/T2Diff-fast.yaml"
    assert "| T2Diff-fast (compiled) |" in (tmp_path / "serving_tiny_compiled.md").read_text()
    assert not (tmp_path / "serving_tiny.md").exists()


def test_a_quantized_sparcodes_row_records_the_size_of_its_exact_index(sparcode_data, tiny_data):
    from benchmarks.worker import index_columns
    from helpers import make_model, trained_sparcode
    from recbole_t2diff.sparse_index import SparseIndex

    model = trained_sparcode(sparcode_data)
    index = SparseIndex.build(model, keys="used", threshold=0.0)
    queries = sparcode_data[2]
    recorded = index_columns(model, queries)
    time_ratio = recorded.pop("index_time_vs_dense")
    assert recorded == {"index_density": round(index.nnz / (index.n_rows * (model.n_items - 1)), 4), "index_mib": round(index.nbytes() / 2**20, 3)}
    assert 0 < recorded["index_density"] <= 1 and isinstance(time_ratio, float) and time_ratio > 0
    model.score_bias = -1e6  # no entry survives ReLU(s + b) > 0: the index keeps nothing
    assert index_columns(model, queries)["index_density"] == 0.0
    empty = {"index_density": "", "index_mib": "", "index_time_vs_dense": ""}
    assert index_columns(trained_sparcode(sparcode_data, quantize=False), queries) == empty and index_columns(make_model(tiny_data), queries) == empty


def test_the_index_is_timed_against_a_dense_table_that_scores_as_it_does(sparcode_data, monkeypatch):
    import benchmarks.sparcode_index as sparcode_index
    from helpers import trained_sparcode
    from recbole_t2diff.sparse_index import SparseIndex

    model = trained_sparcode(sparcode_data)
    index = SparseIndex.build(model, keys="used", threshold=0.0)
    interaction = next(iter(sparcode_data[2]))[0]
    clock = iter(range(10**6))  # every path call takes one tick: the ratio of the medians is 1
    monkeypatch.setattr(sparcode_index.time, "perf_counter", lambda: next(clock))
    assert sparcode_index.time_against_dense(model, index, interaction) == 1.0
    monkeypatch.undo()
    # A table that is not the index's is refused rather than timed.
    real_table = sparcode_index.dense_table
    monkeypatch.setattr(sparcode_index, "dense_table", lambda index, n_items: 2 * real_table(index, n_items))
    with pytest.raises(RuntimeError, match="does not score as the index does"):
        sparcode_index.time_against_dense(model, index, interaction)
    # Histories with a key that has no posting list are left out; with none left there is nothing to time.
    no_keys = SparseIndex.build(model, keys="used", threshold=0.0)
    no_keys.keys = no_keys.keys[:0]
    assert sparcode_index.time_against_dense(model, no_keys, interaction) == ""


def test_the_table_lists_the_index_of_every_sparcode_row_and_no_other(tmp_path):
    from benchmarks.worker import COLUMNS

    study = Study(["--models=SparCode,SASRec", "--dataset=ml-100k", "--seeds=1,2", f"--out={tmp_path}"])
    for seed, density in (("1", "0.25"), ("2", "0.35")):
        base = {**dict.fromkeys(COLUMNS, "1"), "seed": seed, "valid_curve": "[0.1]", "machine": "m", "date": "d"}
        study.record({**base, "variant": "SparCode", "index_density": density, "index_mib": "2.0", "index_time_vs_dense": "0.5"})
        study.record({**base, "variant": "SASRec", "index_density": "", "index_mib": ""})
    study.summarize()
    section = (tmp_path / "ml-100k.md").read_text().split("## SparCode's sparse index")[1]
    assert "| SparCode | 1.0000 ± 0.0000 | 1.0000 ± 0.0000 | 0.3000 ± 0.0707 | 2.0000 ± 0.0000 | 0.50 |" in section
    assert "SASRec" not in section and (tmp_path / "ml-100k_index.png").stat().st_size > 0


def test_compare_gives_each_pairs_means_difference_and_welch_p_over_the_chosen_seeds(tmp_path, capsys):
    from scipy import stats

    from benchmarks.compare import main

    values = {"A[x=1]": [0.080, 0.084, 0.082, 0.090], "A": [0.070, 0.071, 0.069]}
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["variant", "seed", "valid_ndcg@10", "test_ndcg@10"])
        writer.writeheader()
        for variant, scores in values.items():
            for seed, score in zip([2020, 2021, 2022, 2023], scores):
                writer.writerow({"variant": variant, "seed": seed, "valid_ndcg@10": score, "test_ndcg@10": score - 0.01})
    main([str(tmp_path / "rows.csv"), "--pair", "A[x=1]|A", "--seeds=2020,2021,2022", "--out", str(tmp_path / "out.md")])
    row = next(line for line in open(tmp_path / "out.md") if line.startswith("| A[x=1] |")).split(" | ")
    p = stats.ttest_ind(values["A[x=1]"][:3], values["A"], equal_var=False).pvalue
    assert row[2] == "2020, 2021, 2022" and row[3:7] == ["0.0820 ± 0.0020", "0.0700 ± 0.0010", "+0.0120", f"{p:.3g}"]
    main([str(tmp_path / "rows.csv"), "--pair", "A[x=1]|A"])  # every seed: the pair ran different ones, and says so
    assert "| 2020, 2021, 2022, 2023 | 2020, 2021, 2022 |" in capsys.readouterr().out
    for pair, error in [("A[x=1]|B", "no rows of 'B'"), ("A[x=1]", "not two variants")]:
        with pytest.raises(SystemExit):
            main([str(tmp_path / "rows.csv"), "--pair", pair])
        assert error in capsys.readouterr().err


def test_a_finished_row_is_reused_only_while_it_means_what_its_variants_name_means(tmp_path):
    from benchmarks.knob_record import knob_values
    from benchmarks.run_benchmark import Study
    from benchmarks.worker import COLUMNS

    study = Study(["--models=T2Diff-copyLast", "--dataset=ml-100k", "--seeds=2020", f"--out={tmp_path}", "--epochs=7"])
    knobs = knob_values(study.config("T2Diff-copyLast"))
    assert knobs["epochs"] == 7 and knobs["session_len"] == 10 and knobs["x_hat_source"] == "copy_last"  # the study's, the files', the name's
    assert not {"data_path", "checkpoint_dir", "gpu_id", "state"} & set(knobs)  # machine and paths: never a result
    row = {"variant": "T2Diff-copyLast", "seed": "2020", "settings": json.dumps({"x_hat_source": "copy_last"}), "knobs": json.dumps(knobs)}
    study.rows.append(row)
    assert study.finished("T2Diff-copyLast", 2020) is row and study.finished("T2Diff-copyLast", 2021) is None
    older = {**knobs, "session_len": 5, "a_knob_added_since": 1}
    del older["unet_levels"]  # a setting the files did not name then: taken to have kept the old behaviour
    row["knobs"] = json.dumps(older)
    with pytest.raises(UsageError) as info:
        study.finished("T2Diff-copyLast", 2020)
    message = str(info.value)
    assert "\n" not in message and "it ran with session_len=5; the property files give session_len=10" in message
    assert "T2Diff-copyLast seed 2020" in message and "in brackets" in message and "unet_levels" not in message
    row["knobs"] = ""  # a row from before the column: its settings are still checked
    assert study.finished("T2Diff-copyLast", 2020) is row
    row["settings"] = json.dumps({"x_hat_source": "diffusion"})
    with pytest.raises(UsageError, match="its settings were"):
        study.finished("T2Diff-copyLast", 2020)
    assert "knobs" in COLUMNS


def test_workers_ask_for_a_malloc_that_keeps_freed_memory_and_rows_name_it(monkeypatch):
    import platform

    from benchmarks import machine
    from benchmarks.worker import environment

    for name in machine.KERNEL_LIMITS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    assert environment(1, 2)["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:" + machine.HEAP_ONLY_MALLOC  # the user's kept
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert not machine.describe().endswith("malloc")
    monkeypatch.setenv("GLIBC_TUNABLES", machine.HEAP_ONLY_MALLOC)
    assert machine.describe().endswith(", heap-only malloc")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))  # another C library ignores glibc's tunables
    assert not machine.describe().endswith("malloc")


def test_a_timing_taken_with_kernels_held_to_an_older_instruction_set_says_so(monkeypatch):
    from benchmarks import machine

    for name in machine.KERNEL_LIMITS:
        monkeypatch.delenv(name, raising=False)
    assert "kernels limited" not in machine.describe()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert machine.describe().endswith(", kernels limited: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2")


def test_a_timing_names_the_cpu_model_and_its_widest_matrix_unit(tmp_path, monkeypatch):
    """Two sessions' 2-core machines differed only in their CPUs (a CPU with AMX, then an EPYC without): a description without
    the CPU would let report.per_machine divide one's timings by the other's."""
    import platform

    from benchmarks import machine

    def cpuinfo(flags, name="model name\t: AMD EPYC\n"):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\n{name}flags\t\t: fpu {flags} sse2\n\nprocessor\t: 1\n")
        return str(path)

    assert machine.cpu_model(cpuinfo("avx2 avx512f avx512_bf16 amx_bf16")) == "AMD EPYC, AMX"
    assert machine.cpu_model(cpuinfo("avx2 avx512f avx512_bf16")) == "AMD EPYC, AVX512-BF16"
    assert machine.cpu_model(cpuinfo("avx2 avx512f")) == "AMD EPYC, AVX512"
    assert machine.cpu_model(cpuinfo("avx2")) == "AMD EPYC, AVX2"
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert machine.cpu_model(cpuinfo("neon", name="")) == "unknown CPU"  # nothing to name: said, not left blank
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert machine.cpu_model(str(tmp_path / "missing")) == "arm"
    monkeypatch.setattr(machine, "cpu_model", lambda: "Some CPU, AVX2")
    assert ", Some CPU, AVX2, " in machine.describe()


@pytest.mark.spawns
def test_a_worker_environment_stops_a_64_mib_tensor_from_faulting_its_pages_in_again():
    """What HEAP_ONLY_MALLOC is for (benchmarks/machine.py): under glibc every freed block of 32 MiB or more went back
    to the kernel, and the next one faulted all its pages in again."""
    import platform

    from benchmarks.worker import environment

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc tunables")
    probe = "import resource, torch\nfor _ in range(20):\n    torch.empty(2**24).fill_(1.0)\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)\n"
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    faults = [
        int(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300, check=True).stdout)
        for env in (plain, environment(1, 1))
    ]
    assert faults[1] < faults[0] - 20 * 16384 // 2, faults  # 16,384 pages a tensor: each again without, once with


def test_a_step_with_enable_amp_runs_the_loss_under_bfloat16_autocast_as_recboles_trainer_does(tiny_data):
    from benchmarks.steps import Stepper

    from helpers import make_model

    config, train, _, _ = tiny_data
    dtypes = {}
    for amp in (False, True):
        model = make_model(tiny_data)
        model.denoiser.unet.down[0][0].register_forward_hook(lambda module, args, out, amp=amp: dtypes.__setitem__(amp, out.dtype))
        stepper = Stepper.of(model, config, train)
        stepper.amp = amp
        seconds, sequences = stepper.step()
        assert seconds > 0 and sequences == len(next(iter(train)))
    assert dtypes == {False: torch.float32, True: torch.bfloat16}
    assert Stepper.of(make_model(tiny_data), config, train).amp is False  # the config's enable_amp, off by default


def test_step_ratio_writes_each_variants_cost_as_a_ratio_to_sasrec(tiny_path, workdir):
    from benchmarks import step_ratio

    out = workdir / "ratio.md"
    argv = ["--dataset=tiny", f"--data_path={tiny_path}", "--variants=SASRec,T2Diff[enable_amp=true,unet_levels=2]", "--rounds=1", f"--out={out}"]
    step_ratio.main(argv)
    text = out.read_text()
    rows = dict(re.findall(r"^\| (\S+) \| [\d.]+ \| ([\d.]+) \|$", text, flags=re.M))
    assert rows.keys() == {"SASRec", "T2Diff[enable_amp=true,unet_levels=2]"} and rows["SASRec"] == "1.00"
    assert "Command: `python -m benchmarks." in text and "Machine: " in text and "load average" in text
    with pytest.raises(SystemExit):
        step_ratio.main(["--variants=T2Diff", f"--out={out}"])  # the reference comes first


def test_shared_rows_times_sparcode_per_code_key_and_per_token_against_sasrec(tiny_path, workdir):
    from benchmarks import shared_rows

    out = workdir / "shared.md"
    tiny = [f"--{key}={value}" for key, value in TINY_SPARCODE.items()]
    shared_rows.main(["--dataset=tiny", f"--data_path={tiny_path}", "--epochs=1", "--rounds=1", f"--out={out}", *tiny])
    text = out.read_text()
    rows = dict(re.findall(r"^\| ([^|]+) \| [\d.]+ \| ([\d.]+) \|$", text, flags=re.M))
    assert rows.keys() == {"SASRec", "SparCode, negatives per code key", "SparCode, negatives per token"} and rows["SASRec"] == "1.00"
    assert re.search(r"after each training epoch: 1: [01]\.\d\d\.", text) and "Machine: " in text


def test_cost_benchmarks_read_variants_with_settings_whole_and_sasrec_first():
    from benchmarks.variants import against_sasrec

    assert against_sasrec("SASRec,T2Diff[enable_amp=true,unet_levels=2],T2Diff-fast") == ["SASRec", "T2Diff[enable_amp=true,unet_levels=2]", "T2Diff-fast"]
    for text in ("T2Diff,SASRec", ""):
        with pytest.raises(UsageError, match="must start with SASRec"):
            against_sasrec(text)


def test_code_curves_join_a_resumed_runs_logs_and_name_each_run_by_the_settings_that_differ(sparcode_data, tmp_path, caplog):
    from benchmarks.code_curves import main as code_curves
    from helpers import make_model

    model = make_model(sparcode_data)  # the code line as SparCode logs it
    model.train()
    model.calculate_loss(next(iter(sparcode_data[1])))
    with caplog.at_level("INFO"):
        model.eval()
    code_line = next(line for line in caplog.text.splitlines() if "SparCode codes in training" in line)
    code_line = code_line[code_line.index("SparCode codes") : code_line.rindex(", ")]  # without its restarts

    def log(name, run, threshold, epochs, restarts):
        text = ["Mon 07 Dec 2026 08:22:11 INFO  ", "General Hyper Parameters:", "seed = 2020", f"checkpoint_dir = {run}", f"dead_code_threshold = {threshold}"]
        text += ["softmax_negatives = 20", "epochs = 100", "train_neg_sample_args = {'distribution': 'none', 'sample_num': 'none'}"]
        for epoch, ndcg in epochs:
            text += [
                f"Mon 07 Dec 2026 08:23:06 INFO  epoch {epoch} training [time: 1.00s, train_loss1: 1.0]",
                f"Mon 07 Dec 2026 08:23:06 INFO  {code_line}, {restarts} restarts",
                "Mon 07 Dec 2026 08:23:06 INFO  valid result: ",
                f"recall@10 : 0.1    ndcg@10 : {ndcg}    hit@10 : 0.1",
            ]
        (tmp_path / "log" / name).write_text("\n".join(text) + "\n")

    (tmp_path / "log").mkdir()
    root = tmp_path / "resume"
    log("SparCode-ml-100k-a.log", root / "ml-100k" / "run1", 0.01, [(0, 0.01), (1, 0.03)], 7)
    time.sleep(0.01)  # files are joined in the order they were written
    log("SparCode-ml-100k-b.log", root / "ml-100k" / "run1", 0.01, [(2, 0.05)], 14)  # resumed, logged the loaded 7 + 7
    log("SparCode-ml-100k-c.log", root / "ml-100k" / "run2", 0, [(0, 0.02)], 0)
    log("SparCode-ml-100k-d.log", tmp_path / "elsewhere" / "run3", 0, [(0, 0.09)], 0)  # another batch's run
    out = tmp_path / "curves.md"
    code_curves([f"--resume_root={root}", f"--log_dir={tmp_path / 'log'}", f"--out={out}"])
    text = out.read_text()
    assert "| SparCode | 2020 | 3 | 0.0500 (3) | 14 | 3 |" in text, "7 restarts in each of epochs 1 and 2; epoch 3 (resumed) logged their 14 as its own"
    assert "| SparCode[dead_code_threshold=0] | 2020 | 1 | 0.0200 (1) | 0 | 1 |" in text
    # what every run read unlike SparCode.yaml is said once (RecBole's expansion of train_neg_sample_args: ~ is not)
    assert "Every run here read softmax_negatives=20 (SparCode.yaml: 100): a run's name leaves these out." in text
    assert "0.09" not in text and (tmp_path / "curves.png").exists()


def test_rename_rows_spells_out_an_old_default_and_refuses_a_name_that_means_something_else(tmp_path, capsys):
    from benchmarks.knob_record import knob_values
    from benchmarks.rename_rows import main
    from benchmarks.run_benchmark import read_rows
    from benchmarks.worker import COLUMNS

    study = Study(["--models=SparCode", "--dataset=ml-100k", "--seeds=1,2", f"--out={tmp_path}"])
    knobs = knob_values(study.config("SparCode"))
    old_default = knobs["softmax_negatives"] + 7  # the rows ran before the default changed to today's
    base = {**dict.fromkeys(COLUMNS, "1"), "valid_curve": "[0.1]", "machine": "m", "date": "d"}
    for seed in ("1", "2"):
        study.record({**base, "variant": "SparCode", "seed": seed, "settings": "{}", "knobs": json.dumps({**knobs, "softmax_negatives": old_default})})
    beta = knobs["vq_beta"] + 1.0  # a row that named a value of its own
    own = {"variant": f"SparCode[vq_beta={beta}]", "seed": "2", "settings": json.dumps({"vq_beta": beta})}
    study.record({**base, **own, "knobs": json.dumps({**knobs, "vq_beta": beta})})
    csv_path = str(tmp_path / "ml-100k.csv")
    before = open(csv_path).read()
    with pytest.raises(UsageError, match="no longer means what that name means"):
        Study(["--models=SparCode", "--dataset=ml-100k", "--seeds=1", f"--out={tmp_path}"]).finished("SparCode", 1)

    refusals = [
        (["Caser", "SparCode"], "has no rows of 'Caser'"),
        (["SparCode", f"SparCode[softmax_negatives={old_default + 1}]"], f"it ran with softmax_negatives={old_default}"),
        ([f"SparCode[vq_beta={beta}]", "SparCode[softmax_negatives=3]"], f"vq_beta={beta}, SparCode[softmax_negatives=3] gives {knobs['vq_beta']}"),
        ([f"SparCode[vq_beta={beta}]", f"SparCode[vq_beta={beta},softmax_negatives=3]"], "it ran with softmax_negatives"),
        ([f"SparCode[vq_beta={beta}]", "SparCode"], "already has a row of 'SparCode' seed 2"),
    ]
    for args, message in refusals:
        with pytest.raises(SystemExit):
            main([csv_path, *args])
        assert message in capsys.readouterr().err
        assert open(csv_path).read() == before  # nothing renamed

    main([csv_path, "SparCode", f"SparCode[softmax_negatives={old_default}]"])
    assert "renamed 2 row(s)" in capsys.readouterr().out
    now = Study([f"--models=SparCode[softmax_negatives={old_default}]", "--dataset=ml-100k", "--seeds=1,2", f"--out={tmp_path}"])
    for seed in (1, 2):
        row = now.finished(f"SparCode[softmax_negatives={old_default}]", seed)  # reused, not refused as stale
        assert row["settings"] == json.dumps({"softmax_negatives": old_default}) and row["knobs"]
    assert [r["variant"] for r in read_rows(csv_path)][-1] == f"SparCode[vq_beta={beta}]"  # other rows untouched
    with pytest.raises(SystemExit):  # the same name again: two rows would share a key
        main([csv_path, f"SparCode[vq_beta={beta}]", f"SparCode[softmax_negatives={old_default}]"])
    assert "already has a row" in capsys.readouterr().err

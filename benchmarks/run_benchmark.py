"""Benchmark T2Diff, its ablations and RecBole's built-in models under one protocol.

    python -m benchmarks.run_benchmark --models=T2Diff,SASRec,GRU4Rec,BERT4Rec --dataset=ml-100k \
        --seeds=2020,2021,2022 [--time_budget=MIN] [--search="learning_rate=0.001,0.002;train_batch_size=512,2048"] \
        [--data_path=../shared/data] [--config_files=...] [--key=value ...]

Protocol (properties/sequential.yaml): leave-one-out by time, full ranking over all items,
MAX_ITEM_LIST_LENGTH 50, early stopping on validation NDCG@10; each model at its property-file
config unless --config_files / --key=value (applied to every model) say otherwise. --time_budget gives
every run the same wall-clock, counted from the start of the run (loading the data and building the model,
a few seconds, count too): the epoch in progress when it runs out ends at that batch, is validated, and
the run is tested at its best-validation epoch as usual. Models may carry
settings in brackets, e.g. "T2Diff[lambda_diff=0.1]", and the paper's ablations have names:
T2Diff-noDiff, T2Diff-noDP, T2Diff-noTA, T2Diff-linear, T2Diff-log, the control T2Diff-copyLast
(x̂ := x_L), T2Diff-positions (order in the user tower) and T2Diff-amp (RecBole's enable_amp: the training
steps in bfloat16 on a CPU), and SparCode's SparCode-noVQ, SparCode-dot, SparCode-dotVQ (its two-tower
reduction) and SparCode-noReLU (docs/SPARCODE.md §14); an ablation takes settings in brackets too,
e.g. "T2Diff-copyLast[position_embedding=learned]". A preset's name (T2Diff-fast, T2Diff-paper: the file
properties/presets/<name>.yaml) is a configuration users run: it is searched like a model.
For a T2Diff with x̂, the row also gets x̂'s quality on validation at the best epoch
(benchmarks/xhat_diagnosis.py: relative error against the true next item, nearest-item hit@1/@10).

--search gives every model the same hyperparameter search: each point of the grid (keys separated by
";", values by ",") trains once with the first seed, and the point with the best validation NDCG@10 runs
all seeds (its first-seed run is the search run itself). An ablation takes its model's chosen point
(T2Diff-noDiff T2Diff's, SparCode-dotVQ SparCode's), so each differs from its model's row by its one switch. Test metrics play no part in any choice.

Every (model, seed) runs in its own process and is appended to results/<dataset>.csv as soon as it
ends (rows already there for the same settings are skipped, so an interrupted run resumes). The
summary (mean ± std over seeds) goes to results/<dataset>.md with a plot results/<dataset>.png. A run
that fails shows its error and the others go on; the runner then exits 1 naming the failed runs.

Modules: the variant language (benchmarks/variants.py), one run in its process (benchmarks/worker.py, its
resume state benchmarks/resume.py), the table (benchmarks/report.py, benchmarks/plots.py); this one is the CLI
and the studies' bookkeeping (CSV rows, resume folders), which benchmarks/batch.py shares.
"""

import argparse
import concurrent.futures
import csv
import functools
import hashlib
import json
import os
import shlex
import sys
import threading
import time

from benchmarks.cli import settings_of
from benchmarks.knob_record import refuse_stale
from benchmarks.report import summarize
from benchmarks.variants import ROOT, find_row, parse_grid, parse_variant, pick, search_trials, split_models
from benchmarks.worker import COLUMNS, command, environment, run_settings, run_worker, threads
from recbole_t2diff.cli import exit_on_usage_error
from recbole_t2diff.errors import UsageError


def say(line):
    """One progress line; a single write, so lines from parallel runs do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def read_header(path):
    with open(path, newline="") as f:
        return next(csv.reader(f))


def read_rows(path):
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def rewrite_rows(path, fields, rows):
    """Writes ``rows`` under the header ``fields`` over the CSV at ``path``, whole or not at all (a file beside it,
    then renamed over it)."""
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="T2Diff,SASRec,GRU4Rec,BERT4Rec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--seeds", default="2020,2021,2022")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files for every model")
    parser.add_argument("--time_budget", type=float, default=None, help="training minutes per run (same for every model)")
    parser.add_argument(
        "--search", default=None, help='grid searched for every model with the first seed, e.g. "learning_rate=0.001,0.002;train_batch_size=512,2048"'
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at once; each gets cores // jobs torch threads")
    parser.add_argument("--out", default=os.path.join(ROOT, "results"))
    parser.add_argument(
        "--resume_root",
        default=None,
        help="where interrupted runs keep their state (default <out>/.resume); outside the work tree it survives a fresh checkout",
    )
    return parser


@functools.lru_cache(maxsize=None)
def csv_lock(path):
    """One lock per CSV file in this process (a batch's studies with the same --out and --dataset share one)."""
    return threading.Lock()


CONFIG_LOCK = threading.Lock()  # a batch's worker threads ask for configs at once; RecBole builds one at a time


def read_seeds(text):
    """The seeds of --seeds=2020,2021 as ints; anything else is a UsageError that says how to write them."""
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise UsageError(f"cannot read --seeds={text}: write whole numbers separated by commas, e.g. --seeds=2020,2021,2022") from None


class Study:
    """One command line of this script: its variants, seeds, search grid, CSV and the rows already in it."""

    def __init__(self, argv):
        self.args, extra = build_parser().parse_known_args(argv)
        self.argv = list(argv)
        # The --key=value settings of every run: each run's command line, and part of the key of its resume folder.
        self.overrides = extra
        settings_of(extra)  # a misspelt argument fails now, in one line
        self.config_files = self.args.config_files.split() if self.args.config_files else None
        self.csv_path = os.path.join(self.args.out, f"{self.args.dataset}.csv")
        self.seeds = read_seeds(self.args.seeds)
        self.variants = split_models(self.args.models)
        for v in self.variants:
            parse_variant(v)  # a misspelt variant fails now, not after hours of other runs
        self.grid = parse_grid(self.args.search) if self.args.search else None
        self.trials = search_trials(self.variants, self.grid) if self.grid else None
        self.configs = {}

    @functools.cached_property
    def rows(self):
        """The rows already in the CSV, read when first needed."""
        return read_rows(self.csv_path)

    def config(self, variant):
        """The Config a run of ``variant`` trains with (the property files, --config_files, the variant's settings,
        the study's), built once; the tables read its stopping rule from it."""
        from recbole_t2diff.config import Config

        with CONFIG_LOCK:
            if variant not in self.configs:
                model, config_dict = run_settings(variant, self.seeds[0])
                self.configs[variant] = Config(
                    model=model,
                    dataset=self.args.dataset,
                    config_file_list=self.config_files,
                    config_dict={**config_dict, "state": "ERROR"},
                    argv=self.overrides,
                )
            return self.configs[variant]

    def finished(self, variant, seed):
        """The CSV row of (variant, seed), None when there is none; a row that no longer means what the variant's name
        means (a default or preset changed since it ran) is a one-line UsageError, never silently reused."""
        row = find_row(self.rows, variant, seed)
        if row is not None:
            refuse_stale(self.csv_path, row, variant, self.config(variant))
        return row

    def command(self, variant, seed):
        """The worker process of one (variant, seed)."""
        a = self.args
        return command(variant, seed, a.dataset, a.config_files, a.time_budget, self.resume_dir(variant, seed), self.overrides)

    def resume_dir(self, variant, seed):
        """Where a run keeps the state it resumes from: one folder per (dataset, variant, seed, settings).

        None with a time budget: a budget counts from each start, so a resumed budgeted run would
        train longer than the others."""
        if self.args.time_budget:
            return None
        key = json.dumps([variant, int(seed), self.args.config_files, sorted(self.overrides)])
        root = self.args.resume_root or os.path.join(self.args.out, ".resume")
        return os.path.join(root, self.args.dataset, hashlib.sha1(key.encode()).hexdigest()[:16])

    def record(self, row):
        """Appends a finished run's row to the CSV. A CSV from before a column was added is first rewritten
        with the new columns (empty in its old rows), so that no new row loses a value."""
        with csv_lock(self.csv_path):  # studies of one batch may share a CSV
            self.rows.append(row)
            os.makedirs(self.args.out, exist_ok=True)
            new_file = not os.path.isfile(self.csv_path)
            fields = COLUMNS if new_file else read_header(self.csv_path)
            if missing := [c for c in COLUMNS if c not in fields]:
                fields = fields + missing
                rewrite_rows(self.csv_path, fields, read_rows(self.csv_path))
            with open(self.csv_path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                if new_file:
                    writer.writeheader()
                writer.writerow(row)

    def search(self):
        """The search's outcome from the rows (``None`` without --search); call it once every trial ran or failed."""
        if not self.grid:
            return None
        return {
            "grid": self.grid,
            "trials": self.trials,
            "seed": self.seeds[0],
            "chosen": pick(self.variants, self.grid, self.seeds[0], self.rows, self.trials),
        }

    def command_line(self):
        """This study as the command a table states (where runs kept their resume state is no setting)."""
        return "python -m benchmarks.run_benchmark " + shlex.join(a for a in self.argv if not a.startswith("--resume_root="))

    def summarize(self, search=None):
        chosen = self.variants if search is None else [search["chosen"][v] for v in self.variants]
        summarize(self, self.rows, chosen, [self.command_line()], search)


def main(argv=None):
    with exit_on_usage_error():
        study = Study(sys.argv[1:] if argv is None else argv)
    args = study.args
    started, failed = time.time(), []
    # Parallel runs split the cores between them (torch threads = cores // jobs), so that timings
    # of runs that shared the machine stay comparable with each other.
    env = environment(threads(args.jobs), args.jobs)

    def run_job(number, total, variant, seed):
        say(f"[bench] {number}/{total} {variant} seed {seed} started ({(time.time() - started) / 60:.1f} min so far)")

        def on_epoch(e):
            say(f"[bench]   {variant} seed {seed} epoch {e['epoch']}: valid NDCG@10 {e['valid']:.4f} ({e['run_s']:.0f} s into the run)")

        row, error = run_worker(study.command(variant, seed), env, on_epoch)
        if row is None:
            say(f"[bench] {variant} seed {seed} failed:\n{error}")
            failed.append(f"{variant} seed {seed}")
            return
        study.record(row)
        say(
            f"[bench] {variant} seed {seed}: test NDCG@10 {row['test_ndcg@10']:.4f}, Recall@10 {row['test_recall@10']:.4f}, "
            f"{row['epochs_run']} epochs, {row['train_s_per_epoch']} s/epoch ({(time.time() - started) / 60:.1f} min so far)"
        )

    def run_all(jobs):
        """Runs the (variant, seed) pairs not yet in the CSV, args.jobs at a time."""
        todo = [(v, s) for v, s in jobs if study.finished(v, s) is None]
        for variant, seed in sorted(set(jobs) - set(todo), key=jobs.index):
            say(f"[bench] {variant} seed {seed}: already in {study.csv_path}, skipped")
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run_job(job[0], len(todo), *job[1]), enumerate(todo, 1)))

    search = None
    if study.grid:
        run_all([(t, study.seeds[0]) for v in study.trials for t in study.trials[v]])
        search = study.search()
    variants = study.variants if search is None else [search["chosen"][v] for v in study.variants]
    run_all([(v, s) for v in variants for s in study.seeds])
    study.summarize(search)
    if failed:  # the table holds what finished; the exit status says it is incomplete
        raise SystemExit(f"error: {len(failed)} run(s) failed ({', '.join(failed)}); their errors are above, and the same command re-runs only them")


if __name__ == "__main__":
    main()

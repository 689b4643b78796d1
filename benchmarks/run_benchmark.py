"""Benchmark T2Diff, its ablations and RecBole's built-in models under one protocol.

    python benchmarks/run_benchmark.py --models=T2Diff,SASRec,GRU4Rec,BERT4Rec --dataset=ml-100k \
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
(x̂ := x_L) and T2Diff-positions (order in the user tower); an ablation takes settings in brackets too,
e.g. "T2Diff-copyLast[position_embedding=learned]". A preset's name (T2Diff-fast, T2Diff-paper: the file
properties/presets/<name>.yaml) is a configuration users run: it is searched like a model.
For a T2Diff with x̂, the row also gets x̂'s quality on validation at the best epoch
(benchmarks/xhat_diagnosis.py: relative error against the true next item, nearest-item hit@1/@10).

--search gives every model the same hyperparameter search: each point of the grid (keys separated by
";", values by ",") trains once with the first seed, and the point with the best validation NDCG@10 runs
all seeds (its first-seed run is the search run itself). The ablations take T2Diff's chosen point, so
each differs from T2Diff's row by its one switch. Test metrics play no part in any choice.

Every (model, seed) runs in its own process and is appended to results/<dataset>.csv as soon as it
ends (rows already there for the same settings are skipped, so an interrupted run resumes). The
summary (mean ± std over seeds) goes to results/<dataset>.md with a plot results/<dataset>.png. A run
that fails shows its error and the others go on; the runner then exits 1 naming the failed runs.
"""
import argparse
import concurrent.futures
import csv
import datetime
import functools
import hashlib
import itertools
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from machine import command_line, describe  # benchmarks/ is on sys.path when a script runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ABLATIONS = {
    "T2Diff-noDiff": {"use_diffusion": False},
    "T2Diff-copyLast": {"x_hat_source": "copy_last"},
    "T2Diff-positions": {"position_embedding": "learned"},
    "T2Diff-noDP": {"use_drift": False},
    "T2Diff-noTA": {"use_target_attention": False},
    "T2Diff-linear": {"beta_schedule": "linear"},
    "T2Diff-log": {"beta_schedule": "log"},
}
METRICS = ["recall@10", "mrr@10", "ndcg@10", "recall@20", "ndcg@20", "recall@2", "ndcg@2"]
COLUMNS = ["variant", "seed", "settings", *[f"valid_{m}" for m in METRICS], *[f"test_{m}" for m in METRICS],
           "params", "train_s_per_epoch", "eval_s", "epochs_run", "best_epoch", "peak_rss_mib",
           "xhat_rel_error", "xhat_hit@1", "xhat_hit@10", "run_s", "valid_curve", "machine", "date", "reads"]
XHAT_COLUMNS = ["xhat_rel_error", "xhat_hit@1", "xhat_hit@10"]
OURS = ("T2Diff", "SparCode")  # the package's models; every other model is a RecBole built-in


def split_models(text):
    """The variants of --models: commas inside brackets belong to a variant's settings."""
    return re.findall(r"[^,\[\]]+(?:\[[^\]]*\])?", text)


def base_name(variant):
    """The name before any brackets: "T2Diff-noDP[n_steps=20]" -> "T2Diff-noDP"."""
    return variant.partition("[")[0]


def parse_value(text):
    text = text.strip()
    return json.loads(text) if re.fullmatch(r"[-\d.eE]+|true|false|null", text) else text


def parse_variant(variant):
    """(model name, settings) for "SASRec", "T2Diff-noDP", "T2Diff[lambda_diff=0.1,n_steps=20]" or "T2Diff-noDP[n_steps=20]"."""
    match = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?", variant)
    if not match or ("-" in match.group(1) and match.group(1) not in ABLATIONS and preset_settings(match.group(1)) is None):
        raise SystemExit(f"error: cannot read model '{variant}': write NAME, NAME[key=value,...], one of {', '.join(ABLATIONS)} "
                         "or a preset's name (properties/presets/<Model>-<name>.yaml)")
    name, settings = match.group(1), {}
    if name in ABLATIONS:
        name, settings = "T2Diff", dict(ABLATIONS[name])
    elif "-" in name:  # a preset: a configuration users run, searched like a model
        name, settings = name.partition("-")[0], preset_settings(name)
    for pair in filter(None, (match.group(2) or "").split(",")):
        key, _, value = pair.partition("=")
        settings[key.strip()] = parse_value(value)
    return name, settings


def preset_settings(name):
    """The settings of ``properties/presets/<name>.yaml`` (e.g. T2Diff-fast), or None when there is no such preset."""
    path = os.path.join(ROOT, "properties", "presets", f"{name}.yaml")
    return dict(read_yaml(path)) if os.path.isfile(path) else None


def with_settings(variant, point):
    """The variant with the grid point's settings added to its brackets: SASRec -> SASRec[learning_rate=0.001]."""
    name = base_name(variant)
    pairs = [p for p in variant[len(name):].strip("[]").split(",") if p] + [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items()]
    return f"{name}[{','.join(pairs)}]" if pairs else name


def parse_grid(text):
    """The points of --search="learning_rate=0.001,0.002;train_batch_size=512,2048", as dicts, in order."""
    axes = []
    for axis in filter(None, (a.strip() for a in text.split(";"))):
        key, sep, values = axis.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise SystemExit(f"error: cannot read --search axis '{axis}': write key=value1,value2 and separate keys with ';'")
        axes.append((key.strip(), [parse_value(v) for v in values.split(",")]))
    return [dict(zip([k for k, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]


class Batches:
    """A RecBole train loader that counts the batches it gives and stops once the budget is spent.

    The check comes after each batch, so every epoch trains at least one; the epoch in progress when
    the budget runs out ends at that batch and is validated as usual. Cutting inside an epoch matters
    where one epoch alone is longer than the budget (ml-1m: 30+ CPU-minutes per epoch).
    """

    def __init__(self, loader, budget):
        self.loader, self.budget, self.given = loader, budget, 0

    def __getattr__(self, name):  # the trainer may read sampler, shuffle, ... of the real loader
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch
            self.given += 1
            if self.budget.spent():
                return


class Budget:
    """Wall-clock budget of one run from its creation (data loading, training, validation), ``None`` minutes = no limit.

    ``apply`` feeds the trainer's epochs through :class:`Batches` and makes RecBole's fit loop stop
    after the validation that follows the cut: the loop ends when ``early_stopping`` says stop, and
    this process trains one model, so wrapping that function here adds the budget to its verdict
    while keeping its bookkeeping (best score, whether this epoch is the new best) unchanged.
    """

    def __init__(self, minutes=None):
        self.minutes, self.started, self.epochs = minutes, time.perf_counter(), 0.0  # epochs: fractional

    def spent(self):
        return self.minutes is not None and time.perf_counter() - self.started >= 60 * self.minutes

    def apply(self, trainer):
        import recbole.trainer.trainer as trainer_module

        train_epoch, early_stopping = trainer._train_epoch, trainer_module.early_stopping

        def budgeted_epoch(train_data, *args, **kwargs):
            batches = Batches(train_data, self)
            out = train_epoch(batches, *args, **kwargs)
            self.epochs += batches.given / len(train_data)
            return out

        def stop_when_spent(*args, **kwargs):
            best, cur_step, stop, update = early_stopping(*args, **kwargs)
            if self.spent():
                stop = True
                print(f"time budget of {self.minutes:g} min spent after {self.epochs:.2f} epochs", file=sys.stderr, flush=True)
            return best, cur_step, stop, update

        trainer._train_epoch = budgeted_epoch
        trainer_module.early_stopping = stop_when_spent


def worker(variant, seed, dataset, config_files, time_budget=None, resume_dir=None):
    """Train and test one (variant, seed); returns a row of COLUMNS.

    With ``resume_dir`` the run keeps its training state there after every validated epoch (see
    :class:`Resume`) and, started again after an interruption, goes on from the last such epoch.
    """
    from recbole_t2diff.quick_start import run

    model, settings = parse_variant(variant)
    timings, curve, clock = {"train": [], "valid": []}, [], {"started": time.perf_counter()}

    def timed(method, bucket):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = method(*args, **kwargs)
            timings[bucket].append(time.perf_counter() - start)
            return out
        return wrapper

    trainers, budget = [], Budget(time_budget)
    # A private checkpoint folder: RecBole names checkpoints by the second, and parallel runs of
    # one model would otherwise overwrite each other's.
    checkpoints = resume_dir or tempfile.mkdtemp(prefix="bench-")
    resume = Resume(checkpoints, timings, curve, budget, clock) if resume_dir else None

    def on_trainer(trainer):
        budget.apply(trainer)
        if resume is not None:
            fit = trainer.fit

            def fit_resuming(train_data, valid_data=None, **kwargs):
                resume.restore(trainer, train_data)
                kwargs["callback_fn"] = lambda epoch, score: resume.save(trainer, train_data, epoch)
                return fit(train_data, valid_data, **kwargs)

            trainer.fit = fit_resuming
        trainer._train_epoch = timed(trainer._train_epoch, "train")
        valid_epoch = timed(trainer._valid_epoch, "valid")

        def valid_epoch_reported(*args, **kwargs):
            score, result = valid_epoch(*args, **kwargs)
            curve.append(round(float(score), 5))
            # One line per validation, read live by the runner (progress) and kept as the run's curve.
            best = max(range(len(curve)), key=lambda i: (curve[i], -i))  # RecBole keeps the first of equal scores
            print("EPOCH " + json.dumps({"epoch": len(curve), "valid": curve[-1], "best": curve[best], "best_epoch": best + 1,
                                          "train_s": round(sum(timings["train"]), 1),
                                          "run_s": round(time.perf_counter() - clock["started"], 1)}), flush=True)
            return score, result

        trainer._valid_epoch = valid_epoch_reported
        if resume is not None:  # a fixed name, so that a resumed run finds its best checkpoint
            trainer.saved_model_file = os.path.join(checkpoints, "best.pth")
        trainers.append(trainer)

    result = run(model, dataset, config_file_list=config_files, saved=True, on_trainer=on_trainer,
                 config_dict={"seed": seed, "show_progress": False, "checkpoint_dir": checkpoints, **settings})
    trainer = trainers[0]
    row = {"variant": variant, "seed": seed, "settings": json.dumps(settings, sort_keys=True),
           "params": result["params"], "train_s_per_epoch": round(sum(timings["train"]) / budget.epochs, 2),
           "eval_s": round(statistics.mean(timings["valid"]), 2), "epochs_run": round(budget.epochs, 3),
           "best_epoch": len(timings["train"]) - trainer.cur_step * trainer.eval_step,
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "run_s": round(time.perf_counter() - clock["started"], 1), "valid_curve": json.dumps(curve),
           "machine": describe(), "date": datetime.date.today().isoformat()}
    for metric in METRICS:
        row[f"valid_{metric}"] = float(result["best_valid_result"][metric])
        row[f"test_{metric}"] = float(result["test_result"][metric])
    row.update(result.get("xhat_quality") or dict.fromkeys(XHAT_COLUMNS, ""))
    # What the run reads that RecBole's built-ins do not: T2Diff's time lag reads the request time.
    row["reads"] = "request time" if getattr(trainer.model, "lag_embedding", None) is not None else ""
    shutil.rmtree(checkpoints)  # a benchmark keeps numbers, not checkpoints
    return row


class Resume:
    """A run's training state after its last validated epoch, in ``folder``/last.pth, to go on from.

    Holds the weights, the optimizer, the early-stopping state, every random generator the training
    draws from (torch, CUDA, numpy, random and the train loader's shuffling), and the run's curve and
    timings, so that an interrupted and resumed run trains exactly as an uninterrupted one. Written
    atomically; read with ``weights_only=True`` (plain tensors and numbers: loading runs no code).
    """

    def __init__(self, folder, timings, curve, budget, clock):
        self.path, self.timings, self.curve, self.budget, self.clock = os.path.join(folder, "last.pth"), timings, curve, budget, clock
        os.makedirs(folder, exist_ok=True)

    def save(self, trainer, train_data, epoch):
        import random

        import numpy as np
        import torch

        kind, keys, position, has_gauss, gauss = np.random.get_state()
        state = {
            "epoch": epoch, "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "cur_step": trainer.cur_step, "best_valid_score": float(trainer.best_valid_score),
            "best_valid_result": {k: float(v) for k, v in (trainer.best_valid_result or {}).items()},
            "curve": list(self.curve), "train_s": list(self.timings["train"]), "valid_s": list(self.timings["valid"]),
            "budget_epochs": self.budget.epochs, "elapsed": time.perf_counter() - self.clock["started"],
            "torch_rng": torch.get_rng_state(), "loader_rng": train_data.generator.get_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy_rng": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "random_rng": random.getstate(),
        }
        torch.save(state, self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)

    def restore(self, trainer, train_data):
        """Sets the trainer up to go on after the saved epoch; nothing when no state was saved."""
        import random

        import numpy as np
        import torch

        if not os.path.isfile(self.path):
            return
        state = torch.load(self.path, map_location=trainer.device, weights_only=True)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.cur_step, trainer.best_valid_score = state["cur_step"], state["best_valid_score"]
        trainer.best_valid_result = state["best_valid_result"] or None
        # Early stopping had already fired at the saved epoch: train no further, test as it would have.
        stopped = trainer.cur_step > trainer.stopping_step
        trainer.start_epoch = trainer.epochs if stopped else state["epoch"] + 1
        self.curve[:] = state["curve"]
        self.timings["train"][:], self.timings["valid"][:] = state["train_s"], state["valid_s"]
        self.budget.epochs = state["budget_epochs"]
        self.clock["started"] = time.perf_counter() - state["elapsed"]
        torch.set_rng_state(state["torch_rng"].cpu())
        train_data.generator.set_state(state["loader_rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        kind, keys, position, has_gauss, gauss = state["numpy_rng"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        version, internal, gauss_next = state["random_rng"]
        random.setstate((version, tuple(internal), gauss_next))
        print(f"resumed after epoch {state['epoch'] + 1} from {self.path}", file=sys.stderr, flush=True)


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


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="T2Diff,SASRec,GRU4Rec,BERT4Rec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--seeds", default="2020,2021,2022")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files for every model")
    parser.add_argument("--time_budget", type=float, default=None, help="training minutes per run (same for every model)")
    parser.add_argument("--search", default=None,
                        help='grid searched for every model with the first seed, e.g. "learning_rate=0.001,0.002;train_batch_size=512,2048"')
    parser.add_argument("--jobs", type=int, default=1, help="runs at once; each gets cores // jobs torch threads")
    parser.add_argument("--out", default=os.path.join(ROOT, "results"))
    parser.add_argument("--resume_root", default=None,
                        help="where interrupted runs keep their state (default <out>/.resume); outside the work tree it survives a fresh checkout")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    return parser


@functools.lru_cache(maxsize=None)
def csv_lock(path):
    """One lock per CSV file in this process (a batch's studies with the same --out and --dataset share one)."""
    return threading.Lock()


class Study:
    """One command line of this script: its variants, seeds, search grid, CSV and the rows already in it."""

    def __init__(self, argv):
        self.args, extra = build_parser().parse_known_args(argv)
        self.argv = list(argv)
        self.overrides = [a for a in extra if a.startswith("--") and "=" in a]
        self.csv_path = os.path.join(self.args.out, f"{self.args.dataset}.csv")
        self.seeds = [int(s) for s in self.args.seeds.split(",")]
        self.variants = split_models(self.args.models)
        for v in self.variants:
            parse_variant(v)  # a misspelt variant fails now, not after hours of other runs
        self.grid = parse_grid(self.args.search) if self.args.search else None
        self.trials = search_trials(self.variants, self.grid) if self.grid else None

    @functools.cached_property
    def rows(self):
        """The rows already in the CSV, read when first needed: a worker process never needs them."""
        return read_rows(self.csv_path)

    def command(self, variant, seed):
        """The worker process of one (variant, seed)."""
        a = self.args
        return [sys.executable, os.path.abspath(__file__), "--worker", variant, str(seed), f"--dataset={a.dataset}", f"--out={a.out}",
                *([f"--config_files={a.config_files}"] if a.config_files else []),
                *([f"--time_budget={a.time_budget}"] if a.time_budget else []),
                *([f"--resume_root={a.resume_root}"] if a.resume_root else []), *self.overrides]

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
                with open(self.csv_path + ".tmp", "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(read_rows(self.csv_path))
                os.replace(self.csv_path + ".tmp", self.csv_path)
            with open(self.csv_path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                if new_file:
                    writer.writeheader()
                writer.writerow(row)

    def search(self):
        """The search's outcome from the rows (``None`` without --search); call it once every trial ran or failed."""
        if not self.grid:
            return None
        return {"grid": self.grid, "trials": self.trials, "seed": self.seeds[0],
                "chosen": pick(self.variants, self.grid, self.seeds[0], self.rows, self.trials)}

    def command_line(self):
        """This study as the run_benchmark.py command a table states (where runs kept their resume state is no setting)."""
        return "python benchmarks/run_benchmark.py " + shlex.join(a for a in self.argv if not a.startswith("--resume_root="))

    def summarize(self, search=None, jobs=None):
        chosen = self.variants if search is None else [search["chosen"][v] for v in self.variants]
        summarize(self.rows, self.args, chosen, search, command=self.command_line(), jobs=jobs, overrides=self.overrides)


def run_worker(command, env, on_epoch=None, procs=None):
    """Runs one worker process; returns (row, None) or (None, the end of its error output).

    Its EPOCH lines go to ``on_epoch`` as they come (live progress); ``procs``, a set, holds the
    process while it runs, so that a caller can stop it.
    """
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        if procs is not None:
            procs.add(proc)
        row = None
        for line in proc.stdout:
            if line.startswith("EPOCH ") and on_epoch:
                on_epoch(json.loads(line[len("EPOCH "):]))
            elif line.startswith("RESULT "):
                row = json.loads(line[len("RESULT "):])
        proc.wait()
        if procs is not None:
            procs.discard(proc)
        if proc.returncode or row is None:
            errors.seek(0)
            return None, errors.read()[-3000:] or f"exit status {proc.returncode}"
        return row, None


def main():
    study = Study(sys.argv[1:])
    args = study.args
    if args.worker:
        config_files = args.config_files.split() if args.config_files else None
        print("RESULT " + json.dumps(worker(args.worker[0], int(args.worker[1]), args.dataset, config_files, args.time_budget,
                                            study.resume_dir(*args.worker))), flush=True)
        return
    started, failed = time.time(), []
    # Parallel runs split the cores between them (torch threads = cores // jobs), so that timings
    # of runs that shared the machine stay comparable with each other.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads(args.jobs))}

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
        say(f"[bench] {variant} seed {seed}: test NDCG@10 {row['test_ndcg@10']:.4f}, Recall@10 {row['test_recall@10']:.4f}, "
            f"{row['epochs_run']} epochs, {row['train_s_per_epoch']} s/epoch ({(time.time() - started) / 60:.1f} min so far)")

    def run_all(jobs):
        """Runs the (variant, seed) pairs not yet in the CSV, args.jobs at a time."""
        todo = [(v, s) for v, s in jobs if find_row(study.rows, v, s) is None]
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
    study.summarize(search, jobs=args.jobs)
    if failed:  # the table holds what finished; the exit status says it is incomplete
        raise SystemExit(f"error: {len(failed)} run(s) failed ({', '.join(failed)}); their errors are above, and the same command re-runs only them")


def find_row(rows, variant, seed):
    return next((r for r in rows if r["variant"] == variant and int(r["seed"]) == seed), None)


def search_trials(variants, grid):
    """{variant: its variant at every grid point} for the variants a search trains (not the ablations)."""
    searched = [v for v in variants if base_name(v) not in ABLATIONS]
    if len(searched) < len(variants) and "T2Diff" not in searched:
        raise SystemExit("error: with --search the ablations take T2Diff's chosen settings: add T2Diff to --models")
    return {v: [with_settings(v, point) for point in grid] for v in searched}


def pick(variants, grid, seed, rows, trials):
    """{variant: chosen variant}: the trial with the best validation NDCG@10; an ablation takes T2Diff's point."""
    chosen, points = {}, {}
    for v, mine in trials.items():
        scores = [(float(row["valid_ndcg@10"]), i) for i, t in enumerate(mine) if (row := find_row(rows, t, seed))]
        if not scores:
            raise SystemExit(f"error: every search run of {v} failed; see the messages above")
        best = max(scores, key=lambda score: score[0])[1]  # a tie goes to the earlier point
        chosen[v], points[v] = mine[best], grid[best]
    for v in variants:
        if v not in chosen:  # an ablation (search_trials makes sure T2Diff was searched)
            chosen[v] = with_settings(v, points["T2Diff"])
    return chosen


def choose(variants, grid, seed, run_all, rows):
    """The search: every grid point of every non-ablation variant with one seed; the best on validation wins.

    Returns {"grid": [points], "trials": {variant: [trial variants]}, "chosen": {variant: chosen variant}};
    an ablation's chosen variant is the ablation at T2Diff's chosen point.
    """
    trials = search_trials(variants, grid)
    run_all([(t, seed) for v in trials for t in trials[v]])
    return {"grid": grid, "trials": trials, "chosen": pick(variants, grid, seed, rows, trials), "seed": seed}


def mean_std(values):
    values = [float(v) for v in values]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def threads(jobs):
    return max(1, (os.cpu_count() or 1) // jobs)


def per_machine(rows, key):
    """The mean of a timing column over ``rows``, or "mixed machines" when they ran on different machines:
    seconds from a GPU and a CPU are never averaged together."""
    if len({r.get("machine") or "" for r in rows}) > 1:
        return "mixed machines"
    return f"{mean_std(r[key] for r in rows)[0]:.1f}"


def welch_p(a, b):
    """Welch's t-test p-value (two-sided) of two groups of seeds, or None when either has fewer than 2 values
    or both have no spread. Seeds are not paired across models, so the test is unpaired and unequal-variance."""
    from scipy import stats

    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2 or statistics.pstdev(a) == statistics.pstdev(b) == 0:
        return None
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def margin(rows, variants):
    """Each of the package's rows against the best built-in (by mean test NDCG@10): the difference of means
    of test NDCG@10 and Recall@10 with Welch's p-value over the seeds, and what the row reads that the
    built-ins do not, as markdown lines."""
    values = {v: {k: [float(r[k]) for r in rows if r["variant"] == v] for k in ("test_ndcg@10", "test_recall@10")} for v in variants}
    builtins = [v for v in variants if parse_variant(v)[0] not in OURS]
    ours = [v for v in variants if parse_variant(v)[0] in OURS]
    if not builtins or not ours:
        return []
    best = max(builtins, key=lambda v: statistics.mean(values[v]["test_ndcg@10"]))

    def cell(v, key):
        diff = statistics.mean(values[v][key]) - statistics.mean(values[best][key])
        p = welch_p(values[v][key], values[best][key])
        return f"{diff:+.4f} ({100 * diff / statistics.mean(values[best][key]):+.1f}%)", "—" if p is None else f"{p:.3g}"

    lines = [f"Margins over the best built-in by mean test NDCG@10, **{best}** ({len(values[best]['test_ndcg@10'])} seeds); "
             "p: Welch's t-test over the seeds (unpaired: seeds are not paired across models), — with fewer than 2 seeds.", "",
             "| model | seeds | test NDCG@10 vs best built-in | p | test Recall@10 vs best built-in | p | reads beyond the built-ins |",
             "|---|---|---|---|---|---|---|"]
    for v in ours:
        reads = sorted({r.get("reads") or "" for r in rows if r["variant"] == v} - {""})
        lines.append(f"| {v} | {len(values[v]['test_ndcg@10'])} | {' | '.join(cell(v, 'test_ndcg@10'))} | "
                     f"{' | '.join(cell(v, 'test_recall@10'))} | {', '.join(reads) or '—'} |")
    return lines + [""]


def sasrec_ratio(rows, variant, variants):
    """s/epoch of ``variant`` over SASRec's, from runs on the same machine and day only (timings from different
    machines or days are never divided); None without such a pair. SASRec is the table's SASRec row."""
    reference = next((v for v in variants if parse_variant(v)[0] == "SASRec"), None)
    if reference is None:
        return None
    ratios = []
    for key in sorted({(r.get("machine"), r.get("date")) for r in rows if r["variant"] == variant}):
        mine = [float(r["train_s_per_epoch"]) for r in rows if r["variant"] == variant and (r.get("machine"), r.get("date")) == key]
        theirs = [float(r["train_s_per_epoch"]) for r in rows if r["variant"] == reference and (r.get("machine"), r.get("date")) == key]
        if theirs:
            ratios.append(statistics.mean(mine) / statistics.mean(theirs))
    return statistics.mean(ratios) if ratios else None


def title(variants):
    models = list(dict.fromkeys(parse_variant(v)[0] for v in variants))
    ours, builtins = [m for m in models if m in OURS], [m for m in models if m not in OURS]
    if ours and builtins:
        return f"{' and '.join(ours)} against RecBole's built-in models"
    return ", ".join(models) + (" and their variants" if len(variants) > len(models) else "")


def setting(key, variant, args, overrides=()):
    """The value of config ``key`` a run of ``variant`` trained with, in RecBole's order of precedence.

    Lowest first: RecBole's overall.yaml, model and dataset files, this package's property files (the ones
    a Config reads, for a sequential model), --config_files, the variant's settings (the worker's config_dict),
    then the study's --key=value overrides (the worker's command line, which RecBole reads last). ``None`` when
    no file sets it. (Not a Config: building one would read this script's own command line as settings.)
    """
    import recbole

    from recbole_t2diff.config import property_files

    model = parse_variant(variant)[0]
    theirs = os.path.join(os.path.dirname(recbole.__file__), "properties")
    files = [os.path.join(theirs, "overall.yaml"), os.path.join(theirs, "model", f"{model}.yaml"),
             os.path.join(theirs, "dataset", f"{args.dataset}.yaml"), *map(str, property_files(model, args.dataset, sequential=True)),
             *(args.config_files.split() if getattr(args, "config_files", None) else [])]
    value = None
    for file in files:
        value = read_yaml(file).get(key, value)
    value = parse_variant(variant)[1].get(key, value)
    for override in overrides or ():
        name, _, text = override[2:].partition("=")
        if name == key:
            value = parse_value(text)
    return value


@functools.lru_cache(maxsize=None)
def read_yaml(file):
    """A property file's settings ({} when absent), read once per process: a summary asks for them per variant and per cell."""
    import yaml

    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def capped(rows, variant, args, overrides=()):
    """The rows of ``variant`` that the epoch cap stopped: epochs_run reached ``epochs`` while early stopping was still waiting.

    RecBole stops early once ``stopping_step`` + 1 validations in a row failed to beat the best, so a run
    that reached the cap exactly then ended by early stopping (and a budget cuts runs below the cap).
    """
    cap, patience = setting("epochs", variant, args, overrides), setting("stopping_step", variant, args, overrides)
    return [r for r in rows if r["variant"] == variant and cap is not None and float(r["epochs_run"]) >= float(cap)
            and (patience is None or float(r["epochs_run"]) - float(r["best_epoch"]) <= float(patience))]


def colours(variants):
    """One colour per variant, the same in every plot of a study (tab10, or tab20 past ten variants)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(variants) <= 10 else "tab20"]
    return {v: cmap(i % cmap.N) for i, v in enumerate(variants)}


def plot_curves(rows, variants, path, dataset, cap_of):
    """Validation NDCG@10 against epoch, a line per run (seeds of a variant share its colour), a dot at the best epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = colours(variants)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for v in variants:
        mine = sorted((r for r in rows if r["variant"] == v and r.get("valid_curve")), key=lambda r: int(r["seed"]))
        for i, r in enumerate(mine):
            curve = json.loads(r["valid_curve"])
            ax.plot(range(1, len(curve) + 1), curve, color=colour[v], linewidth=1.2, alpha=0.85,
                    label=f"{v} ({len(mine)} seed{'s' if len(mine) > 1 else ''})" if i == 0 else None)
            best = int(float(r["best_epoch"]))
            if 1 <= best <= len(curve):
                ax.plot([best], [curve[best - 1]], "o", color=colour[v], markersize=4)
    caps = {cap_of(v) for v in variants} - {None}
    if len(caps) == 1:  # one cap for every variant: drawn where the longest run reached it
        cap = float(caps.pop())
        if cap <= max((len(json.loads(r["valid_curve"])) for r in rows if r["variant"] in variants and r.get("valid_curve")), default=0):
            ax.axvline(cap, color="grey", linestyle=":", linewidth=1)
            ax.text(cap, ax.get_ylim()[0], f" cap {cap:g}", color="grey", fontsize=7, va="bottom")
    ax.set(xlabel="epoch",
           ylabel="validation NDCG@10", title=f"{dataset}: validation NDCG@10 per epoch (dot: best epoch, whose weights are tested)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2 if len(variants) > 6 else 1)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def unfinished_search(rows, args, requested):
    """The header line of a table summarized before its --search finished (no search outcome to apply)."""
    seed = int(args.seeds.split(",")[0])
    trials = [t for ts in search_trials(requested, parse_grid(args.search)).values() for t in ts]
    done = [t for t in trials if find_row(rows, t, seed)]
    searched = ", ".join(dict.fromkeys(base_name(t) for t in done))
    return (f"Search: unfinished, {len(done)} of its {len(trials)} runs (seed {seed}, grid `{args.search}`) are in the CSV"
            f"{f' ({searched})' if searched else ''}; the rows below are those search points, one seed each, "
            "not yet each model's chosen point with every seed.")


def order(variant, requested, rows):
    """Where a variant's row goes: a requested one at its place, another (e.g. a search point of an unfinished search)
    after the requested variant of the same model, in the order the CSV got them."""
    names = [base_name(q) for q in requested]
    place = requested.index(variant) if variant in requested else names.index(base_name(variant)) + 0.5 if base_name(variant) in names else len(requested)
    return place, next(i for i, r in enumerate(rows) if r["variant"] == variant)


def summarize(rows, args, requested, search=None, command=None, jobs=None, overrides=()):
    # The requested variants first, then any other rows of the CSV but the search's unchosen points.
    hidden = {t for trials in (search or {}).get("trials", {}).values() for t in trials}
    variants = sorted({r["variant"] for r in rows if r["variant"] in requested or r["variant"] not in hidden}, key=lambda v: order(v, requested, rows))
    cap_of = lambda v: setting("epochs", v, args, overrides)  # noqa: E731
    caps, patiences = {cap_of(v) for v in variants}, {setting("stopping_step", v, args, overrides) for v in variants}
    cap = f"{next(iter(caps))} epochs" if len(caps) == 1 else "the epochs each variant sets"  # a variant may set its own
    patience = f"{next(iter(patiences))} validations" if len(patiences) == 1 else "the stopping_step each variant sets"
    lines = [
        f"# {args.dataset}: {title(variants)}",
        "",
        # Several studies may share one CSV (a plan's lines with the same --out and --dataset): one line each.
        *[f"Command: `{c}`  " for c in (command if isinstance(command, list) else [command or command_line()])],
        f"Machine: {'; '.join(sorted({r.get('machine') or describe() for r in rows if r['variant'] in variants}))}; "
        f"date {', '.join(sorted({r.get('date') or datetime.date.today().isoformat() for r in rows if r['variant'] in variants}))}"
        f"{f'; {jobs} run(s) at a time' if jobs else ''}.  ",
        "Protocol: leave-one-out by time, full ranking over all items, MAX_ITEM_LIST_LENGTH 50, early stopping on",
        "validation NDCG@10; test metrics of the best-validation checkpoint. Mean ± std over the seeds listed.",
        *([f"Budget: each run had {args.time_budget:g} min of wall-clock from its start (data loading, training and validation; "
           f"the epoch in progress when it ran out was cut at that batch and validated); {args.jobs} run(s) at a time, "
           f"{threads(args.jobs)} torch thread(s) each. s/epoch is per run, extrapolated to a whole epoch where one was cut."]
          if args.time_budget else []),
        *([f"Search: every model trained once with seed {search['seed']} at each of the {len(search['grid'])} settings below, "
           f"{'with the same budget per run' if args.time_budget else 'under the same stopping rule'}; the one with the best validation "
           f"NDCG@10 ran all seeds (its seed-{search['seed']} row is that search run). "
           "Ablations use T2Diff's chosen settings."] if search else []),
        *([unfinished_search(rows, args, requested)] if args.search and not search else []),
        *([f"Stopping: patience {patience} (a run ends once more validations than that in a row fail to beat its best "
           f"validation NDCG@10), at most {cap}. A run that the cap stopped before patience ran out is marked *cap* in the "
           "epochs column (*cap: k of n runs* when only some seeds were): it had not converged by this rule."]
          if not args.time_budget and None not in caps | patiences else []),
        "s/epoch ÷ SASRec: against the table's SASRec runs on the same machine and day only (— where there are none); "
        "min to stop: training minutes until early stopping (s/epoch × epochs); timings of seeds that ran on different "
        "machines are not averaged (*mixed machines*).",
        "",
        *margin(rows, variants),
        "| model | seeds | test NDCG@10 | test Recall@10 | test MRR@10 | test NDCG@20 | valid NDCG@10 | params | s/epoch | "
        "s/epoch ÷ SASRec | eval s | epochs (best) | min to stop | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cap_mark(v):
        hit = capped(rows, v, args, overrides)
        if not hit:
            return ""
        return " *cap*" if len(hit) == sum(r["variant"] == v for r in rows) else f" *cap: {len(hit)} of {sum(r['variant'] == v for r in rows)} runs*"

    xhat_lines = []
    ratio = functools.partial(sasrec_ratio, rows, variants=variants)
    for v in variants:
        mine = sorted((r for r in rows if r["variant"] == v), key=lambda r: int(r["seed"]))
        cell = lambda key: "{:.4f} ± {:.4f}".format(*mean_std(r[key] for r in mine))  # noqa: E731
        lines.append(
            f"| {v} | {','.join(str(r['seed']) for r in mine)} | {cell('test_ndcg@10')} | {cell('test_recall@10')} | "
            f"{cell('test_mrr@10')} | {cell('test_ndcg@20')} | {cell('valid_ndcg@10')} | {mine[0]['params']} | "
            f"{per_machine(mine, 'train_s_per_epoch')} | {'—' if ratio(v) is None else f'{ratio(v):.2f}'} | {per_machine(mine, 'eval_s')} | "
            f"{mean_std(r['epochs_run'] for r in mine)[0]:.3g} ({mean_std(r['best_epoch'] for r in mine)[0]:.0f}){cap_mark(v)} | "
            f"{per_machine([{**r, 'train_min': float(r['train_s_per_epoch']) * float(r['epochs_run']) / 60} for r in mine], 'train_min')} | "
            f"{mean_std(r['peak_rss_mib'] for r in mine)[0]:.0f} |")
        if all(r.get(c) not in (None, "") for r in mine for c in XHAT_COLUMNS):
            xhat_lines.append(f"| {v} | " + " | ".join("{:.3f} ± {:.3f}".format(*mean_std(r[c] for r in mine)) for c in XHAT_COLUMNS) + " |")
    if search:
        lines += ["", f"## Search (seed {search['seed']}, validation NDCG@10; test metrics were not looked at)", "",
                  "| model | " + " | ".join(", ".join(f"{k}={v}" for k, v in point.items()) for point in search["grid"]) + " |",
                  "|---|" + "---|" * len(search["grid"])]
        for v, trials in search["trials"].items():
            cells = []
            for t in trials:
                row = find_row(rows, t, search["seed"])
                cell = "failed" if row is None else (f"{float(row['valid_ndcg@10']):.4f} ({float(row['epochs_run']):.3g} ep"
                                                     f"{', cap' if row in capped(rows, t, args, overrides) else ''})")
                cells.append(f"**{cell}**" if t == search["chosen"][v] else cell)
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if xhat_lines:
        lines += ["", "## x̂ on the validation split", "", "At the best epoch, as inference computes it (mean ± std over seeds): relative error",
                  "|x̂ - x_next| / |x_next - x_L| pooled over users (1 = no better than copying x_L), and how often the true next",
                  "item is the nearest item token to x̂ (hit@1) or among its 10 nearest (hit@10).", "",
                  "| model | x̂ relative error | x̂ nearest-item hit@1 | x̂ nearest-item hit@10 |", "|---|---|---|---|", *xhat_lines]
    with open(os.path.join(args.out, f"{args.dataset}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, variants, os.path.join(args.out, f"{args.dataset}.png"), args.dataset, args.time_budget,
         stopped_by_cap=[r for v in variants for r in capped(rows, v, args, overrides)])
    if any(r.get("valid_curve") for r in rows if r["variant"] in variants):  # rows from before the column have none
        plot_curves(rows, variants, os.path.join(args.out, f"{args.dataset}_curves.png"), args.dataset, cap_of)
    print("\n".join(lines))


def plot(rows, variants, path, dataset, time_budget=None, stopped_by_cap=()):
    """Test NDCG@10 against training cost, a point per run.

    Without a budget the cost is the training time to early stopping. With one, every run trains for
    the same minutes, so the cost that tells the models apart is the time per epoch (how little of
    the data a slow model sees in the budget), on a log axis. Runs in ``stopped_by_cap`` (rows the
    epoch cap stopped before early stopping) are drawn hollow.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if time_budget:
        cost = lambda r: float(r["train_s_per_epoch"])  # noqa: E731
    else:
        cost = lambda r: float(r["train_s_per_epoch"]) * float(r["epochs_run"]) / 60  # noqa: E731
    colour, at_cap = colours(variants), [id(r) for r in stopped_by_cap]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        for hollow in (False, True):
            part = [r for r in mine if (id(r) in at_cap) == hollow]
            if part:
                ax.scatter([cost(r) for r in part], [float(r["test_ndcg@10"]) for r in part], edgecolors=colour[v],
                           facecolors="none" if hollow else colour[v], label=None if hollow and len(part) < len(mine) else v)
    if time_budget:
        ax.set_xscale("log")
        plain = lambda v, _=None: f"{v:g}"  # noqa: E731  "600", not "6 x 10^2"
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(lambda v, _: plain(v) if plain(v)[0] in "25" else "")  # 20, 50, 200, 500
        ax.set(xlabel=f"training time per epoch (s, log scale); every run trained {time_budget:g} min",
               title=f"{dataset}: accuracy vs cost per epoch, equal time budget")
    else:
        ax.set(xlabel="training time to early stop (min)" + ("; hollow: stopped by the epoch cap" if stopped_by_cap else ""),
               title=f"{dataset}: accuracy vs training time")
    ax.set_ylabel("test NDCG@10")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2 if len(variants) > 6 else 1)  # below the axes: never over a point
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()

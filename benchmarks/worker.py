"""One benchmark run, (variant, seed), in a process of its own, and the runner's side of its output.

    python -m benchmarks.worker VARIANT SEED --dataset=NAME [--config_files=...] [--time_budget=MIN] [--resume_dir=DIR] [--key=value ...]

The process trains and tests one variant through RecBole's trainer, timed by hooks on that trainer,
prints an ``EPOCH {...}`` line after every validation (the runner's live progress) and, at the end,
``RESULT {...}``: the run's row of :data:`COLUMNS`. The --key=value settings (a study's, for every run)
are the run's command-line settings: they override the variant's own, in RecBole's order.
"""

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.knob_record import knob_values
from benchmarks.machine import HEAP_ONLY_MALLOC, describe, load_average
from benchmarks.resume import Resume
from benchmarks.variants import ROOT, parse_variant
from recbole_t2diff.cli import exit_on_usage_error

METRICS = ["recall@10", "mrr@10", "ndcg@10", "recall@20", "ndcg@20", "recall@2", "ndcg@2"]
XHAT_COLUMNS = ["xhat_rel_error", "xhat_hit@1", "xhat_hit@10"]
XHAT_NOISE_DROP = "xhat_noise_drop"  # recorded since 2026-12-06: older rows leave it empty
# A quantized SparCode's exact sparse index (the keys its training split uses, threshold 0) at the tested weights: the
# share of (key, item) entries it stores and its size (recorded since 2026-12-06; the trade-off of docs/SPARCODE.md §10).
INDEX_COLUMNS = ["index_density", "index_mib"]
# Its query time as a ratio to the dense table of the same scores, timed in the same rounds (recorded since 2026-12-07;
# :func:`benchmarks.sparcode_index.time_against_dense`): below 1 the posting lists are the faster way to serve.
INDEX_TIME = "index_time_vs_dense"
COLUMNS = [
    "variant",
    "seed",
    "settings",
    *[f"valid_{m}" for m in METRICS],
    *[f"test_{m}" for m in METRICS],
    "params",
    "train_s_per_epoch",
    "eval_s",
    "epochs_run",
    "best_epoch",
    "peak_rss_mib",
    "xhat_rel_error",
    "xhat_hit@1",
    "xhat_hit@10",
    "run_s",
    "valid_curve",
    "machine",
    "date",
    "reads",
    "xhat_noise_drop",
    *INDEX_COLUMNS,
    "knobs",  # the property-file values the run read (benchmarks/knob_record.py; recorded since 2026-12-06)
    # What the run's timings shared the machine with (recorded since 2026-12-07): the runs its batch ran at once, and
    # the mean 1-minute load average at its validations, which also counts work from outside the batch.
    "runs_at_once",
    "load_average",
    # The run's training cost per sequence as a ratio to RecBole's SASRec, their steps interleaved in the worker after the
    # test (recorded since 2026-12-07; :func:`step_ratio_to_sasrec`).
    "step_ratio_sasrec",
    INDEX_TIME,
]
REFERENCE_ROUNDS = 5  # interleaved training steps of each, after 2 warm-up steps each
RUNS_AT_ONCE = "BENCHMARK_RUNS_AT_ONCE"  # set by the runner in its workers' environment


def run_settings(variant, seed):
    """(model, config_dict) of a run of ``variant``: its settings and the seed (a study's --key=value settings
    go to the Config as its command line, ``argv``, above these)."""
    model, settings = parse_variant(variant)
    return model, {"seed": seed, "show_progress": False, **settings}


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


def worker(variant, seed, dataset, config_files, time_budget=None, resume_dir=None, overrides=None):
    """Train and test one (variant, seed) with the study's ``overrides`` (--key=value arguments); returns a row of COLUMNS.

    With ``resume_dir`` the run keeps its training state there after every validated epoch (see
    :class:`Resume`) and, started again after an interruption, goes on from the last such epoch.
    """
    from recbole_t2diff.quick_start import run

    model, config_dict = run_settings(variant, seed)
    timings, curve, clock = {"train": [], "valid": [], "load": []}, [], {"started": time.perf_counter()}

    def timed(method, bucket):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = method(*args, **kwargs)
            timings[bucket].append(time.perf_counter() - start)
            return out

        return wrapper

    trainers, budget, loaders = [], Budget(time_budget), {}
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
        fit_to_time = trainer.fit

        def fit_keeping_loader(train_data, valid_data=None, **kwargs):  # the SASRec reference steps train on it too
            loaders["train"], loaders["valid"] = train_data, valid_data  # the index is timed on validation histories
            return fit_to_time(train_data, valid_data, **kwargs)

        trainer.fit = fit_keeping_loader
        trainer._train_epoch = timed(trainer._train_epoch, "train")
        valid_epoch = timed(trainer._valid_epoch, "valid")

        def valid_epoch_reported(*args, **kwargs):
            score, result = valid_epoch(*args, **kwargs)
            curve.append(round(float(score), 5))
            if (load := load_average()) != "n/a":  # a system without a load average records none
                timings["load"].append(load)
            # One line per validation, read live by the runner (progress) and kept as the run's curve.
            best = max(range(len(curve)), key=lambda i: (curve[i], -i))  # RecBole keeps the first of equal scores
            print(
                "EPOCH "
                + json.dumps(
                    {
                        "epoch": len(curve),
                        "valid": curve[-1],
                        "best": curve[best],
                        "best_epoch": best + 1,
                        "train_s": round(sum(timings["train"]), 1),
                        "run_s": round(time.perf_counter() - clock["started"], 1),
                    }
                ),
                flush=True,
            )
            return score, result

        trainer._valid_epoch = valid_epoch_reported
        if resume is not None:  # a fixed name, so that a resumed run finds its best checkpoint
            trainer.saved_model_file = os.path.join(checkpoints, "best.pth")
        trainers.append(trainer)

    result = run(
        model,
        dataset,
        config_file_list=config_files,
        saved=True,
        on_trainer=on_trainer,
        config_dict={**config_dict, "checkpoint_dir": checkpoints},
        argv=overrides,
    )
    trainer = trainers[0]
    row = {
        "variant": variant,
        "seed": seed,
        "settings": json.dumps(parse_variant(variant)[1], sort_keys=True),
        "params": result["params"],
        "train_s_per_epoch": round(sum(timings["train"]) / budget.epochs, 2),
        "eval_s": round(statistics.mean(timings["valid"]), 2),
        "epochs_run": round(budget.epochs, 3),
        "best_epoch": len(timings["train"]) - trainer.cur_step * trainer.eval_step,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "run_s": round(time.perf_counter() - clock["started"], 1),
        "valid_curve": json.dumps(curve),
        "machine": describe(),
        "date": datetime.date.today().isoformat(),
        "runs_at_once": os.environ.get(RUNS_AT_ONCE, ""),
        # Validations resumed from a state saved before the load was recorded have none: the mean of those that do.
        "load_average": round(statistics.mean(timings["load"]), 1) if timings["load"] else "",
    }
    for metric in METRICS:
        row[f"valid_{metric}"] = float(result["best_valid_result"][metric])
        row[f"test_{metric}"] = float(result["test_result"][metric])
    row.update(result.get("xhat_quality") or dict.fromkeys([*XHAT_COLUMNS, XHAT_NOISE_DROP], ""))
    # What the run reads that RecBole's built-ins do not: T2Diff's time lag reads the request time.
    row["reads"] = "request time" if getattr(trainer.model, "lag_embedding", None) is not None else ""
    row.update(index_columns(trainer.model, loaders["valid"]))
    row["step_ratio_sasrec"] = step_ratio_to_sasrec(trainer.model, trainer.config, loaders["train"])
    row["knobs"] = json.dumps(knob_values(trainer.config), sort_keys=True)
    shutil.rmtree(checkpoints)  # a benchmark keeps numbers, not checkpoints
    return row


def step_ratio_to_sasrec(model, config, train_data, rounds=REFERENCE_ROUNDS):
    """The run's training cost per sequence as a ratio to RecBole's SASRec at its property-file defaults on the same data,
    measured in this process once the run's numbers are taken: after 2 warm-up steps each, ``rounds`` rounds of one
    training step of the run's model as RecBole's trainer takes it (under autocast with ``enable_amp``, every loss it
    returns, its optimiser) and one of SASRec, so that the load of the machine hits both alike (``benchmarks.steps``).
    The model trains on from its tested weights, which nothing reads afterwards."""
    import logging

    from recbole.data import data_preparation

    from benchmarks.steps import Stepper, seconds_per_sequence

    from recbole_t2diff.config import Config
    from recbole_t2diff.data import create_dataset
    from recbole_t2diff.quick_start import build_model

    # RecBole's Config joins the dataset's name onto data_path: the reference reads the folder the run was given.
    data_path = os.path.dirname(os.path.normpath(config["data_path"]))
    settings = {"data_path": data_path, "seed": config["seed"], "show_progress": False, "state": "ERROR"}
    reference_config = Config(model="SASRec", dataset=config["dataset"], config_dict=settings)
    logging.disable(logging.INFO)  # RecBole logs the reference's data at INFO: not into the run's log
    try:
        reference_train, _, _ = data_preparation(reference_config, create_dataset(reference_config))
    finally:
        logging.disable(logging.NOTSET)
    reference = build_model(reference_config, reference_train)
    steppers = {"run": Stepper.of(model, config, train_data), "SASRec": Stepper.of(reference, reference_config, reference_train)}
    cost = seconds_per_sequence(steppers, rounds)
    return round(cost["run"] / cost["SASRec"], 3)


def index_columns(model, queries):
    """:data:`INDEX_COLUMNS` and :data:`INDEX_TIME` of a quantized SparCode (its exact index over the keys the training
    split uses; timed on the first batch of ``queries``, a full-sort loader); empty for any other model. At threshold 0
    the index scores exactly as the model, so the row's test metrics are the index's: what a smaller index costs in
    accuracy is read across rows (score_bias, sparsity_weight)."""
    from benchmarks.sparcode_index import time_against_dense
    from recbole_t2diff.sparse_index import SparseIndex, indexable

    if not indexable(model):
        return dict.fromkeys([*INDEX_COLUMNS, INDEX_TIME], "")
    index = SparseIndex.build(model, keys="used", threshold=0.0)
    return {
        "index_density": round(index.nnz / max(index.n_rows * (model.n_items - 1), 1), 4),
        "index_mib": round(index.nbytes() / 2**20, 3),
        INDEX_TIME: time_against_dense(model, index, next(iter(queries))[0]),
    }


def command(variant, seed, dataset, config_files=None, time_budget=None, resume_dir=None, overrides=()):
    """The worker process of one (variant, seed); ``overrides`` are the study's --key=value arguments."""
    return [
        sys.executable,
        "-m",
        "benchmarks.worker",
        variant,
        str(seed),
        f"--dataset={dataset}",
        *([f"--config_files={config_files}"] if config_files else []),
        *([f"--time_budget={time_budget}"] if time_budget else []),
        *([f"--resume_dir={resume_dir}"] if resume_dir else []),
        *overrides,
    ]


def threads(jobs):
    """Torch threads per run when ``jobs`` runs share the machine: its cores split evenly, so that timings of runs
    that shared it stay comparable with each other."""
    return max(1, (os.cpu_count() or 1) // jobs)


def environment(torch_threads, runs_at_once):
    """The environment of worker processes: ``torch_threads`` torch threads each, ``runs_at_once`` of them at a time
    (each row records it), glibc's malloc keeping freed memory (``machine.HEAP_ONLY_MALLOC``: the same numbers, up
    to a quarter faster; rows name it in their machine), and this package importable from any working folder (a
    run's relative paths, its data and RecBole's log/, are the runner's folder's)."""
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), HEAP_ONLY_MALLOC]))
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(torch_threads),
        RUNS_AT_ONCE: str(runs_at_once),
        "GLIBC_TUNABLES": tunables,
        "PYTHONPATH": path,
    }


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
                on_epoch(json.loads(line[len("EPOCH ") :]))
            elif line.startswith("RESULT "):
                row = json.loads(line[len("RESULT ") :])
        proc.wait()
        if procs is not None:
            procs.discard(proc)
        if proc.returncode or row is None:
            errors.seek(0)
            return None, errors.read()[-3000:] or f"exit status {proc.returncode}"
        return row, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant")
    parser.add_argument("seed", type=int)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    parser.add_argument("--time_budget", type=float, default=None, help="minutes of wall-clock from the start of the run")
    parser.add_argument("--resume_dir", default=None, help="where the run keeps its state after every validated epoch")
    with exit_on_usage_error():
        args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
        row = worker(
            args.variant, args.seed, args.dataset, args.config_files.split() if args.config_files else None, args.time_budget, args.resume_dir, overrides
        )
    print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

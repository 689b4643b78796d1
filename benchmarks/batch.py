"""Run several benchmark studies through one pool of workers, in order of priority.

    python -m benchmarks.batch PLAN [PLAN ...] [--jobs=N] [--stop_starting_after=MIN] [--stop_after=MIN]

A PLAN has one study per line: the arguments benchmarks.run_benchmark would take for it (--models, --dataset,
--seeds, --search, --out, --key=value ...); '#' starts a comment. Several PLANs run as one, in the order given. Every
(variant, seed) of every study runs in its own process, --jobs at a time, earlier lines first (a study's search runs
before its seeds; the seeds of a searched model become ready once all the study's search runs have ended). Rows go to
each study's <out>/<dataset>.csv exactly as benchmarks.run_benchmark writes them, and runs already there are
skipped, so a plan resumes where it stopped and `benchmarks.run_benchmark` with a study's line completes or
summarizes that study alone. Progress: one line per validation of every run and one per finished run,
with an estimate of the time left. At the end every study's table is written.

--stop_starting_after: no run starts after this many minutes; --stop_after: runs still going are
stopped (and not recorded) after this many, so a lease of a fixed length still returns its tables;
--abort_if_first_fail=K: stop everything when the first K runs to end all failed (a broken set-up
costs seconds, not the lease). --report writes the tables from the rows the CSVs hold now, running nothing
(a table of a batch still running, or of rows a GPU lease brought back). --check builds every run's config (the knob checks, no data, no
training) and exits: a plan with a misspelt setting fails here, before a machine is paid for.
Each run gets cores // jobs torch threads (--threads sets another number); with a GPU the runs share it.
"""

import argparse
import heapq
import shlex
import threading
import time

from benchmarks.report import summarize
from benchmarks.run_benchmark import Study, read_rows, say
from benchmarks.worker import environment, run_worker, threads
from recbole_t2diff.cli import exit_on_usage_error
from recbole_t2diff.errors import UsageError


def read_plan(path, resume_root=None):
    """The studies of PLAN, one per non-comment line (each keeping its runs' resume state under ``resume_root`` if given).
    A line that cannot be read is a UsageError naming it."""
    with open(path) as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    extra = [f"--resume_root={resume_root}"] if resume_root else []
    studies = []
    for number, line in enumerate(lines, 1):
        if line:
            try:
                studies.append(Study(shlex.split(line) + extra))
            except UsageError as error:
                raise UsageError(f"{path}, line {number}: {error}") from error
    if not studies:
        raise UsageError(f"{path} holds no study: write one line of benchmarks.run_benchmark arguments per study")
    return studies


def epoch_reporter(name, patience, cap):
    """The progress line of one run's validations (the worker's EPOCH records), with when it will end at the latest.

    RecBole stops after ``patience`` + 1 validations in a row without a new best, so a run ends within
    that many epochs unless it improves, and at the epoch cap in any case.
    """

    def on_epoch(e):
        epoch = e["epoch"]
        left = [int(cap) - epoch] if cap is not None else []
        if patience is not None:
            left.append(e["best_epoch"] + int(patience) + 1 - epoch)
        ends = f"; ends within {min(left)} epoch(s), about {min(left) * e['run_s'] / epoch / 60:.0f} min, unless it improves" if left else ""
        say(
            f"[batch]   {name} epoch {epoch}: valid NDCG@10 {e['valid']:.4f} (best {e['best']:.4f} at {e['best_epoch']}), "
            f"{e['train_s'] / epoch:.0f} s/epoch training, {e['run_s'] / 60:.0f} min into the run{ends}"
        )

    return on_epoch


class Batch:
    def __init__(self, studies, jobs, stop_starting_after=None, abort_if_first_fail=None):
        self.studies, self.jobs, self.stop_starting_after = studies, jobs, stop_starting_after
        self.abort_if_first_fail = abort_if_first_fail
        self.ready, self.waiting, self.running, self.procs = [], {}, 0, set()
        self.changed, self.started = threading.Condition(threading.Lock()), time.time()
        self.durations, self.failed, self.stopped, self.finished, self.order = [], [], [], 0, 0
        self.stopping = False
        self.searches = {}
        for rank, study in enumerate(studies):
            if study.grid:
                trials = [(t, study.seeds[0]) for v in study.trials for t in study.trials[v]]
                self.waiting[rank] = {job for job in trials if study.finished(*job) is None}
                self.push(rank, trials)
                if not self.waiting[rank]:
                    self.search_done(rank)
            else:
                self.push(rank, [(v, s) for v in study.variants for s in study.seeds])

    def push(self, rank, jobs):
        for variant, seed in jobs:
            if self.studies[rank].finished(variant, seed) is None:
                self.order += 1
                heapq.heappush(self.ready, (rank, self.order, variant, seed))

    def search_done(self, rank):
        """All search runs of study ``rank`` ended: its chosen variants' seeds become ready."""
        study = self.studies[rank]
        try:
            self.searches[rank] = study.search()
        except SystemExit as error:  # every search run of a model failed: the study stops there
            say(f"[batch] {study.args.dataset} {study.args.out}: {error}")
            return
        chosen = [self.searches[rank]["chosen"][v] for v in study.variants]
        self.push(rank, [(v, s) for v in chosen for s in study.seeds])

    def minutes(self):
        return (time.time() - self.started) / 60

    def left(self):
        """Runs not yet finished (the seeds of a search still running counted at their number)."""
        # a searched variant's first seed is its search run; an ablation runs every seed after the search
        pending = sum(len(s.seeds) - (v in s.trials) for r, s in enumerate(self.studies) if s.grid and r not in self.searches for v in s.variants)
        return len(self.ready) + self.running + pending

    def eta(self):
        if not self.durations:
            return "no estimate yet"
        per_run = sum(self.durations) / len(self.durations)
        return f"about {self.left() * per_run / self.jobs / 60:.0f} min left at {per_run / 60:.1f} min per run"

    def take(self):
        """The next ready run, or None when nothing is left to start."""
        with self.changed:
            while True:
                if self.stop_starting_after is not None and self.minutes() >= self.stop_starting_after:
                    return None
                if self.ready:
                    self.running += 1
                    return heapq.heappop(self.ready)
                if self.running == 0:
                    return None
                self.changed.wait(timeout=5)

    def work(self, env):
        while (job := self.take()) is not None:
            rank, _, variant, seed = job
            study = self.studies[rank]
            name = f"{study.args.dataset} {variant} seed {seed}"
            say(f"[batch] started {name} ({self.minutes():.1f} min so far)")

            config = study.config(variant)
            on_epoch = epoch_reporter(name, config["stopping_step"], config["epochs"])

            row, error = run_worker(study.command(variant, seed), env, on_epoch, self.procs)
            with self.changed:
                self.running -= 1
                if row is None and self.stopping:
                    self.stopped.append(name)
                    say(f"[batch] {name} stopped unfinished (not recorded)")
                elif row is None:
                    self.failed.append(name)
                    say(f"[batch] {name} failed:\n{error}")
                    if self.finished == 0 and len(self.failed) == self.abort_if_first_fail:
                        say(f"[batch] the first {len(self.failed)} runs to end all failed: stopping everything")
                        self._stop_holding_lock()
                else:
                    study.record(row)
                    # the row's run_s spans every start of a resumed run; time since this batch started it would not
                    self.durations.append(float(row["run_s"]))
                    self.finished += 1
                    say(
                        f"[batch] finished {name}: test NDCG@10 {row['test_ndcg@10']:.4f}, valid {row['valid_ndcg@10']:.4f}, "
                        f"{row['epochs_run']} epochs (best {row['best_epoch']}), {row['train_s_per_epoch']} s/epoch; "
                        f"{self.finished} done, {self.eta()} ({self.minutes():.1f} min so far)"
                    )
                if rank in self.waiting and not (row is None and self.stopping):  # a stopped search run is still to come
                    self.waiting[rank].discard((variant, seed))
                    if not self.waiting[rank] and rank not in self.searches:
                        self.search_done(rank)
                self.changed.notify_all()

    def stop(self):
        """Stops the runs still going (their rows are not written) and starts no more."""
        with self.changed:
            self._stop_holding_lock()

    def _stop_holding_lock(self):
        self.stop_starting_after, self.stopping = 0, True
        for proc in list(self.procs):
            proc.kill()


def check(studies):
    """Builds the config of every variant (each search point too) of every study, in this process, and refuses a
    finished row that no longer means what its variant's name means (``Study.finished``)."""
    count = 0
    for study in studies:
        variants = [t for trials in study.trials.values() for t in trials] if study.grid else []
        for variant in variants + study.variants:
            study.config(variant)
            count += 1
            for seed in study.seeds:
                study.finished(variant, seed)
    say(f"[batch] {count} configs of {len(studies)} studies checked")


def summarize_all(batch):
    """One table per CSV: studies that share a CSV (same --out and --dataset) are summarized together."""
    groups = {}
    for rank, study in enumerate(batch.studies):
        groups.setdefault(study.csv_path, []).append(rank)
    for ranks in groups.values():
        first = batch.studies[ranks[0]]
        rows = read_rows(first.csv_path)
        if not rows:
            continue
        requested, commands, search = [], [], None
        for rank in ranks:
            study, chosen = batch.studies[rank], batch.searches.get(rank)
            requested += study.variants if chosen is None else [chosen["chosen"][v] for v in study.variants]
            commands.append(study.command_line())
            search = search or chosen
        summarize(first, rows, requested, commands, search)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plans", nargs="+", metavar="plan")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--stop_starting_after", type=float, default=None, help="minutes after which no run starts")
    parser.add_argument("--stop_after", type=float, default=None, help="minutes after which running runs are stopped")
    parser.add_argument("--abort_if_first_fail", type=int, default=None, help="stop when the first K runs to end all failed")
    parser.add_argument("--check", action="store_true", help="build every run's config and exit")
    parser.add_argument("--report", action="store_true", help="write every study's table from the rows its CSV holds now, run nothing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores // jobs)")
    parser.add_argument("--resume_root", default=None, help="where interrupted runs keep their state (default <out>/.resume of each study)")
    args = parser.parse_args(argv)
    with exit_on_usage_error():  # a bad plan line or knob is one line, as everywhere else
        studies = [study for plan in args.plans for study in read_plan(plan, args.resume_root)]
        if args.check:
            return check(studies)
        batch = Batch(studies, args.jobs, args.stop_starting_after, args.abort_if_first_fail)
        if args.report:
            return summarize_all(batch)
    per_run = args.threads or threads(args.jobs)
    say(f"[batch] {len(batch.ready)} runs ready, {batch.left()} in all, {args.jobs} at a time, {per_run} torch thread(s) each")
    env = environment(per_run, args.jobs)
    workers = [threading.Thread(target=batch.work, args=(env,), daemon=True) for _ in range(args.jobs)]
    for w in workers:
        w.start()
    deadline = None if args.stop_after is None else batch.started + 60 * args.stop_after
    while any(w.is_alive() for w in workers):
        if deadline is not None and time.time() >= deadline:
            say(f"[batch] {args.stop_after:g} min reached: stopping {len(batch.procs)} run(s) still going")
            batch.stop()
            deadline = None
        elif batch.stopping:  # a run whose process started as the others were stopped (or aborted) stops too
            batch.stop()
        time.sleep(1)
    summarize_all(batch)
    unfinished = batch.left() + len(batch.stopped)
    say(
        f"[batch] {batch.finished} runs finished, {len(batch.failed)} failed, {len(batch.stopped)} stopped unfinished, "
        f"{unfinished} not finished in all ({batch.minutes():.1f} min)"
    )
    if batch.failed or unfinished:
        raise SystemExit(
            f"error: {len(batch.failed)} run(s) failed ({', '.join(batch.failed)}) and {unfinished} did not finish; the same command runs only those"
        )


if __name__ == "__main__":
    main()

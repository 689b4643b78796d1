"""What a Ray Tune search (``ray_search.py``) prints and keeps per trial, and when it stops: trials numbered as they
start, one line per finished, stopped or failed trial, their results for the result file, and the search's own
early stop after ``early_stop`` trials without improvement (hyperopt's ``no_progress_loss`` in the hyperopt path).
"""

# Keys of a trial's report: the epoch (a scheduler's clock), the epoch's validation score (what a
# scheduler compares) and the best so far (what the search algorithm sees when a trial ends).
EPOCH, SCORE, BEST = "epoch", "valid_score", "best_valid_score"
CPU = "cpu_s"  # the trial process's CPU time so far (what the scheduler saves is counted from it)


def progress_callback(tune, search):
    """A Tune callback that numbers trials as they start, prints one line per finished or stopped
    trial, keeps their results, and stops the search after ``early_stop`` trials without improvement."""

    class Progress(tune.Callback):
        def __init__(self):
            self.numbers, self.finished, self.stopped, self.errors = {}, [], [], []
            self.best, self.since_best, self.cpu_s = None, 0, 0.0
            self.ending = None  # why the search stopped early, once it has

        def on_trial_start(self, iteration, trials, trial, **info):
            self.numbers[trial.trial_id] = number = len(self.numbers) + 1
            print(f"[ray] trial {number} of at most {search.max_evals} started: {search.params2str(trial.config)}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            number, params, last = self.numbers[trial.trial_id], dict(trial.config), trial.last_result or {}
            if "result" not in last and self.ending:
                # Cut short by the end of the search, not judged by the scheduler: it is no trial of the result.
                print(f"[ray] trial {number} cut short after epoch {last.get(EPOCH, 0)}: {self.ending}", flush=True)
                return
            if "result" in last:
                result = last["result"]
                outcome = f"valid score {result['best_valid_score']:.4f} after {last.get(EPOCH, 0)} epochs, {last.get(CPU, 0):.0f} CPU-s"
            else:
                epoch = last.get(EPOCH, 0)
                result = {
                    "best_valid_score": last.get(BEST),
                    "valid_score_bigger": search.bigger,
                    "best_valid_result": last.get("best_valid_result", {}),
                    "test_result": None,
                    "stopped_after_epoch": epoch,
                }
                self.stopped.append((number, params, epoch))
                outcome = (
                    f"stopped by {search.scheduler_name} after epoch {epoch}, valid score {last.get(SCORE, float('nan')):.4f} "
                    f"(best {result['best_valid_score']:.4f}), {last.get(CPU, 0):.0f} CPU-s"
                )
            self.finished.append((number, params, result))
            self.cpu_s += last.get(CPU, 0)
            score = result["best_valid_score"]
            sign = 1 if search.bigger else -1
            # The best is chosen among tested trials (Search.best_trial): a stopped one never improves it.
            if "result" in last and (self.best is None or sign * score > sign * self.best[1]):
                self.best, self.since_best = (number, score, params), 0
            else:
                self.since_best += 1
            best = f"best so far {self.best[1]:.4f} (trial {self.best[0]}: {search.params2str(self.best[2])})" if self.best else "none tested yet"
            print(f"[ray] trial {number} {outcome}; {best}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            number = self.numbers.get(trial.trial_id, len(self.numbers) + 1)
            self.errors.append((number, dict(trial.config), _last_error_line(trial.error_file)))
            print(f"[ray] trial {number} failed: {self.errors[-1][2]}", flush=True)

        def stopper(self):
            callback = self

            class NoProgress(tune.Stopper):
                """Stop the search after ``early_stop`` finished trials without a better score, as hyperopt's
                ``no_progress_loss`` does in the hyperopt path; a failed trial stops it at once."""

                def __call__(self, trial_id, result):
                    return False

                def stop_all(self):
                    if callback.errors:
                        callback.ending = "the search stopped at a failed trial"
                    elif callback.since_best >= search.early_stop:
                        callback.ending = f"the search stopped after {search.early_stop} trials without improvement (--early_stop)"
                    return callback.ending is not None

            return NoProgress()

    return Progress()


def _last_error_line(error_file):
    """The exception line of a failed trial's traceback (Ray writes it as text in error.txt)."""
    try:
        with open(error_file, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, TypeError):
        return f"see the trial's error.txt ({error_file})"
    cause = next((line for line in reversed(lines) if "Error" in line.split(":", 1)[0]), lines[-1] if lines else "")
    return f"{cause} (traceback in {error_file})"

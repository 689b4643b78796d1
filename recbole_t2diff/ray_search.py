"""Hyperparameter search on Ray Tune's ``Tuner`` API: the hyperopt search of :mod:`recbole_t2diff.hyper`
run as Ray trials, one process each, on this machine or on an existing Ray cluster.

The params file, its parser, the algorithms (exhaustive, random, bayes), the objective and the result
file are :class:`~recbole_t2diff.hyper.Search`'s; Ray adds parallel trials, resources per trial,
clusters and schedulers (ASHA, median stopping) that stop lagging trials after any epoch, fed the
validation metric by RecBole's ``fit(callback_fn=...)``. Ray is an optional extra (``.[ray]``) and is
imported only when a search runs (RecBole's own Ray path pins ray<=2.6.3 and uses calls today's Ray
rejects).

Nothing a trial loads is a pickle the user did not write: a trial gets its parameters as plain values,
model checkpoints are this package's checksummed format (``checkpoint.py``), RecBole's pickle caches are
refused by the Config, and no Ray experiment state (``tuner.pkl``, searcher state) is ever read back.
"""

import functools
import inspect
import ipaddress
import math
import os
import socket
import time

from recbole_t2diff.config import Config
from recbole_t2diff.errors import UsageError
from recbole_t2diff.hyper import Search, make_objective
from recbole_t2diff.ray_progress import BEST, CPU, EPOCH, SCORE, progress_callback
from recbole_t2diff.settings import command_line_settings

INSTALL = 'python -m uv pip install --python "$(command -v python)" -e ".[ray]"'
SCHEDULERS = ("none", "asha", "median")


def import_ray(loopback=True):
    """``ray`` and ``ray.tune``, or a one-line error saying how to install them.

    ``loopback``: Ray on this machine only. Ray reads these variables when it is first imported.
    """
    # No usage report leaves the machine.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if loopback:
        # Ray turns 127.0.0.1 into the machine's outward address (it expects more nodes to join) unless
        # it runs as a single-machine Ray (the switch's name says Windows or macOS, where that is the
        # default): then its processes listen on 127.0.0.1 only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Tune's older console output, which verbose=0 silences: the search prints its own [ray] lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        import ray
        from ray import tune
    except ImportError as err:
        raise UsageError(f"--tool=ray needs Ray Tune, which is not installed ({err}): run {INSTALL} from this package's folder") from err
    return ray, tune


def _check_reachable(address):
    """One TCP connection to the cluster's address first: ray.init waits minutes on one that does not answer."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address={address}: give the cluster's host:port, as `ray start --head` prints it (e.g. 127.0.0.1:6379), or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as err:
        raise UsageError(
            f"cannot reach a Ray cluster at --address={address} ({err.strerror or err}): start one with "
            "'ray start --head --node-ip-address=127.0.0.1' and pass the address it prints"
        ) from err


def _loopback(address):
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _trial(params, *, model, dataset, config_files, cwd, argv, threads):
    """One trial, in its own Ray worker process: train through hyper's objective, reporting every
    validation to Tune, then report the tested result."""
    ray, tune = import_ray(loopback=False)  # the worker's node is already set up
    import torch

    # A worker starts in Ray's trial folder: run where the search was started (relative data_path,
    # log/ and saved/ as for hyperopt); the search's --key=value settings come as argv.
    os.chdir(cwd)
    torch.set_num_threads(threads)
    # RecBole sets CUDA_VISIBLE_DEVICES from gpu_id: hand it the GPUs Ray gave this trial, or none.
    fixed = {"gpu_id": ",".join(str(i) for i in ray.get_gpu_ids())}
    last = {}

    def report_every_epoch(trainer):
        if "callback_fn" not in inspect.signature(trainer.fit).parameters:
            raise UsageError(f"{model}'s trainer ({type(trainer).__name__}) reports no per-epoch validation: search it with --tool=hyperopt")

        def report(epoch_idx, valid_score):
            last.update({EPOCH: epoch_idx + 1, SCORE: valid_score, BEST: trainer.best_valid_score, CPU: time.process_time()})
            tune.report({**last, "best_valid_result": dict(trainer.best_valid_result or {})})

        trainer.fit = functools.partial(trainer.fit, callback_fn=report)

    result = make_objective(model, dataset, on_trainer=report_every_epoch, argv=argv)({**params, **fixed}, config_files)
    # The last report repeats the last epoch, so a scheduler records nothing new: it carries the test.
    plain = {k: (dict(v) if isinstance(v, dict) else v) for k, v in result.items()}
    tune.report({**last, BEST: result["best_valid_score"], CPU: time.process_time(), "result": plain})


class RaySearch(Search):
    """:class:`~recbole_t2diff.hyper.Search` with its trials run by Ray Tune.

    ``address``: an existing cluster (``host:port`` or ``auto``); ``None`` starts a local Ray instance
    on 127.0.0.1 with ``num_cpus`` CPUs (default: all). ``cpus_per_trial``/``gpus_per_trial``: each
    trial's share; ``max_concurrent``: at most that many at once (0: as the resources allow).
    ``scheduler``: ``asha`` or ``median`` stops trials whose validation score lags after
    ``grace_period`` epochs (ASHA: rungs ``reduction_factor`` apart up to ``max_t`` epochs, default the
    ``epochs`` setting). ``storage_path``: Ray Tune's experiment folder (trial logs, state), default
    ``ray_results`` in the current folder.
    """

    def __init__(
        self,
        model,
        dataset,
        params_file,
        config_files=None,
        algo="exhaustive",
        max_evals=10,
        early_stop=10,
        argv=None,
        address=None,
        num_cpus=None,
        cpus_per_trial=1.0,
        gpus_per_trial=0.0,
        max_concurrent=0,
        scheduler="none",
        grace_period=1,
        reduction_factor=4,
        max_t=None,
        storage_path="ray_results",
    ):
        self.loopback = address is None or _loopback(address)
        import_ray(self.loopback)  # no ray: say how to install it before any other work
        super().__init__(model, dataset, params_file, config_files, algo, max_evals, early_stop, argv)
        if scheduler not in SCHEDULERS:
            raise UsageError(f"unknown --scheduler={scheduler}: use one of {', '.join(SCHEDULERS)}")
        for name, value, low in (
            ("cpus_per_trial", cpus_per_trial, 0),
            ("gpus_per_trial", gpus_per_trial, 0),
            ("max_concurrent", max_concurrent, 0),
            ("grace_period", grace_period, 1),
            ("reduction_factor", reduction_factor, 2),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
                raise UsageError(f"--{name}={value}: it must be a number >= {low}")
        if cpus_per_trial == 0 and gpus_per_trial == 0:
            raise UsageError("--cpus_per_trial=0 with --gpus_per_trial=0 gives a trial no resources: give it at least one CPU or GPU")
        if num_cpus is not None and not (isinstance(num_cpus, int) and num_cpus >= max(1, math.ceil(cpus_per_trial))):
            raise UsageError(f"--num_cpus={num_cpus}: it must be a whole number >= --cpus_per_trial ({cpus_per_trial})")
        if address is not None and num_cpus is not None:
            raise UsageError("--num_cpus sizes a local Ray instance; with --address the cluster's own CPUs count: drop one of them")
        if "gpu_id" in set(self.space) | set(command_line_settings(self.argv)) | set(_file_keys(config_files)):
            raise UsageError("gpu_id is Ray's to choose for each trial: drop it and give --gpus_per_trial instead")
        self.address, self.num_cpus, self.early_stop = address, num_cpus, early_stop
        self.cpus_per_trial, self.gpus_per_trial, self.max_concurrent = cpus_per_trial, gpus_per_trial, int(max_concurrent)
        self.scheduler_name, self.grace_period, self.reduction_factor = scheduler, int(grace_period), reduction_factor
        self.storage_path = os.path.abspath(storage_path)
        # The fixed settings, checked here in one line rather than in every trial; they also give the
        # metric's direction and the default scheduler horizon.
        config = _fixed_config(model, dataset, config_files, self.argv)
        self.bigger = config["valid_metric_bigger"]
        self.seed = config["seed"]
        self.max_t = int(max_t) if max_t is not None else int(config["epochs"])
        if self.max_t < 1:
            raise UsageError(f"--max_t={max_t}: it must be a whole number of epochs >= 1")
        self.algo_name = f"{algo} on Ray Tune" + ("" if scheduler == "none" else f", {scheduler} scheduler")
        self.stopped = []  # (trial number, params, epoch) of the trials the scheduler stopped

    def run(self):
        ray, tune = import_ray(self.loopback)
        from ray.tune.search.hyperopt import HyperOptSearch

        mode = "max" if self.bigger else "min"
        # Seeded with the settings' seed: the same params file draws the same trials in the same order.
        searcher = HyperOptSearch(space=self.space, metric=BEST, mode=mode, random_state_seed=self.seed)
        searcher.algo = self.algo  # hyperopt's own exhaustive/random/TPE step, as in the hyperopt path
        trainable = tune.with_resources(
            tune.with_parameters(
                _trial,
                model=self.model_name,
                dataset=self.dataset,
                config_files=self.fixed_config_file_list,
                cwd=os.getcwd(),
                argv=self.argv,
                threads=max(1, math.floor(self.cpus_per_trial)),
            ),
            {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial},
        )
        progress = progress_callback(tune, self)
        self._init_ray(ray)
        try:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    scheduler=self._scheduler(mode),
                    num_samples=int(self.max_evals),
                    max_concurrent_trials=self.max_concurrent or self._fitting_trials(ray),
                ),
                run_config=tune.RunConfig(
                    name=f"{self.model_name}-{self.dataset}",
                    storage_path=self.storage_path,
                    verbose=0,
                    stop=progress.stopper(),
                    callbacks=[progress],
                ),
            )
            print(
                f"[ray] Ray Tune writes its trial folders under {self.storage_path}; model checkpoints go to "
                f"saved/ and logs to log/ under {os.getcwd()}, as with hyperopt",
                flush=True,
            )
            tuner.fit()
        finally:
            ray.shutdown()  # with --address: this process leaves the cluster, which keeps running
        if progress.errors:
            number, params, error = progress.errors[0]
            more = f" (and {len(progress.errors) - 1} more)" if len(progress.errors) > 1 else ""
            raise UsageError(f"trial {number} ({self.params2str(params)}) failed{more}: {error}")
        self.trials = [(params, result) for _, params, result in sorted(progress.finished, key=lambda t: t[0])]
        self.stopped = progress.stopped
        stopped = ", ".join(f"trial {number} after epoch {epoch}" for number, _, epoch in self.stopped)
        print(
            f"[ray] {len(self.trials)} trials, {progress.cpu_s:.0f} CPU-s in trial processes; "
            + (f"the {self.scheduler_name} scheduler stopped {len(self.stopped)}: {stopped}" if self.stopped else "none stopped early"),
            flush=True,
        )
        if not any("stopped_after_epoch" not in result for _, result in self.trials):
            raise UsageError("every trial was stopped early, so none was tested: raise --grace_period or --max_t")

    def _fitting_trials(self, ray):
        """As many trials at once as the cluster's CPUs and GPUs hold (Tune on its own starts one trial
        at a time on a cluster it connects to)."""
        resources = ray.cluster_resources()
        counts = [resources.get(kind, 0) // share for kind, share in (("CPU", self.cpus_per_trial), ("GPU", self.gpus_per_trial)) if share]
        return max(1, int(min(counts)))

    def _scheduler(self, mode):
        from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

        if self.scheduler_name == "asha":
            return ASHAScheduler(
                time_attr=EPOCH,
                metric=SCORE,
                mode=mode,
                max_t=self.max_t,
                grace_period=self.grace_period,
                reduction_factor=self.reduction_factor,
                stop_last_trials=False,
            )  # a trial at max_t ends by itself, after its test
        if self.scheduler_name == "median":
            return MedianStoppingRule(time_attr=EPOCH, metric=SCORE, mode=mode, grace_period=self.grace_period)
        return None

    def _init_ray(self, ray):
        settings = {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning"}
        if self.address is None:
            # A private instance, on 127.0.0.1 (import_ray); its session files go to Ray's temp folder (/tmp/ray).
            # "local": never attach to a cluster some other `ray start` left running on this machine.
            settings.update(address="local", num_cpus=self.num_cpus)
        else:
            if self.address != "auto":  # Ray's own search for a cluster started on this machine
                _check_reachable(self.address)
            settings["address"] = self.address
        try:
            ray.init(**settings)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as err:
            if self.address is None:
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(
                f"cannot reach a Ray cluster at --address={self.address} ({reason}): start one with "
                "'ray start --head --node-ip-address=127.0.0.1' and pass the address it prints"
            ) from err
        if self.address is not None and ray.cluster_resources().get("CPU", 0) < self.cpus_per_trial:
            ray.shutdown()
            raise UsageError(f"the Ray cluster at {self.address} has fewer CPUs than --cpus_per_trial={self.cpus_per_trial}: lower it")


def _file_keys(config_files):
    import yaml

    keys = []
    for file in config_files or []:
        try:
            with open(file, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue  # reported in one line by _fixed_config's Config
        keys += list(loaded) if isinstance(loaded, dict) else []
    return keys


def _fixed_config(model, dataset, config_files, argv):
    """The fixed settings' Config, built as a trial builds it (same files, same command line)."""
    saved_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        return Config(model=model, dataset=dataset, config_file_list=config_files, argv=argv)
    finally:
        # RecBole's Config sets CUDA_VISIBLE_DEVICES from gpu_id: Ray must still see every GPU.
        if saved_devices is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved_devices

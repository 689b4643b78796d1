"""Hyperparameter search with RecBole's ``HyperTuning`` for T2Diff and every built-in model.

RecBole's own objective lives in ``recbole.quick_start`` (which imports ray) and re-resolves the
model by name inside ``recbole``; :func:`make_objective` trains through this package's
:func:`~recbole_t2diff.quick_start.run` instead. Trials are selected on the validation metric; test
metrics are only reported.
"""

import ast
import math
import os

import yaml

from recbole_t2diff.errors import UsageError
from recbole_t2diff.quick_start import run
from recbole_t2diff.settings import check_known_keys, command_line_settings, parse_setting

from recbole.trainer import HyperTuning
from recbole.utils.utils import dict2str

PARAM_TYPES = {"choice": None, "uniform": 2, "quniform": 3, "loguniform": 2}
ALGOS = ("exhaustive", "random", "bayes")


def parse_params_file(path):
    """Read RecBole's params format, ``name type value`` per line, into a hyperopt space.

    Blank lines and ``#`` comments are skipped; anything else malformed raises a one-line
    :class:`UsageError` naming the file, line and expected form. ``quniform`` ranges whose bounds
    and step are whole numbers yield ints (hyperopt returns floats, which layer sizes reject).
    """
    from hyperopt import hp
    from hyperopt.pyll import scope

    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as err:
        raise UsageError(f"cannot read params file '{path}' ({err.strerror}): check --params_file") from err
    space = {}
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{path}:{number}: '{line.strip()}'"
        parts = text.split(maxsplit=2)
        if len(parts) < 3 or parts[1] not in PARAM_TYPES:
            raise UsageError(f"{where} is not 'name type value' with type one of {', '.join(PARAM_TYPES)}")
        name, kind, value = parts
        if name in space:
            raise UsageError(f"{where} repeats '{name}': give each parameter once")
        if kind == "choice":
            try:
                options = ast.literal_eval(value)  # literals only: a params file never runs code
            except Exception as err:
                raise UsageError(f"{where}: choice needs a Python list such as [0.001,0.01] ({err})") from err
            if not isinstance(options, list) or not options:
                raise UsageError(f"{where}: choice needs a Python list such as [0.001,0.01]")
            for option in options:  # a trial hands each option to the Config, which reads a string as a literal: refuse code now
                parse_setting(name, option, f"a choice in {path}, line {number}")
            space[name] = hp.choice(name, list(options))
            continue
        try:
            bounds = [float(v) for v in value.split(",")]
        except ValueError:
            bounds = []
        if len(bounds) != PARAM_TYPES[kind] or bounds[0] >= bounds[1]:
            form = "low,high,step" if kind == "quniform" else "low,high"
            raise UsageError(f"{where}: {kind} needs {form} numbers with low < high")
        if kind == "uniform":
            space[name] = hp.uniform(name, *bounds)
        elif kind == "loguniform":  # bounds are natural logs, as in RecBole: -9,-4 means e^-9..e^-4
            space[name] = hp.loguniform(name, *bounds)
        else:
            node = hp.quniform(name, *bounds)
            space[name] = scope.int(node) if all(b == math.floor(b) for b in bounds) else node
    if not space:
        raise UsageError(f"params file '{path}' defines no parameter: write lines like 'learning_rate choice [0.001,0.01]'")
    return space


def check_output_file(path):
    """The result file is written after the last trial: a path that cannot be written fails now."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--output_file={path} is a folder: name a file in it, e.g. {os.path.join(path, 'hyper.result')}")
    if not os.path.isdir(folder):
        raise UsageError(f"--output_file={path}: folder {folder} does not exist; create it first (the results are written after the last trial)")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--output_file={path}: folder {folder} is not writable; choose another folder")


def _extra_keys(config_files):
    """``extra_keys`` listed in the fixed config files (the searched keys may be the user's own)."""
    keys = []
    for file in config_files or []:
        try:
            with open(file, encoding="utf-8") as f:
                keys += (yaml.safe_load(f) or {}).get("extra_keys") or []
        except (OSError, yaml.YAMLError, AttributeError):
            continue  # a missing or broken file is reported in one line when the first trial builds its Config
    return keys


def make_objective(model, dataset, saved=True, on_trainer=None, argv=None):
    """The objective ``HyperTuning`` calls as ``objective(config_dict, config_file_list)``; every trial
    gets the command-line settings ``argv``; ``on_trainer`` as in :func:`~recbole_t2diff.quick_start.run`
    (Ray trials report every epoch)."""

    def objective(config_dict, config_file_list):
        return run(model, dataset, config_file_list=config_file_list, config_dict=config_dict, argv=argv, saved=saved, verbose=False, on_trainer=on_trainer)

    return objective


class Search(HyperTuning):
    """RecBole's HyperTuning with progress lines and a result file that names the best trial.

    ``argv``: the command line's ``--key=value`` settings, fixed for every trial (``None``: none).
    """

    def __init__(self, model, dataset, params_file, config_files=None, algo="exhaustive", max_evals=10, early_stop=10, argv=None):
        if algo not in ALGOS:
            raise UsageError(f"unknown --algo={algo}: use one of {', '.join(ALGOS)}")
        space = parse_params_file(params_file)
        check_known_keys(space, f"in {params_file}", _extra_keys(config_files))
        self.argv = list(argv or [])
        # RecBole's Config gives the command line priority over each trial's values: a searched key
        # also given as --key=value would silently fix it in every trial.
        clash = sorted(set(space) & set(command_line_settings(self.argv)))
        if clash:
            raise UsageError(
                f"--{clash[0]} is given on the command line and searched in {params_file}: the command line would override "
                "every trial's value; drop one of them (fixed values belong in --config_files or on the command line, searched ones in the params file)"
            )
        super().__init__(
            make_objective(model, dataset, argv=self.argv),
            space=space,
            fixed_config_file_list=config_files,
            algo=algo,
            max_evals=max_evals,
            early_stop=early_stop,
        )
        self.model_name, self.dataset, self.algo_name = model, dataset, algo
        self.trials = []  # (params, result) in the order they ran

    def trial(self, params):
        number = len(self.trials) + 1
        print(f"[hyper] trial {number} of at most {self.max_evals}: {self.params2str(params)}", flush=True)
        outcome = super().trial(params)
        result = self.params2result[self.params2str(params)]
        self.trials.append((dict(params), result))
        best_params, best = self.best_trial()
        print(
            f"[hyper] trial {number} valid score {result['best_valid_score']:.4f}; "
            f"best so far {best['best_valid_score']:.4f} with {self.params2str(best_params)}",
            flush=True,
        )
        return outcome

    def best_trial(self):
        """(params, result) of the trial with the best validation score (ties: the earliest) among those
        that trained to the end: a trial a scheduler stopped (ray_search.py) was never tested."""
        sign = 1 if self.trials[0][1]["valid_score_bigger"] else -1
        tested = [trial for trial in self.trials if "stopped_after_epoch" not in trial[1]]
        return max(tested, key=lambda trial: sign * trial[1]["best_valid_score"])

    def export_result(self, output_file=None):
        best_params, best = self.best_trial()
        lines = [
            f"# {self.model_name} on {self.dataset}: {len(self.trials)} trials, algo {self.algo_name}, "
            "selected on the validation metric (test metrics only reported)",
            "",
        ]
        for number, (params, result) in enumerate(self.trials, 1):
            lines += [
                f"trial {number}: {self.params2str(params)}",
                f"  valid score: {result['best_valid_score']:.6f}",
                f"  valid: {dict2str(result['best_valid_result'])}",
                f"  stopped by the scheduler after epoch {result['stopped_after_epoch']}: not tested"
                if "stopped_after_epoch" in result
                else f"  test: {dict2str(result['test_result'])}",
                "",
            ]
        lines += [
            f"best trial {self.trials.index((best_params, best)) + 1}: {self.params2str(best_params)}",
            f"  valid score: {best['best_valid_score']:.6f}",
            f"  test: {dict2str(best['test_result'])}",
        ]
        with open(output_file, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

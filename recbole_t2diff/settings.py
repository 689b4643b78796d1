"""Every setting a user gives must be one something reads, with a value of the right kind.

RecBole takes any key from yaml files, ``config_dict`` and ``--key=value`` and ignores the ones no
code reads, so ``--lamda_diff=0.5`` trained the baseline without a word. The known keys are derived,
never listed by hand, so a knob added to a property file is accepted at once:

- every key of RecBole's own property files (``recbole/properties``: ``overall.yaml``, every model's
  and dataset's yaml) and of its settings lists (``recbole.utils.argument_list``);
- every key RecBole's or this package's code reads as ``config["key"]`` (a few have no yaml default);
- every key of this package's property files (``properties/``: every registered model's yaml, the
  dataset and protocol files);
- on the command line only, the options the running script declares itself with ``add_argument``
  (``--config_files``, ``--params_file``, ...), which RecBole's Config also reads from ``sys.argv``.

Keys from the user's own yaml files are checked like every other source. A deliberate key of your
own (read by your code from the config) is listed in ``extra_keys``.
"""
import difflib
import functools
import numbers
import os
import re
import sys
from pathlib import Path

import yaml

import recbole
from recbole.utils import argument_list

from recbole_t2diff.errors import UsageError

_CODE_READ = re.compile(r"""(?:config|config_dict)\[\s*["']([A-Za-z_]\w*)["']\s*\]|config\.get\(\s*["']([A-Za-z_]\w*)["']""")
_SCRIPT_OPTION = re.compile(r"""add_argument\(\s*["']--([A-Za-z_]\w*)["']""")


def _yaml_keys(folder):
    keys = set()
    for file in Path(folder).rglob("*.yaml"):
        if file.name == "url.yaml":  # RecBole's download table: its keys are dataset names, not settings
            continue
        loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            keys |= set(loaded)
    return keys


def _code_keys(folder):
    keys = set()
    for file in Path(folder).rglob("*.py"):
        for match in _CODE_READ.finditer(file.read_text(encoding="utf-8", errors="replace")):
            keys.add(match.group(1) or match.group(2))
    return keys


@functools.lru_cache(maxsize=1)
def known_keys():
    """Every setting some model, dataset or RecBole itself knows (see the module docstring)."""
    from recbole_t2diff.config import properties_dir

    recbole_root = Path(recbole.__file__).parent
    package_root = Path(__file__).parent
    lists = (argument_list.general_arguments, argument_list.training_arguments,
             argument_list.evaluation_arguments, argument_list.dataset_arguments)
    keys = set().union(*lists) | _yaml_keys(recbole_root / "properties") | _code_keys(recbole_root)
    return frozenset(keys | _yaml_keys(properties_dir()) | _code_keys(package_root) | {"model", "dataset"})


def script_options(argv0=None):
    """The ``--options`` the running script declares with argparse (they are its own, not settings)."""
    script = argv0 if argv0 is not None else (sys.argv[0] if sys.argv else "")
    if not script.endswith(".py") or not os.path.isfile(script):
        return set()
    with open(script, encoding="utf-8", errors="replace") as f:
        return set(_SCRIPT_OPTION.findall(f.read()))


def check_known_keys(keys, source, extra_keys=()):
    """One-line :class:`UsageError` for the first key in ``keys`` that nothing reads, naming the nearest known one."""
    known = known_keys() | set(extra_keys or ())
    for key in keys:
        if key in known:
            continue
        nearest = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean '{nearest[0]}'? " if nearest else ""
        raise UsageError(
            f"unknown setting '{key}' ({source}): no model, dataset or RecBole setting reads it; {hint}"
            "(a key your own code reads goes in extra_keys: [name])"
        )


def check_user_keys(config, config_files):
    """Check every key of every user source of a freshly built RecBole ``Config``."""
    extra_keys = config["extra_keys"] or []
    if not isinstance(extra_keys, list) or not all(isinstance(k, str) for k in extra_keys):
        raise UsageError(f"extra_keys={extra_keys!r}: it must be a list of setting names, e.g. extra_keys: [my_flag]")
    files = ", ".join(config_files or [])
    check_known_keys(config.file_config_dict, f"in {files}", extra_keys)
    check_known_keys(config.variable_config_dict, "in config_dict", extra_keys)
    check_known_keys(set(config.cmd_config_dict) - script_options(), "on the command line", extra_keys)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_count(config, key):
    value = config[key]
    if not _is_number(value) or value != int(value) or value < 1:
        raise UsageError(f"invalid setting {key}={value}: it must be a whole number >= 1")
    config[key] = int(value)


def check_values(config):
    """Training settings every model uses, and the kind of every value the user gave.

    A value of the wrong kind (``embedding_size=abc``: RecBole keeps a command-line value it cannot
    evaluate as the string) fails here in one line instead of deep inside the model or optimiser.
    """
    given = {**config.file_config_dict, **config.variable_config_dict, **config.cmd_config_dict}
    for key, value in given.items():
        default = config.internal_config_dict.get(key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise UsageError(f"invalid setting {key}={value}: it must be True or False")
        if _is_number(default) and not (_is_number(value) or value is None):
            raise UsageError(f"invalid setting {key}={value}: it must be a number (the default is {default})")
    for key in ("epochs", "train_batch_size", "eval_batch_size"):
        _check_count(config, key)
    learning_rate = config["learning_rate"]
    if not _is_number(learning_rate) or not learning_rate > 0:
        raise UsageError(f"invalid setting learning_rate={learning_rate}: it must be a number > 0, e.g. 0.001")
    check_no_pickle_caches(config)


def check_no_pickle_caches(config):
    """RecBole's dataset and dataloader caches are pickles, read back on the next run whenever the
    file exists, and unpickling runs whatever code a file holds: they are not supported."""
    for key in ("save_dataset", "dataset_save_path", "save_dataloaders", "dataloaders_save_path"):
        if config[key]:
            raise UsageError(
                f"{key}={config[key]} is not supported: RecBole's dataset caches are pickles, and loading one runs any code "
                "it holds; datasets are rebuilt from the atomic files on every run (drop the setting)"
            )

"""Every setting a user gives must be one something reads, with a value of the right kind.

RecBole takes any key from yaml files, ``config_dict`` and ``--key=value`` and ignores the ones no
code reads, so ``--lamda_diff=0.5`` trained the baseline without a word. The known keys are derived,
never listed by hand, so a knob added to a property file is accepted at once:

- every key of RecBole's own property files (``recbole/properties``: ``overall.yaml``, every model's
  and dataset's yaml) and of its settings lists (``recbole.utils.argument_list``);
- every key RecBole's or this package's code reads as ``config["key"]`` (a few have no yaml default);
- every key of this package's property files (``properties/``: every registered model's yaml, the
  dataset and protocol files).

Command-line settings reach a ``Config`` only as its ``argv`` argument (:func:`command_line_settings`
reads them): a script parses its own options (``--config_files``, ``--params_file``, ...) with
argparse first and hands over only the rest, so those options are never settings.

Keys from the user's own yaml files are checked like every other source. A deliberate key of your
own (read by your code from the config) is listed in ``extra_keys``.
"""

import ast
import difflib
import functools
import numbers
import os
import re
from pathlib import Path

import yaml

import recbole
from recbole.evaluator import metric_types
from recbole.utils import argument_list

from recbole_t2diff import properties
from recbole_t2diff.errors import UsageError

_CODE_READ = re.compile(r"""(?:config|config_dict)\[\s*["']([A-Za-z_]\w*)["']\s*\]|config\.get\(\s*["']([A-Za-z_]\w*)["']""")


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
    recbole_root = Path(recbole.__file__).parent
    package_root = Path(__file__).parent
    lists = (argument_list.general_arguments, argument_list.training_arguments, argument_list.evaluation_arguments, argument_list.dataset_arguments)
    keys = set().union(*lists) | _yaml_keys(recbole_root / "properties") | _code_keys(recbole_root)
    return frozenset(keys | _yaml_keys(properties.properties_dir()) | _code_keys(package_root) | {"model", "dataset"})


def command_line_settings(argv):
    """The ``--key=value`` settings of a command line, as ``{key: text}`` (``None``: no settings).

    ``argv`` holds settings only (a script's own options are argparse's, parsed before). RecBole
    reads ``--key=value`` with exactly one ``=`` and only logged anything else, so ``--epochs 1``
    trained 100 epochs: anything else is refused in one line, and so is a key given twice.
    """
    settings = {}
    arguments = list(argv or [])
    for index, argument in enumerate(arguments):
        if not (argument.startswith("--") and argument.count("=") == 1):
            _refuse_argument(argument, arguments[index + 1] if index + 1 < len(arguments) else None)
        key, value = argument[2:].split("=")
        if settings.get(key, value) != value:
            raise UsageError(f"--{key} is given twice, as --{key}={settings[key]} and {argument}: give it once")
        settings[key] = value
    return settings


def _refuse_argument(argument, following):
    if argument.startswith("--") and "=" not in argument:
        value = following if following is not None and not following.startswith("--") else "VALUE"
        raise UsageError(f"'{argument}' has no value: settings are written with '=', not a space; use {argument}={value}")
    if argument.startswith("--"):
        raise UsageError(
            f"'{argument}' has more than one '=': RecBole reads --key=value with one '='; put this setting in a yaml file given with --config_files"
        )
    raise UsageError(f"unexpected argument '{argument}': settings are written --key=value (e.g. --epochs=1)")


def check_known_keys(keys, source, extra_keys=()):
    """One-line :class:`UsageError` for the first key in ``keys`` that nothing reads, naming the nearest known one."""
    known = known_keys() | set(extra_keys or ())
    for key in keys:
        if key in known:
            continue
        nearest = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean '{nearest[0]}'? " if nearest else ""
        raise UsageError(
            f"unknown setting '{key}' ({source}): no model, dataset or RecBole setting reads it; {hint}(a key your own code reads goes in extra_keys: [name])"
        )


def check_user_keys(config, config_files):
    """Check every key of every user source of a freshly built RecBole ``Config``."""
    extra_keys = config["extra_keys"] or []
    if not isinstance(extra_keys, list) or not all(isinstance(k, str) for k in extra_keys):
        raise UsageError(f"extra_keys={extra_keys!r}: it must be a list of setting names, e.g. extra_keys: [my_flag]")
    files = ", ".join(config_files or [])
    check_known_keys(config.file_config_dict, f"in {files}", extra_keys)
    check_known_keys(config.variable_config_dict, "in config_dict", extra_keys)
    check_known_keys(config.cmd_config_dict, "on the command line", extra_keys)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_count(config, key):
    value = config[key]
    if not _is_number(value) or value != int(value) or value < 1:
        raise UsageError(f"invalid setting {key}={value}: it must be a whole number >= 1")
    config[key] = int(value)


def _check_kind(key, value, reference, what):
    """``value`` is of the kind of ``reference`` (a default or a stored value): True/False, or a number."""
    if isinstance(reference, bool) and not isinstance(value, bool):
        raise UsageError(f"invalid setting {key}={value}: it must be True or False")
    if _is_number(reference) and not (_is_number(value) or value is None):
        raise UsageError(f"invalid setting {key}={value}: it must be a number ({what} is {reference})")


def check_values(config):
    """Training settings every model uses, and the kind of every value the user gave.

    A value of the wrong kind (``embedding_size=abc``: RecBole keeps a command-line value it cannot
    evaluate as the string) fails here in one line instead of deep inside the model or optimiser.
    """
    given = {**config.file_config_dict, **config.variable_config_dict, **config.cmd_config_dict}
    for key, value in given.items():
        _check_kind(key, value, config.internal_config_dict.get(key), "the default")
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


# --- setting strings are read as literals, never run -------------------------------------------------

# What RecBole's eval() kept (other results it replaced by the text): ast.literal_eval gives these too.
_LITERAL_TYPES = (str, int, float, bool, list, tuple, dict, type(None))
# Syntax that only code has: a value holding one of these is refused, not kept as text.
_CODE_SYNTAX = {
    ast.Call: "a function call",
    ast.Subscript: "indexing",
    ast.Lambda: "a lambda",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator",
    ast.NamedExpr: "an assignment",
    ast.Starred: "unpacking",
    ast.IfExp: "a conditional",
    ast.BoolOp: "and/or",
    ast.Compare: "a comparison",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.JoinedStr: "an f-string",
}
_CONTAINERS = (ast.List, ast.Tuple, ast.Dict, ast.Set)
LITERAL_FORMS = "a number, True/False/None, a word or a quoted string, or a list or dict of those (strings in it quoted)"


def parse_setting(key, value, source):
    """A setting's value as RecBole would read it from ``--key=value`` or ``config_dict``, without
    running anything: RecBole's ``Config`` passes such strings to ``eval()``, so a value could run
    any code. Here a string is read with ``ast.literal_eval``, and what is no literal is:

    - text, when it is no Python expression at all (``ml-1m``, ``../data``, ``~``) or only words
      joined by operators or dots (``SASRec``, ``amazon-beauty``, ``NDCG@10``, ``data/ml``,
      ``my.yaml``), as RecBole kept them (its eval failed with NameError or SyntaxError);
      ``true``/``false`` in any case become booleans, as in RecBole;
    - refused in one line when it is code: a call, indexing, a comprehension, a lambda, ... (eval
      would have run it), arithmetic on numbers (``1e-3*2``: eval would have computed it; write the
      result), or a list or dict with unquoted words (eval failed and RecBole kept the whole text).

    Non-strings are returned unchanged.
    """
    if not isinstance(value, str):
        return value
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    else:  # a set, bytes or complex number: RecBole kept the text as well
        return parsed if isinstance(parsed, _LITERAL_TYPES) else value
    if value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    try:
        tree = ast.parse(value.strip(), mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return value  # not Python: plain text
    problem = _code_in(tree)
    if problem is None:
        return value
    shown = value if len(value) <= 80 else value[:77] + "..."
    raise UsageError(
        f"setting {key}={shown!r} ({source}) is {problem}: settings are read as literals only, never run as code; "
        f"give {LITERAL_FORMS}; text that looks like code goes in quotes ('...')"
    )


def _code_in(tree):
    """What makes the parsed expression ``tree`` code rather than a literal or plain text, or None."""
    present = {type(node) for node in ast.walk(tree)}
    for syntax, name in _CODE_SYNTAX.items():  # a call first: it is what eval would have run
        if syntax in present:
            return f"Python code ({name})"
    for node in ast.walk(tree):  # __import__, __builtins__, x.__class__: names no value or file has
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
        if len(name) > 4 and name.startswith("__") and name.endswith("__"):
            return f"Python code (the name {name})"
    if isinstance(tree, _CONTAINERS):
        return "a list, tuple or dict with unquoted words (quote each string, e.g. ['Recall','NDCG'])"
    if isinstance(tree, (ast.BinOp, ast.UnaryOp)) and all(
        isinstance(node, ast.Constant) for node in ast.walk(tree) if not isinstance(node, (ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop))
    ):
        return "arithmetic, not a value (write its result)"
    return None


def parse_settings(settings, source):
    """``parse_setting`` for every value of the dict ``settings``, in place (RecBole's own reader also
    replaces the values in the dict it is given)."""
    for key, value in settings.items():
        settings[key] = parse_setting(key, value, source)
    return settings


# --- dataset names ------------------------------------------------------------------------------------


def check_dataset_name(name):
    """A dataset is named by its folder's name; RecBole joins the name into the log file's path and
    the data path, so a name with a path in it wrote (an empty log file) outside the working folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(sep and sep in name for sep in ("/", "\\", os.sep, os.altsep)):
        raise UsageError(
            f"dataset name {name!r} is not a folder name: pass the name of the folder holding <name>.inter as --dataset=NAME "
            "and its parent folder as --data_path=DIR"
        )


# --- overrides of a checkpoint's settings ---------------------------------------------------------------


def apply_overrides(config, overrides):
    """Set ``overrides`` on a checkpoint's reloaded config, read and checked as a Config reads and
    checks the same keys: names that something reads, literals (as ``config_dict``), values of the
    stored value's kind, and what RecBole checks once when it builds a Config (counts >= 1, topk,
    metrics of the stored kind), which a reloaded config skips."""
    overrides = parse_settings(dict(overrides or {}), "in overrides")
    check_known_keys(overrides, "overrides")
    for key, value in overrides.items():
        _check_kind(key, value, config[key], "the checkpoint's value")
        config[key] = value
    for key in ("epochs", "train_batch_size", "eval_batch_size"):
        if key in overrides:
            _check_count(config, key)
    if "topk" in overrides:
        topk = [config["topk"]] if _is_number(config["topk"]) else config["topk"]
        if not isinstance(topk, list) or not topk or not all(_is_number(k) and k == int(k) and k >= 1 for k in topk):
            raise UsageError(f"invalid setting topk={overrides['topk']}: it must be a whole number >= 1 or a list of them, e.g. [10,20]")
        config["topk"] = [int(k) for k in topk]
    if "metrics" in overrides:
        metrics = [config["metrics"]] if isinstance(config["metrics"], str) else config["metrics"]
        kinds = [metric_types.get(metric.lower()) if isinstance(metric, str) else None for metric in metrics or [None]]
        if not all(kind == config["eval_type"] for kind in kinds):
            raise UsageError(
                f"invalid setting metrics={overrides['metrics']}: it must be a list of RecBole metric names of the kind the model "
                f"was evaluated with ({config['eval_type'].name.lower()}), e.g. ['Recall','NDCG']"
            )
        config["metrics"] = metrics

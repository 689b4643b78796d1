"""Config subclass and model registry: RecBole's, plus the models this package adds.

RecBole only looks for models and their property files inside the ``recbole`` package. This
``Config`` resolves model names through :func:`get_model` (our registry first, then RecBole's
built-ins) and loads this package's property files with *internal* priority: they override
RecBole's defaults, while user yaml files, ``config_dict`` and the command line still override them.

RecBole's ``Config`` reads the process's command line itself; this one takes it as an argument,
``argv`` (the ``--key=value`` settings only; ``None``: none), which the scripts pass in.
"""

import importlib
import importlib.util
import os

import torch
import yaml

from recbole_t2diff.errors import UsageError
from recbole_t2diff.properties import properties_dir, property_files  # noqa: F401  (properties_dir: re-exported, callers import it from here)
from recbole_t2diff.settings import check_dataset_name, check_user_keys, check_values, command_line_settings, parse_settings

from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType
from recbole.utils import get_model as recbole_get_model

MODELS = {"T2Diff": "recbole_t2diff.model.t2diff:T2Diff", "SparCode": "recbole_t2diff.model.sparcode:SparCode"}

# RecBole's own search order; its exlib models (LightGBM, XGBoost) are only imported when named,
# because importing that package for an unknown name fails on a missing lightgbm instead.
_BUILTIN_SUBMODULES = [
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
]
_EXLIB_MODELS = {"lightgbm", "xgboost"}


def get_model(name):
    """Model class for ``name``: a T2Diff-package model or any RecBole built-in (e.g. ``SASRec``)."""
    if not isinstance(name, str):
        return name
    if name in MODELS:
        module, attr = MODELS[name].split(":")
        return getattr(importlib.import_module(module), attr)
    if name.lower() in _EXLIB_MODELS:
        try:
            return recbole_get_model(name)
        except ImportError as err:
            raise UsageError(f"model '{name}' needs {err.name}: pip install {err.name}") from err
    return _builtin_model(name)


def _builtin_model(name):
    if not name.isidentifier():  # "../x" would reach importlib as a relative module name
        raise UsageError(f"unknown model {name!r}: a model name is a Python class name, e.g. --model=T2Diff or --model=SASRec")
    for submodule in _BUILTIN_SUBMODULES:
        module_path = f"recbole.model.{submodule}.{name.lower()}"
        if importlib.util.find_spec(module_path) is None:
            continue
        module = importlib.import_module(module_path)
        if hasattr(module, name):
            return getattr(module, name)
        spelled = [attr for attr in dir(module) if attr.lower() == name.lower()]
        hint = f"did you mean --model={spelled[0]}?" if spelled else "check the spelling"
        raise UsageError(f"unknown model '{name}': model names are case-sensitive, {hint}")
    raise UsageError(
        f"unknown model '{name}': use --model=T2Diff, --model=SparCode or the name of a RecBole built-in model (e.g. SASRec, GRU4Rec, BERT4Rec, Caser, NARM)"
    )


def check_model_config(config):
    """Run the model's own ``check_config`` (T2Diff's knob checks), if it has one, before any data loads."""
    check = getattr(get_model(config["model"]), "check_config", None)
    if check is not None:
        check(config)


BACKENDS = ("gloo", "nccl")


def _check_yaml_file(file):
    """A missing file or a yaml syntax error in one line, naming the file and position."""
    if not os.path.isfile(file):
        raise UsageError(f"config file '{file}' does not exist: check the path given to --config_files")
    try:  # syntax only: composing builds no Python object
        with open(file, encoding="utf-8") as f:
            document = yaml.compose(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"config file '{file}' is not valid yaml{where}: {problem}") from None
    if document is not None and not isinstance(document, yaml.MappingNode):
        raise UsageError(f"config file '{file}' must hold 'key: value' lines")
    node = _python_tagged(document)
    if node is not None:  # RecBole's FullLoader builds Python objects for these (a function for !!python/name:)
        raise UsageError(
            f"config file '{file}' line {node.start_mark.line + 1}: the tag {node.tag.replace('tag:yaml.org,2002:', '!!')} asks for a "
            "Python object; settings are plain yaml (numbers, strings, true/false, null, lists, mappings): drop the tag"
        )


def _python_tagged(node):
    """The first node of a composed yaml document with a ``!!python/...`` tag, or None."""
    pending = [node] if node is not None else []
    while pending:
        node = pending.pop()
        if node.tag.startswith("tag:yaml.org,2002:python/"):
            return node
        if isinstance(node, yaml.MappingNode):
            pending += [part for pair in reversed(node.value) for part in reversed(pair)]
        elif isinstance(node, yaml.SequenceNode):
            pending += reversed(node.value)
    return None


class Config(RecBoleConfig):
    """RecBole's Config, aware of this package's models and property files, with the command line
    given as ``argv``: the ``--key=value`` settings (e.g. a script's arguments less its own
    options), which override every other source, as in RecBole; ``None`` means none."""

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, argv=None):
        for file in config_file_list or []:
            _check_yaml_file(file)
        self.argv = list(argv or [])  # read by _load_cmd_line, which RecBole's __init__ calls without arguments
        try:
            super().__init__(model, dataset, config_file_list, config_dict)
        except ValueError as err:  # RecBole's own checks of settings, e.g. CE with sampled negatives
            raise UsageError(f"invalid setting: {err}") from err
        check_user_keys(self, config_file_list)
        check_values(self)
        check_model_config(self)

    def _get_model_and_dataset(self, model, dataset):
        model = model if model is not None else self.external_config_dict.get("model")
        dataset = dataset if dataset is not None else self.external_config_dict.get("dataset")
        if model is None:
            raise UsageError("no model given: pass --model=NAME (e.g. --model=T2Diff)")
        if dataset is None:
            raise UsageError("no dataset given: pass --dataset=NAME (e.g. --dataset=ml-100k)")
        check_dataset_name(dataset)  # before anything (RecBole's log file first) is written under its name
        return super()._get_model_and_dataset(get_model(model), dataset)

    def _load_variable_config_dict(self, config_dict):
        # RecBole eval()s every string of config_dict (HyperTuning may hand lists over as text): literals only
        return parse_settings(config_dict, "in config_dict") if config_dict else dict()

    def _load_cmd_line(self):
        """RecBole's reading of ``--key=value`` from the process's command line, from ``self.argv`` instead, with
        anything but ``--key=value`` and a key given twice refused in one line (RecBole logged the
        first as unused) and values read as literals, never ``eval()``-ed (``settings.parse_setting``)."""
        return parse_settings(command_line_settings(self.argv), "on the command line")

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        for file in property_files(model, dataset, model_class.type == ModelType.SEQUENTIAL):
            loaded = self._update_internal_config_dict(str(file)) or {}
            if file.parent.name == "dataset":
                self.parameters["Dataset"] += [k for k in loaded if k not in self.parameters["Dataset"]]

    def _init_device(self):
        """RecBole's device set-up, plus a gloo process group for distributed runs on CPU.

        RecBole hard-codes NCCL, CUDA devices and ``torch.cuda.set_device`` for distributed runs
        (docs/RECBOLE.md §9); ``dist_backend: gloo`` (the default without a GPU) runs the same
        multi-process path on CPU processes.
        """
        settings = self.final_config_dict
        if "local_rank" not in settings or self.dist_backend() == "nccl":
            return super()._init_device()
        settings["gpu_id"] = str(settings["gpu_id"])
        torch.distributed.init_process_group(
            backend="gloo",
            rank=settings["local_rank"] + settings["offset"],
            world_size=settings["world_size"],
            init_method=f"tcp://{settings['ip']}:{settings['port']}",
        )
        settings.update(device=torch.device("cpu"), single_spec=False)
        if settings["local_rank"] != 0:  # as RecBole: only rank 0 logs
            settings.update(state="error", show_progress=False, verbose=False)

    def dist_backend(self):
        backend = self.final_config_dict.get("dist_backend")
        if backend is None:
            use_gpu = self.final_config_dict.get("use_gpu", True)
            return "nccl" if use_gpu and torch.cuda.is_available() else "gloo"
        if backend not in BACKENDS:
            raise UsageError(f"unknown dist_backend '{backend}': use gloo (CPU) or nccl (GPU)")
        return backend

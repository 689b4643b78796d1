"""Checkpoints that load without running code, name their run uniquely and know their data.

A checkpoint is one ``torch.save`` file holding only tensors and plain data (str, int, float,
bool, None, lists and dicts): the weights, the run's settings as plain values, the token maps and a
fingerprint of the data it was trained on, a SHA-256 of the weights and one of the settings. It is
read with ``torch.load(weights_only=True)``, which refuses anything else, so a crafted file cannot
run code.

RecBole's own checkpoints (and this package's before this format) pickle the ``Config`` object:
they are refused with a one-line error, and ``convert.convert_checkpoint`` rewrites one in this format
when the caller says it trusts the file (``trust_checkpoint=True``, or on the command line
``python -m recbole_t2diff.convert --trust_checkpoint OLD.pth``).
"""

import enum
import hashlib
import io
import json
import numbers
import os
import pickletools
import secrets
import warnings
import zipfile

import numpy as np
import torch

from recbole_t2diff.config import Config, get_model
from recbole_t2diff.errors import UsageError
from recbole_t2diff.settings import check_dataset_name, check_no_pickle_caches

from recbole.utils import get_local_time
from recbole.utils.enum_type import EvaluatorType, FeatureSource, FeatureType, InputType, ModelType

FORMAT = "recbole_t2diff checkpoint 1"
CONVERT_HINT = "python -m recbole_t2diff.convert --trust_checkpoint"
# The enums RecBole puts into a Config's settings (MODEL_TYPE, MODEL_INPUT_TYPE, eval_type, ...).
_ENUMS = {cls.__name__: cls for cls in (EvaluatorType, FeatureSource, FeatureType, InputType, ModelType)}
# Settings the SHA-256 of the settings leaves out: where and how a process runs and reports, never
# what the model computes (the data's content is checked by its own fingerprint, wherever it lies).
# Every other setting is covered, a knob added later too.
UNCHECKED_SETTINGS = frozenset(
    {
        "gpu_id",
        "use_gpu",
        "device",
        "single_spec",
        "local_rank",
        "nproc",
        "world_size",
        "ip",
        "port",
        "offset",
        "dist_backend",
        "state",
        "show_progress",
        "checkpoint_dir",
        "data_path",
        "worker",
        "log_wandb",
        "wandb_project",
    }
)


def unique_checkpoint_path(folder, model_name):
    """``<folder>/<model>-<time>-<random>.pth``: runs started in the same second get different files."""
    return os.path.join(folder, f"{model_name}-{get_local_time()}-{secrets.token_hex(4)}.pth")


def weights_digest(state_dict):
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def settings_digest(plain_config):
    """SHA-256 over a stored config (:func:`config_to_plain`'s result): model, dataset and every setting
    but :data:`UNCHECKED_SETTINGS`, as canonical JSON (tensors by dtype, shape and bytes)."""
    covered = {
        "model": plain_config["model"],
        "dataset": plain_config["dataset"],
        "settings": {key: value for key, value in plain_config["settings"].items() if key not in UNCHECKED_SETTINGS},
    }

    def tensor(value):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{type(value).__name__} is not plain data")
        value = value.detach().cpu().contiguous()
        return {"__tensor__": [str(value.dtype), list(value.shape), value.reshape(-1).view(torch.uint8).numpy().tobytes().hex()]}

    return hashlib.sha256(json.dumps(covered, sort_keys=True, default=tensor).encode()).hexdigest()


def data_identity(dataset):
    """What ties a checkpoint to its data: every token field's id -> token map, and a SHA-256 of the
    tables RecBole loaded (interactions, item and user features, ids remapped), before the split.

    The dataset classes of ``data.py`` compute it once, when built, as ``dataset.identity``: the
    split later replaces a sequential dataset's interactions by its training samples.
    """
    tokens = {str(field): [str(token) for token in id2token] for field, id2token in sorted(dataset.field2id_token.items())}
    digest = hashlib.sha256()
    for name in ("inter_feat", "item_feat", "user_feat"):
        table = getattr(dataset, name, None)
        if table is None:
            continue
        for field in sorted(table.columns):
            for part in _column_arrays(table[field].to_numpy()):
                digest.update(f"{name}|{field}|{part.dtype}|{part.shape}|".encode())
                digest.update(np.ascontiguousarray(part))  # hashed in place, no copy of a big table
    return {"tokens": tokens, "fingerprint": digest.hexdigest()}


def _column_arrays(values):
    """A column as arrays with a fixed-size dtype: sequence fields (one array per row) become their
    lengths and their concatenated values."""
    if values.dtype != object:
        return [values]
    cells = [np.atleast_1d(np.asarray(cell)) for cell in values]
    flat = np.concatenate(cells) if cells else np.zeros(0)
    return [np.array([len(cell) for cell in cells]), flat.astype(str) if flat.dtype == object else flat]


def check_data(path, stored, current):
    """One line, and no evaluation, when the data (``current``: a dataset's ``identity``) is not the
    data the checkpoint was trained on (``stored``)."""
    for field, tokens in stored["tokens"].items():
        now = current["tokens"].get(field)
        if now != tokens:
            change = "is missing" if now is None else f"maps its ids to other tokens ({len(tokens)} ids at training, {len(now)} now)"
            raise UsageError(
                f"checkpoint '{path}' was trained on other data: field {field} {change}, so every id would mean another "
                "user or item; evaluate or export it against the data files it was trained on (same rows, same order)"
            )
    if current["fingerprint"] != stored["fingerprint"]:
        raise UsageError(
            f"checkpoint '{path}' was trained on other data: the ids match but the interactions differ (fingerprint "
            f"{stored['fingerprint'][:12]} at training, {current['fingerprint'][:12]} now); use the data files it was trained on"
        )


def _plain(value, key):
    """``value`` as plain data (enums and devices tagged), or a one-line error naming the setting."""
    if value is None:
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str):  # also numpy's str_, which would pickle as a numpy object
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, enum.Enum) and type(value).__name__ in _ENUMS:
        return {"__enum__": f"{type(value).__name__}.{value.name}"}
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(item, key) for item in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, key) for k, v in value.items()}
    raise UsageError(f"setting {key}={value!r} ({type(value).__name__}) cannot be stored in a checkpoint: use numbers, strings, lists or dicts")


def _restore(value):
    if isinstance(value, list):
        return [_restore(item) for item in value]
    if isinstance(value, dict):
        if set(value) == {"__enum__"}:
            enum_name, member = value["__enum__"].split(".")
            return _ENUMS[enum_name][member]
        if set(value) == {"__device__"}:
            return torch.device(value["__device__"])
        return {k: _restore(v) for k, v in value.items()}
    return value


def config_to_plain(config):
    return {
        "model": config["model"],
        "dataset": config["dataset"],
        "parameters": _plain(config.parameters, "parameters"),
        "settings": {key: _plain(value, key) for key, value in config.final_config_dict.items()},
    }


def config_from_plain(plain):
    """The ``Config`` a checkpoint was trained with, rebuilt from its stored settings (no file, no
    command line and no property default is read again, so a changed default cannot change the model)."""
    settings = _restore(plain["settings"])
    check_dataset_name(plain["dataset"])  # joined into the log file's path: a stored path would write outside
    # RecBole's KD_DAGFM builds its teacher with eval(config["teacher"]): from a file, only a class name.
    teacher = settings.get("teacher")
    if teacher is not None and not (isinstance(teacher, str) and teacher.isidentifier()):
        raise UsageError(f"checkpoint setting teacher={teacher!r} is not a model class name (RecBole evaluates it as code): the file is not to be trusted")
    config = Config.__new__(Config)
    config.model, config.dataset, config.argv = plain["model"], plain["dataset"], []
    config.model_class = get_model(plain["model"])
    config.parameters = _restore(plain["parameters"])
    config.yaml_loader = config._build_yaml_loader()
    config.file_config_dict = config.variable_config_dict = config.cmd_config_dict = {}
    config.external_config_dict, config.internal_config_dict = {}, {}
    config.final_config_dict = settings
    check_no_pickle_caches(config)  # RecBole would write (and a later run read) a pickle cache
    return config


def save_checkpoint(path, config, model, data, **training_state):
    """Write the checkpoint atomically (a temporary file in the same folder, then a rename), so a
    crash or a parallel reader never sees half a file. ``data`` is :func:`data_identity`'s result."""
    state_dict = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    plain_config = config_to_plain(config)
    payload = {
        "format": FORMAT,
        "config": plain_config,
        "state_dict": state_dict,
        "other_parameter": _plain(model.other_parameter(), "other_parameter"),
        "weights_sha256": weights_digest(state_dict),
        "settings_sha256": settings_digest(plain_config),
        "data": data,
        **{key: _plain(value, key) for key, value in training_state.items()},
    }
    write_atomically(payload, path)


def write_atomically(payload, path):
    """``torch.save`` to a temporary file in the same folder, then a rename: a crash or a parallel
    reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint without running code; its ``config`` is rebuilt as a ``Config``.

    Every failure is a one-line :class:`UsageError`: a missing, damaged or foreign file, a bare
    state dict, a file that needs unpickling (an old-format checkpoint, or a crafted one), or
    weights or settings that do not match the checksums written with them.
    """
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{path}' does not exist: pass the .pth file a training run saved (its path is in run()'s saved_model_file)")
    try:
        with warnings.catch_warnings():  # torch warns about the "protocol" of bytes that are no pickle, before failing
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for foreign or damaged files: all mean "not loadable"
        if "Weights only load failed" in str(err) and _pickles_objects(path):
            raise UsageError(
                f"checkpoint '{path}' is not in the safe format: loading it would unpickle objects, which can run code "
                f"(a checkpoint from RecBole or an earlier recbole_t2diff, or a crafted file); if you trust where it came "
                f"from, convert it once: {CONVERT_HINT} {path}"
            ) from None
        raise UsageError(f"checkpoint '{path}' is damaged or not a checkpoint ({_reason(err)[:200]}): use a .pth file a training run saved") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            raise UsageError(
                f"checkpoint '{path}' holds only weights (a state dict), without the settings and data maps needed to rebuild "
                "the model: use the .pth file a training run saved"
            )
        raise UsageError(f"'{path}' is not a recbole_t2diff checkpoint (no '{FORMAT}' format tag): use the .pth file a training run saved")
    check_digests(path, payload)
    try:
        payload["config"] = config_from_plain(payload["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a tagged file with parts missing or of the wrong kind
        raise UsageError(f"checkpoint '{path}' is damaged: its {type(err).__name__} ({err}) shows a part missing or malformed; use an intact copy") from None
    return payload


def check_digests(path, payload):
    """The weights and the settings (all but :data:`UNCHECKED_SETTINGS`) match the SHA-256 written
    with them: a damaged or edited file fails in one line instead of computing something else."""
    try:
        weights_intact = weights_digest(payload["state_dict"]) == payload["weights_sha256"]
        stored = payload.get("settings_sha256")
        settings_intact = stored is not None and settings_digest(payload["config"]) == stored
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UsageError(f"checkpoint '{path}' is damaged: its {type(err).__name__} ({err}) shows a part missing or malformed; use an intact copy") from None
    if not weights_intact:
        raise UsageError(f"checkpoint '{path}' is damaged: its weights do not match the SHA-256 written with them; use an intact copy")
    if stored is None:
        raise UsageError(
            f"checkpoint '{path}' has no SHA-256 of its settings (written before they were checked): add one, taking its settings "
            f"as they are now, with python -m recbole_t2diff.convert {path} (no unpickling: the file is in the safe format)"
        )
    if not settings_intact:
        raise UsageError(
            f"checkpoint '{path}' is damaged or edited: its settings do not match the SHA-256 written with them; use an intact copy, "
            "and change settings for an evaluation with overrides=..., not in the file"
        )


def _reason(err):
    """The informative line of a torch.load error: torch's weights-only message starts with advice
    and gives the reason after "WeightsUnpickler error:" (on that line or the next)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    marker = next((index for index, line in enumerate(lines) if "WeightsUnpickler error:" in line), None)
    if marker is not None:
        rest = [lines[marker].partition("WeightsUnpickler error:")[2].strip(), *lines[marker + 1 : marker + 2]]
        return next((line for line in rest if line), type(err).__name__)
    return lines[0] if lines else type(err).__name__


# Opcodes that name a Python callable or class to build: what only an object pickle needs.
_OBJECT_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST"}


def _pickles_objects(path):
    """Whether the file is a pickle that builds Python objects (torch's zip format, or a raw pickle
    stream as torch's legacy format writes several): an old-format or crafted checkpoint, as opposed
    to bytes that are no pickle at all. Only reads the opcodes (pickletools), builds nothing."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                records = [name for name in archive.namelist() if name.rpartition("/")[2] == "data.pkl"]
                streams = [io.BytesIO(archive.read(records[0]))] if records else []
        else:
            streams = [open(path, "rb")]
        for stream in streams:
            with stream:
                for _ in range(4):  # torch's legacy format: magic number, protocol, system info, then the object
                    names = {opcode.name for opcode, _, _ in pickletools.genops(stream)}  # the whole pickle, up to STOP
                    if names & _OBJECT_OPCODES:
                        return True
                    if not stream.read(1):
                        break
                    stream.seek(-1, io.SEEK_CUR)
    except Exception:  # genops rejects an unknown opcode or a cut-off stream: no pickle
        return False
    return False

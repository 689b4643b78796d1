"""Make RecBole 1.2.1 run on today's Python, numpy and torch: :func:`install` puts every patch in
place, once per process; the package's ``__init__`` calls it (its docstring lists each patch).

RecBole's log file, ``log/<model>/<model>-<dataset>-<time>-<md5 of the settings>.log``, and the
tensorboard folder named after it were shared by two runs of one setting started in the same second
(their lines interleaved), and ``logging.basicConfig`` adds nothing once the root logger has
handlers, so every later run in a process (search trials) logged into the first run's file:
:func:`init_logger` (called by ``quick_start.prepare`` instead of RecBole's) gives each run a file
of its own, and RecBole's trainers get :func:`get_tensorboard` (patch 5 of :func:`install`), which
names the folder after it.

Not patches, but the same versions' problems, handled elsewhere:

- RecBole 1.2.1 declares ray<=2.6.3, which has no wheels past Python 3.11: nothing here imports ray
  (``recbole.quick_start``, its only user, is never imported; tests/test_packaging.py checks), and
  the README's install drops the requirement (pyproject.toml, ``[tool.uv]``).
- torch >= 2.6 loads with ``weights_only=True`` and refuses RecBole's checkpoints, which pickle the
  ``Config`` (docs/RECBOLE.md §8.3): this package writes and reads its own safe format, see ``checkpoint.py``.
"""

import logging
import os
import secrets
import warnings

import colorama
import colorlog
import numpy as np
import torch

import recbole.data.utils as recbole_data_utils
import recbole.trainer.trainer as recbole_trainer
import recbole.utils.utils as recbole_utils
from recbole.utils.logger import RemoveColorFilter, log_colors_config

# The aliases RecBole's Config sets (and its metrics use), set here too because a process that only
# loads a checkpoint never builds a Config.
_NUMPY_ALIASES = {
    "float_": np.float64,
    "complex_": np.complex128,
    "unicode_": np.str_,
    "bool": np.bool_,
    "int": np.int_,
    "float": np.float64,
    "complex": np.complex128,
    "object": np.object_,
    "str": np.str_,
    "long": np.int_,
    "unicode": np.str_,
}
_installed = False


def install():
    """Install every patch this package makes to its dependencies; calling it again does nothing.

    1. **warnings** (hyperopt 0.2.5 with setuptools < 81; Python >= 3.12 with RecBole 1.2.1):
       hyperopt imports ``pkg_resources``, which warns on every import (setup.cfg pins setuptools<81
       so that it still exists, and declares it because Python 3.12+ makes environments without
       setuptools); Python 3.12+ reports the invalid escape sequences in RecBole's ``dien.py``
       docstrings (``\\p``) as a SyntaxWarning whenever it compiles the file, so every run without
       cached bytecode printed two warnings before its first line. Both are silenced (SyntaxWarnings
       from RecBole's own files only). RecBole's own calls of APIs that pandas >= 2.2 and torch >= 2.4
       deprecate printed three FutureWarnings (twelve lines) in every run: ``Dataset._fill_nan``'s chained
       ``feat[field].fillna(..., inplace=True)``, which fills as it always did on the pandas < 3 that
       setup.cfg pins (pandas 3 would make it fill nothing), and the trainer's ``torch.cuda.amp.GradScaler``
       (same behaviour). Nothing a user can change: those two messages, from RecBole's files only, are silenced.
    2. **numpy aliases** (numpy >= 1.24 removed ``np.float``, ``np.int``, ...; numpy >= 2 removed
       ``np.float_``, ``np.complex_``, ``np.unicode_``): RecBole 1.2.1's
       ``Config.compatibility_settings`` and its metrics use them (docs/RECBOLE.md §8.1): put back.
    3. **anomaly mode** (RecBole 1.2.1, any torch): importing ``recbole.model.sequential_recommender.sine``
       (which importing any of RecBole's sequential models does) switches autograd anomaly mode on
       for the whole process (docs/RECBOLE.md §8.7), which makes training 2-3x slower. It is
       imported here, once, and the mode switched off right after: a module runs once, so no later
       model lookup switches it on again.
    4. **ensure_dir** (RecBole 1.2.1): RecBole's ``ensure_dir`` checks, then creates: two runs started
       together in a fresh folder (the benchmark's parallel runs, both writing ``log/<model>/``)
       race, and the loser dies with FileExistsError. It is made to create with ``exist_ok``; its
       code, not the name, is replaced, because RecBole's modules imported the function by name.
    5. **get_tensorboard** (RecBole 1.2.1): RecBole names the tensorboard folder after its log file (or
       ``model-<time>``), both shared by runs started in the same second; its trainers look the
       function up in their module when built, and get :func:`get_tensorboard`, which names the
       folder after the run's own log file (:func:`init_logger`).
    6. **dataloader cache reader** (RecBole 1.2.1): ``data_preparation`` unpickles
       ``saved/<dataset>-for-<model>-dataloader.pth`` whenever that file exists, so a file dropped there ran
       code on the next run. It looks the reader up in its module at every call, and gets one that
       reads nothing (the settings that write such caches are refused: ``settings.check_no_pickle_caches``).
    """
    global _installed
    if _installed:
        return
    silence_recboles_warnings()
    with warnings.catch_warnings():  # asking numpy about np.object / np.str warns
        warnings.simplefilter("ignore", FutureWarning)
        for alias, value in _NUMPY_ALIASES.items():
            if not hasattr(np, alias):
                setattr(np, alias, value)
    import recbole.model.sequential_recommender.sine  # noqa: F401  (its import is what switches anomaly mode on)

    torch.autograd.set_detect_anomaly(False)
    recbole_utils.ensure_dir.__code__ = _ensure_dir.__code__
    recbole_trainer.get_tensorboard = get_tensorboard
    recbole_data_utils.load_split_dataloaders = _no_cached_dataloaders
    _installed = True


def silence_recboles_warnings():
    """The warnings filters of :func:`install`'s patch 1 (adding them again changes nothing)."""
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    # A compile-time warning's module is its file path without ".py": match RecBole's files only.
    warnings.filterwarnings("ignore", category=SyntaxWarning, module=r".*[/\\]recbole[/\\]")
    # A runtime warning's module is the calling module's name: RecBole's own calls only.
    warnings.filterwarnings("ignore", message="A value is trying to be set on a copy", category=FutureWarning, module=r"recbole\.")
    warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.GradScaler", category=FutureWarning, module=r"recbole\.")


def _ensure_dir(dir_path):
    os.makedirs(dir_path, exist_ok=True)


def _no_cached_dataloaders(config):
    return None


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
_RUN_HANDLERS = []  # the handlers init_logger last added to the root logger: the running run's


def init_logger(config):
    """RecBole's ``init_logger`` (same handlers, formats and levels), with a log file per run:
    ``log/<model>/<model>-<dataset>-<time>-<8 random hex>.log``. The previous run's handlers are
    replaced; a root logger that someone else configured (an application, pytest) is left alone and
    gets no file, as with RecBole's ``basicConfig``."""
    colorama.init(autoreset=True)
    root = logging.getLogger()
    for handler in _RUN_HANDLERS:
        root.removeHandler(handler)
        handler.close()
    _RUN_HANDLERS.clear()
    if root.handlers:
        return
    level = _LEVELS.get(str(config["state"]).lower(), logging.INFO)  # RecBole: None or an unknown state is INFO
    folder = os.path.join("log", config["model"])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{config['model']}-{config['dataset']}-{recbole_utils.get_local_time()}-{secrets.token_hex(4)}.log")
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)-15s %(levelname)s  %(message)s", "%a %d %b %Y %H:%M:%S"))
    to_file.addFilter(RemoveColorFilter())
    to_screen = logging.StreamHandler()
    to_screen.setFormatter(colorlog.ColoredFormatter("%(log_color)s%(asctime)-15s %(levelname)s  %(message)s", "%d %b %H:%M", log_colors=log_colors_config))
    for handler in (to_screen, to_file):
        handler.setLevel(level)
        root.addHandler(handler)
        _RUN_HANDLERS.append(handler)
    root.setLevel(level)


def get_tensorboard(logger):
    """RecBole's ``get_tensorboard``: ``log_tensorboard/<the run's log file name>``, or without one
    ``model-<time>-<8 random hex>`` (RecBole's ``model-<time>`` was shared within a second)."""
    from torch.utils.tensorboard import SummaryWriter

    log_file = next((handler.baseFilename for handler in _RUN_HANDLERS if isinstance(handler, logging.FileHandler)), None)
    name = os.path.splitext(os.path.basename(log_file))[0] if log_file else f"model-{recbole_utils.get_local_time()}-{secrets.token_hex(4)}"
    return SummaryWriter(os.path.join("log_tensorboard", name))

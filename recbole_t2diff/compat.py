"""Make RecBole 1.2.1 run on today's Python, numpy and torch. Every entry point imports this first.

- numpy >= 2 (and >= 1.24) removed the aliases RecBole's ``Config.compatibility_settings`` and
  metrics use (RECBOLE_NOTES §8 row 1): put them back before RecBole runs.
- importing ``recbole.model.sequential_recommender.sine`` switches autograd anomaly mode on for the
  whole process (§8 row 7), which makes training 2-3x slower: ``disable_anomaly_mode`` switches it off
  and is called after every model lookup.
- hyperopt 0.2.5 imports ``pkg_resources``, which warns on every import (setup.cfg pins
  setuptools<81 so that it still exists, and declares it because Python 3.12+ makes environments
  without setuptools): the warning is silenced.
- RecBole 1.2.1 declares ray<=2.6.3, which has no wheels past Python 3.11: nothing here imports ray
  (``recbole.quick_start``, its only user, is never imported; tests/test_packaging.py checks), and
  the README's install drops the requirement (pyproject.toml, ``[tool.uv]``).
- Python 3.12+ reports the invalid escape sequences in RecBole's ``dien.py`` docstrings (``\\p``) as a
  SyntaxWarning whenever it compiles the file, so every run without cached bytecode printed two
  warnings before its first line: SyntaxWarnings from RecBole's own files are silenced. This and the
  ray pin are all that Python 3.12 and 3.13 needed.
- RecBole's ``ensure_dir`` checks, then creates: two runs started together in a fresh folder (the
  benchmark's parallel runs, both writing ``log/<model>/``) race, and the loser dies with
  FileExistsError. It is made to create with ``exist_ok``.

(torch >= 2.6 loads with ``weights_only=True`` and refuses RecBole's checkpoints, which pickle the
``Config``, §8 row 3: this package writes and reads its own safe format, see ``checkpoint.py``.)
"""
import os
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
# A compile-time warning's module is its file path without ".py": match RecBole's files only.
warnings.filterwarnings("ignore", category=SyntaxWarning, module=r".*[/\\]recbole[/\\]")

# The aliases RecBole's Config sets (and its metrics use), set here too because a process that only
# loads a checkpoint never builds a Config.
_ALIASES = {
    "float_": np.float64, "complex_": np.complex128, "unicode_": np.str_,
    "bool": np.bool_, "int": np.int_, "float": np.float64, "complex": np.complex128,
    "object": np.object_, "str": np.str_, "long": np.int_, "unicode": np.str_,
}
with warnings.catch_warnings():  # asking numpy about np.object / np.str warns
    warnings.simplefilter("ignore", FutureWarning)
    for _alias, _value in _ALIASES.items():
        if not hasattr(np, _alias):
            setattr(np, _alias, _value)

import recbole.utils.utils as recbole_utils  # noqa: E402  (after the aliases, like every RecBole import)


def _ensure_dir(dir_path):
    os.makedirs(dir_path, exist_ok=True)


# Its code, not the name, is replaced: RecBole's modules imported the function object by name.
recbole_utils.ensure_dir.__code__ = _ensure_dir.__code__


def disable_anomaly_mode():
    torch.autograd.set_detect_anomaly(False)

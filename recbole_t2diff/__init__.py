"""T2Diff for RecBole: a pluggable sequential model with its own config, registry and runners."""

from recbole_t2diff import compat

# RecBole 1.2.1 needs patches to run on today's numpy, torch and Python (compat.install lists each).
# Installed here, once, before anything else of the package: importing any module of it (a script,
# `python -m recbole_t2diff.convert`, a spawned rank, a Ray trial) runs this file first, so
# `import recbole_t2diff; recbole_t2diff.run(...)` works without a set-up call of its own.
compat.install()

from recbole_t2diff.config import Config, get_model  # noqa: E402
from recbole_t2diff.errors import UsageError  # noqa: E402
from recbole_t2diff.quick_start import evaluate_checkpoint, load_data_and_model, run  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Config", "UsageError", "evaluate_checkpoint", "get_model", "load_data_and_model", "run"]

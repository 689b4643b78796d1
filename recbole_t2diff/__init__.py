"""T2Diff for RecBole: a pluggable sequential model with its own config, registry and runners."""
from recbole_t2diff import compat  # noqa: F401  (must run before RecBole builds any Config)
from recbole_t2diff.config import Config, get_model
from recbole_t2diff.errors import UsageError
from recbole_t2diff.quick_start import evaluate_checkpoint, load_data_and_model, run

__version__ = "0.1.0"
__all__ = ["Config", "UsageError", "evaluate_checkpoint", "get_model", "load_data_and_model", "run"]

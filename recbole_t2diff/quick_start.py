"""Train, evaluate and reload models: RecBole's quick-start, without importing ``recbole.quick_start``.

``recbole.quick_start`` imports ray at module level, which breaks with current numpy and setuptools,
and looks models up by name inside ``recbole`` only (RECBOLE_NOTES §3). These functions follow the
same steps with this package's Config and registry, so they run T2Diff and every built-in model.
"""
import logging
import os
import sys

import torch

from recbole_t2diff import compat
from recbole_t2diff.config import Config, get_model
from recbole_t2diff.data import ensure_dataset

from recbole.data import create_dataset, data_preparation
from recbole.utils import dict2str, get_trainer, init_logger, init_seed, set_color


def prepare(config):
    """Seed, set up logging and build the three data loaders for ``config``."""
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    ensure_dataset(config)
    logger = logging.getLogger()
    logger.info(sys.argv)
    logger.info(config)
    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return dataset, train_data, valid_data, test_data


def build_model(config, train_data):
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    return get_model(config["model"])(config, train_data._dataset).to(config["device"])


def load_best_model(trainer):
    """Reload the checkpoint ``fit`` saved (RecBole's own reload fails on torch >= 2.6, see compat)."""
    checkpoint = compat.load_checkpoint(trainer.saved_model_file, map_location=trainer.device)
    trainer.model.load_state_dict(checkpoint["state_dict"])
    trainer.model.load_other_parameter(checkpoint.get("other_parameter"))
    logging.getLogger().info(f"Loading model structure and parameters from {trainer.saved_model_file}")


def run(model, dataset, config_file_list=None, config_dict=None, saved=True, verbose=True):
    """Train with early stopping on the validation metric, then test the best model.

    Returns the dict RecBole's ``run_recbole`` returns, plus ``model`` (the name) and
    ``saved_model_file`` (the best checkpoint, ``None`` when ``saved`` is false).
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    _, train_data, valid_data, test_data = prepare(config)
    model = build_model(config, train_data)
    logger = logging.getLogger()
    logger.info(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, verbose=verbose, saved=saved, show_progress=config["show_progress"]
    )
    if saved:
        load_best_model(trainer)
    test_result = trainer.evaluate(test_data, load_best_model=False, show_progress=config["show_progress"])
    logger.info(set_color("best valid ", "yellow") + f": {dict2str(best_valid_result)}")
    logger.info(set_color("test result", "yellow") + f": {dict2str(test_result)}")
    return {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "saved_model_file": os.path.abspath(trainer.saved_model_file) if saved else None,
    }


def load_data_and_model(model_file, overrides=None):
    """Rebuild config, model and data loaders from a checkpoint written by :func:`run`.

    ``overrides`` change settings of the stored config that do not change the weights, such as
    T2Diff's inference sampler. Returns ``(config, model, dataset, train_data, valid_data,
    test_data)``, like RecBole's function.
    """
    checkpoint = compat.load_checkpoint(model_file)
    config = checkpoint["config"]
    for key, value in (overrides or {}).items():
        config[key] = value
    check = getattr(get_model(config["model"]), "check_config", None)
    if check is not None:
        check(config)
    if torch.device(config["device"]).type == "cuda" and not torch.cuda.is_available():
        config["device"] = torch.device("cpu")
    dataset, train_data, valid_data, test_data = prepare(config)
    model = build_model(config, train_data)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data


def evaluate_checkpoint(model_file, split="test", overrides=None):
    """Metrics of a saved checkpoint on its ``valid`` or ``test`` split (``overrides`` as in :func:`load_data_and_model`)."""
    config, model, _, _, valid_data, test_data = load_data_and_model(model_file, overrides)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    return trainer.evaluate({"valid": valid_data, "test": test_data}[split], load_best_model=False)

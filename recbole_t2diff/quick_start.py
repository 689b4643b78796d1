"""Train, evaluate and reload models: RecBole's quick-start, without importing ``recbole.quick_start``.

``recbole.quick_start`` imports ray at module level, which breaks with current numpy and setuptools,
and looks models up by name inside ``recbole`` only (docs/RECBOLE.md §3). These functions follow the
same steps with this package's Config and registry, so they run T2Diff and every built-in model.
"""

import logging
import os

import torch
import torch.multiprocessing as mp
import yaml
from torch.nn.parallel import DistributedDataParallel

from recbole_t2diff.checkpoint import check_data, load_checkpoint, save_checkpoint, unique_checkpoint_path
from recbole_t2diff.compat import init_logger
from recbole_t2diff.config import Config, check_model_config, get_model
from recbole_t2diff.data import check_dataset, create_dataset, ensure_dataset
from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.t2diff import T2Diff
from recbole_t2diff.properties import properties_dir
from recbole_t2diff.settings import apply_overrides

from recbole.data import data_preparation
from recbole.utils import dict2str, get_trainer, init_seed, set_color


def prepare(config):
    """Seed, set up logging and build the three data loaders for ``config``."""
    init_seed(config["seed"], config["reproducibility"])
    ensure_dataset(config)  # first: a missing dataset leaves no empty log file behind
    init_logger(config)
    logger = logging.getLogger()
    logger.info(f"command-line settings: {config.cmd_config_dict}")
    logger.info(config)
    dataset = create_dataset(config)
    logger.info(dataset)
    check_dataset(config, dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return dataset, train_data, valid_data, test_data


def build_model(config, train_data):
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    return get_model(config["model"])(config, train_data._dataset).to(config["device"])


def load_best_model(trainer):
    """Reload the checkpoint ``fit`` saved, checksum verified."""
    checkpoint = load_checkpoint(trainer.saved_model_file, map_location=trainer.device)
    trainer.model.load_state_dict(checkpoint["state_dict"])
    trainer.model.load_other_parameter(checkpoint.get("other_parameter"))
    logging.getLogger().info(f"Loading model structure and parameters from {trainer.saved_model_file}")


class _SafeCheckpoints:
    """Mixed into RecBole's trainer: checkpoints in this package's safe format (see checkpoint.py),
    written atomically under a name unique to the run (RecBole's holds the time to the second, so
    two runs started in the same second overwrote each other's)."""

    def __init__(self, config, model, dataset=None):
        super().__init__(config, model)
        self.saved_model_file = unique_checkpoint_path(self.checkpoint_dir, config["model"])
        self.checkpoint_dataset = dataset
        self.saved_epoch = None  # the epoch saved_model_file holds, once written

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        if self.checkpoint_dataset is None:
            raise UsageError("this trainer was made without its dataset: pass make_trainer(config, model, dataset) to save checkpoints")
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        save_checkpoint(saved_model_file, self.config, self.model, self.checkpoint_dataset.identity, epoch=epoch, best_valid_score=self.best_valid_score)
        if saved_model_file == self.saved_model_file:
            self.saved_epoch = epoch
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")


_SAFE_TRAINERS = {}


def _safe_trainer_class(trainer_class):
    if trainer_class not in _SAFE_TRAINERS:
        _SAFE_TRAINERS[trainer_class] = type(trainer_class.__name__, (_SafeCheckpoints, trainer_class), {})
    return _SAFE_TRAINERS[trainer_class]


def make_trainer(config, model, dataset=None):
    """RecBole's trainer for the model, saving safe checkpoints of ``dataset`` (needed only to save);
    on CPU processes of a distributed run, DDP without devices.

    RecBole wraps the model in ``DistributedDataParallel(model, device_ids=[rank])``, which torch
    rejects for CPU modules: build the trainer as if single-process, then wrap it the CPU way.
    """
    trainer_class = _safe_trainer_class(get_trainer(config["MODEL_TYPE"], config["model"]))
    if config["single_spec"] or config["device"].type != "cpu":
        return trainer_class(config, model, dataset)
    config["single_spec"] = True
    try:
        trainer = trainer_class(config, model, dataset)
    finally:
        config["single_spec"] = False
    trainer.distributed_model = DistributedDataParallel(trainer.model)
    return trainer


def _share_checkpoint_name(trainer):
    """Every rank reloads the file rank 0 saves; each rank's trainer drew its own unique name."""
    if not trainer.config["single_spec"]:
        name = [trainer.saved_model_file]
        torch.distributed.broadcast_object_list(name, src=0)
        trainer.saved_model_file = name[0]


def run(
    model,
    dataset,
    config_file_list=None,
    config_dict=None,
    argv=None,
    saved=True,
    verbose=True,
    nproc=1,
    world_size=-1,
    ip="localhost",
    port="5678",
    group_offset=0,
    on_trainer=None,
):
    """Train with early stopping on the validation metric, then test the best model.

    The settings come from ``config_file_list``, ``config_dict`` and ``argv``, the command line's
    ``--key=value`` settings (which override the others, see :class:`~recbole_t2diff.config.Config`).

    Returns the dict RecBole's ``run_recbole`` returns, plus ``model`` (the name) and
    ``saved_model_file`` (the best checkpoint, ``None`` when ``saved`` is false). With ``nproc`` > 1
    (or ``world_size`` > 1 across machines) it runs RecBole's distributed mode, one process per
    device, on gloo (CPU) or NCCL (GPU) by ``dist_backend``; rank 0's result is returned.
    ``on_trainer(trainer)``, single-process only, is called before training (benchmarks time it).
    Ctrl-C during training or testing raises :class:`TrainingInterrupted`, a ``KeyboardInterrupt``
    whose message names the checkpoint kept.
    """
    if nproc == 1 and world_size <= 1:
        return _run(model, dataset, config_file_list, config_dict, argv, saved, verbose, on_trainer)
    settings = distributed_settings(nproc, world_size, ip, port, group_offset)
    # Check settings and fetch a missing dataset once, here, rather than in every process.
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict={**(config_dict or {}), **settings}, argv=argv)
    ensure_dataset(config)
    return spawn(
        _run,
        nproc,
        settings,
        config,
        "config_dict",
        model=model,
        dataset=dataset,
        config_file_list=config_file_list,
        config_dict=config_dict,
        argv=argv,
        saved=saved,
        verbose=verbose,
    )


def distributed_settings(nproc, world_size=-1, ip="localhost", port="5678", group_offset=0):
    """The config keys RecBole's distributed mode reads (``local_rank`` is added per process)."""
    return {"nproc": nproc, "world_size": world_size if world_size > 0 else nproc, "ip": ip, "port": str(port), "offset": group_offset}


def spawn(function, nproc, settings, config, settings_key, **kwargs):
    """Run ``function(**kwargs)`` in ``nproc`` processes, the settings dict ``kwargs[settings_key]``
    extended with the distributed keys and each process's ``local_rank``; returns global rank 0's result.
    ``config`` is the run's config, for the folders every rank writes to."""
    # RecBole creates log/<model>/ and the checkpoint folder with a check-then-create that races
    # between ranks: create them first.
    for folder in (os.path.join("log", config["model"]), config["checkpoint_dir"]):
        os.makedirs(folder, exist_ok=True)
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_main, args=(function, settings, settings_key, kwargs, results), nprocs=nproc, join=True)
    return None if results.empty() else results.get()


def _rank_main(rank, function, settings, settings_key, kwargs, results):
    kwargs[settings_key] = {**(kwargs[settings_key] or {}), **settings, "local_rank": rank}
    result = function(**kwargs)
    if rank + settings["offset"] == 0:
        results.put(result)
    torch.distributed.destroy_process_group()


def _run(model, dataset, config_file_list, config_dict, argv, saved, verbose, on_trainer=None):
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict, argv=argv)
    dataset, train_data, valid_data, test_data = prepare(config)
    model = build_model(config, train_data)
    logger = logging.getLogger()
    logger.info(model)
    trainer = make_trainer(config, model, dataset)
    _share_checkpoint_name(trainer)
    if on_trainer is not None:
        on_trainer(trainer)
    phase = "training"
    try:
        best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=config["show_progress"])
        phase = "the test evaluation"
        if saved:
            if not config["single_spec"]:
                torch.distributed.barrier()  # rank 0 may still be writing the checkpoint
            load_best_model(trainer)
        test_result = trainer.evaluate(test_data, load_best_model=False, show_progress=config["show_progress"])
    except KeyboardInterrupt:
        raise TrainingInterrupted(trainer, phase) from None
    logger.info(set_color("best valid ", "yellow") + f": {dict2str(best_valid_result)}")
    logger.info(set_color("test result", "yellow") + f": {dict2str(test_result)}")
    xhat_quality = model.xhat_quality(valid_data) if isinstance(model, T2Diff) else None
    if xhat_quality and model.denoises and 0.98 <= xhat_quality["xhat_rel_error"] <= 1.02:
        logger.warning(
            f"x̂'s relative error on validation is {xhat_quality['xhat_rel_error']} (1 = a copy of the last item): the "
            "diffusion module learned to copy the last item; x_hat_source: copy_last gives the same tower without the U-Net"
        )
    return {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "saved_model_file": os.path.abspath(trainer.saved_model_file) if saved else None,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "xhat_quality": xhat_quality,  # T2Diff with x̂: how close the served x̂ is to the next item (valid split, best weights)
    }


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training or the test evaluation after it; the message says what was kept (the
    scripts print it in one line)."""

    def __init__(self, trainer, phase="training"):
        path, epoch = trainer.saved_model_file, getattr(trainer, "saved_epoch", None)
        if epoch is not None and os.path.isfile(path):  # checkpoints are written atomically: the file is whole
            metric = trainer.config["valid_metric"]
            kept = (
                f"kept {os.path.abspath(path)}, the best model so far (epoch {epoch}, valid {metric} {trainer.best_valid_score:.4f}); "
                f"evaluate it with evaluate_checkpoint('{os.path.abspath(path)}')"
            )
        else:
            kept = "no checkpoint was kept (no validation had run yet, or saved=False)"
        super().__init__(f"{phase} stopped by Ctrl-C; {kept}")


def load_data_and_model(model_file, overrides=None):
    """Rebuild config, model and data loaders from a checkpoint written by :func:`run`.

    ``overrides`` change settings of the stored config that do not change the weights, such as
    T2Diff's inference sampler; knobs added to the package after the checkpoint was written take
    their defaults. Returns ``(config, model, dataset, train_data, valid_data,
    test_data)``, like RecBole's function.
    """
    checkpoint = load_checkpoint(model_file)
    config = checkpoint["config"]
    _add_new_knobs(config)
    apply_overrides(config, overrides)
    if "local_rank" in (overrides or {}):  # a distributed evaluation: join the process group
        config._init_device()
    else:  # one process, whatever the checkpoint was trained with
        config["single_spec"], config["local_rank"] = True, 0
    check_model_config(config)
    if torch.device(config["device"]).type == "cuda" and not torch.cuda.is_available():
        config["device"] = torch.device("cpu")
    dataset, train_data, valid_data, test_data = prepare(config)
    check_data(model_file, checkpoint["data"], dataset.identity)
    model = build_model(config, train_data)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:  # only overrides can make the model differ from the weights: the file's are checked
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise UsageError(
            f"overrides {overrides} change the model's shape, so the checkpoint's weights do not fit ({first[:160]}); "
            "override only settings that leave the weights alone (e.g. sampler, infer_steps, topk, eval_batch_size)"
        ) from None
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data


def _add_new_knobs(config):
    """Give a checkpoint from an older version of this package the knobs added since, at their defaults."""
    defaults = properties_dir() / "model" / f"{config['model']}.yaml"
    if defaults.is_file():
        with open(defaults, encoding="utf-8") as f:
            for key, value in (yaml.load(f, Loader=config.yaml_loader) or {}).items():
                if key not in config.final_config_dict:
                    config[key] = value


def evaluate_checkpoint(model_file, split="test", overrides=None, nproc=1, port="5679"):
    """Metrics of a saved checkpoint on its ``valid`` or ``test`` split (``overrides`` as in
    :func:`load_data_and_model`); with ``nproc`` > 1, evaluated by that many processes and gathered."""
    if nproc > 1:
        config = load_checkpoint(model_file)["config"]
        return spawn(
            evaluate_checkpoint, nproc, distributed_settings(nproc, port=port), config, "overrides", model_file=model_file, split=split, overrides=overrides
        )
    config, model, _, _, valid_data, test_data = load_data_and_model(model_file, overrides)
    trainer = make_trainer(config, model)
    return trainer.evaluate({"valid": valid_data, "test": test_data}[split], load_best_model=False)

"""A benchmark run's training state after its last validated epoch, to go on from after an interruption."""

import os
import random
import sys
import time

import numpy as np
import torch

from recbole_t2diff.checkpoint import write_atomically


class Resume:
    """A run's training state after its last validated epoch, in ``folder``/last.pth, to go on from.

    Holds the weights, the optimizer, the early-stopping state, every random generator the training
    draws from (torch, CUDA, numpy, random and the train loader's shuffling), and the run's curve and
    timings, so that an interrupted and resumed run trains exactly as an uninterrupted one. Written
    atomically (the checkpoint's writer: a temporary file, then a rename); read with ``weights_only=True``
    (plain tensors and numbers: loading runs no code). The layout is read back by later code: runs
    interrupted under an older version resume, so keys are only ever added.
    """

    def __init__(self, folder, timings, curve, budget, clock):
        self.path, self.timings, self.curve, self.budget, self.clock = os.path.join(folder, "last.pth"), timings, curve, budget, clock
        os.makedirs(folder, exist_ok=True)

    def save(self, trainer, train_data, epoch):
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        state = {
            "epoch": epoch,
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "cur_step": trainer.cur_step,
            "best_valid_score": float(trainer.best_valid_score),
            "best_valid_result": {k: float(v) for k, v in (trainer.best_valid_result or {}).items()},
            "curve": list(self.curve),
            "train_s": list(self.timings["train"]),
            "valid_s": list(self.timings["valid"]),
            "load": list(self.timings["load"]),
            "budget_epochs": self.budget.epochs,
            "elapsed": time.perf_counter() - self.clock["started"],
            "torch_rng": torch.get_rng_state(),
            "loader_rng": train_data.generator.get_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy_rng": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "random_rng": random.getstate(),
        }
        write_atomically(state, self.path)

    def restore(self, trainer, train_data):
        """Sets the trainer up to go on after the saved epoch; nothing when no state was saved."""
        if not os.path.isfile(self.path):
            return
        state = torch.load(self.path, map_location=trainer.device, weights_only=True)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.cur_step, trainer.best_valid_score = state["cur_step"], state["best_valid_score"]
        trainer.best_valid_result = state["best_valid_result"] or None
        # Early stopping had already fired at the saved epoch: train no further, test as it would have.
        stopped = trainer.cur_step > trainer.stopping_step
        trainer.start_epoch = trainer.epochs if stopped else state["epoch"] + 1
        self.curve[:] = state["curve"]
        self.timings["train"][:], self.timings["valid"][:] = state["train_s"], state["valid_s"]
        self.timings["load"][:] = state.get("load", [])  # saved since 2026-12-07
        self.budget.epochs = state["budget_epochs"]
        self.clock["started"] = time.perf_counter() - state["elapsed"]
        torch.set_rng_state(state["torch_rng"].cpu())
        train_data.generator.set_state(state["loader_rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        kind, keys, position, has_gauss, gauss = state["numpy_rng"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        version, internal, gauss_next = state["random_rng"]
        random.setstate((version, tuple(internal), gauss_next))
        print(f"resumed after epoch {state['epoch'] + 1} from {self.path}", file=sys.stderr, flush=True)

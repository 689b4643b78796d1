"""Training steps of RecBole models as RecBole's trainer takes them, and the cost per sequence of several models with
their steps interleaved in one process (the project's speed rule: a change of the machine's load hits every model
alike). The worker's SASRec reference (:func:`benchmarks.worker.step_ratio_to_sasrec`), ``benchmarks.step_ratio``,
``benchmarks.scaling`` and ``benchmarks.sparcode_codes`` all step through here."""

import itertools
import os
import time
from dataclasses import dataclass

import torch


def train_step(model, optimizer, batch, amp=False):
    """One training step of a RecBole model: ``calculate_loss`` under torch.autocast when ``amp`` (RecBole's
    ``enable_amp``: bfloat16 on a CPU), every loss it returns (T2Diff's and SparCode's return several) backpropagated,
    then the optimiser's step. RecBole's trainer does the same, and scales the loss only with a GPU's GradScaler."""
    optimizer.zero_grad()
    with torch.autocast(batch[model.ITEM_SEQ].device.type, enabled=amp):
        loss = model.calculate_loss(batch)
    (sum(loss) if isinstance(loss, tuple) else loss).backward()
    optimizer.step()


@dataclass
class Stepper:
    """A model, its optimiser and training batches (cycled), stepped as RecBole's trainer steps it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: object
    device: str = "cpu"
    amp: bool = False

    @classmethod
    def of(cls, model, config, train_data):
        """Adam at the config's learning rate, as RecBole's trainer builds it by default, over ``train_data``."""
        optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
        return cls(model, optimizer, itertools.cycle(train_data), config["device"], bool(config["enable_amp"]))

    def step(self):
        """One step; returns (seconds, sequences)."""
        self.model.train()
        batch = next(self.batches).to(self.device)
        start = time.perf_counter()
        train_step(self.model, self.optimizer, batch, self.amp)
        return time.perf_counter() - start, len(batch)


def seconds_per_sequence(steppers, rounds, warm_up=2):
    """{name: training seconds per sequence} of ``steppers`` ({name: Stepper}): after ``warm_up`` steps each, ``rounds``
    rounds of one step of each in turn."""
    seconds, sequences = dict.fromkeys(steppers, 0.0), dict.fromkeys(steppers, 0)
    for round_ in range(warm_up + rounds):
        for name, stepper in steppers.items():
            took, size = stepper.step()
            if round_ >= warm_up:
                seconds[name] += took
                sequences[name] += size
    return {name: seconds[name] / sequences[name] for name in steppers}


def cost_table(cost):
    """Markdown table lines of ``cost`` ({name: training seconds per sequence}, SASRec's among them): seconds per 1,000
    sequences and the ratio to SASRec."""
    lines = ["| model | s per 1,000 sequences | x SASRec |", "|---|---|---|"]
    return lines + [f"| {name} | {1000 * s:.3f} | {s / cost['SASRec']:.2f} |" for name, s in cost.items()]


def write_report(path, lines):
    """Writes the Markdown ``lines`` to ``path`` (its folder made if missing) and prints them."""
    report = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(report)
    print(report, end="")

"""Where a RecBole training epoch's time goes: data loading, calculate_loss, backward, optimizer step and
the rest of the trainer's loop, over the first BATCHES batches of an epoch, then one full validation.

    python -m benchmarks.epoch_parts --model=SparCode --dataset=ml-100k --batches=40 [--key=value ...]

One torch thread; the parts are timed inside one run of RecBole's own ``Trainer._train_epoch``, so machine
load hits them alike. An epoch costs what its steps add up to when data and rest are near 0.
"""

import argparse
import time

import torch

from benchmarks.cli import one_thread_config
from recbole_t2diff.cli import exit_on_usage_error
from recbole_t2diff.quick_start import build_model, make_trainer, prepare


class FirstBatches:
    """The first ``k`` batches of a RecBole train loader, timing each ``next`` as data loading."""

    def __init__(self, loader, k, spent):
        self.loader, self.k, self.spent, self.shuffle = loader, k, spent, loader.shuffle

    def __iter__(self):
        iterator = iter(self.loader)
        for _ in range(self.k):
            start = time.perf_counter()
            batch = next(iterator)
            self.spent["data"] += time.perf_counter() - start
            yield batch

    def __len__(self):
        return self.k


def timed(spent, name, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start

    return wrapper


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SparCode")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--batches", type=int, default=40)
    with exit_on_usage_error():
        args, overrides, config = one_thread_config(parser, argv)
    _, train, valid, _ = prepare(config)
    trainer = make_trainer(config, build_model(config, train))
    spent = dict.fromkeys(("data", "calculate_loss", "backward", "optimizer_step"), 0.0)
    trainer._train_epoch(FirstBatches(train, 3, spent), 0)  # warm-up
    spent.update(dict.fromkeys(spent, 0.0))
    trainer.model.calculate_loss = timed(spent, "calculate_loss", trainer.model.calculate_loss)
    torch.Tensor.backward = timed(spent, "backward", torch.Tensor.backward)
    trainer.optimizer.step = timed(spent, "optimizer_step", trainer.optimizer.step)
    start = time.perf_counter()
    trainer._train_epoch(FirstBatches(train, args.batches, spent), 1)
    total = time.perf_counter() - start
    spent["rest"] = total - sum(spent.values())
    start = time.perf_counter()
    trainer.evaluate(valid, load_best_model=False, show_progress=False)
    validation = time.perf_counter() - start
    sequences = args.batches * config["train_batch_size"]
    print(f"{args.model} {overrides}: {args.batches} of {len(train)} batches of {config['train_batch_size']}, anomaly mode {torch.is_anomaly_enabled()}")
    print(f"total {total:.1f} s = " + ", ".join(f"{name} {seconds:.1f} s ({seconds / total:.0%})" for name, seconds in spent.items()))
    print(f"{1000 * total / sequences:.2f} s per 1,000 training sequences; one full validation {validation:.1f} s")


if __name__ == "__main__":
    main()

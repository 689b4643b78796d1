"""What scoring SparCode's sampled negatives once per distinct code key saves: a trained SparCode's training step with
its negatives scored per key (``SharedRowScores``, what SparCode does) and per token (the same model copied, its
``shares_rows`` answering False), as ratios to SASRec, their steps interleaved in one process.

    python -m benchmarks.shared_rows --dataset=ml-100k --epochs=2 --rounds=20 --out=results/sparcode/shared_rows_ml-100k.md

The saving depends on how many of a batch's tokens share a key, which changes over training (on ml-100k it rose from
0.35 after the first epoch to 0.68 after the eighth as dead-code restarts spread the codes), so the model first trains
``--epochs`` epochs with RecBole's trainer; ``--epochs=0`` times the first steps. One torch thread; --key=value
settings go on top of SparCode's property file. Writes the command, machine, date, load average, the share of
distinct keys per token after each training epoch and after the timing, and the table to --out.
"""

import argparse
import copy
import datetime
import itertools
import os

import torch

from benchmarks.cli import one_thread_config, untrained
from benchmarks.machine import command_line, describe, load_average
from benchmarks.steps import Stepper, cost_table, seconds_per_sequence, write_report
from recbole_t2diff.cli import exit_on_usage_error
from recbole_t2diff.quick_start import build_model, make_trainer, prepare


@torch.no_grad()
def distinct_key_share(model, batches):
    """Distinct code keys over tokens, pooled over ``batches``, in training mode (dropout on, as in a step)."""
    model.train()
    distinct = tokens = 0
    for batch in batches:
        keys = model.query_keys(batch)
        distinct += len(torch.unique(keys))
        tokens += keys.numel()
    return distinct / tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", required=True, help="the Markdown file to write")
    with exit_on_usage_error():
        args, settings, config = one_thread_config(parser, argv, model="SparCode")
        _, train, _, _ = prepare(config)
        data_path = os.path.dirname(os.path.normpath(config["data_path"]))  # RecBole's Config joined the dataset's name onto it
        reference_config, reference, reference_train, _ = untrained("SASRec", args.dataset, {"data_path": data_path})
    model = build_model(config, train)
    trainer = make_trainer(config, model)
    shares = []  # after each epoch, on the first --rounds batches of a fresh shuffle
    for epoch in range(args.epochs):
        trainer._train_epoch(train, epoch)
        shares.append(distinct_key_share(model, itertools.islice(iter(train), args.rounds)))
    per_token = copy.deepcopy(model)
    per_token.shares_rows = lambda: False  # this copy alone scores its negatives token by token
    steppers = {
        "SASRec": Stepper.of(reference, reference_config, reference_train),
        "SparCode, negatives per code key": Stepper.of(model, config, train),
        "SparCode, negatives per token": Stepper.of(per_token, config, train),
    }
    load_before = load_average()
    cost = seconds_per_sequence(steppers, args.rounds)
    share = distinct_key_share(model, itertools.islice(iter(train), args.rounds))  # after the steps: codes are seeded
    lines = [
        f"# SparCode's sampled negatives scored per code key or per token, on {args.dataset}",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {describe()}; 1 torch thread; date {datetime.date.today().isoformat()}; 1-minute load average "
        f"{load_before} before and {load_average()} after.  ",
        f"SparCode at its property-file defaults{' plus ' + str(settings) if settings else ''}, trained {args.epochs} "
        f"epoch(s) with RecBole's trainer, then copied; SASRec at its defaults. {args.rounds} rounds after 2 warm-up steps "
        "each, one training step of every model per round. Distinct code keys per token in "
        f"{args.rounds} training batches after the timing: {share:.2f}"
        + (f"; after each training epoch: {', '.join(f'{e + 1}: {x:.2f}' for e, x in enumerate(shares))}." if shares else "."),
        "",
    ]
    write_report(args.out, lines + cost_table(cost))


if __name__ == "__main__":
    main()

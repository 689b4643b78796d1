"""Training cost per sequence of model variants as ratios to SASRec, measured in one process with their steps interleaved.

    python -m benchmarks.step_ratio --dataset=ml-100k --variants=SASRec,T2Diff,T2Diff[enable_amp=true] [--rounds=20] \
        --out=results/t2diff/step_ratio_amp_ml-100k.md

A variant is written as in a benchmark study (``benchmarks.variants``): a model, ``T2Diff[key=value,...]``, a named
ablation or a preset; each is built at its property-file defaults plus those settings, and steps as RecBole's trainer
would (``benchmarks.steps``: with ``enable_amp`` under torch.autocast, bfloat16 on a CPU). After 2 warm-up steps each,
``--rounds`` rounds of one training step of every variant in turn, on ``--threads`` torch threads (default 1), so a
change of the machine's load hits them alike. Writes a table with the command, machine, date and load average to --out.
"""

import argparse
import datetime

import torch

from benchmarks.cli import untrained
from benchmarks.machine import command_line, describe, load_average
from benchmarks.steps import Stepper, cost_table, seconds_per_sequence, write_report
from benchmarks.variants import against_sasrec
from recbole_t2diff.cli import exit_on_usage_error


def stepper(variant, dataset, settings):
    """A :class:`Stepper` of ``variant`` on ``dataset``, its settings read as a benchmark run reads them."""
    config, model, train, _ = untrained(variant, dataset, settings)
    return Stepper.of(model, config, train)


def table(args, command, cost, load_before, load_after):
    """The Markdown report's lines of ``cost`` ({variant: seconds per sequence}, SASRec's first)."""
    lines = [
        f"# Training cost per sequence on {args.dataset}, as ratios to SASRec",
        "",
        f"Command: `{command}`  ",
        f"Machine: {describe()}; {args.threads} torch thread(s); date {datetime.date.today().isoformat()}; 1-minute load "
        f"average {load_before} before and {load_after} after.  ",
        f"Each variant at its property-file defaults plus the settings named; {args.rounds} rounds after 2 warm-up steps "
        "each, one training step of every variant per round (as RecBole's trainer steps it: every loss, the optimiser, "
        "autocast with `enable_amp`).",
        "",
    ]
    return lines + cost_table(cost)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--variants", default="SASRec,T2Diff")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="the Markdown file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {"data_path": args.data_path} if args.data_path else {}
    with exit_on_usage_error():
        steppers = {v: stepper(v, args.dataset, settings) for v in against_sasrec(args.variants)}
    load_before = load_average()
    cost = seconds_per_sequence(steppers, args.rounds)
    write_report(args.out, table(args, command_line(argv), cost, load_before, load_average()))


if __name__ == "__main__":
    main()

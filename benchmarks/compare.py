"""Pairs of a study's variants compared over their seeds: the ablation tables of the result READMEs, regenerable.

    python -m benchmarks.compare results/order/ml-100k.csv --pair "VARIANT_A|VARIANT_B" [--pair ...] \
        [--seeds=2020,2021,2022] [--out=FILE.md]

Each --pair names two variants exactly as the CSV's ``variant`` column does, the row credited first. For each
pair and each of validation and test NDCG@10: the mean ± std over the seeds each variant has (restricted to
--seeds when given), the difference of the means and Welch's two-sided t-test p-value (seeds are not paired
across variants: building a different model shifts the random stream). A pair whose variants ran different seeds
is still compared, and the table says which seeds each had. Writes the table with its command and date to --out
(default: print it).
"""

import argparse
import datetime
import os

from benchmarks.machine import command_line
from benchmarks.report import mean_std, welch_p
from benchmarks.run_benchmark import read_rows
from recbole_t2diff.cli import exit_on_usage_error
from recbole_t2diff.errors import UsageError

METRICS = (("valid_ndcg@10", "valid NDCG@10"), ("test_ndcg@10", "test NDCG@10"))


def seed_values(rows, variant, metric, seeds=None):
    """{seed: value} of ``metric`` for ``variant``'s rows (only ``seeds`` when given)."""
    return {int(r["seed"]): float(r[metric]) for r in rows if r["variant"] == variant and (seeds is None or int(r["seed"]) in seeds)}


def compare(rows, pairs, seeds=None):
    """Markdown lines: one table row per (credited, control) pair of variants."""
    known = {r["variant"] for r in rows}
    for pair in pairs:
        for variant in pair:
            if variant not in known:
                raise UsageError(f"no rows of {variant!r} in this CSV: name a variant exactly as its 'variant' column does")
    header = "| credited | control | seeds | " + " | ".join(f"{name}: credited | control | difference | p" for _, name in METRICS) + " |"
    lines = [header, "|" + "---|" * (3 + 4 * len(METRICS))]
    for credited, control in pairs:
        cells = []
        for metric, _ in METRICS:
            a, b = seed_values(rows, credited, metric, seeds), seed_values(rows, control, metric, seeds)
            (mean_a, std_a), (mean_b, std_b) = mean_std(a.values()), mean_std(b.values())
            p = welch_p(list(a.values()), list(b.values()))
            cells += [f"{mean_a:.4f} ± {std_a:.4f}", f"{mean_b:.4f} ± {std_b:.4f}", f"{mean_a - mean_b:+.4f}", "—" if p is None else f"{p:.3g}"]
        a_seeds, b_seeds = sorted(a), sorted(b)  # every metric is read from the same rows: the last one's seeds are every one's
        ran = ", ".join(map(str, a_seeds)) if a_seeds == b_seeds else f"{', '.join(map(str, a_seeds))} | {', '.join(map(str, b_seeds))}"
        lines.append(f"| {credited} | {control} | {ran} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("csv")
    parser.add_argument("--pair", action="append", required=True, help="CREDITED|CONTROL, two variants as the CSV names them")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds to use (default: every seed each variant has)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    with exit_on_usage_error():
        pairs = []
        for pair in args.pair:
            if pair.count("|") != 1:
                raise UsageError(f"--pair {pair!r} is not two variants joined by one '|': write --pair 'CREDITED|CONTROL'")
            pairs.append(tuple(part.strip() for part in pair.split("|")))
        seeds = None if args.seeds is None else {int(seed) for seed in args.seeds.split(",")}
        if not os.path.isfile(args.csv):
            raise UsageError(f"no CSV at {args.csv}: give a study's results CSV, e.g. results/order/ml-100k.csv")
        table = compare(read_rows(args.csv), pairs, seeds)
    text = "\n".join(
        [
            f"Command: `{command_line(argv)}`  ",
            f"Date: {datetime.date.today().isoformat()}; rows from `{args.csv}`. Mean ± std over the seeds; difference = credited − control; "
            "p: Welch's two-sided t-test (unpaired, unequal variances).",
            "",
            *table,
        ]
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

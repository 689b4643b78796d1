"""Give a study's finished rows a variant name that still means what they ran with, after a default changed.

    python -m benchmarks.rename_rows CSV OLD NEW [--config_files=...] [--key=value ...]

Rows are keyed by variant name and seed, and a name means the property files' values plus its settings
(``benchmarks/knob_record.py``). When a default in ``properties/`` changes, the rows that ran under the old one no
longer mean what their name says, and a plan refuses to reuse them. This renames every row of OLD in CSV to NEW,
a name that spells the old values out (e.g. ``SparCode`` -> ``SparCode[softmax_negatives=100]``), and rewrites its
``settings`` column to match. It renames nothing unless NEW means exactly what each row ran with, checked as a plan
checks a finished row: give the study's own --config_files and --key=value settings (those of the plan line that
made the rows), since they are part of what the rows ran with. It refuses a NEW that already has a row for one of
the seeds. The CSV's dataset is its file name (``<out>/<dataset>.csv``). Stop any batch that writes to the CSV
first: a running batch keeps its own copy of the rows.
"""

import argparse
import json
import os

from benchmarks.knob_record import stale_reason
from benchmarks.run_benchmark import Study, find_row, read_header, read_rows, rewrite_rows
from benchmarks.variants import parse_variant
from recbole_t2diff.cli import exit_on_usage_error
from recbole_t2diff.errors import UsageError


def renamed_rows(csv_path, old, new, study_args=()):
    """The rows of ``csv_path`` with every row of ``old`` renamed to ``new`` (variant and settings), and how many were
    renamed; a UsageError when there are none, when ``new`` has a row of the same seed already, or when ``new`` does not
    mean what a row ran with (the study's ``study_args`` applied, as its plan line gives them)."""
    rows = read_rows(csv_path)
    mine = [r for r in rows if r["variant"] == old]
    if not mine:
        raise UsageError(f"{csv_path} has no rows of {old!r}: name a variant exactly as its 'variant' column does")
    for row in mine:
        if find_row(rows, new, int(row["seed"])) is not None:
            raise UsageError(f"{csv_path} already has a row of {new!r} seed {row['seed']}: two rows would share one key")
    dataset = os.path.splitext(os.path.basename(csv_path))[0]
    study = Study([f"--models={new}", f"--dataset={dataset}", f"--seeds={mine[0]['seed']}", f"--out={os.path.dirname(csv_path)}", *study_args])
    config = study.config(new)
    settings = json.dumps(parse_variant(new)[1], sort_keys=True)
    # What OLD's brackets set must hold under NEW too, whether NEW spells it or leaves it to the property files: the
    # recorded knobs below cover only the settings the property files name.
    ran_with = parse_variant(old)[1]
    differs = {key: value for key, value in ran_with.items() if not same_value(config[key], value)}
    if differs:
        raise UsageError(
            f"{new} does not name what the rows of {old} ran with: "
            + ", ".join(f"they ran with {key}={as_json(value)}, {new} gives {as_json(config[key])}" for key, value in sorted(differs.items()))
        )
    renamed = []
    for row in rows:
        if row["variant"] == old:
            row = {**row, "variant": new, "settings": settings}
            reason = stale_reason(row, new, config)
            if reason is not None:
                raise UsageError(f"{new} does not name what the row of {old} seed {row['seed']} ran with: {reason}")
        renamed.append(row)
    return renamed, len(mine)


def as_json(value):
    """A setting's value as JSON text, as the error names it."""
    return json.dumps(value, sort_keys=True, default=str)


def same_value(a, b):
    """Whether two values of a setting are the same: numbers by value (0 and 0.0 alike), anything else as JSON text."""
    numbers = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)]
    return float(a) == float(b) if all(numbers) else as_json(a) == as_json(b)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("csv")
    parser.add_argument("old", help="the variant as the rows name it now")
    parser.add_argument("new", help="the variant that spells out what they ran with")
    args, study_args = parser.parse_known_args(argv)
    with exit_on_usage_error():
        if not os.path.isfile(args.csv):
            raise UsageError(f"no CSV at {args.csv}: give a study's results CSV, e.g. results/sparcode_levers/ml-100k.csv")
        rows, count = renamed_rows(args.csv, args.old, args.new, study_args)
        rewrite_rows(args.csv, read_header(args.csv), rows)
    print(f"renamed {count} row(s) of {args.old} to {args.new} in {args.csv}")


if __name__ == "__main__":
    main()

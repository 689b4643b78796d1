"""SparCode's codes over training, epoch by epoch, read back from the RecBole logs of its runs.

    python -m benchmarks.code_curves --resume_root=/work/runs/order/resume --dataset=ml-100k [--log_dir=log/SparCode]
        [--out=results/sparcode/code_curves_ml-100k.md]

Every SparCode epoch logs its training codes (``SparCode codes in training: usage ..., perplexity ..., K distinct keys,
relative quantization error e, R restarts``) and its validation; a benchmark run resumed after an interruption goes
on in a new log file with the same ``checkpoint_dir``, which is how a run's files are joined (a later file's epoch
replaces an earlier one's). Only runs whose checkpoints lie under ``--resume_root`` (one batch's runs) are read. A
run is named by its seed and those of the settings the runs differ in whose value is not
``properties/model/SparCode.yaml``'s. Writes, per
run, validation NDCG@10, restarts, codes used, perplexity, distinct keys and quantization error per epoch, a summary
table, and a plot (validation NDCG@10 and restarts against epoch) next to ``--out``.
"""

import argparse
import datetime
import glob
import os
import re

import yaml

from benchmarks.machine import command_line
from benchmarks.variants import ROOT, with_settings
from recbole_t2diff.settings import parse_setting

CODES = re.compile(
    r"SparCode codes in training: usage (?P<usage>[\d%/]+) of \d+ codes per codebook, perplexity (?P<perplexity>[\d./]+), "
    r"(?P<keys>\d+) distinct keys, relative quantization error (?P<error>[\d.]+), (?P<restarts>\d+) restarts"
)
EPOCH = re.compile(r"INFO\s+epoch (\d+) training")
NDCG = re.compile(r"\bndcg@10 : ([\d.]+)")
SETTING = re.compile(r"^(\w+) = (.*)$")


def read_log(path):
    """(settings, {epoch: {...}}) of one log file: the config dump's ``key = value`` lines and, per training epoch,
    its code line and the validation NDCG@10 that follows it."""
    settings, epochs, epoch, in_valid = {}, {}, None, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if epoch is None and (m := SETTING.match(line)):
                settings.setdefault(m.group(1), m.group(2).strip())
            if m := EPOCH.search(line):
                epoch = int(m.group(1)) + 1  # RecBole counts from 0; tables and curves from 1
                epochs[epoch] = {}
            elif epoch is not None and (m := CODES.search(line)):
                epochs[epoch].update(
                    usage=m.group("usage"),
                    perplexity=m.group("perplexity"),
                    keys=int(m.group("keys")),
                    error=float(m.group("error")),
                    restarts=int(m.group("restarts")),
                )
            elif "valid result:" in line:
                in_valid = True
            elif in_valid and (m := NDCG.search(line)):
                if epoch is not None:
                    epochs[epoch]["ndcg"] = float(m.group(1))
                in_valid = False
    return settings, epochs


def collect(log_dir, resume_root, dataset):
    """{checkpoint_dir: (settings, epochs, files)} of the runs under ``resume_root`` on ``dataset``, files in time order."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(log_dir, f"SparCode-{dataset}-*.log")), key=os.path.getmtime):
        settings, epochs = read_log(path)
        run = settings.get("checkpoint_dir", "")
        if not epochs or not run.startswith(os.path.abspath(resume_root)):
            continue
        _, merged, files = runs.setdefault(run, (settings, {}, []))
        epochs = {e: v for e, v in epochs.items() if "restarts" in v}
        if merged and epochs:
            # Before 2026-12-07 the first epoch of a resumed run logged the loaded restart count, all the run's earlier
            # restarts, as its own: a count equal to that total is taken off.
            first = min(epochs)
            earlier = sum(v["restarts"] for e, v in merged.items() if e < first)
            if earlier and epochs[first]["restarts"] == earlier:
                epochs[first]["restarts"] = 0
        merged.update(epochs)
        files.append(os.path.basename(path))
    return runs


def logged_value(key, text):
    """A setting's value as the run's log shows it, read as RecBole reads a setting (``parse_setting``: 0, True,
    [128, 128], 'gelu'), so that it compares with the property file's."""
    return parse_setting(key, text, "a run's log")


def is_default(value, default):
    """Whether a logged value is the property file's: RecBole logs ``train_neg_sample_args: ~`` expanded, as a dict whose
    distribution is 'none'."""
    return value == default or (default is None and isinstance(value, dict) and value.get("distribution") == "none")


def run_name(settings, defaults, varying):
    """The run's name and seed: SparCode with those of the ``varying`` settings (the ones the runs read differ in)
    whose value is not the property file's, written as the batch writes a variant (``with_settings``)."""
    changed = {key: logged_value(key, settings[key]) for key in varying}
    return with_settings("SparCode", {key: value for key, value in changed.items() if not is_default(value, defaults[key])}), settings.get("seed", "?")


def split_settings(logged, defaults):
    """(varying, shared) over the property file's settings that every run logged: ``varying`` the keys the runs read
    differently (they name the runs), ``shared`` ``key=value`` of those every run read alike and not as the property
    file has them. Names leave the shared ones out, so the table says them once, or a plain "SparCode" there would
    read as the shipped model."""
    varying, shared = [], []
    for key in defaults:
        if not all(key in s for s in logged):
            continue
        values = [logged_value(key, s[key]) for s in logged]
        if len({repr(v) for v in values}) > 1:
            varying.append(key)
        elif not is_default(values[0], defaults[key]):
            shared.append(f"{key}={values[0]} (SparCode.yaml: {defaults[key]})")
    return varying, shared


def summary_row(name, seed, epochs):
    ndcg = {e: v["ndcg"] for e, v in epochs.items() if "ndcg" in v}
    best = max(ndcg, key=lambda e: (ndcg[e], -e)) if ndcg else None
    last_restart = max((e for e, v in epochs.items() if v["restarts"]), default=0)
    quiet = next((e for e in sorted(epochs) if e > last_restart), None)
    total = sum(v["restarts"] for v in epochs.values())
    best_cell = f"{ndcg[best]:.4f} ({best})" if best else "—"
    return f"| {name} | {seed} | {len(epochs)} | {best_cell} | {total:,} | {quiet if quiet is not None else '—'} |"


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.4), sharex=True)
    for (name, seed), epochs in runs:
        xs = sorted(epochs)
        validated = [e for e in xs if "ndcg" in epochs[e]]
        (line,) = top.plot(validated, [epochs[e]["ndcg"] for e in validated], label=f"{name} seed {seed}")
        bottom.plot(xs, [epochs[e]["restarts"] for e in xs], color=line.get_color())
    top.set(ylabel="validation NDCG@10", title="SparCode: validation and dead-code restarts per epoch")
    bottom.set(xlabel="epoch", ylabel="restarts in the epoch")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume_root", required=True, help="the batch's resume folder: runs whose checkpoints lie under it")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--log_dir", default=os.path.join(ROOT, "log", "SparCode"))
    parser.add_argument("--out", default=None, help="default results/sparcode/code_curves_<dataset>.md")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(ROOT, "results", "sparcode", f"code_curves_{args.dataset}.md")
    with open(os.path.join(ROOT, "properties", "model", "SparCode.yaml"), encoding="utf-8") as f:
        defaults = yaml.safe_load(f)
    runs = collect(args.log_dir, args.resume_root, args.dataset)
    if not runs:
        parser.exit(1, f"error: no SparCode log in {args.log_dir} has a checkpoint_dir under {args.resume_root}: pass the batch's --resume_root\n")
    logged = [settings for settings, _, _ in runs.values()]
    varying, shared = split_settings(logged, defaults)
    named = sorted(((run_name(settings, defaults, varying), epochs) for settings, epochs, _ in runs.values()), key=lambda r: r[0])
    lines = [
        f"# SparCode's codes over training on {args.dataset}, per epoch (issue 27)",
        "",
        f"Command: `{command_line()}`  ",
        f"Date: {datetime.date.today()}; read from the RecBole logs of {len(runs)} run(s) ({', '.join(f for _, _, files in runs.values() for f in files)}).  ",
        "Codes used, perplexity (per codebook), distinct keys and the relative quantization error are over the epoch's "
        "training batches (dropout on); restarts are the dead-code restarts during the epoch. *Quiet from*: the epoch "
        "from which no restart fired to the end of the run.",
        *(["", f"Every run here read {', '.join(shared)}: a run's name leaves these out."] if shared else []),
        "",
        "| run | seed | epochs | best valid NDCG@10 (epoch) | restarts in all | quiet from |",
        "|---|---|---|---|---|---|",
        *(summary_row(name, seed, epochs) for (name, seed), epochs in named),
    ]
    for (name, seed), epochs in named:
        lines += ["", f"## {name}, seed {seed}", "", "| epoch | valid NDCG@10 | restarts | codes used | perplexity | distinct keys | quantization error |"]
        lines.append("|---|---|---|---|---|---|---|")
        for e in sorted(epochs):
            v = epochs[e]
            ndcg = f"{v['ndcg']:.4f}" if "ndcg" in v else "—"
            lines.append(f"| {e} | {ndcg} | {v['restarts']:,} | {v['usage']} | {v['perplexity']} | {v['keys']:,} | {v['error']:.3f} |")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    plot(named, os.path.splitext(out)[0] + ".png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

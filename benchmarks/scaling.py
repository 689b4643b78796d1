"""How training and evaluation cost grow with the catalogue, on generated data.

    python -m benchmarks.scaling --sizes=10000:5000,100000:20000,1000000:80000 --out=results

Each size ITEMS:USERS gets a synthetic dataset (benchmarks/make_synthetic.py, 20 interactions per
user on average, written under --data and never committed). Each model runs in its own process:
training time per 1k samples (median over --batches batches of 512 after one warm-up), full-sort
evaluation time per 1k users (batches of 1024), and the process's peak resident memory. Variants:
T2Diff (full softmax), T2Diff+ssm (sampled softmax, 1024 negatives) and SASRec, all at their
default configs otherwise. Writes <out>/scaling.md, scaling.json and scaling.png (log-log) with
the fitted growth exponents (slope of log cost against log items).
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks.machine import command_line, describe
from benchmarks.steps import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


VARIANTS = {
    "T2Diff": ("T2Diff", {}),
    "T2Diff+ssm": ("T2Diff", {"softmax_negatives": 1024}),
    "SASRec": ("SASRec", {}),
}


def worker(variant, dataset, data_path, batches):
    import torch

    from recbole_t2diff.config import Config
    from recbole_t2diff.quick_start import build_model, make_trainer, prepare

    model_name, extra = VARIANTS[variant]
    config = Config(
        model=model_name,
        dataset=dataset,
        config_dict={"data_path": data_path, "show_progress": False, "state": "WARNING", "train_batch_size": 512, "eval_batch_size": 1024, **extra},
    )
    _, train, _, test = prepare(config)
    model = build_model(config, train)
    trainer = make_trainer(config, model)
    model.train()
    times = []
    for i, batch in enumerate(train):
        if i > batches:
            break
        start = time.perf_counter()
        train_step(model, trainer.optimizer, batch)
        if i:  # the first batch warms up
            times.append((time.perf_counter() - start) / len(batch))
    model.eval()
    eval_times = []
    with torch.no_grad():
        for i, (interaction, *_) in enumerate(test):
            if i >= 2:
                break
            start = time.perf_counter()
            model.full_sort_predict(interaction)
            eval_times.append((time.perf_counter() - start) / len(interaction))
    return {
        "variant": variant,
        "items": int(train.dataset.item_num),
        "users": int(train.dataset.user_num),
        "train_samples": len(train.dataset),
        "train_s_per_1k": 1000 * statistics.median(times),
        "eval_s_per_1k_users": 1000 * statistics.median(eval_times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def exponent(rows, key):
    x = np.log([r["items"] for r in rows])
    y = np.log([r[key] for r in rows])
    return float(np.polyfit(x, y, 1)[0]) if len(rows) > 1 else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000:5000,100000:20000,1000000:80000")
    parser.add_argument("--variants", default="T2Diff,T2Diff+ssm,SASRec")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--data", default=os.path.join(ROOT, "synthetic"))
    parser.add_argument("--out", default=os.path.join(ROOT, "results"))
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "DATASET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args.data, args.batches)))
        return
    from benchmarks.make_synthetic import generate, write

    rows = []
    for size in args.sizes.split(","):
        items, users = (int(v) for v in size.split(":"))
        name = f"synth-{items}"
        if not os.path.isfile(os.path.join(args.data, name, f"{name}.inter")):
            write(args.data, name, *generate(items, users, 20))
        for variant in args.variants.split(","):
            print(f"[scaling] {variant} on {name} ({users} users) ...", flush=True)
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.scaling", "--worker", variant, name, "--data", args.data, "--batches", str(args.batches)],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                print(f"[scaling] {variant} on {name} failed:\n{done.stderr[-2000:]}", flush=True)
                rows.append({"variant": variant, "items": items, "users": users, "failed": done.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(line[0][len("RESULT ") :]))
            print(f"[scaling] {json.dumps(rows[-1])}", flush=True)
    report(rows, args)


def report(rows, args):
    ok = [r for r in rows if "failed" not in r]
    variants = sorted({r["variant"] for r in rows}, key=list(VARIANTS).index)
    growth = {v: {k: exponent([r for r in ok if r["variant"] == v], k) for k in ("train_s_per_1k", "eval_s_per_1k_users", "peak_rss_mib")} for v in variants}
    meta = {"command": command_line(), "machine": describe(), "date": datetime.date.today().isoformat()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump({**meta, "rows": rows, "growth_exponents": growth}, f, indent=1)
    lines = [
        "# Cost against catalogue size (synthetic data)",
        "",
        f"Command: `{meta['command']}`; machine: {meta['machine']}; date {meta['date']}.",
        "Training: seconds per 1k training samples (batch 512, median of the timed batches); evaluation:",
        "full-sort seconds per 1k users (batch 1024); memory: the process's peak RSS (data included).",
        "",
        "| variant | items | users | train samples | train s / 1k samples | eval s / 1k users | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['variant']} | {r['items']} | {r['users']} | failed: {' '.join(r['failed'])} | | | |")
        else:
            lines.append(
                f"| {r['variant']} | {r['items']} | {r['users']} | {r['train_samples']} | {r['train_s_per_1k']:.3f} | "
                f"{r['eval_s_per_1k_users']:.3f} | {r['peak_rss_mib']:.0f} |"
            )
    lines += [
        "",
        "Growth exponents (slope of log cost against log items; 1 = linear in the catalogue):",
        "",
        "| variant | training | evaluation | memory |",
        "|---|---|---|---|",
    ]
    lines += [f"| {v} | {g['train_s_per_1k']:.2f} | {g['eval_s_per_1k_users']:.2f} | {g['peak_rss_mib']:.2f} |" for v, g in growth.items()]
    with open(os.path.join(args.out, "scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(ok, variants, os.path.join(args.out, "scaling.png"))
    print("\n".join(lines))


def plot(rows, variants, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(
        axes, ["train_s_per_1k", "eval_s_per_1k_users", "peak_rss_mib"], ["training s / 1k samples", "evaluation s / 1k users", "peak RSS (MiB)"]
    ):
        for v in variants:
            mine = [r for r in rows if r["variant"] == v]
            ax.plot([r["items"] for r in mine], [r[key] for r in mine], "o-", label=v)
        ax.set(xscale="log", yscale="log", xlabel="items", title=title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""Accuracy and speed of T2Diff's user tower per sampler and step count, against SASRec, in one run.

    python -m benchmarks.inference --t2diff=saved/T2Diff-X.pth --sasrec=saved/SASRec-Y.pth \
        --steps=1,2,5,10,25,50 --out=results

For each T2Diff setting (the ancestral DDPM chain over all n_steps, and DDIM with each step count)
and for SASRec: validation and test NDCG@10 / Recall@10 (RecBole's full-sort evaluation), full-sort
users per second at batch 1024, and the median latency of one user. Then, for the DDIM default, the
exported two-tower vectors go through faiss (exact, HNSW, IVF): retrieval metrics against exact
full-sort scoring, and queries per second. Updates this dataset's entry in <out>/inference.json,
rewrites inference.md from it, and plots inference_<dataset>.png. Pick the default sampler on the validation columns.
"""

import argparse
import datetime
import json
import os
import statistics
import time

import torch

from benchmarks.machine import command_line, describe
from recbole_t2diff.ann import build_index, exact_top_k, recall_ndcg, search
from recbole_t2diff.cli import exit_on_usage_error
from recbole_t2diff.export import item_matrix, user_matrix
from recbole_t2diff.quick_start import load_data_and_model, make_trainer


def batch_of(loader, size):
    """One evaluation batch of exactly ``size`` sequences (test users repeated as needed)."""
    interaction = next(iter(loader))[0]
    index = torch.arange(size) % len(interaction)
    return interaction[index]


def speed(model, loader, batch_size=1024, repeats=5, single_repeats=30):
    model.eval()
    big, one = batch_of(loader, batch_size), batch_of(loader, 1)
    with torch.no_grad():
        model.full_sort_predict(big)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.full_sort_predict(big)
            times.append(time.perf_counter() - start)
        single = []
        for _ in range(single_repeats):
            start = time.perf_counter()
            model.full_sort_predict(one)
            single.append(time.perf_counter() - start)
    return batch_size / statistics.median(times), 1000 * statistics.median(single)


def accuracy(trainer, valid, test):
    v = trainer.evaluate(valid, load_best_model=False)
    t = trainer.evaluate(test, load_best_model=False)
    return {"valid_ndcg@10": float(v["ndcg@10"]), "valid_recall@10": float(v["recall@10"]), "ndcg@10": float(t["ndcg@10"]), "recall@10": float(t["recall@10"])}


def measure(name, model, trainer, valid, test, sampler, steps):
    record = {"model": name, "sampler": sampler, "steps": steps}
    record.update(accuracy(trainer, valid, test))
    record["users_per_s"], record["single_user_ms"] = speed(model, test)
    record["users_per_s"] = round(record["users_per_s"], 1)
    record["single_user_ms"] = round(record["single_user_ms"], 2)
    print(json.dumps(record), flush=True)
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t2diff", required=True, help="T2Diff checkpoint")
    parser.add_argument("--sasrec", default=None, help="SASRec checkpoint on the same dataset")
    parser.add_argument("--steps", default="1,2,5,10,25,50")
    parser.add_argument("--default_steps", type=int, default=None, help="DDIM steps used for the ANN part (default: best on valid)")
    parser.add_argument("--out", default="results")
    parser.add_argument("--trained_with", default="", help="how the checkpoints were trained, recorded in the results")
    args = parser.parse_args()
    torch.autograd.set_detect_anomaly(False)
    records = []
    with exit_on_usage_error():
        config, model, _, _, valid, test = load_data_and_model(args.t2diff)
        trainer = make_trainer(config, model)
        dataset = config["dataset"]
        model.set_sampler("ddpm")
        records.append(measure("T2Diff", model, trainer, valid, test, "ddpm", model.n_steps))
        for steps in [int(s) for s in args.steps.split(",")]:
            model.set_sampler("ddim", steps, 0.0)
            records.append(measure("T2Diff", model, trainer, valid, test, "ddim", steps))
        ddim = [r for r in records if r["sampler"] == "ddim"]
        best = args.default_steps or max(ddim, key=lambda r: (round(r["valid_ndcg@10"], 4), -r["steps"]))["steps"]
        model.set_sampler("ddim", best, 0.0)
        items = item_matrix(model).float().numpy()
        users, targets = (t.numpy() for t in user_matrix(model, test))
        exact_recall, exact_ndcg = recall_ndcg(exact_top_k(items, users, 10), targets)
        start = time.perf_counter()
        exact_top_k(items, users, 10)
        exact_qps = len(users) / (time.perf_counter() - start)
        ann = [{"index": "exact numpy", "recall@10": exact_recall, "ndcg@10": exact_ndcg, "qps": round(exact_qps)}]
        for kind in ("flat", "hnsw", "ivf"):
            found, qps = search(build_index(items, kind), users, 10)
            recall, ndcg = recall_ndcg(found, targets)
            ann.append({"index": kind, "recall@10": recall, "ndcg@10": ndcg, "qps": round(qps)})
        if args.sasrec:
            config_s, sasrec, _, _, valid_s, test_s = load_data_and_model(args.sasrec)
            trainer_s = make_trainer(config_s, sasrec)
            records.append(measure("SASRec", sasrec, trainer_s, valid_s, test_s, "-", 0))
    machine = describe()
    command = command_line()
    for record in records:
        record["dataset"] = dataset
    run = {
        "command": command,
        "machine": machine,
        "date": datetime.date.today().isoformat(),
        "dataset": dataset,
        "checkpoints": {"T2Diff": args.t2diff, "SASRec": args.sasrec},
        "trained_with": args.trained_with,
        "ddim_default_steps": best,
        "records": records,
        "ann": ann,
    }
    # One file for every dataset measured: this run replaces only its own dataset's entry.
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "inference.json")
    everything = {}
    if os.path.isfile(json_path):  # other sections (benchmarks/serving.py's "serving") are kept
        with open(json_path) as f:
            everything = json.load(f)
    runs = everything.setdefault("runs", {})
    runs[dataset] = run
    with open(json_path, "w") as f:
        json.dump(everything, f, indent=1)
    write_markdown(os.path.join(args.out, "inference.md"), runs)
    plot(os.path.join(args.out, f"inference_{dataset}.png"), records, dataset)


def write_markdown(path, runs):
    keys = ["model", "sampler", "steps", "valid_ndcg@10", "ndcg@10", "recall@10", "users_per_s", "single_user_ms"]
    lines = [
        "# Inference: samplers, speed and ANN retrieval",
        "",
        "Accuracy: RecBole full-sort evaluation (valid and test splits); users/s: full-sort scoring of a",
        "1024-sequence batch (median of 5); single_user_ms: median of 30 one-user calls. All rows of one",
        "dataset come from one run on one machine. Plots: `inference_<dataset>.png`.",
    ]
    for dataset, run in runs.items():
        lines += [
            "",
            f"## {dataset}",
            "",
            f"Command: `{run['command']}`  ",
            f"Machine: {run['machine']}; date {run['date']}; checkpoints {run['checkpoints']}.  ",
            f"Checkpoints trained with: {run['trained_with'] or 'not stated'}.",
            "",
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
        ]
        for r in run["records"]:
            lines.append("| " + " | ".join(f"{r[k]:.4f}" if k.endswith("@10") else str(r[k]) for k in keys) + " |")
        lines += [
            "",
            f"ANN retrieval with T2Diff vectors (DDIM, {run['ddim_default_steps']} steps, test split):",
            "",
            "| index | recall@10 | ndcg@10 | queries/s |",
            "|---|---|---|---|",
        ] + [f"| {a['index']} | {a['recall@10']:.4f} | {a['ndcg@10']:.4f} | {a['qps']} |" for a in run["ann"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path, records, dataset):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ddim = [r for r in records if r["model"] == "T2Diff" and r["sampler"] == "ddim"]
    others = [r for r in records if r not in ddim]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["steps"] for r in ddim], [r["ndcg@10"] for r in ddim], "o-", label="T2Diff DDIM (test)")
    left.plot([r["steps"] for r in ddim], [r["valid_ndcg@10"] for r in ddim], "s--", label="T2Diff DDIM (valid)")
    for r in others:
        left.axhline(r["ndcg@10"], linestyle=":", color="C2" if r["model"] == "SASRec" else "C3", label=f"{r['model']} {r['sampler']} (test)")
    left.set(xscale="log", xlabel="denoiser calls at inference", ylabel="NDCG@10", title=f"Accuracy vs steps ({dataset})")
    left.legend(fontsize=8)
    for r in records:
        label = f"{r['model']} {r['sampler']}{'' if r['model'] == 'SASRec' else ' ' + str(r['steps'])}"
        right.scatter(r["single_user_ms"], r["ndcg@10"])
        right.annotate(label, (r["single_user_ms"], r["ndcg@10"]), fontsize=7)
    right.set(xscale="log", xlabel="single-user latency, ms (log)", ylabel="test NDCG@10", title="Accuracy vs latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

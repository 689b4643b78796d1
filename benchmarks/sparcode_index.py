"""SparCode: exact scoring against its sparse inverted index on one trained model (docs/SPARCODE.md §12).

    python -m benchmarks.sparcode_index --dataset=ml-100k [--checkpoint=saved/SparCode-....pth] \
        [--seed=2020] [--index_keys=used] [--out=results/sparcode] [--key=value ...]

Without --checkpoint it trains SparCode first (RecBole's Trainer, early stopping on exact validation
NDCG@10; every --key=value is a SparCode/RecBole setting, e.g. --epochs=20 --stopping_step=3), then
reloads the best checkpoint and reports on the test split:

1. accuracy: Recall, NDCG, MRR @ 10, 20, 50 from RecBole's evaluator, exact and through the index;
2. fidelity: overlap@k of the two top-k lists (ties by item id on both sides), short-list rate (fewer
   than k items touched), missed keys (``index_keys: used``), share of test targets whose exact
   score is 0 (no posting list reaches them);
3. size: keys, nnz, density, posting-list lengths, bytes measured and by formula, code usage;
4. latency per query batch (B = 1 and 256, median and p99): (a) tokenize + quantize, (b) index
   accumulate + top-k, (c) exact interaction MLP over all items + top-k, (d) two-tower dot product
   on the same tokens (Σ_k q̃_k · v_i) + top-k; one process, the threads torch is given;
5. trade-off: accuracy against index bytes for thresholds τ at the 0/50/90/99 % quantiles of the
   stored values, posting caps P in {50, 100, 500}, and float16 values (pruned from the τ = 0 index).

Writes <out>/index_<dataset>.md, .json and .png, each with the command, machine and date.
"""

import argparse
import datetime
import json
import math
import os
import time

import numpy as np
import torch

from benchmarks.cli import options_and_settings
from benchmarks.machine import command_line, describe
from recbole_t2diff.cli import exit_on_usage_error
from recbole_t2diff.quick_start import load_data_and_model, make_trainer, prepare, run
from recbole_t2diff.sparse_index import SparseIndex, top_items


METRICS = ["recall@10", "ndcg@10", "mrr@10", "recall@20", "ndcg@20", "mrr@20", "recall@50", "ndcg@50", "mrr@50"]
OVERLAP_K = (10, 20, 50)


def evaluate(trainer, test, model, score_mode):
    model.score_mode = score_mode
    result = trainer.evaluate(test, load_best_model=False, show_progress=False)
    return {metric: round(float(result[metric]), 4) for metric in METRICS}


@torch.no_grad()
def fidelity(model, index, test):
    """Overlap@k, short-list and miss rates, and targets with exact score 0, over the test users."""
    model.eval()
    overlap = {k: 0.0 for k in OVERLAP_K}
    short, missed, tokens, zero_targets, users = {k: 0 for k in OVERLAP_K}, 0, 0, 0, 0
    for interaction, _, _, targets in test:
        model.score_mode = "exact"
        exact = model.full_sort_predict(interaction)
        exact[:, 0] = 0
        approx, misses = index.accumulate(model, index.query_keys(model, interaction))
        missed += misses
        tokens += approx.numel() // approx.size(1) * model.n_query_tokens
        zero_targets += int((exact[torch.arange(len(targets)), targets] <= 0).sum())
        touched = (approx[:, 1:] > 0).sum(1)
        for k in OVERLAP_K:
            a, b = top_items(exact, k), top_items(approx, k)
            overlap[k] += float((a[:, :, None] == b[:, None, :]).any(-1).float().mean(1).sum())
            short[k] += int((touched < k).sum())
        users += len(targets)
    return {
        **{f"overlap@{k}": round(overlap[k] / users, 4) for k in OVERLAP_K},
        **{f"short_list@{k}": round(short[k] / users, 4) for k in OVERLAP_K},
        "miss_rate": round(missed / tokens, 4),
        "targets_with_exact_score_0": round(zero_targets / users, 4),
        "test_users": users,
    }


def size(index):
    lengths = index.posting_lengths()
    n_items = index.meta["n_items"] - 1
    return {
        "keys": index.n_rows,
        "nnz": index.nnz,
        "density": round(index.nnz / max(1, index.n_rows * n_items), 4),
        "postings_mean": round(float(lengths.mean()), 1),
        "postings_p50": int(np.percentile(lengths, 50)),
        "postings_p99": int(np.percentile(lengths, 99)),
        "postings_max": int(lengths.max()),
        "bytes": index.nbytes(),
        "bytes_by_formula": index.predicted_bytes(),
        "dense_fp32_bytes": index.n_rows * n_items * 4,
    }


def code_usage(model, test):
    """SparCode.code_stats over the test users' tokens: per-codebook share of codes used and perplexity,
    distinct keys, relative quantization error, restarts during training."""
    stats = model.code_stats(test)
    return {
        "codebooks": [
            {"codes_used": round(share * model.quantizer.codebook_size), "perplexity": round(perplexity, 1)}
            for share, perplexity in zip(stats["usage"], stats["perplexity"])
        ],
        "distinct_test_keys": stats["distinct_keys"],
        "relative_quantization_error": round(stats["relative_error"], 4),
        "restarts_during_training": stats["restarts"],
    }


def timed(function, runs=100, warmups=10, max_seconds=30.0):
    """Median and p99 seconds of ``function()`` over up to ``runs`` calls after ``warmups`` (stops at max_seconds)."""
    for _ in range(warmups):
        function()
    times, start = [], time.perf_counter()
    while len(times) < runs and (time.perf_counter() - start < max_seconds or len(times) < 3):
        begin = time.perf_counter()
        function()
        times.append(time.perf_counter() - begin)
    return {"median_ms": round(1000 * float(np.median(times)), 3), "p99_ms": round(1000 * float(np.percentile(times, 99)), 3), "runs": len(times)}


def dense_table(index, n_items):
    """The index's posting lists as a dense float32 table [stored keys, items] (item 1 in column 0): what serving
    without posting lists would keep."""
    import scipy.sparse

    postings = scipy.sparse.csr_matrix((np.asarray(index.values, dtype=np.float32), index.indices, index.indptr), shape=(index.n_rows, n_items - 1))
    return torch.from_numpy(postings.toarray())


@torch.no_grad()
def time_against_dense(model, index, interaction, batch=256, k=10, rounds=30):
    """Median time of one top-``k`` query batch through ``index`` (its posting lists summed per history) over the
    median time of the same query through the dense table of the same scores (every stored key's row over all items,
    float32, gathered and summed), the two timed alternately in this process so that the machine's load hits both
    alike; below 1 the posting lists are the faster. ``batch`` histories of ``interaction`` whose keys all have a
    posting list, so that neither path scores a row on the fly. Returns "" when there are none."""
    model.eval()
    keys = index.query_keys(model, interaction)
    rows, found = index.rows_of(keys)
    whole = found.all(1).nonzero().flatten()[:batch]
    if not len(whole):
        return ""
    keys, rows = keys[whole], rows[whole]
    table = dense_table(index, model.n_items)

    def via_index():
        scores = index.accumulate(model, keys)[0][:, 1:]  # column 0 is the padding item
        return scores.topk(k)

    def via_table():
        return table[rows].sum(1).topk(k)

    # Like for like: both paths must give the same top-k scores (the table is the index's own entries).
    if not torch.allclose(via_index().values, via_table().values, rtol=1e-5, atol=1e-6):
        raise RuntimeError("the dense table does not score as the index does: the timing would compare different functions")
    times = {via_index: [], via_table: []}
    for round_ in range(rounds + 3):
        for path, spent in times.items():
            begin = time.perf_counter()
            path()
            if round_ >= 3:  # warm-up rounds are not counted
                spent.append(time.perf_counter() - begin)
    return round(float(np.median(times[via_index]) / np.median(times[via_table])), 3)


@torch.no_grad()
def latency(model, index, test, k=10):
    model.eval()
    interaction = next(iter(test))[0]
    result = {}
    for batch in (1, 256):
        queries = interaction[torch.arange(min(batch, len(interaction)))]
        tokens = model.query_tokens(queries)
        keys = model.quantizer.keys(model.quantizer.assign(tokens))
        rows, token_row = model.query_rows(queries)
        item_vectors = model.item_vectors()
        user = model.quantizer.lookup(model.quantizer.assign(tokens)).sum(1)

        def exact():
            scores = model.accumulate(model.code_scores(rows), token_row, len(tokens))
            scores[:, 0] = -math.inf
            return scores.topk(k)

        def two_tower():
            scores = user @ item_vectors.t()
            scores[:, 0] = -math.inf
            return scores.topk(k)

        def via_index():
            scores = index.accumulate(model, keys)[0]
            scores[:, 0] = -math.inf
            return scores.topk(k)

        result[f"B={len(tokens)}"] = {
            "a_tokenize_quantize": timed(lambda: model.quantizer.keys(model.quantizer.assign(model.query_tokens(queries)))),
            "b_index_accumulate_topk": timed(via_index),
            "c_exact_mlp_topk": timed(exact, runs=20, warmups=2),
            "d_two_tower_dot_topk": timed(two_tower),
        }
    return result


def trade_off(model, base, trainer, test):
    """Index accuracy and bytes over thresholds (quantiles of the stored values), caps and float16."""
    stored = base.values.astype(np.float32)
    points = []
    for q in (0, 50, 90, 99):
        tau = 0.0 if q == 0 else float(np.percentile(stored, q))
        points.append(({"threshold": tau, "quantile": q}, base.pruned(model, threshold=tau)))
    for cap in (500, 100, 50):
        points.append(({"max_postings": cap}, base.pruned(model, max_postings=cap)))
    points.append(({"dtype": "float16"}, base.pruned(model, dtype="float16")))
    rows = []
    for label, index in points:
        model.sparse_index, model.index_settings = index, {name: index.meta[name] for name in ("keys", "miss", "threshold", "max_postings", "dtype")}
        metrics = evaluate(trainer, test, model, "index")
        rows.append({**label, "bytes": index.nbytes(), "nnz": index.nnz, **metrics})
    return rows


def plot(rows, exact, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("threshold", "o"), ("max_postings", "s"), ("dtype", "^")):
        chosen = [r for r in rows if kind in r]
        ax.plot(
            [r["bytes"] / 2**20 for r in chosen],
            [r["ndcg@10"] for r in chosen],
            marker=marker,
            linestyle="-" if len(chosen) > 1 else "",
            label={"threshold": "threshold τ (quantiles 0/50/90/99 %)", "max_postings": "posting cap P (500/100/50)", "dtype": "float16 values"}[kind],
        )
        for r in chosen:
            ax.annotate(str(r.get("quantile", r.get("max_postings", "fp16"))), (r["bytes"] / 2**20, r["ndcg@10"]), fontsize=7)
    ax.axhline(exact["ndcg@10"], color="grey", linestyle="--", label="exact scoring")
    ax.set_xscale("log")
    ax.set_xlabel("index size (MiB, log scale)")
    ax.set_ylabel("test NDCG@10")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def one_row_table(values):
    """A markdown table of one row: the keys of ``values`` as the header, its values below."""
    return ["| " + " | ".join(values) + " |", "|---" * len(values) + "|", "| " + " | ".join(str(v) for v in values.values()) + " |"]


def write_markdown(report, path):
    lines = [
        f"# SparCode on {report['dataset']}: exact scoring vs the sparse inverted index",
        "",
        f"Command: `{report['command']}`; machine: {report['machine']}; date: {report['date']}; seed {report['seed']}.",
        f"Checkpoint trained with: {report['training']}. Index: {report['index_settings']}; built in {report['build_s']} s.",
        "",
        "## Accuracy on the test split (RecBole's evaluator, full ranking)",
        "",
        "| scoring | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for name in ("exact", "index"):
        lines.append(f"| {name} | " + " | ".join(str(report["accuracy"][name][m]) for m in METRICS) + " |")
    lines += [
        "",
        "## Fidelity",
        "",
        *one_row_table(report["fidelity"]),
        "",
        "## Size",
        "",
        *one_row_table(report["size"]),
        "",
        f"Code usage on the test users' tokens: {report['code_usage']}",
        "",
        "## Latency per query batch (ms; median / p99 over `runs` calls)",
        "",
        "| batch | (a) tokenize + quantize | (b) index accumulate + top-10 | (c) exact MLP, all items + top-10 | (d) two-tower dot + top-10 |",
        "|---|---|---|---|---|",
    ]
    for batch, parts in report["latency"].items():
        cells = [f"{p['median_ms']} / {p['p99_ms']} ({p['runs']})" for p in parts.values()]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Trade-off: index size against accuracy (pruned from the τ = 0 index)",
        "",
        "| pruning | nnz | bytes | ndcg@10 | recall@10 | ndcg@20 | recall@20 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["trade_off"]:
        label = (
            f"τ = {r['threshold']:.4g} (q{r['quantile']})"
            if "threshold" in r
            else f"P = {r['max_postings']}"
            if "max_postings" in r
            else f"values {r['dtype']}"
        )
        lines.append(f"| {label} | {r['nnz']} | {r['bytes']} | {r['ndcg@10']} | {r['recall@10']} | {r['ndcg@20']} | {r['recall@20']} |")
    lines += ["", f"![accuracy against index bytes]({os.path.basename(path)[:-3]}.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--checkpoint", default=None, help="a SparCode checkpoint; without it, train one first")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--index_keys", default="used", help="all | used (default: used, the training split's keys)")
    parser.add_argument("--out", default="results/sparcode")
    with exit_on_usage_error():
        args, settings = options_and_settings(parser, argv)
    command, machine, stamp = command_line(argv), describe(), datetime.date.today().isoformat()
    with exit_on_usage_error():
        overrides = {"topk": [10, 20, 50], "index_keys": args.index_keys}
        checkpoint = args.checkpoint
        if checkpoint is None:
            trainers = []  # run() leaves the best epoch's weights in its trainer's model
            result = run("SparCode", args.dataset, config_dict={"seed": args.seed, "show_progress": False, **settings}, on_trainer=trainers.append)
            checkpoint, config, model = result["saved_model_file"], trainers[0].config, trainers[0].model
            for key, value in overrides.items():
                config[key] = value
            model.index_settings["keys"] = args.index_keys
            _, _, _, test = prepare(config)
        else:
            config, model, _, _, _, test = load_data_and_model(checkpoint, overrides)
        trainer = make_trainer(config, model)
        exact = evaluate(trainer, test, model, "exact")
        start = time.perf_counter()
        index = SparseIndex.build(model, **model.index_settings)
        build_s = round(time.perf_counter() - start, 1)
        model.sparse_index = index
        report = {
            "dataset": args.dataset,
            "seed": args.seed,
            "command": command,
            "machine": machine,
            "date": stamp,
            "checkpoint": os.path.abspath(checkpoint),
            "training": settings or "the property file's defaults",
            "index_settings": index.meta | {"fingerprint": index.meta["fingerprint"][:12]},
            "build_s": build_s,
            "accuracy": {"exact": exact, "index": evaluate(trainer, test, model, "index")},
            "fidelity": fidelity(model, index, test),
            "size": size(index),
            "code_usage": code_usage(model, test),
            "latency": latency(model, index, test),
            "threads": torch.get_num_threads(),
        }
        report["trade_off"] = trade_off(model, index, trainer, test)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"index_{args.dataset}")
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1)
    write_markdown(report, base + ".md")
    plot(report["trade_off"], exact, base + ".png", f"SparCode on {args.dataset}: index size vs accuracy")
    print(open(base + ".md").read())


if __name__ == "__main__":
    main()

"""Serving cost of T2Diff configurations against SASRec, measured in one process with the models interleaved.

    python -m benchmarks.serving --dataset=ml-100k --variants=SASRec,T2Diff,T2Diff-fast [--rounds=7] [--out=results] [--compile]

A variant is written as in a benchmark study (``benchmarks.variants``): a model name, ``T2Diff[key=value,...]``, or a
preset's name: ``T2Diff-fast`` is T2Diff with the settings of ``properties/presets/T2Diff-fast.yaml``.
Serving cost depends on the architecture, not on the weights, so each model is built untrained from its settings
(the same Config a run would read). Each round times, for every model in turn, full-sort scoring of a batch of
1,024 test sequences (users/s) and 20 one-user calls (latency): a change of load during the run hits every model
alike, and the medians over rounds are compared as ratios to SASRec's. Writes the dataset's entry under
"serving" in <out>/inference.json and the table <out>/serving_<dataset>.md.

``--compile`` adds a second copy of every model, SASRec's included, scored through ``torch.compile`` (inductor) and
timed in the same rounds: a compiled model's ratios are to the compiled SASRec, so the run answers whether compiling
closes a gap to SASRec (only by helping one model more than the other), with the eager ratios of the same run beside
them. That run goes under "serving_compiled" and into serving_<dataset>_compiled.md, so the eager entry stays as it is.
"""

import argparse
import datetime
import json
import os
import statistics
import time

import torch

from benchmarks.cli import untrained
from benchmarks.machine import command_line, describe, load_average
from benchmarks.variants import ROOT, against_sasrec, preset_file
from recbole_t2diff.cli import exit_on_usage_error

COMPILED = " (compiled)"  # the name of a model's compiled copy: "<variant> (compiled)"


def build(variant, dataset, settings):
    """(model in eval mode, a 1,024-sequence test batch, a one-sequence batch) for ``variant`` on ``dataset``, its
    settings read as a benchmark run reads them (``variants.parse_variant``)."""
    _, model, _, test = untrained(variant, dataset, settings)
    model.eval()
    interaction = next(iter(test))[0]
    big = interaction[torch.arange(1024) % len(interaction)]
    return model, big, interaction[torch.arange(1)]


def compiled(models):
    """``models`` ({variant: (model, big, one)}) renamed "<variant> (compiled)", each model's ``full_sort_predict``
    compiled by inductor for the batch shapes it is timed at (``dynamic=False``: one graph per shape, as a server with
    fixed batch sizes would)."""
    import torch._inductor.config

    # Inductor's pattern matcher fails on RecBole's SASRec in torch 2.13 (a broadcast check in its matmul decomposition
    # during the joint-graph passes); without those rewrites every model compiles, and each still fuses its small ops.
    torch._inductor.config.pattern_matcher = False
    for model, _, _ in models.values():
        model.full_sort_predict = torch.compile(model.full_sort_predict, dynamic=False)
    return {variant + COMPILED: built for variant, built in models.items()}


def timed(call, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def measure(models, rounds, single_calls=20):
    """{variant: {"users_per_s", "single_user_ms"}}: medians over ``rounds`` interleaved rounds."""
    big_times, single_times = {v: [] for v in models}, {v: [] for v in models}
    with torch.no_grad():
        for model, big, one in models.values():  # warm-up
            model.full_sort_predict(big)
            model.full_sort_predict(one)
        for _ in range(rounds):
            for variant, (model, big, one) in models.items():
                big_times[variant] += timed(lambda: model.full_sort_predict(big), 1)
                single_times[variant] += timed(lambda: model.full_sort_predict(one), single_calls)
    return {
        v: {"users_per_s": round(1024 / statistics.median(big_times[v]), 1), "single_user_ms": round(1000 * statistics.median(single_times[v]), 3)}
        for v in models
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--variants", default="SASRec,T2Diff,T2Diff-fast")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(ROOT, "results"))
    parser.add_argument("--compile", action="store_true", help="also time every model compiled by torch.compile, in the same rounds")
    args = parser.parse_args()
    settings = {"data_path": args.data_path} if args.data_path else {}
    with exit_on_usage_error():  # variants with settings in brackets keep their commas
        variants = against_sasrec(args.variants)
        models = {v: build(v, args.dataset, settings) for v in variants}
        if args.compile:  # copies of their own, so the eager ones stay eager; measure's warm-up compiles them, untimed
            models.update(compiled({v: build(v, args.dataset, settings) for v in variants}))
    load_before = load_average()
    results = measure(models, args.rounds)
    for v, r in results.items():
        reference = results["SASRec" + COMPILED] if v.endswith(COMPILED) else results["SASRec"]
        r["throughput_vs_sasrec"] = round(r["users_per_s"] / reference["users_per_s"], 3)
        r["latency_vs_sasrec"] = round(r["single_user_ms"] / reference["single_user_ms"], 3)
        preset = preset_file(v.removesuffix(COMPILED))
        r["preset"] = os.path.relpath(preset, ROOT) if preset else None
    entry = {
        "command": command_line(),
        "machine": describe(),
        "date": datetime.date.today().isoformat(),
        "threads": torch.get_num_threads(),
        "compiled": args.compile,
        "rounds": args.rounds,
        "load_average": [load_before, load_average()],
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "inference.json")
    everything = json.load(open(path)) if os.path.isfile(path) else {}
    everything.setdefault("serving_compiled" if args.compile else "serving", {})[args.dataset] = entry
    with open(path + ".tmp", "w") as f:
        json.dump(everything, f, indent=1)
    os.replace(path + ".tmp", path)
    lines = [
        f"# Serving cost on {args.dataset}: T2Diff configurations against SASRec" + (", each also through torch.compile" if args.compile else ""),
        "",
        f"Command: `{entry['command']}`  ",
        f"Machine: {entry['machine']}; {entry['threads']} torch thread(s); date {entry['date']}; 1-minute load average "
        f"{entry['load_average'][0]} before and {entry['load_average'][1]} after.  ",
        f"Untrained models (cost depends on the architecture, not the weights); {args.rounds} rounds, the models interleaved in each; "
        "medians. users/s: full-sort scoring of a 1,024-sequence batch; latency: one user's full-sort scoring."
        + (" A compiled model's ratios are to the compiled SASRec (`torch.compile`, inductor, `dynamic=False`)." if args.compile else ""),
        "",
        "| variant | preset | users/s | x SASRec | single-user ms | x SASRec |",
        "|---|---|---|---|---|---|",
    ]
    for v, r in results.items():
        lines.append(
            f"| {v} | {r['preset'] or '—'} | {r['users_per_s']} | {r['throughput_vs_sasrec']:.2f} | {r['single_user_ms']} | {r['latency_vs_sasrec']:.2f} |"
        )
    with open(os.path.join(args.out, f"serving_{args.dataset}{'_compiled' if args.compile else ''}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

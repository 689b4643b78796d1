"""Wall time of one training epoch and one full-sort evaluation per model, measured in one process.

    python -m benchmarks.epoch_time --models=T2Diff,SASRec --dataset=ml-100k

Each model runs at its default config (property files), seed 2020, on the CPU unless a GPU is
visible. Writes results/epoch_time_<dataset>.md and .json and prints the table.
"""

import argparse
import datetime
import json
import os
import time

import torch

from benchmarks.machine import command_line, describe
from recbole_t2diff.cli import exit_on_usage_error
from recbole_t2diff.config import Config
from recbole_t2diff.quick_start import build_model, make_trainer, prepare


def measure(model_name, dataset, extra):
    config = Config(model=model_name, dataset=dataset, config_dict={"show_progress": False, **extra})
    _, train_data, valid_data, _ = prepare(config)
    model = build_model(config, train_data)
    trainer = make_trainer(config, model)
    start = time.perf_counter()
    trainer._train_epoch(train_data, 0)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    result = trainer.evaluate(valid_data, load_best_model=False)
    eval_s = time.perf_counter() - start
    return {
        "model": model_name,
        "dataset": dataset,
        "train_batch_size": config["train_batch_size"],
        "train_batches": len(train_data),
        "train_epoch_s": round(train_s, 2),
        "s_per_batch": round(train_s / len(train_data), 3),
        "eval_users": len(valid_data.dataset) if hasattr(valid_data, "dataset") else None,
        "full_eval_s": round(eval_s, 2),
        "params": sum(p.numel() for p in model.parameters()),
        "valid_ndcg@10_after_1_epoch": float(result["ndcg@10"]),
        "anomaly_mode": torch.is_anomaly_enabled(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="T2Diff,SASRec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    extra = {"data_path": args.data_path} if args.data_path else {}
    machine = describe()
    with exit_on_usage_error():
        rows = [measure(name, args.dataset, extra) for name in args.models.split(",")]
    os.makedirs(args.out, exist_ok=True)
    command = command_line()
    stamp = datetime.date.today().isoformat()
    with open(os.path.join(args.out, f"epoch_time_{args.dataset}.json"), "w") as f:
        json.dump({"command": command, "machine": machine, "date": stamp, "rows": rows}, f, indent=1)
    keys = ["model", "train_batch_size", "train_batches", "train_epoch_s", "s_per_batch", "full_eval_s", "params"]
    lines = [
        f"# One training epoch and one full evaluation on {args.dataset}",
        "",
        f"Command: `{command}`; machine: {machine}; date: {stamp}; seed 2020; default configs.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ] + ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    with open(os.path.join(args.out, f"epoch_time_{args.dataset}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""SparCode's code usage over its first training steps, with the dead-code rule as now and with the EMA
count alone (as before issue 27: an unused code reached the threshold only after ~458 steps).

    python -m benchmarks.sparcode_codes --dataset=ml-100k --steps=60 [--key=value ...]

Same batches, seed and initial weights for both rules; one torch thread. Prints codes used per batch
(per codebook) and restarts at chosen steps, then SparCode.code_stats over the last 10 batches (eval mode).
"""

import argparse
import itertools

import torch

from benchmarks.cli import one_thread_config
from benchmarks.steps import train_step
from recbole_t2diff.cli import exit_on_usage_error
from recbole_t2diff.quick_start import build_model, prepare

SHOWN = (1, 5, 10, 20, 25, 30, 40, 50, 60, 80, 100, 200, 380)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--steps", type=int, default=60)
    with exit_on_usage_error():
        args, _, config = one_thread_config(parser, argv, model="SparCode")
    _, train, _, _ = prepare(config)
    batches = list(itertools.islice(iter(train), args.steps))
    for rule in ("now", "EMA count only"):
        torch.manual_seed(config["seed"])
        model = build_model(config, train)
        model.train()
        if rule != "now":
            model.quantizer.patience = lambda n_vectors: float("inf")
        optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
        used, restarts, update = [], [], model.quantizer.update

        def traced(tokens, codes, update=update, model=model, used=used, restarts=restarts):
            flat = codes.reshape(-1, model.quantizer.n_codebooks)
            used.append([len(torch.unique(flat[:, m])) for m in range(flat.size(1))])
            update(tokens, codes)
            restarts.append(int(model.quantizer.restarts))

        model.quantizer.update = traced
        for batch in batches:
            train_step(model, optimizer, batch)
        steps = [step for step in SHOWN if step <= len(used)]
        print(
            f"{rule}: codes used per batch (of {model.quantizer.codebook_size}, per codebook) at step "
            + ", ".join(f"{step}: {'/'.join(map(str, used[step - 1]))}" for step in steps)
        )
        print(f"{rule}: restarts so far at step " + ", ".join(f"{step}: {restarts[step - 1]}" for step in steps))
        stats = model.code_stats(batches[-10:])
        print(
            f"{rule}: code_stats over the last 10 batches: usage {'/'.join(f'{u:.1%}' for u in stats['usage'])}, "
            f"perplexity {'/'.join(f'{p:.1f}' for p in stats['perplexity'])}, {stats['distinct_keys']} distinct keys, "
            f"relative quantization error {stats['relative_error']:.3f}"
        )


if __name__ == "__main__":
    main()

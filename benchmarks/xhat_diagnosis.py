"""How much does a trained T2Diff's user vector use the generated item x̂? (docs/T2DIFF.md §9 diagnosis)

    python -m benchmarks.xhat_diagnosis --checkpoints=saved/T2Diff-X.pth,saved/T2Diff-Y.pth \
        [--trained_with="how they were trained"] [--out=results]

For each checkpoint (all on one dataset), scores the validation split (RecBole's full-sort evaluation) with x̂ taken from:
  - chain: the configured inference sampler, which never sees the target (what evaluation uses);
  - removed: no x̂ token in the session at all;
  - teacher s=K: the training-time one-step estimate from the true next item's drift noised at step K
    (it reads the target, so it is a diagnosis only: how much the tower would gain from a good x̂).
If "chain" ≈ "removed", diffusion adds nothing at inference; if "teacher" at small K is far above
"chain", the tower learned to lean on an x̂ the chain does not deliver: the train/inference gap.
Also reports the denoiser's error on the last drift row at each teacher step, relative to the drift's
norm (1.0 = it predicts ~0 whatever it is given). Writes <out>/xhat_<dataset>.md and .json.
"""

import argparse
import datetime
import json
import os
import statistics

import torch

from benchmarks.machine import command_line, describe
from recbole_t2diff.cli import exit_on_usage_error
from recbole_t2diff.quick_start import load_data_and_model, make_trainer


def teacher_forward(model, step, errors):
    """A forward whose x̂ is the one-step estimate from the target's drift noised at ``step``;
    appends the estimate's relative error on the last row to ``errors``."""

    def forward(interaction):
        history, mask = model.history(interaction)
        z0, condition, scale = model.diffusion_target(history, model.tokens(interaction[model.ITEM_ID]))
        s = torch.full((len(z0),), step, dtype=torch.long, device=z0.device)
        generator = model.eval_generator(z0.device)
        noise = torch.randn(z0.shape, generator=generator, device=z0.device)
        z0_hat = model.one_step_estimate(z0, condition, s, noise)
        errors.append(((z0_hat[:, -1] - z0[:, -1]).norm(dim=-1) / z0[:, -1].norm(dim=-1).clamp(min=1e-12)).mean().item())
        return model.user_vector(history, mask, model.generated_item(history, z0_hat[:, -1] * scale))

    return forward


def removed_forward(model):
    def forward(interaction):
        history, mask = model.history(interaction)
        return model.user_vector(history, mask, None)

    return forward


def diagnose(checkpoint, teacher_steps):
    config, model, _, _, valid, _ = load_data_and_model(checkpoint)
    if not model.denoises:
        raise SystemExit(f"error: {checkpoint} was trained without a denoiser (use_diffusion=False or x_hat_source=copy_last): it has no diffusion to diagnose")
    if model.x_hat_source == "next_item" and any(k <= model.n_steps for k in teacher_steps):
        raise SystemExit(
            f"error: {checkpoint} generates x̂ with x_hat_source=next_item: the teacher rows noise the drift U-Net's "
            "target; give --teacher_steps= (none) to compare the chain with no x̂"
        )
    trainer = make_trainer(config, model)
    label = (
        f"diffusion_scale={model.diffusion_scale}, diff_loss_positions={model.diff_loss_positions}, xhat_loss={model.xhat_loss}, train_xhat={model.train_xhat}"
    )
    modes = [("chain", f"{model.sampler}, {model.infer_steps} steps", model.forward, None), ("removed", "no x̂ token", removed_forward(model), None)]
    for k in (k for k in teacher_steps if k <= model.n_steps):
        errors = []
        modes.append((f"teacher s={k}", "reads the target", teacher_forward(model, k, errors), errors))
    records = []
    for name, detail, forward, errors in modes:
        model.forward = forward  # full_sort_predict calls self.forward
        result = trainer.evaluate(valid, load_best_model=False)
        records.append(
            {
                "checkpoint": checkpoint,
                "model": label,
                "x_hat": name,
                "detail": detail,
                "valid_ndcg@10": float(result["ndcg@10"]),
                "valid_recall@10": float(result["recall@10"]),
                "last_row_rel_error": round(statistics.mean(errors), 3) if errors else None,
            }
        )
        print(json.dumps(records[-1]), flush=True)
    return config["dataset"], records


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", required=True, help="comma-separated T2Diff checkpoints (with diffusion) of one dataset")
    parser.add_argument("--teacher_steps", default="1,10,25,50")
    parser.add_argument("--trained_with", default="", help="how the checkpoints were trained, recorded in the results")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    torch.autograd.set_detect_anomaly(False)
    records, datasets = [], set()
    with exit_on_usage_error():
        for checkpoint in args.checkpoints.split(","):
            dataset, mine = diagnose(checkpoint, [int(k) for k in args.teacher_steps.split(",") if k])
            datasets.add(dataset)
            records += mine
    if len(datasets) > 1:
        raise SystemExit(f"error: the checkpoints come from several datasets ({', '.join(sorted(datasets))}): diagnose one at a time")
    meta = {"command": command_line(), "machine": describe(), "date": datetime.date.today().isoformat(), "dataset": dataset, "trained_with": args.trained_with}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"xhat_{dataset}.json"), "w") as f:
        json.dump({**meta, "records": records}, f, indent=1)
    lines = [
        f"# Does the user vector use x̂? ({dataset}, validation split)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; date {meta['date']}.  ",
        f"Checkpoints trained with: {meta['trained_with'] or 'not stated'}.",
        "",
        "Teacher rows read the target (a diagnosis, never an evaluation); last-row error is |ẑ0 - z0| / |z0|",
        "on the drift row behind x̂ (1.0: the denoiser ignores its input and predicts ~0).",
        "",
        "| model | x̂ from | detail | valid NDCG@10 | valid Recall@10 | last-row error |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['x_hat']} | {r['detail']} | {r['valid_ndcg@10']:.4f} | {r['valid_recall@10']:.4f} | "
        f"{'' if r['last_row_rel_error'] is None else r['last_row_rel_error']} |"
        for r in records
    ]
    with open(os.path.join(args.out, f"xhat_{dataset}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

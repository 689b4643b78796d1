#!/usr/bin/env bash
# The diffusion study (does T2Diff's diffusion module carry signal?): every run behind results/diffusion/.
#
#   bash benchmarks/diffusion_study.sh [DATA_PATH] [JOBS]      # DATA_PATH holds amazon-beauty (default ../shared/data)
#
# Per dataset: the T2Diff whose denoiser can carry signal ("signal": next-item query slot, loss on the row
# behind x̂, FiLM step conditioning, rms units, x̂ cross-entropy, tower trained on the inference chain's x̂)
# against the controls that remove only the diffusion module (T2Diff-copyLast: x̂ := x_L; T2Diff-noDiff: no
# x̂), 3 seeds each; then, with seed 2020, one ablation per ingredient. Every run trains to early stopping
# (patience 5, at most 30 epochs) at the 2-level U-Net's tuned point (lr 0.002, batch 2048), without the time
# lag (time_lag: none, the default when these ran; amazon-beauty has no clock time anyway); last, the T2Diff
# of the paper's objective (every diffusion knob at its default) with all 3 seeds. Runs already in
# results/diffusion/<dataset>.csv are skipped, so an interrupted study resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
data_path=${1:-../shared/data}
jobs=${2:-2}
signal="diffusion_scale=rms,denoiser_next_slot=true,diff_loss_positions=last,step_conditioning=film"
common=(--jobs="$jobs" --out=results/diffusion --time_lag=none --unet_levels=2 --learning_rate=0.002 --train_batch_size=2048
        --stopping_step=5 --epochs=30)
for dataset in ml-100k amazon-beauty; do
  where=()
  [ "$dataset" != ml-100k ] && where=(--data_path="$data_path")
  python -m benchmarks.run_benchmark "--models=T2Diff[$signal,xhat_loss=ce,train_xhat=chain],T2Diff-copyLast,T2Diff-noDiff" \
    --dataset="$dataset" --seeds=2020,2021,2022 "${where[@]}" "${common[@]}"
  python -m benchmarks.run_benchmark "--models=T2Diff[$signal,xhat_loss=ce,train_xhat=one_step],T2Diff[$signal,xhat_loss=none,train_xhat=chain],T2Diff[xhat_loss=ce,train_xhat=chain],T2Diff" \
    --dataset="$dataset" --seeds=2020 "${where[@]}" "${common[@]}"
  python -m benchmarks.run_benchmark --models=T2Diff --dataset="$dataset" --seeds=2020,2021,2022 "${where[@]}" "${common[@]}"
done

#!/usr/bin/env bash
# Issue-4 experiment: on the embedded SmolLM2-135M (CPU, fp32) and the shipped ML-1M DMPO
# few-shot files, train SFT on the first N_TRAIN SFT prompts, then DPO, DMPO and S-DPO at
# K=3 on the first N_TRAIN dpo_ranking_3 users, and evaluate zero-shot, SFT and each loss on
# one fixed 200-pair subset (seed 0) of the 1000 eval pairs. Writes
# runs/ml1m-losses/summary.md and times.txt. N_TRAIN=100 uses all the few-shot data
# (about 3x the CPU time of the default 48).
set -euo pipefail
cd "$(dirname "$0")/.."
P=${PREFREC:-.venv/bin/prefrec}
OUT=${OUT:-runs/ml1m-losses}
N_EVAL=${N_EVAL:-200}
N_TRAIN=${N_TRAIN:-48}
mkdir -p "$OUT"
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s) - s )) s: $*" >> "$OUT/times.txt"; }

t $P eval --data ml1m-eval --limit "$N_EVAL" --out "$OUT/eval-zero-shot"
t $P sft --data ml1m-sft --limit "$N_TRAIN" --epochs 1 --batch-size 4 --out "$OUT/sft"
t $P eval --data ml1m-eval --limit "$N_EVAL" --adapter "$OUT/sft/adapter" --out "$OUT/eval-sft"
for loss in dpo dmpo sdpo; do
  t $P align --data ml1m-dpo-3 --sft "$OUT/sft/adapter" --loss "$loss" --negatives 3 \
    --limit "$N_TRAIN" --epochs 1 --batch-size 2 --beta 0.1 --ftx 1.0 --out "$OUT/$loss"
  t $P eval --data ml1m-eval --limit "$N_EVAL" --adapter "$OUT/$loss/adapter" --out "$OUT/eval-$loss"
done
$P summarize "$OUT"/eval-zero-shot "$OUT"/eval-sft "$OUT"/eval-dpo "$OUT"/eval-dmpo "$OUT"/eval-sdpo \
  --metrics pairwise_accuracy,dmpo_auc,candidate_roc_auc,pairwise_accuracy_positive_listed_first,pairwise_accuracy_positive_listed_second \
  --output "$OUT/summary.md"

#!/usr/bin/env bash
# The README's main job on the embedded SmolLM2-135M and the shipped ML-1M DMPO data:
# data audit, zero-shot eval, SFT, DMPO and S-DPO at K=3, evaluation of every model, and a
# summary table. Sized to finish in about 10-15 minutes on 2 CPU cores; scale it up with
# N_EVAL, SFT_N, N_GROUPS (the results at this size are a smoke test, not a benchmark).
# Re-running continues where a killed run stopped (training and eval both resume).
set -euo pipefail
cd "$(dirname "$0")/.."
P=${PREFREC:-.venv/bin/prefrec}
OUT=${OUT:-runs/quickstart}
N_EVAL=${N_EVAL:-40}      # eval pairs (seeded subset of the 1000)
SFT_N=${SFT_N:-16}        # SFT prompts
N_GROUPS=${N_GROUPS:-8}   # preference groups (users) of K=3 negatives (not GROUPS: a bash builtin)
start=$(date +%s)
mkdir -p "$OUT"

$P data audit ml1m-sft ml1m-dpo-3 ml1m-eval --markdown "$OUT/audit.md" >/dev/null
echo "audit: $OUT/audit.md"
$P eval --data ml1m-eval --limit "$N_EVAL" --out "$OUT/eval-zero-shot"
$P sft --data ml1m-sft --limit "$SFT_N" --epochs 1 --batch-size 4 --out "$OUT/sft"
$P eval --data ml1m-eval --limit "$N_EVAL" --adapter "$OUT/sft/adapter" --out "$OUT/eval-sft"
for loss in dmpo sdpo; do
  $P align --data ml1m-dpo-3 --sft "$OUT/sft/adapter" --loss "$loss" --negatives 3 \
    --limit "$N_GROUPS" --epochs 1 --batch-size 2 --out "$OUT/$loss"
  $P eval --data ml1m-eval --limit "$N_EVAL" --adapter "$OUT/$loss/adapter" --out "$OUT/eval-$loss"
done
$P summarize "$OUT"/eval-zero-shot "$OUT"/eval-sft "$OUT"/eval-dmpo "$OUT"/eval-sdpo \
  --metrics pairwise_accuracy,dmpo_auc,pairwise_accuracy_positive_listed_first,pairwise_accuracy_positive_listed_second \
  --output "$OUT/summary.md"
echo "quickstart finished in $(( $(date +%s) - start )) s; summary: $OUT/summary.md"

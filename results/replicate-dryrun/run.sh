#!/usr/bin/env bash
# The paper's protocol, dry (issue 16): ViT-B-32-quickgelu with random weights, a synthetic
# ImageNet-shaped folder (the 1000 WordNet ids, 16 noise images each for training, 1 for validation),
# two optimiser steps of every method at 16 shots and eps 1/255, then its evaluation (16 validation
# images, PGD-2), each method in a fresh process so that its peak memory is its own.
#
#   bash results/replicate-dryrun/run.sh            # about 30 min on 2 CPU cores
#
# The text tower of 1000 labels is checkpointed (--grad-checkpointing): without it the prompts'
# backward keeps about 35 GB of activations (see the README). Evaluation uses one template instead of
# ImageNet's 80 (--eval-templates): 80 text passes of 1000 labels per hand-prompted model take most of
# an hour on 2 cores and measure nothing a dry run needs. Accuracy on noise means nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-/tmp/synthetic-imagenet}
OUT=${OUT:-runs/replicate-dryrun}     # git-ignored: random weights (600 MB), checkpoints
HERE=results/replicate-dryrun
METHODS=(zeroshot apt advvp advmaple fap capt)
[ -d "$DATA/train" ] || .venv/bin/capt synthetic-imagenet "$DATA" --no-progress
common=(--model ViT-B-32-quickgelu --pretrained none --shots 16 --eps 1/255 --seeds 1 --steps 0 --epochs 1
        --max-steps 2 --train-data "imagenet:$DATA:train" --eval-data "imagenet:$DATA:val" --eval-samples 16
        --pgd-steps 2 --headline-eps --ablations --eval-templates "a photo of a {}." --grad-checkpointing
        --workers 1 --no-progress --output "$OUT")
for method in "${METHODS[@]}"; do
  started=$(date +%s)
  HF_HUB_OFFLINE=1 .venv/bin/capt replicate "${common[@]}" --methods "$method"
  echo "$method: $(( $(date +%s) - started )) s in its process"
done
# Every cell is recorded now: one more call writes the tables of all of them together.
HF_HUB_OFFLINE=1 .venv/bin/capt replicate "${common[@]}" --methods "${METHODS[@]}"
cp "$OUT/results.md" "$OUT/results.json" "$HERE/"
.venv/bin/capt info --json > "$HERE/machine.json"

#!/usr/bin/env bash
# The robust default against zero-shot: which part gives what. Run from the repository root:
#   bash results/robust-default/evaluate.sh            (writes results/robust-default/<part>/<set>/)
# Parts: zero-shot CLIP, the robust backbone alone (zero-shot on it), CAPT prompts alone (on the original
# CLIP: the previous default), both (the served default). Same seeded images for every part.
set -euo pipefail
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CAPT=".venv/bin/python -m capt.cli"
OUT=results/robust-default
ORIGINAL=models/capt-toy/weights.safetensors
ROBUST=models/capt-toy/robust/weights.safetensors
N=${N:-200}            # images per set for PGD-100
N_AA=${N_AA:-100}      # images for AutoAttack (standard, at the served eps)
part() {  # part NAME ARGS...: PGD-100 at 1, 2, 4 /255 on the pair test split and the held-out pairs, PGD-10 cross-dataset
  local name=$1; shift
  $CAPT eval "$@" --data toyworld_pairs::test --data toyworld_pairs::heldout --eps 1/255 2/255 4/255 --steps 100 \
    --max-samples "$N" --no-progress --output "$OUT/$name/pgd100"
  cross "$name" "$@"
  clean "$name" "$@"
}
clean() {  # clean NAME ARGS...: clean accuracy on every image of the splits (2000 each; 200 give +-5.5 points)
  local name=$1; shift
  $CAPT eval "$@" --data toyworld_pairs::test --data toyworld_pairs::heldout --eps --no-progress --output "$OUT/$name/clean"
}
cross() {  # cross NAME ARGS...: PGD-10 at 1/255 and 2/255 on the cross-dataset sets (Fashion-MNIST: Debian's dataset-fashion-mnist)
  local name=$1; shift
  $CAPT eval "$@" --data toyworld_shapes::heldout --data toyworld_colours::heldout --data toyworld_counts::test \
    --data fashion_mnist --eps 1/255 2/255 --steps 10 --max-samples "$N" --no-progress --output "$OUT/$name/cross"
}
autoattack() {
  local name=$1; shift
  $CAPT eval "$@" --data toyworld_pairs::test --data toyworld_pairs::heldout --eps 2/255 --attack autoattack \
    --max-samples "$N_AA" --no-progress --output "$OUT/$name/autoattack"
}
zeroshot=(--model capt-toy-vit --method zeroshot --pretrained "$ORIGINAL")
backbone=(--model capt-toy-vit --method zeroshot --pretrained "$ROBUST")
# Prompts alone: CAPT at 2/255 on the original CLIP, as trained for the learning curves (not committed:
#   capt train --config results/learning-curves/configs/capt.yaml), run with PROMPTS_ONLY=results/learning-curves/runs/capt
prompts=(--checkpoint "${PROMPTS_ONLY:-results/learning-curves/runs/capt}" --pretrained "$ORIGINAL")
both=(--checkpoint models/capt-toy/prompts)
# bash evaluate.sh [PART ...] (default: every part, then AutoAttack on zero-shot and the served default)
for p in "${@:-zeroshot backbone prompts both aa-zeroshot aa-both}"; do
  for q in $p; do
    case $q in
      aa-zeroshot) autoattack zeroshot "${zeroshot[@]}" ;;
      aa-both) autoattack both "${both[@]}" ;;
      clean-*) eval "args=(\"\${${q#clean-}[@]}\")"; clean "${q#clean-}" "${args[@]}" ;;
      cross-*) eval "args=(\"\${${q#cross-}[@]}\")"; cross "${q#cross-}" "${args[@]}" ;;
      *) eval "args=(\"\${$q[@]}\")"; part "$q" "${args[@]}" ;;
    esac
  done
done

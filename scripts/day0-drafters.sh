#!/usr/bin/env bash
# Makes README's day-0 drafter for the default model in its four self-distillation rounds (day0 ->
# day0d -> day0e -> day0f), one `tandem train-drafter` after another. A round whose drafter is
# already written is skipped, and a round cut off part way goes on from its last saved state (see
# `tandem train-drafter --checkpoint-every`), so running it again finishes the chain. Both cores for
# ~72 min on a 2-vCPU Zen 5, ~2.8 h on a 2-vCPU Xeon (docs/speculative-decoding.md).
#
# usage: scripts/day0-drafters.sh [OUT_DIR]
#        OUT_DIR default: drafters; TANDEM: the binary (default target/release/tandem);
#        DAY0_SCALE=N divides every round's prompts and steps by N (a quick check of the chain).
set -euo pipefail

out="${1:-drafters}"
tandem="${TANDEM:-target/release/tandem}"
scale="${DAY0_SCALE:-1}"
mkdir -p "$out"

round() { # name prompts steps [more train-drafter arguments]
  local name=$1 prompts=$(($2 / scale)) steps=$(($3 / scale))
  shift 3
  if [ -f "$out/$name/model.safetensors" ]; then
    echo "$out/$name: already made, skipped"
    return
  fi
  echo "$out/$name: $prompts answers, $steps steps ($(date -u +%H:%M) UTC)"
  "$tandem" train-drafter --self-distill "$prompts" --steps "$steps" "$@" --out "$out/$name"
}

round day0 1600 1600 --eval-served $((20 / scale))
round day0d 2400 4000 --drafter "$out/day0"
round day0e 4800 6000 --drafter "$out/day0d"
round day0f 4800 6000 --drafter "$out/day0e" --seed 1
echo "done: serve it with --spec eagle:$out/day0f"

#!/usr/bin/env bash
# GPU check: one prepared script, no download. Builds full-size random-weight models from the
# configs (SD3.5-Large DiT, SD3 VAE, Qwen2.5-VL-3B from configs/models/full.yaml; the four ViT-L
# scorers from configs/scorers.yaml) and measures one 1024x1024 40-step image (ours vs the bare
# diffusers pipeline), caption tokens per second, Score_i2i pairs per second (ours vs the per-pair
# loop), one step of each GRPO stage and an SFT step, with the peak GPU memory of each, and the
# stage-3 step of bench/memory_plan.py measured against its plan. Every benchmark shares the one
# full-size checkpoint built at the start; results.json is rewritten after each, so a run cut short
# keeps what it measured. Writes bench/results/gpu/results.{json,md} and prints the table.
# Budget: --budget_s 420 by default (what would not finish in time is skipped and listed), under 8
# minutes on one H100 with the checkpoint build.
#
#   bash bench/gpu_check.sh            # on a GPU machine, after the README's install
#   bash bench/gpu_check.sh --small    # tiny models on the CPU (what the tests run)
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1
profile=gpu
args=()
for a in "$@"; do
  case "$a" in
    --small) profile=small ;;
    *) args+=("$a") ;;
  esac
done
if [ "$profile" = gpu ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: no CUDA GPU visible to $PYTHON; use --small to run the CPU version" >&2
  exit 2
fi
budget=()
if [ "$profile" = gpu ] && [[ " ${args[*]+"${args[*]}"} " != *" --budget_s "* ]]; then budget=(--budget_s 420); fi
exec "$PYTHON" bench/run_all.py --profile "$profile" --out "bench/results/$profile" "${budget[@]+"${budget[@]}"}" "${args[@]+"${args[@]}"}"

#!/usr/bin/env bash
# GPU benchmark (issue 15): the Trainer vs a hand-written loop, eager and compiled, then the real loader.
#
#   bash scripts/bench_gpu.sh            # on a GPU: resnet50, 224 px, batch 128, bf16, channels_last (< 8 min)
#   bash scripts/bench_gpu.sh --cpu      # no GPU: the CPU fallback (a tiny model) checks the script runs
#
# Every figure is a line `NAME: VALUE (target OP X)`; extra arguments go to scripts/bench_gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no GPU visible to torch: running the CPU fallback" >&2
  set -- --cpu "$@"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 480 python scripts/bench_gpu.py "$@"

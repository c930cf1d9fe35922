#!/usr/bin/env bash
# DDP on GPUs (issue 13): the distributed tests with NCCL, then training throughput per GPU.
#
#   bash scripts/ddp_gpu_check.sh            # on a GPU machine: 2 processes with 2+ GPUs, else 1
#   DEVICE=cpu bash scripts/ddp_gpu_check.sh # the same steps on CPU with gloo (a dry run of the script)
#   SKIP_TESTS=1 ...                         # throughput only; OUT=DIR keeps the runs there
#
# Prints one line per figure as `NAME: VALUE`, last the throughput per GPU. Needs the project
# installed with its test extras (pip install -e '.[dev]'); nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"

if [[ "$DEVICE" == cuda ]]; then
  GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
  [[ "$GPUS" -ge 1 ]] || { echo "no GPU visible to torch: run with DEVICE=cpu for the dry run" >&2; exit 2; }
  NPROC=$(( GPUS >= 2 ? 2 : 1 ))
  python -c "import torch.distributed as d; assert d.is_nccl_available(), 'torch was built without NCCL'"
  BATCH=64; EPOCHS=3; MODEL=(model=resnet50 model.pretrained=false); WORKERS=4
else
  GPUS=0; NPROC=2; BATCH=16; EPOCHS=2; MODEL=(model=resnet18 model.name=test_resnet model.pretrained=false)
  WORKERS=0
fi
echo "device: $DEVICE  gpus: $GPUS  processes: $NPROC  out: $OUT"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl',
  torch.cuda.nccl.version() if torch.cuda.is_available() else None)"

# 1. The DDP tests (NCCL on GPUs; those needing more GPUs than there are skip, saying so).
[[ "${SKIP_TESTS:-0}" == 1 ]] || FT_TEST_DEVICE="$DEVICE" python -m pytest -q -rs tests/test_distributed.py 2>&1 | tail -n 15

# 2. Throughput: the demo set (generated, offline) enlarged, bf16 + channels_last on GPUs, one run of
#    NPROC processes; images/s of the training epochs after the first (warm-up), from metrics.jsonl.
RUN="$OUT/throughput"
python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m finetune "${MODEL[@]}" \
  data.demo.train_per_class=400 data.demo.val_per_class=20 data.cache_dir="$OUT/demo" data.img_size=128 \
  data.batch_size="$BATCH" data.num_workers="$WORKERS" trainer.device="$DEVICE" trainer.max_epochs="$EPOCHS" \
  trainer.precision="$([[ $DEVICE == cuda ]] && echo bf16 || echo 32)" trainer.channels_last=true \
  logger.progress_bar=false hydra.run.dir="$RUN" > "$OUT/throughput.log" 2>&1 \
  || { tail -n 40 "$OUT/throughput.log"; exit 1; }
python - "$RUN" "$NPROC" <<'EOF'
import json, sys
from pathlib import Path
run, nproc = Path(sys.argv[1]), int(sys.argv[2])
train = sum(json.loads((run / "split.json").read_text())["counts"]["train"].values())
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
print(f"ddp_run_status: {json.loads((run / 'summary.json').read_text())['status']}")
warm = records[1:] or records  # the first epoch starts workers and warms up kernels
seconds = sorted(r["seconds"] for r in warm)[len(warm) // 2]
print(f"ddp_epoch_seconds_median: {seconds:.2f} ({train} training images, train + validation)")
print(f"ddp_train_images_per_s_per_gpu: {train / seconds / nproc:.1f} ({nproc} processes; includes validation time)")
EOF

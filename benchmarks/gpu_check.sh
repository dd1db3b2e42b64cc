#!/usr/bin/env bash
# The GPU-only checks, as one short script for a lent GPU machine (CUDA torch already installed there).
# Usage (from the repository root):  bash benchmarks/gpu_check.sh [OUT_DIR]
#   1. tests/test_gpu.py: SyncBN conversion on a 1-process NCCL group, autocast bf16/fp16, and
#      `soco-det pretrain` on CUDA with bf16, fp16 + GradScaler, and the device photometric path;
#   2. benchmarks/train_step.py: img/s and peak memory of a full-size SoCo_FPN R50 step (both RoI
#      modes, fp32 and bf16);
#   3. benchmarks/views.py: the device photometric throughput on CUDA;
#   4. benchmarks/transfer.py --preset gpu when TRANSFER=1 (about 8 minutes on one H100).
# pycocotools is not on the GPU image: put its wheel in .whl/ (see the device notes) and it is installed.
set -u
OUT=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(0))"

echo "== 1. GPU tests"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -25

echo "== 2. training step, SoCo_FPN R50, batch 64"
python3 benchmarks/train_step.py --recipe soco_fpn_r50_100ep --batch-size 64 --device cuda --steps 10 --warmup 3 \
  --json "$OUT/train_step.json" 2>&1 | tail -12

echo "== 3. views, device photometric on CUDA"
python3 - <<'PY' 2>&1 | tail -5
from soco_det.synth import generate
from soco_det.proposals import compute_store
p = generate("/tmp/gpu_views", n_unlabeled=32, n_train=0, n_val=0, short_side=384)
compute_store(p["images"] / "unlabeled", "/tmp/gpu_views/proposals")
PY
python3 benchmarks/views.py --images /tmp/gpu_views/images/unlabeled --proposals /tmp/gpu_views/proposals \
  --recipe soco_fpn --samples 128 --json "$OUT/views.json" 2>&1 | tail -12

if [ "${TRANSFER:-0}" = 1 ]; then
  echo "== 4. transfer benchmark (gpu preset)"
  python3 benchmarks/transfer.py --preset gpu --out /tmp/transfer --device cuda 2>&1 | tail -30
  cp /tmp/transfer/transfer.json /tmp/transfer/transfer.png "$OUT/" 2>/dev/null
fi

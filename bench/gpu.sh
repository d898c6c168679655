#!/usr/bin/env bash
# Everything a lent GPU should check, in one call (see ../shared/GPU.md):
#   versions, install, ceilings + kernel benchmarks, GPU correctness tests, end-to-end decode.
# Results land in $OUT (default bench/results/gpu) as JSON and markdown, to be committed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export LOCKSTEP_TRITON_ON_GPU=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

{
  nvidia-smi
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python -c "import cupy; print('cupy', cupy.__version__)" || echo "cupy: not importable"
} 2>&1 | tee "$OUT/env.txt"

pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3

status=0
python bench/kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels.log" || status=1
python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15 || status=1
python bench/gpu_e2e.py --out "$OUT" 2>&1 | tee "$OUT/gpu_e2e.log" || status=1
# Latency determinism on the GPU (issue 5: p99/p50 <= 1.15): decode graphs, Triton kernels.
python bench/latency.py --model synthetic:llama-3.2-1b --out "$OUT/latency_gpu.json" 2>&1 | tee "$OUT/latency.log" || status=1

echo; echo "== summary =="; cat "$OUT/kernels.md" 2>/dev/null; tail -8 "$OUT/gpu_e2e.log" 2>/dev/null
tail -7 "$OUT/latency.log" 2>/dev/null
exit $status

#!/usr/bin/env bash
# Everything a lent GPU should check (see ../shared/GPU.md), as one or two device calls:
#   bash bench/gpu.sh          # both parts (about 10-15 minutes on an H100)
#   bash bench/gpu.sh kernels  # part 1: versions, install, ceilings + kernel benchmarks, GPU tests,
#                              #         end-to-end decode against the roofline, host time per step
#                              #         (overlap), latency determinism
#   bash bench/gpu.sh bench    # part 2: `lockstep bench offline` on synthetic 1B and 8B (bf16, 4-bit)
#                              #         and a `lockstep bench serve` sweep against `lockstep serve`
# Results land in $OUT (default bench/results/gpu) as JSON, markdown and PNG, to be committed.
# DRY_RUN=1 bash bench/gpu.sh bench runs part 2's commands on the CPU with a tiny synthetic model
# and tiny sizes (tests/test_bench_scripts.py), so no device minute goes on a typo; part 1's
# scripts have their own --dry-run.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export LOCKSTEP_TRITON_ON_GPU=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

DRY_RUN=${DRY_RUN:-0}
LOCKSTEP=${LOCKSTEP:-lockstep}
PYTHON=${PYTHON:-python}
if [[ $DRY_RUN == 1 ]]; then
  MODELS=(synthetic:tiny); OFFLINE=(--batch-sizes 1 2 --prompt-tokens 8 --new-tokens 3); KV=64MiB
  SWEEP=(--num-prompts 2 --prompt-tokens 8 --output-tokens 3 --concurrency 1 --request-rate inf)
  WEIGHTS=(dense)
else
  {
    nvidia-smi
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    python -c "import cupy; print('cupy', cupy.__version__)" || echo "cupy: not importable"
  } 2>&1 | tee "$OUT/env.txt"
  pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
  MODELS=(synthetic:llama-3.2-1b synthetic:llama-3.1-8b); OFFLINE=(); KV=16GiB
  SWEEP=(--num-prompts 256 --concurrency 1 4 16 64 --request-rate 8 32)
  WEIGHTS=(dense quantized)
fi
status=0

if [[ $PART == all || $PART == kernels ]]; then
  python bench/kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels.log" || status=1
  python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15 || status=1
  python bench/gpu_e2e.py --out "$OUT" 2>&1 | tee "$OUT/gpu_e2e.log" || status=1
  # Host time a GPU waits for per decode step of 64, overlap on and off (issue 5: <= 50 us).
  python bench/overlap.py --out "$OUT/overlap.json" 2>&1 | tee "$OUT/overlap.log" || status=1
  # Latency determinism on the GPU (issue 5: p99/p50 <= 1.15): decode graphs, Triton kernels.
  python bench/latency.py --model synthetic:llama-3.2-1b --out "$OUT/latency_gpu.json" 2>&1 | tee "$OUT/latency.log" || status=1
fi

if [[ $PART == all || $PART == bench ]]; then
  # Offline tok/s by batch size against the roofline: bf16 weights, then GGUF Q4_1 read in the kernel.
  for model in "${MODELS[@]}"; do
    for weights in "${WEIGHTS[@]}"; do
      name=${model#synthetic:}-$weights
      spec=$model; [[ $weights == quantized ]] && spec=$model:q4_1
      $LOCKSTEP bench offline --model "$spec" --weights "$weights" --kv-memory $KV "${OFFLINE[@]}" --no-progress \
        --out "$OUT/offline-$name" 2>&1 | tee "$OUT/offline-$name.log" | tail -12 || status=1
    done
  done
  # Serving: closed-loop concurrency and Poisson arrivals against a real server on this GPU.
  $LOCKSTEP serve --model "${MODELS[0]}" --kv-memory $KV --max-num-seqs 64 --port 8011 --grpc-port 0 \
    >"$OUT/serve-server.log" 2>&1 &
  server=$!
  for _ in $(seq 240); do $PYTHON -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8011/health')" 2>/dev/null && break; sleep 1; done
  $LOCKSTEP bench serve --url http://127.0.0.1:8011 "${SWEEP[@]}" \
    --no-progress --out "$OUT/serve-${MODELS[0]#synthetic:}" 2>&1 | tee "$OUT/serve.log" | tail -12 || status=1
  kill -INT $server; wait $server || true
fi

echo; echo "== summary =="; cat "$OUT/kernels.md" 2>/dev/null; tail -8 "$OUT/gpu_e2e.log" 2>/dev/null
tail -5 "$OUT/overlap.log" 2>/dev/null; tail -7 "$OUT/latency.log" 2>/dev/null
for f in "$OUT"/offline-*/offline.md "$OUT"/serve-*/serve.md; do [[ -f $f ]] && { echo "-- $f"; tail -n +4 "$f"; }; done
exit $status

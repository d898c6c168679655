#!/usr/bin/env bash
# `make bench`: every `lockstep bench` mode on this CPU with the default model, 2 threads, results
# (JSON, markdown, PNG) under $OUT (default bench/results/cpu) to be committed. Run it on a quiet
# machine: other load moves every figure. About 10 minutes on the 2-core dev machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/cpu}
LOCKSTEP=${LOCKSTEP:-.venv/bin/lockstep}
PYTHON=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
status=0
uptime

$LOCKSTEP bench compare --threads "$THREADS" --out "$OUT" || status=1
$LOCKSTEP bench offline --threads "$THREADS" --batch-sizes 1 2 4 8 16 32 64 --out "$OUT" || status=1
$LOCKSTEP bench search --threads "$THREADS" --out "$OUT" || status=1
$LOCKSTEP bench voice --threads "$THREADS" --out "$OUT" || status=1

# The serve sweep runs against a real `lockstep serve` on a spare port.
$LOCKSTEP serve --threads "$THREADS" --port 8011 --grpc-port 0 >"$OUT/serve-server.log" 2>&1 &
server=$!
for _ in $(seq 120); do $PYTHON -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8011/health')" 2>/dev/null && break; sleep 0.5; done
$LOCKSTEP bench serve --url http://127.0.0.1:8011 --num-prompts 64 --concurrency 1 4 16 --request-rate 4 16 \
  --out "$OUT" || status=1
kill -INT $server; wait $server
uptime
exit $status

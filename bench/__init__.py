"""lockstep's benchmarks, installed as `lockstep.bench` and run by `lockstep bench MODE`.

Modes (bench/cli.py): offline (tok/s and latency by batch size, against the memory-bandwidth
roofline), serve (a load generator for any OpenAI-compatible server), compare (peers on the same
prompts and threads in one run), search (forked branches) and voice (gRPC sessions). Every mode
writes JSON, a markdown table and PNG plots (bench/report.py, bench/plots.py).

The scripts beside them (kernels.py, latency.py, gpu.sh, ...) are kernel and runtime benchmarks
run directly: `.venv/bin/python bench/kernels.py`.
"""

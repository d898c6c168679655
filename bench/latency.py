"""Latency determinism: one interactive stream's inter-token latency, alone and beside 32 batch streams.

Issue 5's figure. In one run, on one engine (default model on the CPU, or any --model):
  1. alone: one interactive request decodes --new-tokens tokens; its inter-token latencies
     (ITL) are the gaps between its tokens;
  2. under load: 32 batch requests (latency_class "batch", prompts of 20-120 tokens, 96-256
     new tokens) run in a closed loop, a finished one replaced at once by a fresh one; once all
     32 are decoding, the same interactive request runs again with an ITL target of
     --itl-target-ratio times its alone p50 (or --itl-target-ms).
It reports p50 / p99 / max ITL of the interactive stream in both phases, p99/p50, the under-load
p50 against alone, the batch streams' token rate meanwhile, the step programs that ran and the
cost model's predicted step time against the measured one. Issue 5's targets: p99/p50 <= 1.5 on
the CPU (1.15 on a GPU), under-load p50 <= 1.3x alone. The interactive request is greedy with
EOS ignored, so both phases produce the same tokens (checked: batch invariance under load).

    .venv/bin/python bench/latency.py                      # default model, 2 threads
    .venv/bin/python bench/latency.py --dry-run            # tiny synthetic model, seconds
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lockstep.bench.report import git_commit
from lockstep.bench.stats import summary
from lockstep.runtime.config import EngineConfig
from lockstep.runtime.engine import Engine
from lockstep.runtime.loader import load_model
from lockstep.runtime.sampling_params import SamplingParams

PROMPT = ("You are a voice assistant on a phone call. The caller asks: can you explain, in a few "
          "friendly sentences, how a refrigerator keeps food cold, and why it hums at night?")


def percentiles(gaps_s: list[float]) -> dict:
    s = summary(gaps_s)
    return {"n": s["n"], "p50_ms": s["p50"], "p99_ms": s["p99"], "max_ms": s["max"], "mean_ms": s["mean"],
            "p99_over_p50": s["p99"] / s["p50"]}


class StepLog:
    """Wraps engine.step to record each step's program, predicted and measured time."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.rows = engine, []
        self._step = engine.step
        engine.step = self.step

    def step(self):
        t0 = time.perf_counter()
        out = self._step()
        last = self.engine.last_step
        if last is not None:
            self.rows.append((last.program.name, last.predicted_s, time.perf_counter() - t0))
        return out


def run_interactive(engine: Engine, prompt_ids: list[int], params: SamplingParams, batch: "BatchLoad | None"):
    seq = engine.add_request(prompt_ids, params)
    times: list[float] = []
    while not seq.finished:
        for out in engine.step():
            if out.seq_id == seq.seq_id and out.token_id is not None:
                times.append(time.perf_counter())
            elif batch is not None:
                batch.on_output(out)
        if batch is not None:
            batch.refill()
    return seq, times


class BatchLoad:
    """A closed loop of batch requests: each one that finishes is replaced by a fresh one."""

    def __init__(self, engine: Engine, streams: int, vocab: int, rng: random.Random, short: bool) -> None:
        self.engine, self.rng, self.vocab, self.short = engine, rng, vocab, short
        self.live: set[int] = set()
        self.tokens = 0
        self.streams = streams
        self.refill()

    def _request(self) -> None:
        lo, hi = (4, 12) if self.short else (20, 120)
        prompt = [self.rng.randrange(100, self.vocab - 100) for _ in range(self.rng.randint(lo, hi))]
        new = self.rng.randint(12, 24) if self.short else self.rng.randint(96, 256)
        seq = self.engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True,
                                                             latency_class="batch"))
        self.live.add(seq.seq_id)

    def refill(self) -> None:
        while len(self.live) < self.streams:
            self._request()

    def on_output(self, out) -> None:
        if out.seq_id in self.live:
            self.tokens += out.token_id is not None
            if out.finished:
                self.live.discard(out.seq_id)

    def all_decoding(self) -> bool:
        return all(self.engine.seqs[i].num_uncomputed <= 1 and self.engine.seqs[i].handle is not None
                   for i in self.live if i in self.engine.seqs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, default=32, help="batch streams under load (default: 32)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens the interactive stream makes")
    ap.add_argument("--itl-target-ratio", type=float, default=1.25,
                    help="the interactive request's ITL target, as a multiple of its alone p50")
    ap.add_argument("--itl-target-ms", type=float, default=None, help="an absolute ITL target instead")
    ap.add_argument("--out", default="bench/results/latency_cpu.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny synthetic model and counts; writes nothing")
    args = ap.parse_args()
    if args.dry_run:
        args.model, args.streams, args.new_tokens = "synthetic:tiny", 4, 12

    model = load_model(args.model, quiet=True)
    engine = Engine(model, EngineConfig(threads=args.threads, max_num_seqs=64, kv_memory_bytes=2 << 30,
                                        calibrate="auto"))
    steps = StepLog(engine)
    if args.dry_run or str(model.source).startswith("synthetic:"):
        prompt_ids = list(range(5, 25 if args.dry_run else 65))  # random weights: any ids will do
    else:
        prompt_ids = engine.encode_chat([{"role": "user", "content": PROMPT}])
    greedy = dict(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)

    run_interactive(engine, prompt_ids, SamplingParams(**{**greedy, "max_tokens": 4}), None)  # warm-up
    alone_seq, alone_times = run_interactive(engine, prompt_ids, SamplingParams(**greedy), None)
    alone = percentiles(np.diff(alone_times).tolist())
    target_ms = args.itl_target_ms or args.itl_target_ratio * alone["p50_ms"]

    load = BatchLoad(engine, args.streams, model.config.vocab_size, random.Random(0), args.dry_run)
    while not load.all_decoding():
        for out in engine.step():
            load.on_output(out)
        load.refill()
    steps.rows.clear()
    tokens_before, t0 = load.tokens, time.perf_counter()
    loaded_seq, loaded_times = run_interactive(engine, prompt_ids, SamplingParams(**greedy, itl_target_ms=target_ms),
                                               load)
    elapsed = time.perf_counter() - t0
    loaded = percentiles(np.diff(loaded_times).tolist())
    same = loaded_seq.output_ids == alone_seq.output_ids

    programs = Counter(name for name, _, _ in steps.rows)
    predicted = [(p, m) for _, p, m in steps.rows if p is not None]
    ratio = float(np.median([m / p for p, m in predicted])) if predicted else None
    result = {
        "bench": "latency", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(), "device": str(engine.device), "backend": engine.backend,
        "model": str(model.source), "threads": args.threads, "batch_streams": args.streams,
        "new_tokens": args.new_tokens, "itl_target_ms": target_ms,
        "alone": alone, "under_load": loaded,
        "under_load_p50_over_alone_p50": loaded["p50_ms"] / alone["p50_ms"],
        "batch_tokens_per_s_meanwhile": (load.tokens - tokens_before) / elapsed,
        "same_tokens_alone_and_under_load": same,
        "step_programs_under_load": dict(programs.most_common()),
        "measured_over_predicted_step_time_median": ratio,
        "cost_table": engine.costs.source if engine.costs else "off",
    }
    print("| stream | p50 ITL ms | p99 ITL ms | max ms | p99/p50 |\n|---|---|---|---|---|")
    for name, r in (("alone", alone), (f"beside {args.streams} batch streams", loaded)):
        print(f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} | {r['p99_over_p50']:.2f} |")
    print(f"under-load p50 / alone p50: {result['under_load_p50_over_alone_p50']:.2f} (target <= 1.3); "
          f"ITL target {target_ms:.2f} ms; batch streams meanwhile {result['batch_tokens_per_s_meanwhile']:.1f} tok/s")
    print(f"step programs under load: {dict(programs.most_common(6))}; measured/predicted step time "
          f"{'n/a' if ratio is None else f'{ratio:.2f}'}; same tokens alone and under load: {same}")
    if not same:
        print("ERROR: the interactive stream's tokens changed under load", file=sys.stderr)
        return 1
    if not args.dry_run:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`lockstep bench offline`: prefill and decode throughput and latency by batch size, in-process,
set against the memory-bandwidth roofline measured in the same run (bench/roofline.py).

For each batch size B, B requests with different random prompts (`--prompt-tokens` token ids
drawn from the vocabulary with a fixed seed, like vLLM's random dataset) are submitted at once,
greedy, EOS ignored so each makes exactly `--new-tokens` tokens, all `latency_class="batch"`
(throughput work: an interactive request's ITL target would hold prompt chunks back to keep its
steps short). From each token's arrival time:
  * TTFT: submission to a request's first token (prefill in chunks, queueing included);
  * prefill tok/s: B × prompt tokens ÷ (submission → the last first token);
  * decode tok/s: tokens made after every request had its first token ÷ that window's length
    (pure decode steps of batch B);
  * ITL: gaps between a request's consecutive tokens in that window;
  * roofline: the most decode tok/s the bandwidth allows, B ÷ (bytes of one step ÷ bandwidth),
    the bytes being the weights once plus B sequences' KV at the window's mean context.
"""
from __future__ import annotations

import argparse
import statistics
import sys

HELP = "Prefill and decode tok/s, TTFT and per-token latency by batch size, against the bandwidth roofline."
EXAMPLES = """examples:
  lockstep bench offline                                   # default model, batch 1..64
  lockstep bench offline --batch-sizes 1 8 --new-tokens 32 --threads 2
  lockstep bench offline --model synthetic:llama-3.2-1b --device cuda --kv-memory 8GiB
  lockstep bench offline --cpu-kernels torch --out results/torch-gemm
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lockstep.runtime.cli import add_model_args

    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], metavar="B",
                        help="batch sizes to run (default: 1 2 4 8 16 32 64)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default: 128)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens each request generates (default: 64)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per batch size; figures are medians (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    add_model_args(parser)


def random_prompts(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    """Token ids drawn uniformly, skipping the low ids where tokenizers keep special tokens."""
    import numpy as np

    low = 1000 if vocab_size > 2000 else 1
    rng = np.random.default_rng(seed)
    return rng.integers(low, vocab_size, size=(count, length)).tolist()


def run_batch(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Runs the prompts together once; returns the per-request timings of one run."""
    from lockstep.runtime.sampling_params import SamplingParams

    # An offline job is batch work (runtime/scheduler.py): full prefill chunks and every decode in
    # each step, not the step-time limit an interactive stream's latency target would impose.
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, latency_class="batch")
    seqs = [engine.add_request(p, params) for p in prompts]
    submitted = min(s.arrival_time for s in seqs)
    times = engine.run_until_done(seqs)
    firsts = [times[s.seq_id][0] for s in seqs]
    prefill_done, end = max(firsts), max(times[s.seq_id][-1] for s in seqs)
    decode_tokens = sum(t > prefill_done for s in seqs for t in times[s.seq_id])
    itl = [b - a for s in seqs for a, b in zip(times[s.seq_id], times[s.seq_id][1:]) if a >= prefill_done]
    made = sum(len(times[s.seq_id]) for s in seqs)
    if made != len(seqs) * new_tokens:
        raise RuntimeError(f"expected {len(seqs) * new_tokens} tokens, the engine made {made}")
    return {"ttft_s": [f - s.arrival_time for f, s in zip(firsts, seqs)],
            "prefill_tok_s": len(prompts) * len(prompts[0]) / (prefill_done - submitted),
            "decode_tok_s": decode_tokens / (end - prefill_done) if end > prefill_done else None,
            "itl_s": itl}


def engine_threads(engine) -> int:
    """The threads the engine's forward runs on (lockstep's native kernels keep their own pool)."""
    import torch

    from lockstep import _core

    return _core.get_num_threads() if engine.runner_is_native else torch.get_num_threads()


def run(args: argparse.Namespace) -> int:
    from lockstep.runtime.cli import engine_from_args

    from . import plots, roofline
    from .report import markdown_table, write_report
    from .stats import summary

    sizes = sorted(set(args.batch_sizes))
    if min(sizes) < 1 or args.prompt_tokens < 1 or args.new_tokens < 2 or args.repeats < 1:
        print("lockstep bench offline: batch sizes and --prompt-tokens must be >= 1, --new-tokens >= 2, "
              "--repeats >= 1", file=sys.stderr)
        return 2
    if max(sizes) > args.max_num_seqs:
        print(f"lockstep bench offline: batch {max(sizes)} is over --max-num-seqs {args.max_num_seqs}; "
              "raise --max-num-seqs", file=sys.stderr)
        return 2
    engine, model = engine_from_args(args)
    need = max(sizes) * -(-(args.prompt_tokens + args.new_tokens) // engine.kv.block_size)
    if need > engine.kv.num_blocks:
        print(f"lockstep bench offline: batch {max(sizes)} of {args.prompt_tokens}+{args.new_tokens} tokens needs "
              f"{need} KV blocks, the arena holds {engine.kv.num_blocks}; raise --kv-memory", file=sys.stderr)
        return 2
    device = engine.device
    threads = engine_threads(engine)
    print(f"measuring memory bandwidth on {device} ...", file=sys.stderr)
    bandwidth = roofline.measure_bandwidth(device, args.threads)
    weights = roofline.weight_bytes_read(engine)
    mean_context = args.prompt_tokens + args.new_tokens / 2

    from tqdm import tqdm

    rows, itl_by_batch = [], {}
    engine.generate(random_prompts(model.config.vocab_size, 1, args.prompt_tokens, args.seed + 999),
                    None)  # warm-up: first-touch of weights and workspaces
    for batch in tqdm(sizes, desc="batch sizes", disable=args.no_progress, file=sys.stderr):
        runs = []
        for repeat in range(args.repeats):
            prompts = random_prompts(model.config.vocab_size, batch, args.prompt_tokens,
                                     args.seed + 1000 * repeat + batch)
            runs.append(run_batch(engine, prompts, args.new_tokens))
        decode = statistics.median(r["decode_tok_s"] for r in runs)
        limit = roofline.roofline_tok_s(engine, batch, mean_context, bandwidth)
        ttft, itl = summary(t for r in runs for t in r["ttft_s"]), summary(t for r in runs for t in r["itl_s"])
        itl_by_batch[f"batch {batch}"] = [1000 * t for r in runs for t in r["itl_s"]]
        rows.append({"batch": batch, "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in runs),
                     "decode_tok_s": decode, "ttft_ms": ttft, "itl_ms": itl,
                     "roofline_decode_tok_s": limit, "pct_of_roofline": 100 * decode / limit,
                     "bytes_per_step": roofline.decode_bytes(engine, batch, mean_context)["total"]})

    results = {"model": str(getattr(model, "source", args.model)), "backend": engine.backend, "device": str(device),
               "threads": threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "bandwidth_GBps": bandwidth, "weight_bytes_per_step": weights,
               "kv_bytes_per_token": roofline.kv_bytes_per_token(engine),
               "bytes_counted": "weights as the matmuls read them (GGUF blocks or floats) + K/V of every sequence "
                                "at the decode window's mean context; bandwidth = copy, read + write",
               "rows": rows}
    table = markdown_table(
        ["batch", "prefill tok/s", "decode tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
         "roofline tok/s", "% of roofline"],
        [[r["batch"], r["prefill_tok_s"], r["decode_tok_s"], r["ttft_ms"]["p50"], r["ttft_ms"]["p99"],
          r["itl_ms"]["p50"], r["itl_ms"]["p99"], r["roofline_decode_tok_s"], r["pct_of_roofline"]] for r in rows])
    note = (f"\n{results['model']}, backend {engine.backend} on {device}, {args.prompt_tokens}-token prompts, "
            f"{args.new_tokens} new tokens, greedy. Bandwidth {bandwidth:.1f} GB/s (copy, read + write); a decode step "
            f"reads {weights / 1e6:.1f} MB of weights plus {results['kv_bytes_per_token'] / 1e3:.1f} kB of K/V per "
            "token of context per sequence.\n")
    paths = write_report(args.out, "offline", results, table + note)
    xs = [r["batch"] for r in rows]
    plots.rate_plot(args.out / "offline_tok_s.png",
                    {"decode": (xs, [r["decode_tok_s"] for r in rows]),
                     "decode roofline": (xs, [r["roofline_decode_tok_s"] for r in rows]),
                     "prefill": (xs, [r["prefill_tok_s"] for r in rows])},
                    "lockstep offline throughput", "batch size", "tokens/s")
    plots.roofline_bars(args.out / "offline_roofline.png", {f"batch {r['batch']}": r["pct_of_roofline"] for r in rows},
                        "decode as % of the bandwidth roofline")
    plots.latency_cdf(args.out / "offline_itl_cdf.png", itl_by_batch, "inter-token latency by batch size")
    print(table + note)
    print(f"wrote {paths['json']}, {paths['markdown']} and plots in {args.out}", file=sys.stderr)
    return 0

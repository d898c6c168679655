"""`lockstep bench search`: multi-branch search throughput, forked branches against independent
requests, in-process on one model.

For each branch count B, one prompt of `--prompt-tokens` token ids (drawn with a fixed seed) is
prefilled once as a prefill-only request, then forked into B branches (B-1 engine.fork calls'
worth in one call, plus the parent; the forks share the prompt's KV blocks by refcount). Every
branch samples `--new-tokens` tokens at `--temperature` (seeded; each fork samples on its own
branch number, so the branches differ), EOS ignored. Measured from the fork to the last branch's
end: branches/s, generated tok/s, step times, the fork call alone (µs), and the KV blocks in use
at the peak (read right after each step's KV reservation, when a step holds the most).

The peer, in the same run: B independent requests of the same prompt on a second engine over the
same model with the prefix cache off, so each prefills its own copy; timed from submission to the
last request's end. Its branches/s against the forked figure says what forking buys.

With `--prune K`, once every branch has half its tokens, the K branches with the highest
cumulative logprob are kept and the others cancelled (both variants); the cancel calls are timed.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

HELP = "Branches/s of forked multi-branch search by branch count, against independent requests."
EXAMPLES = """examples:
  lockstep bench search                                    # default model, 1..64 branches
  lockstep bench search --branches 1 4 16 --new-tokens 16 --threads 2
  lockstep bench search --prompt-tokens 1024 --prune 4 --out results/search-prune
  lockstep bench search --model synthetic:llama-3.2-1b --device cuda --kv-memory 8GiB
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lockstep.runtime.cli import add_model_args

    parser.add_argument("--branches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], metavar="B",
                        help="branch counts to run (default: 1 2 4 8 16 32 64)")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="length of the shared prompt (default: 256)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens each branch generates (default: 32)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature of the branches (default: 0.8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt and of sampling (default: 0)")
    parser.add_argument("--prune", type=int, default=None, metavar="K",
                        help="after half the tokens keep the K branches with the highest cumulative logprob "
                             "and cancel the rest (default: no pruning)")
    add_model_args(parser)


def make_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    """One random prompt, drawn as the offline mode draws its prompts."""
    from .offline import random_prompts

    return random_prompts(vocab_size, 1, length, seed)[0]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class _PeakBlocks:
    """Blocks in use right after each step's KV reservation (the step's own peak: a sequence that
    finishes in a step gives its blocks back before the step returns), by wrapping the engine's
    scheduler.schedule on this instance."""

    def __init__(self, engine) -> None:
        self.alloc = engine.kv.allocator
        self.peak = 0
        schedule = engine.scheduler.schedule

        def probed():
            step = schedule()
            self.peak = max(self.peak, self.in_use())
            return step
        engine.scheduler.schedule = probed

    def in_use(self) -> int:
        return self.alloc.num_blocks - self.alloc.num_free_blocks()

    def reset(self) -> None:
        self.peak = self.in_use()


def _drive(engine, seqs: list, new_tokens: int, prune: int | None) -> dict:
    """Steps until every sequence ends; counts tokens per sequence and times each step. With prune,
    cancels all but the best `prune` sequences once each has new_tokens // 2 tokens."""
    tokens = {s.seq_id: 0 for s in seqs}
    pending = set(tokens)
    step_s: list[float] = []
    cancel_s: list[float] = []
    pruned_at = None
    half = new_tokens // 2
    while pending:
        t0 = time.perf_counter()
        outs = engine.step()
        step_s.append(time.perf_counter() - t0)
        for out in outs:
            if out.seq_id in tokens:
                if out.token_id is not None:
                    tokens[out.seq_id] += 1
                if out.finished:
                    pending.discard(out.seq_id)
        if prune is not None and pruned_at is None and len(seqs) > prune \
                and all(tokens[s.seq_id] >= half for s in seqs):
            pruned_at = half
            ranked = sorted(seqs, key=lambda s: sum(s.output_logprobs), reverse=True)
            for seq in ranked[prune:]:
                t0 = time.perf_counter()
                engine.cancel(seq.seq_id)
                cancel_s.append(time.perf_counter() - t0)
    return {"tokens": tokens, "step_s": step_s, "cancel_s": cancel_s, "pruned_at": pruned_at}


def _end_state(engine) -> dict:
    alloc = engine.kv.allocator
    return {"live_sequences_after": len(engine.seqs), "kv_sequences_after": alloc.num_sequences(),
            "kv_blocks_in_use_after": alloc.num_blocks - alloc.num_free_blocks()}


def _figures(b: int, elapsed: float, driven: dict, peak: int, summary) -> dict:
    generated = sum(driven["tokens"].values())
    out = {"elapsed_s": elapsed, "branches_per_s": b / elapsed, "generated_tokens": generated,
           "tokens_per_s": generated / elapsed, "steps": len(driven["step_s"]),
           "mean_step_ms": 1000 * sum(driven["step_s"]) / len(driven["step_s"]),
           "step_ms": summary(driven["step_s"]), "peak_kv_blocks": peak}
    if driven["pruned_at"] is not None:
        out["pruned"] = {"at_token": driven["pruned_at"], "cancelled": len(driven["cancel_s"]),
                         "cancel_call_us": [1e6 * t for t in driven["cancel_s"]]}
    return out


def run_forked(engine, probe: _PeakBlocks, prompt: list[int], b: int, params, prune: int | None, summary) -> dict:
    """One prompt prefilled once, forked into b branches, all decoded to the end."""
    engine.kv.allocator.clear_prefix_cache()  # every B prefills the prompt itself
    t0 = time.perf_counter()
    parent = engine.add_request(prompt, params, generate=False)
    while parent.num_uncomputed:
        engine.step()
    prefill_s = time.perf_counter() - t0
    probe.reset()
    start = time.perf_counter()
    children = engine.fork(parent.seq_id, b - 1) if b > 1 else []
    fork_s = time.perf_counter() - start
    seqs = [parent, *children]
    for seq in seqs:
        engine.commit(seq.seq_id)
    driven = _drive(engine, seqs, params.max_tokens, prune)
    elapsed = time.perf_counter() - start
    return {"prefill_ms": 1000 * prefill_s, "fork_call_us": 1e6 * fork_s if b > 1 else None,
            **_figures(b, elapsed, driven, probe.peak, summary),
            "elapsed_with_prefill_s": prefill_s + elapsed,
            "branches_per_s_with_prefill": b / (prefill_s + elapsed), **_end_state(engine)}


def run_independent(engine, probe: _PeakBlocks, prompt: list[int], b: int, params, prune: int | None,
                    summary) -> dict:
    """b requests of the same prompt, each prefilling its own copy (the engine has no prefix cache)."""
    probe.reset()
    start = time.perf_counter()
    seqs = [engine.add_request(prompt, dataclasses.replace(params, seed=params.seed + i)) for i in range(b)]
    driven = _drive(engine, seqs, params.max_tokens, prune)
    elapsed = time.perf_counter() - start
    return {**_figures(b, elapsed, driven, probe.peak, summary), **_end_state(engine)}


def run(args: argparse.Namespace) -> int:
    from lockstep.runtime.cli import engine_from_args
    from lockstep.runtime.engine import Engine
    from lockstep.runtime.sampling_params import SamplingParams

    from . import plots
    from .report import markdown_table, write_report
    from .stats import summary

    sizes = sorted(set(args.branches))
    if min(sizes) < 1 or args.prompt_tokens < 2 or args.new_tokens < 1:
        print("lockstep bench search: --branches must be >= 1, --prompt-tokens >= 2, --new-tokens >= 1",
              file=sys.stderr)
        return 2
    if args.prune is not None and (args.prune < 1 or args.new_tokens < 2):
        print("lockstep bench search: --prune K needs K >= 1 and --new-tokens >= 2", file=sys.stderr)
        return 2
    if max(sizes) > args.max_num_seqs:
        print(f"lockstep bench search: {max(sizes)} branches is over --max-num-seqs {args.max_num_seqs}; "
              "raise --max-num-seqs", file=sys.stderr)
        return 2
    try:
        # Search branches are batch work (runtime/scheduler.py): every branch in each step, whole
        # prompt chunks, no interactive step-time limit.
        params = SamplingParams(max_tokens=args.new_tokens, temperature=args.temperature, seed=args.seed,
                                ignore_eos=True, latency_class="batch")
    except Exception as exc:  # noqa: BLE001 - a bad flag value: one line, no traceback
        print(f"lockstep bench search: {exc}", file=sys.stderr)
        return 2
    engine, model = engine_from_args(args)
    bs = engine.kv.block_size
    total = args.prompt_tokens + args.new_tokens
    if total > engine.max_model_len:
        print(f"lockstep bench search: {args.prompt_tokens}+{args.new_tokens} tokens is over the context of "
              f"{engine.max_model_len}", file=sys.stderr)
        return 2
    need = max(sizes) * ceil_div(total, bs)
    if need > engine.kv.num_blocks:
        print(f"lockstep bench search: {max(sizes)} independent requests of {total} tokens need {need} KV blocks, "
              f"the arena holds {engine.kv.num_blocks}; raise --kv-memory", file=sys.stderr)
        return 2
    # The peer: the same model and settings, no prefix cache, so each request prefills its own copy.
    peer = Engine(model, dataclasses.replace(engine.config, prefix_cache=False))
    probes = {"forked": _PeakBlocks(engine), "independent": _PeakBlocks(peer)}
    prompt = make_prompt(model.config.vocab_size, args.prompt_tokens, args.seed)
    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for e in (engine, peer):  # warm-up: first touch of weights and workspaces
        e.generate([make_prompt(model.config.vocab_size, 16, args.seed + 1)], warm)
    engine.kv.allocator.clear_prefix_cache()

    from tqdm import tqdm

    rows = []
    for b in tqdm(sizes, desc="branch counts", disable=args.no_progress, file=sys.stderr):
        forked = run_forked(engine, probes["forked"], prompt, b, params, args.prune, summary)
        independent = run_independent(peer, probes["independent"], prompt, b, params, args.prune, summary)
        # What b unshared copies hold at the end: each its prompt and all but its last token's K/V.
        unshared = b * ceil_div(args.prompt_tokens + args.new_tokens - 1, bs)
        rows.append({"branches": b, "forked": forked, "independent": independent,
                     "unshared_kv_blocks": unshared,
                     "kv_saving": 1 - forked["peak_kv_blocks"] / unshared,
                     # like for like: the independent requests' time includes their prefills
                     "speedup": independent["elapsed_s"] / forked["elapsed_with_prefill_s"],
                     "speedup_from_fork": independent["elapsed_s"] / forked["elapsed_s"]})

    results = {"model": str(getattr(model, "source", args.model)), "backend": engine.backend,
               "device": str(engine.device), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "temperature": args.temperature, "seed": args.seed, "prune": args.prune, "block_size": bs,
               "kv_blocks": engine.kv.num_blocks,
               "method": "forked: prompt prefilled once (prefill-only request), engine.fork into B branches, "
                         "timed from the fork call to the last branch's end (and with the prefill added); "
                         "independent: B requests of the "
                         "same prompt on an engine without prefix cache, timed from submission to the last end. "
                         "Peak KV blocks read right after each step's reservation.",
               "rows": rows}
    table = markdown_table(
        ["B", "prefill ms", "fork µs", "fork→done s", "br/s from fork", "br/s incl. prefill", "tok/s",
         "step ms", "indep. s", "indep. br/s", "indep. step ms", "speedup", "peak KV forked", "peak KV indep.",
         "unshared KV", "KV saving"],
        [[r["branches"], r["forked"]["prefill_ms"], r["forked"]["fork_call_us"], r["forked"]["elapsed_s"],
          r["forked"]["branches_per_s"], r["forked"]["branches_per_s_with_prefill"], r["forked"]["tokens_per_s"],
          r["forked"]["mean_step_ms"], r["independent"]["elapsed_s"], r["independent"]["branches_per_s"],
          r["independent"]["mean_step_ms"], r["speedup"], r["forked"]["peak_kv_blocks"],
          r["independent"]["peak_kv_blocks"], r["unshared_kv_blocks"], f"{100 * r['kv_saving']:.0f}%"]
         for r in rows])
    note = (f"\n{results['model']}, backend {engine.backend} on {engine.device}; a {args.prompt_tokens}-token prompt, "
            f"{args.new_tokens} new tokens per branch at temperature {args.temperature}, EOS ignored"
            f"{f', pruned to {args.prune} branches at half way' if args.prune else ''}. KV blocks hold {bs} tokens. "
            "Independent: the same prompt as B separate requests with the prefix cache off. Speedup: independent "
            "time over forked time with its one prefill (br/s from fork leaves the prefill out). Peak KV: blocks in "
            "use at the fullest step; unshared: what B private copies of prompt and output would hold.\n")
    paths = write_report(args.out, "search", results, table + note)
    xs = [r["branches"] for r in rows]
    plots.rate_plot(args.out / "search_branches_per_s.png",
                    {"forked, from the fork": (xs, [r["forked"]["branches_per_s"] for r in rows]),
                     "forked, with its one prefill": (xs, [r["forked"]["branches_per_s_with_prefill"] for r in rows]),
                     "independent requests": (xs, [r["independent"]["branches_per_s"] for r in rows])},
                    "multi-branch search throughput", "branches", "branches/s")
    plots.rate_plot(args.out / "search_step_ms.png",
                    {"forked": (xs, [r["forked"]["mean_step_ms"] for r in rows]),
                     "independent": (xs, [r["independent"]["mean_step_ms"] for r in rows])},
                    "mean engine step time", "branches", "ms per step")
    print(table + note)
    print(f"wrote {paths['json']}, {paths['markdown']} and plots in {args.out}", file=sys.stderr)
    return 0

"""Micro-benchmark of the KV block allocator (lockstep._core.BlockAllocator), called from Python.

Prints ns per call for the sequence primitives on a sequence of --blocks blocks. Times include
the Python -> C++ call; the `call overhead` row (a trivial getter) shows that floor. fork and
free-of-a-fork should not grow with --blocks; free-of-an-owner and block_table should.

    python bench/allocator.py
    python bench/allocator.py --blocks 10 1000 100000 --json out/allocator.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

from lockstep._core import BlockAllocator


def ns_per_op(run_batch: Callable[[], tuple[int, int]], repeats: int) -> float:
    """Median over `repeats` batches of ns per op; run_batch returns (elapsed ns, ops)."""
    samples = []
    for _ in range(repeats):
        elapsed, ops = run_batch()
        samples.append(elapsed / ops)
    return statistics.median(samples)


def timed_calls(call: Callable[[], object], n: int) -> Callable[[], tuple[int, int]]:
    """A batch that makes `call` n times back to back."""
    def run() -> tuple[int, int]:
        start = time.perf_counter_ns()
        for _ in range(n):
            call()
        return time.perf_counter_ns() - start, n
    return run


def bench_length(num_blocks: int, block_size: int, iters: int, repeats: int) -> dict[str, float]:
    # Owners freed per batch in "free (owner)": bounded so the arena stays a few MB.
    owners = max(1, min(50, 2_000_000 // num_blocks))
    arena = num_blocks * (owners + 1) + repeats * (iters // block_size + 2) + 8
    a = BlockAllocator(arena, block_size)
    seq = a.new_sequence()
    a.append(seq, num_blocks * block_size)
    results: dict[str, float] = {}

    results["call overhead"] = ns_per_op(timed_calls(a.num_free_blocks, iters), repeats)

    forks: list[int] = []
    results["fork"] = ns_per_op(timed_calls(lambda: forks.append(a.fork(seq)), iters), repeats)
    # Each fork only drops its hold on the shared tail: O(1) like fork itself.
    results["free (fork)"] = ns_per_op(timed_calls(lambda: a.free(forks.pop()), iters), repeats)

    # The tail block is owned outright, so this is the no-copy path: a fresh block every
    # block_size calls, otherwise a count bump.
    results["append 1 token"] = ns_per_op(timed_calls(lambda: a.append(seq, 1), iters), repeats)
    a.truncate(seq, num_blocks * block_size)

    results["block_table"] = ns_per_op(
        timed_calls(lambda: a.block_table(seq), max(1, iters // 100)), repeats)

    def free_owners() -> tuple[int, int]:
        handles = [a.new_sequence() for _ in range(owners)]
        for h in handles:  # setup, outside the timed span
            a.append(h, num_blocks * block_size)
        start = time.perf_counter_ns()
        for h in handles:
            a.free(h)
        return time.perf_counter_ns() - start, owners
    results["free (owner)"] = ns_per_op(free_owners, repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1000],
                        help="length of the measured sequence, in blocks (default: 1000)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block (default: 16)")
    parser.add_argument("--iters", type=int, default=20_000, help="calls per batch (default: 20000)")
    parser.add_argument("--repeats", type=int, default=5, help="batches; the median is shown (default: 5)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    rows = {n: bench_length(n, args.block_size, args.iters, args.repeats) for n in args.blocks}
    ops = list(next(iter(rows.values())))
    print(f"BlockAllocator, block_size={args.block_size}, {platform.processor() or platform.machine()},"
          f" Python {platform.python_version()}")
    print(f"{'ns/op':<16}" + "".join(f"{f'{n} blocks':>16}" for n in args.blocks))
    for op in ops:
        print(f"{op:<16}" + "".join(f"{rows[n][op]:>16.0f}" for n in args.blocks))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "benchmark": "block_allocator",
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": platform.machine(), "processor": platform.processor(),
                "python": platform.python_version(),
                "block_size": args.block_size,
                "ns_per_op": {str(n): r for n, r in rows.items()},
            }, f, indent=2)


if __name__ == "__main__":
    main()

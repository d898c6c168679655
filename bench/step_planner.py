"""Step planner (lockstep._core.StepPlanner) against the same filling written in numpy.

A decode step of 64 sequences (block_size 16) at a context of 512, 2048 and 4096 tokens: each
sequence's whole block table, one token, position and slot, padded to the bucket. The
sequences grew one block at a time side by side, so each table's blocks are spread over the
arena as in serving. Times include the Python -> C++ call and its argument checks (the
`empty plan` row: a step of padding only shows that floor); the numpy peer reads each table
with BlockAllocator.block_table and writes the same arrays with vectorized numpy. Both are
checked to write the same thing before anything is timed.

Figures: microseconds per step (median over many steps), and nanoseconds per block-table entry
written, since reading a table off the allocator's chain is the part that grows with context.

    OMP_NUM_THREADS=1 .venv/bin/python bench/step_planner.py            # ~10 s
    OMP_NUM_THREADS=1 .venv/bin/python bench/step_planner.py --dry-run  # tiny, checks the script
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lockstep._core import BlockAllocator, StepPlanner

from lockstep.bench.report import cpu_name, run_stamp, save_json as save_result  # noqa: E402

BLOCK_SIZE = 16


class DecodeStep:
    """num_seqs sequences of `context` tokens, the arrays of their bucket, and one decode step's inputs."""

    def __init__(self, num_seqs: int, context: int) -> None:
        blocks = -(-context // BLOCK_SIZE)
        self.allocator = a = BlockAllocator(num_seqs * blocks, BLOCK_SIZE)
        self.handles = [a.new_sequence() for _ in range(num_seqs)]
        for grown in range(0, context, BLOCK_SIZE):
            for h in self.handles:
                a.append(h, min(BLOCK_SIZE, context - grown))
        self.arrays = {
            "token_ids": np.zeros(num_seqs, np.int64), "positions": np.zeros(num_seqs, np.int64),
            "slot_mapping": np.zeros(num_seqs, np.int64),
            "block_tables": np.zeros((num_seqs, blocks), np.int32),
            "seq_lens": np.zeros(num_seqs, np.int32), "query_start": np.zeros(num_seqs + 1, np.int32),
        }
        self.null_block = a.num_blocks
        self.planner = StepPlanner(a, *self.arrays.values(), self.null_block)
        self.inputs = (np.array(self.handles, np.int64), np.full(num_seqs, context - 1, np.int64),
                       np.ones(num_seqs, np.int64), np.arange(num_seqs, dtype=np.int64) + 1000)
        self.num_entries = num_seqs * blocks

    def plan(self) -> None:
        n = len(self.handles)
        self.planner.plan(*self.inputs, n, n)

    def plan_numpy(self) -> None:
        """The same step in numpy: what the engine would do without the planner."""
        handles, starts, counts, tokens = self.inputs
        arr, bs, row = self.arrays, BLOCK_SIZE, 0
        for s, h in enumerate(handles.tolist()):
            start, end = int(starts[s]), int(starts[s] + counts[s])
            table = self.allocator.block_table(h)[:-(-end // bs)]
            arr["block_tables"][s, :len(table)] = table
            pos = np.arange(start, end)
            rows = slice(row, row + end - start)
            arr["positions"][rows] = pos
            arr["slot_mapping"][rows] = arr["block_tables"][s, pos // bs].astype(np.int64) * bs + pos % bs
            arr["query_start"][s], arr["seq_lens"][s] = row, end
            row += end - start
        arr["token_ids"][:row] = tokens
        arr["query_start"][len(handles)] = row

    def check_same(self) -> None:
        for array in self.arrays.values():
            array.fill(-7)
        self.plan()
        ours = {name: array.copy() for name, array in self.arrays.items()}
        for array in self.arrays.values():
            array.fill(-7)
        self.plan_numpy()
        for name, array in self.arrays.items():
            assert np.array_equal(array, ours[name]), f"{name}: planner and numpy differ"


def median_us(call: Callable[[], object], calls: int, samples: int) -> float:
    """Median over `samples` batches of `calls` back-to-back calls, in microseconds per call."""
    call()  # warm
    times = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        for _ in range(calls):
            call()
        times.append((time.perf_counter_ns() - start) / calls / 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes and few repeats, no JSON: checks the script")
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "step_planner.json")
    args = parser.parse_args()
    dry = args.dry_run
    seqs, contexts = (4, [20, 70]) if dry else (args.seqs, args.contexts)
    calls, samples = (2, 3) if dry else (50, 101)

    rows = []
    for context in contexts:
        step = DecodeStep(seqs, context)
        step.check_same()
        ours = median_us(step.plan, calls, samples)
        peer = median_us(step.plan_numpy, max(1, calls // 10), samples)
        rows.append({"seqs": seqs, "context": context, "block_size": BLOCK_SIZE,
                     "block_table_entries": step.num_entries, "plan_us": ours, "numpy_us": peer,
                     "ns_per_entry": 1e3 * ours / step.num_entries, "speedup": peer / ours})
    padding = DecodeStep(1, BLOCK_SIZE)
    empty = (np.zeros(0, np.int64),) * 4
    floor = median_us(lambda: padding.planner.plan(*empty, 1, 1), calls, samples)

    print("| seqs | context | table entries | plan us | ns/entry | numpy us | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seqs']} | {r['context']} | {r['block_table_entries']} | {r['plan_us']:.1f} | "
              f"{r['ns_per_entry']:.2f} | {r['numpy_us']:.0f} | {r['speedup']:.0f}x |")
    print(f"empty plan (call, argument checks, one padded sequence): {floor:.2f} us")

    result = {
        **run_stamp(),
        "machine": {"cpu": cpu_name(), "python": platform.python_version(), "numpy": np.__version__},
        "empty_plan_us": floor,
        "rows": rows,
    }
    if not dry:
        save_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

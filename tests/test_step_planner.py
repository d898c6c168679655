"""The step planner (lockstep._core.StepPlanner, cpp/step_planner.cpp) against a plain Python
reference built from BlockAllocator.block_table, on random batches: decode rows and prefill
chunks side by side, forks that share blocks, padded sequences and padded rows.

Every array is poisoned with -7 before a plan, so the check covers what the planner must
write and what it must leave alone.
"""
from __future__ import annotations

import gc
import random
import re

import numpy as np
import pytest

from lockstep._core import BlockAllocator, StepPlanner

POISON = -7
NAMES = ("token_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start")


def step_arrays(max_tokens: int, max_seqs: int, max_blocks: int) -> dict[str, np.ndarray]:
    return {
        "token_ids": np.full(max_tokens, POISON, np.int64),
        "positions": np.full(max_tokens, POISON, np.int64),
        "slot_mapping": np.full(max_tokens, POISON, np.int64),
        "block_tables": np.full((max_seqs, max_blocks), POISON, np.int32),
        "seq_lens": np.full(max_seqs, POISON, np.int32),
        "query_start": np.full(max_seqs + 1, POISON, np.int32),
    }


def reference_plan(a: BlockAllocator, arrays: dict[str, np.ndarray], handles, starts, counts, tokens,
                   num_seqs_padded: int, num_tokens_padded: int, null_block: int) -> dict[str, np.ndarray]:
    """What plan() must leave in `arrays`, written the obvious way."""
    out = {name: array.copy() for name, array in arrays.items()}
    bs, row = a.block_size, 0
    for s, (h, start, count) in enumerate(zip(handles, starts, counts)):
        end = start + count
        table = a.block_table(h)[:-(-end // bs)]
        out["block_tables"][s, :len(table)] = table
        out["query_start"][s], out["seq_lens"][s] = row, end
        for pos in range(start, end):
            out["token_ids"][row] = tokens[row]
            out["positions"][row] = pos
            out["slot_mapping"][row] = table[pos // bs] * bs + pos % bs
            row += 1
    for s in range(len(handles), num_seqs_padded):
        out["query_start"][s], out["seq_lens"][s], out["block_tables"][s, 0] = row, 1, null_block
        row += 1
    out["query_start"][num_seqs_padded] = row
    out["token_ids"][len(tokens):num_tokens_padded] = 0
    out["positions"][len(tokens):num_tokens_padded] = 0
    out["slot_mapping"][len(tokens):num_tokens_padded] = null_block * bs
    return out


def assert_arrays_equal(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], where: str) -> None:
    for name in NAMES:
        differ = got[name] != expected[name]
        if differ.any():
            i = tuple(int(v) for v in np.argwhere(differ)[0])
            raise AssertionError(f"{where}: {name} differs in {int(differ.sum())} entries; first at {i}: "
                                 f"got {got[name][i]}, expected {expected[name][i]}")


def random_sequences(rng: random.Random, a: BlockAllocator, count: int) -> list[int]:
    """Live sequences of mixed lengths; some are forks that share blocks, some forks extended past a
    copy-on-write."""
    handles: list[int] = []
    for _ in range(count):
        if handles and rng.random() < 0.4:
            h = a.fork(rng.choice(handles))
            a.truncate(h, rng.randint(1, a.num_tokens(h)))
        else:
            h = a.new_sequence()
        a.append(h, rng.randint(1, 70))
        handles.append(h)
    return handles


def random_batch(rng: random.Random, a: BlockAllocator, handles: list[int], max_seqs: int, max_tokens: int):
    """A step: each chosen sequence decodes its last token or prefills a chunk ending anywhere."""
    chosen = rng.sample(handles, rng.randint(0, min(len(handles), max_seqs)))
    starts, counts = [], []
    for h in chosen:
        n = a.num_tokens(h)
        if rng.random() < 0.5:
            starts.append(n - 1)
            counts.append(1)
        else:
            start = rng.randint(0, n - 1)
            starts.append(start)
            counts.append(rng.randint(1, n - start))
    while sum(counts) + max_seqs - len(chosen) > max_tokens:  # keep room for any padding
        chosen.pop(), starts.pop(), counts.pop()
    tokens = [rng.randrange(50_000) for _ in range(sum(counts))]
    num_seqs_padded = rng.randint(len(chosen), max_seqs)
    num_tokens_padded = rng.randint(sum(counts) + num_seqs_padded - len(chosen), max_tokens)
    return chosen, starts, counts, tokens, num_seqs_padded, num_tokens_padded


def i64(values) -> np.ndarray:
    return np.array(values, np.int64).reshape(-1)


@pytest.mark.parametrize("seed, block_size", [(0, 16), (1, 1), (2, 5), (3, 16)])
def test_plan_matches_reference_on_random_batches(seed: int, block_size: int) -> None:
    rng = random.Random(seed)
    a = BlockAllocator(4096, block_size)
    handles = random_sequences(rng, a, 40)
    max_seqs, max_tokens = 24, 600
    max_blocks = -(-max(a.num_tokens(h) for h in handles) // block_size) + 2
    arrays = step_arrays(max_tokens, max_seqs, max_blocks)
    null_block = a.num_blocks + seed  # any block past the allocator's
    planner = StepPlanner(a, *arrays.values(), null_block)
    for step in range(60):
        batch = random_batch(rng, a, handles, max_seqs, max_tokens)
        for array in arrays.values():
            array.fill(POISON)
        expected = reference_plan(a, arrays, *batch, null_block)
        chosen, starts, counts, tokens, *padded = batch
        planner.plan(i64(chosen), i64(starts), i64(counts), i64(tokens), *padded)
        assert_arrays_equal(arrays, expected, f"seed={seed} step={step}")


def test_forks_share_block_table_entries_and_padding_points_at_the_null_block() -> None:
    a = BlockAllocator(8, 4)
    parent = a.new_sequence()
    a.append(parent, 6)  # [0, 1]
    child = a.fork(parent)
    a.append(child, 1)  # copy-on-write: [0, 2]
    arrays = step_arrays(8, 4, 3)
    StepPlanner(a, *arrays.values(), 8).plan(i64([parent, child]), i64([5, 6]), i64([1, 1]), i64([11, 12]), 3, 6)
    assert arrays["block_tables"].tolist() == [[0, 1, POISON], [0, 2, POISON], [8, POISON, POISON],
                                               [POISON] * 3]
    assert arrays["query_start"].tolist() == [0, 1, 2, 3, POISON]
    assert arrays["seq_lens"].tolist() == [6, 7, 1, POISON]
    assert arrays["token_ids"].tolist() == [11, 12, 0, 0, 0, 0, POISON, POISON]
    assert arrays["positions"].tolist() == [5, 6, 0, 0, 0, 0, POISON, POISON]
    assert arrays["slot_mapping"].tolist() == [5, 10, 32, 32, 32, 32, POISON, POISON]


def test_a_step_of_padding_only() -> None:
    a = BlockAllocator(4, 2)
    arrays = step_arrays(4, 2, 1)
    StepPlanner(a, *arrays.values(), 4).plan(i64([]), i64([]), i64([]), i64([]), 2, 3)
    assert arrays["query_start"].tolist() == [0, 1, 2]
    assert arrays["seq_lens"].tolist() == [1, 1]
    assert arrays["slot_mapping"].tolist() == [8, 8, 8, POISON]


def test_planner_keeps_its_allocator_and_arrays_alive() -> None:
    a = BlockAllocator(8, 4)
    h = a.new_sequence()
    a.append(h, 5)
    arrays = step_arrays(4, 2, 2)
    token_ids = arrays["token_ids"]
    planner = StepPlanner(a, *arrays.values(), 8)
    del a, arrays
    gc.collect()
    planner.plan(i64([h]), i64([3]), i64([2]), i64([4, 5]), 2, 4)
    assert token_ids.tolist() == [4, 5, 0, 0]


def test_bad_plan_arguments_raise_value_error_and_write_nothing() -> None:
    a = BlockAllocator(8, 4)
    h, g = a.new_sequence(), a.new_sequence()
    a.append(h, 9)
    a.append(g, 3)
    freed = a.new_sequence()
    a.free(freed)
    arrays = step_arrays(6, 3, 3)
    planner = StepPlanner(a, *arrays.values(), 8)

    def plan(handles=(h, g), starts=(8, 0), counts=(1, 3), tokens=(1, 2, 3, 4), seqs=2, rows=4):
        return lambda: planner.plan(i64(handles), i64(starts), i64(counts), i64(tokens), seqs, rows)

    cases = [
        (plan(handles=(h, freed)), f"handles: entry 1 is {freed}, not a live sequence"),
        (plan(counts=(1, 0), tokens=(1,)), "counts: entry 1 is 0, not >= 1"),
        (plan(starts=(-1, 0), counts=(2, 3), tokens=(1, 2, 3, 4, 5)), "starts: entry 0 is -1"),
        (plan(starts=(8, 1)), "counts: entry 1 reaches token 4 (starts + counts), but the allocator holds 3"),
        (plan(starts=(2**62, 0)), "counts: entry 0 reaches token"),
        (plan(tokens=(1, 2, 3)), "tokens: holds 3 tokens, but counts add up to 4"),
        (plan(seqs=1), "num_seqs_padded: is 1, outside [2 sequences, 3 rows of seq_lens]"),
        (plan(seqs=4), "num_seqs_padded: is 4, outside"),
        (plan(seqs=3, rows=4), "num_tokens_padded: is 4, outside [5 = tokens + padded sequences, 6 rows"),
        (plan(rows=7), "num_tokens_padded: is 7, outside"),
        (plan(starts=(8,)), "starts: expected shape (2,)"),
        (lambda: planner.plan(i64([h]), i64([8]), np.array([1], np.int32), i64([1]), 1, 1), "counts: expected dtype int64"),
        (lambda: planner.plan([h], i64([8]), i64([1]), i64([1]), 1, 1), "handles: expected a numpy.ndarray"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
        assert all((array == POISON).all() for array in arrays.values()), f"{message}: wrote before failing"

    long = a.new_sequence()
    a.append(long, 13)  # 4 blocks; block_tables has 3 columns
    with pytest.raises(ValueError, match=re.escape("counts: entry 0 needs 4 blocks, more than block_tables' 3 columns")):
        planner.plan(i64([long]), i64([12]), i64([1]), i64([1]), 1, 1)
    planner.plan(i64([long]), i64([11]), i64([1]), i64([1]), 1, 1)  # 12 tokens: 3 blocks fit


def test_bad_constructor_arguments_raise_value_error() -> None:
    a = BlockAllocator(8, 4)

    def make(null_block=8, **changes):
        arrays = step_arrays(6, 3, 2) | changes
        return lambda: StepPlanner(a, *(arrays[name] for name in NAMES), null_block)

    read_only = np.zeros(3, np.int32)
    read_only.flags.writeable = False
    shared = np.zeros(6, np.int64)
    cases = [
        (make(null_block=7), "null_block: must be a block outside the allocator's [0, 8)"),
        (make(null_block=2**31), "null_block: must be"),
        (make(token_ids=np.zeros(6, np.int32)), "token_ids: expected dtype int64"),
        (make(block_tables=np.zeros((3, 2), np.int64)), "block_tables: expected dtype int32"),
        (make(block_tables=np.zeros(6, np.int32)), "block_tables: expected a 2-D array"),
        (make(positions=np.zeros(5, np.int64)), "positions: expected shape (6,) = token_ids' shape"),
        (make(seq_lens=np.zeros(4, np.int32)), "seq_lens: expected shape (3,) = (rows of block_tables,)"),
        (make(query_start=np.zeros(3, np.int32)), "query_start: expected shape (4,)"),
        (make(slot_mapping=np.zeros(12, np.int64)[::2]), "slot_mapping: must be C-contiguous"),
        (make(seq_lens=read_only), "seq_lens: is read-only"),
        (make(token_ids=shared, positions=shared), "positions: overlaps token_ids"),
        (make(block_tables=np.zeros((0, 2), np.int32), seq_lens=np.zeros(0, np.int32),
              query_start=np.zeros(1, np.int32)), "seq_lens: needs at least one row"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()

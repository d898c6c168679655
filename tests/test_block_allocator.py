"""Tests for the C++ KV block allocator (lockstep._core.BlockAllocator).

The core check is a randomized run against `ModelAllocator`, a deliberately naive Python
version of the same rules (a flat block list per sequence, a refcount dict, a LIFO free
list): after every operation, every visible piece of state must match exactly. The
directed tests below pin down each rule on its own so a failure names the rule broken.
"""
from __future__ import annotations

import random
import re

import pytest

from lockstep._core import ArenaExhaustedError, BlockAllocator


class ModelExhausted(Exception):
    pass


class ModelAllocator:
    """The allocator's contract, written the obvious O(length) way."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0 first
        self.rc: dict[int, int] = {}
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, int] = {}

    def _ceil_blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _take(self) -> int:
        block = self.free.pop()
        self.rc[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.rc[block] -= 1
        if self.rc[block] == 0:
            del self.rc[block]
            self.free.append(block)

    def _needs_copy(self, h: int, n: int) -> bool:
        return n > 0 and self.tokens[h] % self.block_size != 0 and self.rc[self.tables[h][-1]] > 1

    def add(self, h: int, table: list[int], tokens: int) -> None:
        self.tables[h] = table
        self.tokens[h] = tokens

    def blocks_needed(self, h: int, n: int) -> int:
        fresh = self._ceil_blocks(self.tokens[h] + n) - self._ceil_blocks(self.tokens[h])
        return fresh + int(self._needs_copy(h, n))

    def append(self, h: int, n: int) -> list[tuple[int, int]]:
        need = self.blocks_needed(h, n)
        if need > len(self.free):
            raise ModelExhausted(f"need {need} blocks, {len(self.free)} free of {self.num_blocks}")
        copies = []
        table = self.tables[h]
        if self._needs_copy(h, n):
            old, new = table[-1], self._take()
            self.rc[old] -= 1  # shared, so it cannot reach zero here
            table[-1] = new
            copies.append((old, new))
        while len(table) < self._ceil_blocks(self.tokens[h] + n):
            table.append(self._take())
        self.tokens[h] += n
        return copies

    def fork(self, h: int, child: int) -> None:
        for block in self.tables[h]:
            self.rc[block] += 1
        self.add(child, list(self.tables[h]), self.tokens[h])

    def truncate(self, h: int, n_tokens: int) -> None:
        keep = self._ceil_blocks(n_tokens)
        for block in reversed(self.tables[h][keep:]):
            self._release(block)
        del self.tables[h][keep:]
        self.tokens[h] = n_tokens

    def free_seq(self, h: int) -> None:
        self.truncate(h, 0)
        del self.tables[h], self.tokens[h]


def snapshot(a: BlockAllocator, handles) -> dict:
    """Everything the allocator exposes, in one comparable value."""
    return {
        "tables": {h: a.block_table(h) for h in handles},
        "tokens": {h: a.num_tokens(h) for h in handles},
        "refcounts": [a.refcount(b) for b in range(a.num_blocks)],
        "free": a.num_free_blocks(),
        "sequences": a.num_sequences(),
    }


def model_snapshot(m: ModelAllocator) -> dict:
    return {
        "tables": {h: list(t) for h, t in m.tables.items()},
        "tokens": dict(m.tokens),
        "refcounts": [m.rc.get(b, 0) for b in range(m.num_blocks)],
        "free": len(m.free),
        "sequences": len(m.tables),
    }


def check_model_consistent(m: ModelAllocator) -> None:
    """Guards the oracle itself: its refcounts must be the number of tables holding a block."""
    counted: dict[int, int] = {}
    for table in m.tables.values():
        for block in table:
            counted[block] = counted.get(block, 0) + 1
    assert counted == m.rc
    assert sorted(m.free + list(m.rc)) == list(range(m.num_blocks))


def random_ops(seed: int, num_ops: int, num_blocks: int, block_size: int):
    """Runs a random op stream on the allocator and the model side by side, comparing each step.

    Yields (op, snapshot) after each step so callers can also compare two allocators.
    """
    rng = random.Random(seed)
    a = BlockAllocator(num_blocks, block_size)
    m = ModelAllocator(num_blocks, block_size)
    seen_handles: set[int] = set()
    live: list[int] = []

    def fresh_handle(h: int) -> int:
        assert h not in seen_handles, f"handle {h} reused"
        seen_handles.add(h)
        live.append(h)
        return h

    for step in range(num_ops):
        ops = ["new"] if not live else ["new", "append", "append", "append", "fork", "fork",
                                        "truncate", "truncate", "free"]
        if len(live) >= 12:
            ops = [op for op in ops if op not in ("new", "fork")]
        op = rng.choice(ops)
        h = rng.choice(live) if live else None
        where = f"seed={seed} step={step} op={op} h={h}"
        if op == "new":
            h = fresh_handle(a.new_sequence())
            m.add(h, [], 0)
        elif op == "append":
            # Mostly small steps that land mid-block (so copy-on-write triggers), sometimes
            # a whole prefill that the arena may not have room for.
            n = rng.choice([0, 1, 1, 2, rng.randint(1, block_size),
                            rng.randint(1, 3 * block_size),
                            rng.randint(1, num_blocks * block_size)])
            assert a.blocks_needed(h, n) == m.blocks_needed(h, n), where
            try:
                expected = m.append(h, n)
            except ModelExhausted as exc:
                with pytest.raises(ArenaExhaustedError, match=re.escape(str(exc))):
                    a.append(h, n)
            else:
                got = a.append(h, n)
                assert got == expected, where
        elif op == "fork":
            child = fresh_handle(a.fork(h))
            m.fork(h, child)
        elif op == "truncate":
            n_tokens = rng.randint(0, m.tokens[h])
            a.truncate(h, n_tokens)
            m.truncate(h, n_tokens)
        else:
            a.free(h)
            m.free_seq(h)
            live.remove(h)
        check_model_consistent(m)
        got = snapshot(a, live)
        assert got == model_snapshot(m), where
        yield op, got


@pytest.mark.parametrize("seed", range(6))
def test_random_ops_match_model(seed: int) -> None:
    rng = random.Random(1000 + seed)
    num_blocks = rng.choice([4, 16, 40, 96])
    block_size = rng.choice([1, 2, 3, 4, 16])
    ops = [op for op, _ in random_ops(seed, 3000, num_blocks, block_size)]
    # The stream must actually exercise every operation, or the comparison proves little.
    assert set(ops) == {"new", "append", "fork", "truncate", "free"}


def test_random_ops_hit_copy_on_write_and_exhaustion() -> None:
    """A small arena and block size make both rare paths common; count that they ran."""
    rng = random.Random(7)
    a = BlockAllocator(6, 3)
    m = ModelAllocator(6, 3)
    live = [a.new_sequence()]
    m.add(live[0], [], 0)
    copies = exhausted = 0
    for _ in range(2000):
        h = rng.choice(live)
        roll = rng.random()
        if roll < 0.5:
            n = rng.randint(0, 4)
            try:
                expected = m.append(h, n)
            except ModelExhausted:
                with pytest.raises(ArenaExhaustedError):
                    a.append(h, n)
                exhausted += 1
            else:
                got = a.append(h, n)
                assert got == expected
                copies += len(got)
        elif roll < 0.7 and len(live) < 6:
            child = a.fork(h)
            m.fork(h, child)
            live.append(child)
        elif roll < 0.9:
            n_tokens = rng.randint(0, m.tokens[h])
            a.truncate(h, n_tokens)
            m.truncate(h, n_tokens)
        elif len(live) > 1:
            a.free(h)
            m.free_seq(h)
            live.remove(h)
        assert snapshot(a, live) == model_snapshot(m)
    assert copies > 20 and exhausted > 100


def test_same_ops_give_same_tables() -> None:
    first = list(random_ops(42, 1500, 32, 4))
    second = list(random_ops(42, 1500, 32, 4))
    assert first == second


# ---- deterministic allocation order -------------------------------------------------------

def test_fresh_allocator_hands_out_blocks_in_order() -> None:
    a = BlockAllocator(10, 4)
    h = a.new_sequence()
    a.append(h, 4 * 6)
    assert a.block_table(h) == list(range(6))
    # Interleaved sequences keep taking from the same ascending run.
    g = a.new_sequence()
    a.append(g, 1)
    a.append(h, 1)
    assert a.block_table(g) == [6]
    assert a.block_table(h) == list(range(6)) + [7]


def test_free_list_is_lifo_and_release_is_tail_first() -> None:
    a = BlockAllocator(4, 2)
    x, y = a.new_sequence(), a.new_sequence()
    a.append(x, 4)  # blocks 0, 1
    a.append(y, 4)  # blocks 2, 3
    a.free(x)       # releases 1 then 0: 0 is on top
    a.free(y)       # releases 3 then 2: 2 is on top
    z = a.new_sequence()
    a.append(z, 8)
    assert a.block_table(z) == [2, 3, 0, 1]


def test_truncate_releases_tail_first() -> None:
    a = BlockAllocator(5, 4)
    x = a.new_sequence()
    a.append(x, 12)    # blocks 0, 1, 2
    a.truncate(x, 1)   # releases 2 then 1, so 1 is reused first
    assert a.block_table(x) == [0]
    y = a.new_sequence()
    a.append(y, 16)
    assert a.block_table(y) == [1, 2, 3, 4]


def test_handles_are_never_reused() -> None:
    a = BlockAllocator(4, 4)
    seen = set()
    for _ in range(50):
        h = a.new_sequence()
        assert h not in seen
        seen.add(h)
        child = a.fork(h)
        assert child not in seen
        seen.add(child)
        a.free(h)
        a.free(child)
    assert a.num_sequences() == 0


# ---- copy-on-write and refcounts -----------------------------------------------------------

def test_append_to_shared_partial_block_copies_it() -> None:
    a = BlockAllocator(8, 4)
    parent = a.new_sequence()
    a.append(parent, 5)                   # [0, 1], block 1 holds one token
    child = a.fork(parent)
    assert a.blocks_needed(child, 1) == 1
    assert a.append(child, 1) == [(1, 2)]
    assert a.block_table(child) == [0, 2]
    assert a.block_table(parent) == [0, 1]
    assert [a.refcount(b) for b in range(3)] == [2, 1, 1]
    # The parent's tail is no longer shared, so it is written in place.
    assert a.blocks_needed(parent, 3) == 0
    assert a.append(parent, 3) == []
    assert a.block_table(parent) == [0, 1]


def test_copy_comes_before_fresh_blocks() -> None:
    a = BlockAllocator(8, 4)
    parent = a.new_sequence()
    a.append(parent, 2)                   # [0]
    child = a.fork(parent)
    assert a.blocks_needed(child, 6) == 2   # 8 tokens: one copy, one fresh block
    assert a.append(child, 6) == [(0, 1)]
    assert a.block_table(child) == [1, 2]


def test_full_shared_block_is_never_copied() -> None:
    a = BlockAllocator(8, 4)
    parent = a.new_sequence()
    a.append(parent, 8)                   # [0, 1], both full
    child = a.fork(parent)
    assert a.append(child, 1) == []
    assert a.block_table(child) == [0, 1, 2]
    assert a.append(parent, 4) == []
    assert a.block_table(parent) == [0, 1, 3]
    assert [a.refcount(b) for b in range(4)] == [2, 2, 1, 1]


def test_truncate_into_shared_block_then_append_copies() -> None:
    a = BlockAllocator(8, 4)
    parent = a.new_sequence()
    a.append(parent, 8)                   # [0, 1]
    child = a.fork(parent)
    a.truncate(child, 5)                  # block 1 is now partial for child, still shared
    assert a.block_table(child) == [0, 1]
    assert a.append(child, 1) == [(1, 2)]
    assert a.block_table(parent) == [0, 1]
    assert [a.refcount(b) for b in range(3)] == [2, 1, 1]


def test_fork_of_long_sequence_changes_only_its_refcounts() -> None:
    a = BlockAllocator(1100, 1)
    other = a.new_sequence()
    a.append(other, 50)
    h = a.new_sequence()
    a.append(h, 1000)
    before = [a.refcount(b) for b in range(a.num_blocks)]
    free_before = a.num_free_blocks()
    table = a.block_table(h)

    child = a.fork(h)
    after = [a.refcount(b) for b in range(a.num_blocks)]
    held = set(table)
    for b in range(a.num_blocks):
        assert after[b] == before[b] + (1 if b in held else 0), f"block {b}"
    assert a.num_free_blocks() == free_before
    assert a.block_table(child) == table
    assert a.num_tokens(child) == 1000

    # Freeing the fork puts every count back and frees nothing.
    a.free(child)
    assert [a.refcount(b) for b in range(a.num_blocks)] == before
    assert a.num_free_blocks() == free_before


def test_fork_of_fork_counts_every_holder() -> None:
    a = BlockAllocator(16, 2)
    root = a.new_sequence()
    a.append(root, 6)                     # [0, 1, 2]
    kids = [a.fork(root) for _ in range(3)]
    grandkid = a.fork(kids[0])
    a.truncate(kids[1], 2)                # keeps only block 0
    assert [a.refcount(b) for b in range(3)] == [5, 4, 4]
    a.free(root)
    assert [a.refcount(b) for b in range(3)] == [4, 3, 3]
    a.free(kids[0])
    a.free(kids[2])
    a.free(grandkid)
    assert [a.refcount(b) for b in range(3)] == [1, 0, 0]
    assert a.num_free_blocks() == 15


# ---- exhaustion is atomic ------------------------------------------------------------------

def test_exhaustion_raises_and_changes_nothing() -> None:
    a = BlockAllocator(4, 4)
    x, y = a.new_sequence(), a.new_sequence()
    a.append(x, 6)                        # [0, 1]
    a.append(y, 3)                        # [2]
    before = snapshot(a, [x, y])
    # 6 + 11 = 17 tokens -> 5 blocks, has 2: needs 3, only 1 free.
    with pytest.raises(ArenaExhaustedError,
                       match=re.escape("KV arena exhausted: need 3 blocks, 1 free of 4")):
        a.append(x, 11)
    assert snapshot(a, [x, y]) == before
    assert issubclass(ArenaExhaustedError, RuntimeError)


def test_exhaustion_counts_the_copy() -> None:
    a = BlockAllocator(2, 4)
    x = a.new_sequence()
    a.append(x, 5)                        # [0, 1]; the arena is full
    y = a.fork(x)
    before = snapshot(a, [x, y])
    assert a.blocks_needed(y, 1) == 1
    with pytest.raises(ArenaExhaustedError, match="need 1 blocks, 0 free of 2"):
        a.append(y, 1)
    assert snapshot(a, [x, y]) == before
    # Once the other holder lets go, the same append needs no block at all.
    a.free(x)
    assert a.append(y, 3) == []


def test_huge_append_is_exhaustion_not_overflow() -> None:
    a = BlockAllocator(4, 4)
    h = a.new_sequence()
    a.append(h, 1)
    with pytest.raises(ArenaExhaustedError):
        a.append(h, 2**62)
    assert a.num_tokens(h) == 1


# ---- bad arguments -------------------------------------------------------------------------

@pytest.mark.parametrize("num_blocks, block_size, name", [
    (0, 4, "num_blocks"), (-3, 4, "num_blocks"), (4, 0, "block_size"), (4, -1, "block_size"),
    (2**31, 4, "num_blocks"),
])
def test_bad_constructor_args(num_blocks: int, block_size: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        BlockAllocator(num_blocks, block_size)


def test_unknown_and_freed_handles_are_rejected() -> None:
    a = BlockAllocator(4, 4)
    gone = a.new_sequence()
    a.free(gone)
    for h in (gone, 12345, -1):
        calls = [
            lambda: a.blocks_needed(h, 1), lambda: a.append(h, 1), lambda: a.fork(h),
            lambda: a.truncate(h, 0), lambda: a.free(h), lambda: a.num_tokens(h),
            lambda: a.block_table(h),
        ]
        for call in calls:
            with pytest.raises(ValueError, match="h: unknown sequence handle"):
                call()
    assert a.num_sequences() == 0 and a.num_free_blocks() == 4


def test_bad_counts_are_rejected() -> None:
    a = BlockAllocator(4, 4)
    h = a.new_sequence()
    a.append(h, 5)
    with pytest.raises(ValueError, match=r"\bn must be >= 0"):
        a.append(h, -1)
    with pytest.raises(ValueError, match=r"\bn must be >= 0"):
        a.blocks_needed(h, -1)
    with pytest.raises(ValueError, match="n_tokens must be >= 0"):
        a.truncate(h, -1)
    with pytest.raises(ValueError, match="n_tokens=6 is beyond the sequence length 5"):
        a.truncate(h, 6)
    for block in (-1, 4):
        with pytest.raises(ValueError, match="block must be in"):
            a.refcount(block)
    assert a.num_tokens(h) == 5 and a.block_table(h) == [0, 1]


def test_properties_are_read_only() -> None:
    a = BlockAllocator(7, 3)
    assert (a.num_blocks, a.block_size) == (7, 3)
    with pytest.raises(AttributeError):
        a.num_blocks = 8
    with pytest.raises(AttributeError):
        a.block_size = 8

"""Tests for the C++ KV block allocator (lockstep._core.BlockAllocator).

The core check is a randomized run against `ModelAllocator`, a deliberately naive Python
version of the same rules (a flat block list per sequence, a refcount dict, a LIFO free
list, and for the prefix cache a dict of keys and a list in eviction order): after every
operation, every visible piece of state must match exactly. With the prefix cache on, the
run also plays the KV arena itself (which token each slot holds, copies done as append
asks) and checks every sequence reads its own tokens. The directed tests below pin down
each rule on its own so a failure names the rule broken.
"""
from __future__ import annotations

import random
import re

import numpy as np
import pytest

from lockstep._core import ArenaExhaustedError, BlockAllocator


class ModelExhausted(Exception):
    pass


class ModelAllocator:
    """The allocator's contract, written the obvious O(length) way.

    Prefix cache: a published block is registered under (the block before it or -1, its
    tokens). A registered block no table holds is evictable: it sits in `lru`, oldest first,
    until clear_prefix_cache or an append that finds the free list empty takes it.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0 first
        self.rc: dict[int, int] = {}
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, int] = {}
        self.index: dict[tuple, int] = {}  # (parent block or -1, tokens) -> block
        self.key_of: dict[int, tuple] = {}  # registered block -> its key
        self.lru: list[int] = []  # evictable blocks, least recently released first
        self.published: dict[int, int] = {}
        self.queries = self.hits = 0
        self.evictions = self.cached_copies = 0  # how often the rare paths ran

    def _ceil_blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def num_free(self) -> int:
        return len(self.free) + len(self.lru)

    def _take(self) -> int:
        if self.free:
            block = self.free.pop()
        else:
            block = self.lru.pop(0)
            del self.index[self.key_of.pop(block)]
            self.evictions += 1
        self.rc[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.rc[block] -= 1
        if self.rc[block] == 0:
            del self.rc[block]
            (self.lru if block in self.key_of else self.free).append(block)

    def _hold(self, block: int) -> None:
        if block in self.rc:
            self.rc[block] += 1
        else:
            self.lru.remove(block)
            self.rc[block] = 1

    def _needs_copy(self, h: int, n: int) -> bool:
        if n == 0 or self.tokens[h] % self.block_size == 0:
            return False
        tail = self.tables[h][-1]
        return self.rc[tail] > 1 or tail in self.key_of

    def add(self, h: int, table: list[int], tokens: int, published: int = 0) -> None:
        self.tables[h] = table
        self.tokens[h] = tokens
        self.published[h] = published

    def blocks_needed(self, h: int, n: int) -> int:
        fresh = self._ceil_blocks(self.tokens[h] + n) - self._ceil_blocks(self.tokens[h])
        return fresh + int(self._needs_copy(h, n))

    def append(self, h: int, n: int) -> list[tuple[int, int]]:
        need = self.blocks_needed(h, n)
        if need > self.num_free():
            raise ModelExhausted(f"need {need} blocks, {self.num_free()} free of {self.num_blocks}")
        copies = []
        table = self.tables[h]
        if self._needs_copy(h, n):
            old, new = table[-1], self._take()
            self.cached_copies += old in self.key_of
            table[-1] = new
            copies.append((old, new))
        while len(table) < self._ceil_blocks(self.tokens[h] + n):
            table.append(self._take())
        for old, _ in copies:  # let go of the copied block only after every block is taken
            self._release(old)
        self.tokens[h] += n
        return copies

    def fork(self, h: int, child: int) -> None:
        for block in self.tables[h]:
            self.rc[block] += 1
        self.add(child, list(self.tables[h]), self.tokens[h], self.published[h])

    def truncate(self, h: int, n_tokens: int) -> None:
        keep = self._ceil_blocks(n_tokens)
        for block in reversed(self.tables[h][keep:]):
            self._release(block)
        del self.tables[h][keep:]
        self.tokens[h] = n_tokens
        self.published[h] = min(self.published[h], n_tokens // self.block_size)

    def free_seq(self, h: int) -> None:
        self.truncate(h, 0)
        del self.tables[h], self.tokens[h], self.published[h]

    def _key(self, parent: int, tokens: list[int], i: int) -> tuple:
        return parent, tuple(tokens[i * self.block_size:(i + 1) * self.block_size])

    def new_cached(self, h: int, tokens: list[int]) -> int:
        most = (len(tokens) - 1) // self.block_size if self.prefix_cache and tokens else 0
        table: list[int] = []
        while len(table) < most and self._key(table[-1] if table else -1, tokens, len(table)) in self.index:
            table.append(self.index[self._key(table[-1] if table else -1, tokens, len(table))])
        for block in table:
            self._hold(block)
        self.queries += most * self.block_size
        self.hits += len(table) * self.block_size
        self.add(h, table, len(table) * self.block_size, len(table))
        return len(table) * self.block_size

    def publish(self, h: int, tokens: list[int], num_computed: int, first: int = 0) -> None:
        """tokens: all of h's; `first`: the allocator is given only those from there on, so a
        block starting before it cannot be keyed (nor, without its parent, any after it)."""
        if not self.prefix_cache:
            return
        table, full = self.tables[h], num_computed // self.block_size
        for i in range(self.published[h], full):
            parent = table[i - 1] if i else -1
            key = self._key(parent, tokens, i)
            if i * self.block_size < first or table[i] in self.key_of or (parent != -1 and parent not in self.key_of) or key in self.index:
                continue
            self.index[key] = table[i]
            self.key_of[table[i]] = key
        self.published[h] = max(self.published[h], full)

    def clear_prefix_cache(self) -> None:
        self.free.extend(self.lru)
        self.lru.clear()
        self.index.clear()
        self.key_of.clear()
        self.published = dict.fromkeys(self.published, 0)


def snapshot(a: BlockAllocator, handles) -> dict:
    """Everything the allocator exposes, in one comparable value."""
    return {
        "tables": {h: a.block_table(h) for h in handles},
        "tokens": {h: a.num_tokens(h) for h in handles},
        "published": {h: a.num_published(h) for h in handles},
        "refcounts": [a.refcount(b) for b in range(a.num_blocks)],
        "free": a.num_free_blocks(),
        "sequences": a.num_sequences(),
        "cached": a.num_cached_blocks(),
        "queries": a.prefix_queries(),
        "hits": a.prefix_hits(),
    }


def model_snapshot(m: ModelAllocator) -> dict:
    return {
        "tables": {h: list(t) for h, t in m.tables.items()},
        "tokens": dict(m.tokens),
        "published": dict(m.published),
        "refcounts": [m.rc.get(b, 0) for b in range(m.num_blocks)],
        "free": m.num_free(),
        "sequences": len(m.tables),
        "cached": len(m.key_of),
        "queries": m.queries,
        "hits": m.hits,
    }


def check_model_consistent(m: ModelAllocator) -> None:
    """Guards the oracle itself: its refcounts must be the number of tables holding a block."""
    counted: dict[int, int] = {}
    for table in m.tables.values():
        for block in table:
            counted[block] = counted.get(block, 0) + 1
    assert counted == m.rc
    assert sorted(m.free + list(m.rc) + m.lru) == list(range(m.num_blocks))
    assert set(m.lru) == set(m.key_of) - set(m.rc)  # evictable: cached and in no table
    assert {block: key for key, block in m.index.items()} == m.key_of
    for parent, _ in m.key_of.values():  # every cached block is reachable from the root
        assert parent == -1 or parent in m.key_of


class Arena:
    """The KV arena as the caller sees it: which token each slot holds, -1 if none yet."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots = np.full((num_blocks, block_size), -1, np.int64)

    def write(self, table: list[int], copies: list[tuple[int, int]], first: int, tokens: list[int]) -> None:
        """An append's work: its copies first, then tokens[first:] at their positions."""
        for src, dst in copies:
            self.slots[dst] = self.slots[src]
        for pos in range(first, len(tokens)):
            self.slots[table[pos // self.block_size], pos % self.block_size] = tokens[pos]

    def read(self, table: list[int], n: int) -> list[int]:
        return [int(t) for t in self.slots[table].reshape(-1)[:n]] if table else []


def random_ops(seed: int, num_ops: int, num_blocks: int, block_size: int, prefix_cache: bool = False):
    """Runs a random op stream on the allocator and the model side by side, comparing each step.

    Yields (op, snapshot) after each step so callers can also compare two allocators; the
    last item is ("model", the model), for counts of the rare paths. With the prefix cache,
    each sequence's tokens follow one of three scripts (so blocks repeat across sequences),
    sometimes switching after a truncate (so they diverge), and every sequence must read
    back its own tokens from the arena after every step.
    """
    rng = random.Random(seed)
    a = BlockAllocator(num_blocks, block_size, prefix_cache)
    m = ModelAllocator(num_blocks, block_size, prefix_cache)
    arena = Arena(num_blocks, block_size)
    scripts = [[rng.randrange(1000) for _ in range(num_blocks * block_size)] for _ in range(3)]
    script: dict[int, int] = {}  # sequence -> the script its next tokens come from
    tokens: dict[int, list[int]] = {}
    seen_handles: set[int] = set()
    live: list[int] = []

    def fresh_handle(h: int, follows: int, toks: list[int]) -> int:
        assert h not in seen_handles, f"handle {h} reused"
        seen_handles.add(h)
        live.append(h)
        script[h], tokens[h] = follows, toks
        return h

    weights = {"new": 1, "append": 3, "fork": 2, "truncate": 2, "free": 1}
    if prefix_cache:
        weights |= {"new": 0.5, "new_cached": 1.5, "publish": 2, "clear": 0.05}
    for step in range(num_ops):
        ops = {op: w for op, w in weights.items() if live or op in ("new", "new_cached")}
        if len(live) >= 12:
            ops = {op: w for op, w in ops.items() if op not in ("new", "new_cached", "fork")}
        op = rng.choices(list(ops), list(ops.values()))[0]
        h = rng.choice(live) if live else None
        where = f"seed={seed} step={step} op={op} h={h}"
        if op == "new":
            h = fresh_handle(a.new_sequence(), rng.randrange(3), [])
            m.add(h, [], 0)
        elif op == "new_cached":
            follows = rng.randrange(3)
            prompt = scripts[follows][:rng.choice([0, 1, block_size, rng.randint(1, 4 * block_size)])]
            h, cached = a.new_sequence_cached(np.array(prompt, np.int64))
            fresh_handle(h, follows, prompt[:cached])
            assert cached == m.new_cached(h, prompt), where
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
                first = len(tokens[h])
                tokens[h] += scripts[script[h]][first:first + n]
                arena.write(m.tables[h], got, first, tokens[h])
        elif op == "fork":
            child = fresh_handle(a.fork(h), script[h], list(tokens[h]))
            m.fork(h, child)
        elif op == "truncate":
            n_tokens = rng.randint(0, m.tokens[h])
            a.truncate(h, n_tokens)
            m.truncate(h, n_tokens)
            del tokens[h][n_tokens:]
            if rng.random() < 0.3:
                script[h] = rng.randrange(3)
        elif op == "publish":
            num_computed = rng.choice([len(tokens[h]), rng.randint(0, len(tokens[h]))])
            # The tokens from `first` on only: all, from the first block not yet published (what
            # the engine passes), or from anywhere up to num_computed.
            first = rng.choice([0, min(m.published[h] * block_size, num_computed), rng.randint(0, num_computed)])
            a.publish(h, np.array(tokens[h][first:], np.int64), num_computed, first)
            m.publish(h, tokens[h], num_computed, first)
        elif op == "clear":
            a.clear_prefix_cache()
            m.clear_prefix_cache()
        else:
            a.free(h)
            m.free_seq(h)
            live.remove(h)
        check_model_consistent(m)
        got = snapshot(a, live)
        assert got == model_snapshot(m), where
        if prefix_cache:
            for g in live:
                assert arena.read(m.tables[g], len(tokens[g])) == tokens[g], f"{where}: sequence {g} reads another's KV"
        yield op, got
    yield "model", m


@pytest.mark.parametrize("seed, num_blocks, block_size", [(0, 6, 2), (1, 16, 3), (2, 40, 4), (3, 16, 1),
                                                           (4, 40, 2), (5, 6, 4)])
def test_random_ops_with_prefix_cache_match_model(seed: int, num_blocks: int, block_size: int) -> None:
    *steps, (_, model) = random_ops(seed, 3000, num_blocks, block_size, prefix_cache=True)
    ops = {op for op, _ in steps}
    assert ops == {"new", "new_cached", "append", "fork", "truncate", "free", "publish", "clear"}
    # The rare paths must really run: adoption, eviction under pressure and (where a block can
    # be partial) a copy of a cached block.
    assert model.hits > 0 and model.evictions > 0, vars(model)
    assert model.cached_copies > 0 or block_size == 1, vars(model)


@pytest.mark.parametrize("seed", range(6))
def test_random_ops_match_model(seed: int) -> None:
    rng = random.Random(1000 + seed)
    num_blocks = rng.choice([4, 16, 40, 96])
    block_size = rng.choice([1, 2, 3, 4, 16])
    ops = [op for op, _ in random_ops(seed, 3000, num_blocks, block_size)][:-1]
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
    for prefix_cache in (False, True):
        first = list(random_ops(42, 1500, 32, 4, prefix_cache))[:-1]
        second = list(random_ops(42, 1500, 32, 4, prefix_cache))[:-1]
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


# ---- prefix cache ----------------------------------------------------------------------------

def cached_allocator(num_blocks: int = 16, block_size: int = 4) -> BlockAllocator:
    return BlockAllocator(num_blocks, block_size, prefix_cache=True)


def computed(a: BlockAllocator, prompt: list[int]) -> int:
    """A request's prefill as the engine does it: adopt what is cached, append the rest, publish."""
    h, _ = a.new_sequence_cached(np.array(prompt, np.int64))
    a.append(h, len(prompt) - a.num_tokens(h))
    a.publish(h, np.array(prompt, np.int64), len(prompt))
    return h


def test_hit_shares_the_blocks_and_counts_the_tokens() -> None:
    a = cached_allocator()
    prompt = list(range(100, 111))  # 11 tokens: two full blocks and a partial one
    first = computed(a, prompt)
    assert a.block_table(first) == [0, 1, 2] and a.num_cached_blocks() == 2
    assert (a.prefix_queries(), a.prefix_hits()) == (8, 0)  # a cold miss still counts as a query
    second, cached = a.new_sequence_cached(np.array(prompt, np.int64))
    assert cached == 8 and a.num_tokens(second) == 8
    assert a.block_table(second) == [0, 1]
    assert [a.refcount(b) for b in range(3)] == [2, 2, 1]
    assert (a.prefix_queries(), a.prefix_hits()) == (16, 8)
    # The rest of the prompt goes to fresh blocks; the shared ones are never written.
    assert a.append(second, 3) == [] and a.block_table(second) == [0, 1, 3]


def test_last_prompt_token_is_never_cached() -> None:
    a = cached_allocator()
    computed(a, list(range(12)))  # three full blocks, all published
    assert a.num_cached_blocks() == 3
    for n, expected in [(12, 8), (13, 12), (9, 8), (8, 4), (4, 0), (1, 0), (0, 0)]:
        h, cached = a.new_sequence_cached(np.arange(n, dtype=np.int64))
        assert cached == expected, f"{n} tokens"
        a.free(h)


def test_different_tokens_or_parent_never_match() -> None:
    a = cached_allocator()
    computed(a, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    misses = {
        "last token of the first block differs": [1, 2, 3, 5, 5, 6, 7, 8, 9],
        "first token differs": [0, 2, 3, 4, 5, 6, 7, 8, 9],
        "same second block after another first block": [9, 9, 9, 9, 5, 6, 7, 8, 9],
        "blocks swapped": [5, 6, 7, 8, 1, 2, 3, 4, 9],
    }
    for why, prompt in misses.items():
        h, cached = a.new_sequence_cached(np.array(prompt, np.int64))
        assert cached == 0, why
        a.free(h)
    h, cached = a.new_sequence_cached(np.array([1, 2, 3, 4, 5, 6, 7, 0, 0], np.int64))
    assert cached == 4 and a.block_table(h) == [0], "first block matches, second differs"


def test_identical_prefix_computed_twice_keeps_the_first_entry() -> None:
    a = cached_allocator()
    prompt = np.arange(9, dtype=np.int64)
    x, y = a.new_sequence(), a.new_sequence()
    a.append(x, 9)
    a.append(y, 9)  # [3, 4, 5]: the same tokens, computed independently
    a.publish(x, prompt, 9)
    a.publish(y, prompt, 9)
    assert a.num_cached_blocks() == 2
    h, cached = a.new_sequence_cached(prompt)
    assert cached == 8 and a.block_table(h) == [0, 1]
    a.free(x)
    a.free(h)
    a.free(y)  # y's blocks were never registered: freed, not cached
    assert a.num_cached_blocks() == 2 and a.num_free_blocks() == 16


def test_unheld_cached_blocks_count_as_free_and_are_evicted_least_recent_first() -> None:
    a = cached_allocator(num_blocks=6)
    seqs = [computed(a, [k] * 8 + [0]) for k in (1, 2)]  # blocks [0, 1, 2] and [3, 4, 5]
    assert a.num_cached_blocks() == 4 and a.num_free_blocks() == 0
    a.free(seqs[1])  # 5 is freed; 4, then 3, become evictable
    a.free(seqs[0])  # 2 is freed; 1, then 0, become evictable
    assert a.num_free_blocks() == 6 and a.num_cached_blocks() == 4
    h = a.new_sequence()
    a.append(h, 4 * 4)  # the two free blocks (last freed first), then the oldest evictable
    assert a.block_table(h) == [2, 5, 4, 3]
    assert a.num_cached_blocks() == 2 and a.num_free_blocks() == 2
    _, cached = a.new_sequence_cached(np.array([2] * 8 + [0], np.int64))
    assert cached == 0, "the evicted chain must not match"
    # The chain 0 <- 1 is still cached: adopting it takes it off the eviction list.
    g, cached = a.new_sequence_cached(np.array([1] * 8 + [0], np.int64))
    assert cached == 8 and a.block_table(g) == [0, 1] and a.num_free_blocks() == 0
    # The same calls on a fresh allocator give the same blocks.
    b = cached_allocator(num_blocks=6)
    for k in (1, 2):
        computed(b, [k] * 8 + [0])
    b.free(1)
    b.free(0)
    hb = b.new_sequence()
    b.append(hb, 16)
    assert b.block_table(hb) == [2, 5, 4, 3]


def test_readopting_a_block_moves_it_to_the_back_of_the_eviction_order() -> None:
    a = cached_allocator(num_blocks=3, block_size=2)
    for k in (1, 2, 3):
        a.free(computed(a, [k, k]))  # block k-1 cached; prompts of one block publish it whole
    assert a.num_cached_blocks() == 3 and a.num_free_blocks() == 3
    h, cached = a.new_sequence_cached(np.array([1, 1, 0], np.int64))
    assert cached == 2
    a.free(h)  # block 0 is now the most recently released
    g = a.new_sequence()
    a.append(g, 4)
    assert a.block_table(g) == [1, 2]


def test_truncate_into_a_published_block_then_append_copies_it() -> None:
    a = cached_allocator()
    prompt = list(range(10, 18))
    h = computed(a, prompt)  # [0, 1], both published; h is their only holder
    a.truncate(h, 6)  # mid-block 1
    assert a.refcount(1) == 1
    assert a.blocks_needed(h, 1) == 1
    assert a.append(h, 1) == [(1, 2)]
    assert a.block_table(h) == [0, 2]
    # The index still maps the prompt to the original blocks, which nothing has written.
    g, cached = a.new_sequence_cached(np.array(prompt + [0], np.int64))
    assert cached == 8 and a.block_table(g) == [0, 1]
    # Truncating to a block boundary then appending takes a fresh block: nothing to copy.
    a.truncate(g, 4)
    assert a.append(g, 1) == [] and a.block_table(g) == [0, 3]


def test_copy_of_a_cached_block_is_not_evicted_by_the_same_append() -> None:
    a = cached_allocator(num_blocks=3, block_size=2)
    h = computed(a, [5, 5, 6, 6])  # [0, 1], both published
    a.truncate(h, 3)
    before = snapshot(a, [h])
    with pytest.raises(ArenaExhaustedError, match=re.escape("need 2 blocks, 1 free of 3")):
        a.append(h, 2)  # a copy and a fresh block; block 1 becomes evictable only afterwards
    assert snapshot(a, [h]) == before
    assert a.append(h, 1) == [(1, 2)]
    assert a.num_free_blocks() == 1 and a.num_cached_blocks() == 2  # block 1: cached, unheld


def test_exhaustion_with_evictable_blocks_changes_nothing() -> None:
    a = cached_allocator(num_blocks=4)
    a.free(computed(a, [7] * 8 + [1]))  # [0, 1, 2]: 2 freed, 1 then 0 evictable
    x = a.new_sequence()
    a.append(x, 4)  # block 2
    before = snapshot(a, [x])
    assert a.num_free_blocks() == 3 and a.blocks_needed(x, 13) == 4
    with pytest.raises(ArenaExhaustedError, match=re.escape("need 4 blocks, 3 free of 4")):
        a.append(x, 13)
    assert snapshot(a, [x]) == before
    assert a.new_sequence_cached(np.array([7] * 9, np.int64))[1] == 8, "still cached after the failure"
    a.free(x)


def test_eviction_frees_a_whole_unheld_chain_tail_first() -> None:
    a = cached_allocator(num_blocks=4)
    a.free(computed(a, [7] * 12 + [1]))  # [0, 1, 2, 3]: 3 freed; 2, 1, 0 evictable in that order
    x = a.new_sequence()
    assert a.append(x, 16) == [] and a.block_table(x) == [3, 2, 1, 0]
    assert a.num_cached_blocks() == 0 and a.num_free_blocks() == 0


def test_clear_prefix_cache_returns_unheld_blocks_and_forgets_everything() -> None:
    a = cached_allocator(num_blocks=8)
    held = computed(a, [3] * 8 + [0])  # [0, 1, 2], blocks 0 and 1 cached
    a.free(computed(a, [4] * 8 + [0]))  # [3, 4, 5]: 5 freed; 4 then 3 evictable
    assert a.num_cached_blocks() == 4 and a.num_free_blocks() == 5
    a.clear_prefix_cache()
    assert a.num_cached_blocks() == 0 and a.num_free_blocks() == 5
    assert a.new_sequence_cached(np.array([3] * 9, np.int64))[1] == 0
    # Unregistered, the held blocks are ordinary again: a partial tail is written in place.
    a.truncate(held, 6)
    assert a.append(held, 1) == []
    # And the sequence can publish them again.
    a.publish(held, np.array([3] * 7, np.int64), 7)
    assert a.num_cached_blocks() == 1


def test_without_the_prefix_cache_nothing_is_shared() -> None:
    a = BlockAllocator(8, 4)
    assert not a.prefix_cache and cached_allocator().prefix_cache
    h, cached = a.new_sequence_cached(np.arange(9, dtype=np.int64))
    assert cached == 0 and a.num_tokens(h) == 0
    a.append(h, 9)
    a.publish(h, np.arange(9, dtype=np.int64), 9)
    assert a.new_sequence_cached(np.arange(9, dtype=np.int64))[1] == 0
    assert (a.num_cached_blocks(), a.prefix_queries(), a.prefix_hits()) == (0, 0, 0)
    a.free(h)
    assert a.num_free_blocks() == 8


def test_prefix_cache_bad_arguments() -> None:
    a = cached_allocator()
    h = a.new_sequence()
    a.append(h, 6)
    tokens = np.arange(6, dtype=np.int64)
    with pytest.raises(ValueError, match="num_computed=7 is beyond the sequence length 6"):
        a.publish(h, np.arange(8, dtype=np.int64), 7)
    with pytest.raises(ValueError, match="num_computed=6 is beyond .* or the 5 tokens given"):
        a.publish(h, tokens[:5], 6)
    with pytest.raises(ValueError, match="num_computed=6 is beyond .* or the 3 tokens given from token 2"):
        a.publish(h, tokens[2:5], 6, first=2)
    with pytest.raises(ValueError, match="first must be >= 0"):
        a.publish(h, tokens, 6, first=-1)
    with pytest.raises(ValueError, match="num_computed must be >= 0"):
        a.publish(h, tokens, -1)
    with pytest.raises(ValueError, match="tokens: expected dtype int64"):
        a.publish(h, tokens.astype(np.int32), 4)
    with pytest.raises(ValueError, match="tokens: expected a numpy.ndarray"):
        a.new_sequence_cached([1, 2, 3])
    with pytest.raises(ValueError, match="h: unknown sequence handle"):
        a.publish(99, tokens, 4)
    assert a.num_cached_blocks() == 0 and a.num_sequences() == 1


@pytest.mark.parametrize("seed", range(8))
def test_append_one_each_is_one_append_at_a_time(seed: int) -> None:
    """A decode step's one call grows the same blocks, with the same copies in the same order, as
    append(h, 1) for each handle in turn, and stops where the arena runs dry, as a caller
    stopping at the first shortage would. Forks make shared partial tails (copy-on-write)."""
    def build() -> tuple[BlockAllocator, list[int]]:
        rng = random.Random(seed)
        a = BlockAllocator(40, 4)
        handles = []
        for _ in range(5):
            handles.append(a.new_sequence())
            a.append(handles[-1], rng.randrange(1, 10))
        for _ in range(7):
            handles.append(a.fork(rng.choice(handles)))
        rng.shuffle(handles)
        return a, handles

    batched, order = build()
    single, same_order = build()
    assert order == same_order
    stopped = False
    for _ in range(12):  # each round a decode step of every sequence, until the arena is short
        grown, copies = batched.append_one_each(np.array(order, np.int64))
        expected_copies, expected_grown = [], 0
        for h in order:
            if single.blocks_needed(h, 1) > single.num_free_blocks():
                break
            expected_copies += single.append(h, 1)
            expected_grown += 1
        assert (grown, copies) == (expected_grown, expected_copies)
        assert snapshot(batched, order) == snapshot(single, order)
        if grown < len(order):
            stopped = True
            break
    assert stopped, "the arena never ran short: the test did not reach the stop"


def test_append_one_each_rejects_an_unknown_handle_changing_nothing() -> None:
    a = BlockAllocator(8, 4)
    h = a.new_sequence()
    a.append(h, 4)
    child = a.fork(h)
    before = snapshot(a, [h, child])
    with pytest.raises(ValueError, match="unknown sequence handle"):
        a.append_one_each(np.array([h, child, 12345], np.int64))
    assert snapshot(a, [h, child]) == before
    with pytest.raises(ValueError, match="handles"):
        a.append_one_each(np.array([[h]], np.int64))


def test_append_one_each_copies_in_order_where_one_copy_reuses_a_block_another_reads() -> None:
    """With the prefix cache, one call can free a block (a's copied, published tail, now unheld)
    and reuse it as b's copy target: the copies must then be done in the order returned. Done
    so in the arena, both sequences read back their own tokens."""
    a = BlockAllocator(5, 4, prefix_cache=True)
    arena = Arena(5, 4)
    tokens: dict[int, list[int]] = {}
    for first in (10, 30):
        h = a.new_sequence()
        written = list(range(first, first + 8))
        arena.write(_grown(a, h, 8), [], 0, written)
        a.publish(h, np.array(written, np.int64), 8)
        a.truncate(h, 7)  # into its published tail: the next append copies it
        tokens[h] = written[:7]
    handles = list(tokens)
    grown, copies = a.append_one_each(np.array(handles, np.int64))
    assert grown == 2 and len(copies) == 2
    (src0, dst0), (src1, dst1) = copies
    assert dst1 == src0, f"copies {copies}: the second does not write the block the first reads"
    for src, dst in copies:
        arena.slots[dst] = arena.slots[src]
    for h in handles:
        tokens[h].append(90 + h)
        arena.write(a.block_table(h), [], 7, tokens[h])
    for h in handles:
        assert arena.read(a.block_table(h), 8) == tokens[h]


def _grown(a: BlockAllocator, h: int, n: int) -> list[int]:
    assert a.append(h, n) == []
    return a.block_table(h)

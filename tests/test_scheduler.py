"""The scheduler's latency classes, on a real KV arena with a hand-written cost table.

No model runs here: a "step" is the scheduler's plan applied to the sequences (computed tokens
advance, a decode appends a token). The cost table is chosen so the expected step of each
case can be worked out by hand: decode[B] costs 4 + B ms, prefill[T] costs T / 2 ms.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from lockstep.runtime.config import EngineConfig, ModelConfig
from lockstep.runtime.cost_model import CostTable
from lockstep.runtime.kv_cache import KVCache
from lockstep.runtime.sampling_params import SamplingParams
from lockstep.runtime.scheduler import Scheduler, _StepBuilder
from lockstep.runtime.sequence import Sequence, SeqStatus
from lockstep.runtime.step_program import ProgramLadder

TINY = ModelConfig(arch="llama", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=1,
                   num_heads=2, num_kv_heads=1, head_dim=4, rope_theta=1e4, rms_norm_eps=1e-6,
                   max_position=4096, tie_word_embeddings=True)


def make_scheduler(num_blocks: int = 256, costs: bool = True, **config) -> Scheduler:
    config.setdefault("calibrate", "off")
    cfg = EngineConfig(**config)
    kv = KVCache(TINY, num_blocks, cfg.block_size, prefix_cache=cfg.prefix_cache)
    ladder = ProgramLadder(cfg.max_num_seqs, cfg.max_batched_tokens)
    table = None
    if costs:
        base = {p.name: (4 + p.num_seqs if p.kind == "decode" else p.num_tokens / 2) / 1000 for p in ladder.programs}
        table = CostTable(base, 0.0)
    return Scheduler(cfg, kv, ladder, table)


_ids = iter(range(1 << 30))


def make_seq(prompt_len: int, latency_class: str = "interactive", itl_target_ms: float | None = None,
             first_token: int = 1) -> Sequence:
    params = SamplingParams(latency_class=latency_class, itl_target_ms=itl_target_ms, max_tokens=None)
    return Sequence(seq_id=next(_ids), params=params, token_ids=list(range(first_token, first_token + prompt_len)),
                    num_prompt_tokens=prompt_len, detok=None, seed=0)


def advance(scheduler: Scheduler):
    """One scheduled step, applied: tokens computed, and a sampled token for each finished prompt."""
    step = scheduler.schedule()
    if step is None:
        return None
    for item in step.items:
        item.seq.num_computed += item.num_tokens
        if item.seq.num_uncomputed == 0:
            item.seq.token_ids.append(7)
    return step


def decoding(scheduler: Scheduler, seqs: list[Sequence]) -> None:
    """Runs steps until every sequence has its prompt computed."""
    for _ in range(100):
        if all(s.num_uncomputed <= 1 and s.status is SeqStatus.RUNNING for s in seqs):
            return
        advance(scheduler)
    raise AssertionError("prompts never finished prefilling")


def test_batch_decodes_fill_only_what_the_interactive_target_allows() -> None:
    s = make_scheduler(itl_target_ms=9.5)  # decode[4] costs 8 ms, decode[8] 12 ms
    voice = make_seq(5)
    batch = [make_seq(5 + i, "batch", first_token=20 + i) for i in range(10)]
    for seq in [voice, *batch]:
        s.add(seq)
    decoding(s, [voice, *batch])
    served: dict[int, int] = {}
    for _ in range(8):
        step = advance(s)
        ids = [item.seq.seq_id for item in step.items]
        assert voice.seq_id in ids, "an interactive decode is never held back"
        assert step.program.name == "decode[4]" and step.predicted_s <= 9.5e-3
        for i in ids:
            served[i] = served.get(i, 0) + 1
    # Round robin over 10 batch sequences, 3 seats a step: 24 seats, each served 2 or 3 times.
    assert sorted(served[b.seq_id] for b in batch) == [2] * 6 + [3] * 4


def test_without_interactive_streams_batch_work_takes_whole_buckets() -> None:
    s = make_scheduler(itl_target_ms=5)
    batch = [make_seq(5, "batch", first_token=30 + i) for i in range(10)]
    for seq in batch:
        s.add(seq)
    decoding(s, batch)
    step = advance(s)
    assert step.budget_s == math.inf and len(step.items) == 10 and step.program.name == "decode[16]"


def test_prompt_chunks_are_sized_to_the_interactive_target() -> None:
    s = make_scheduler(itl_target_ms=20)  # prefill[T] costs T / 2 ms: at most 40 rows
    voice = make_seq(5)
    s.add(voice)
    decoding(s, [voice])
    long_prompt = make_seq(300, "batch", first_token=40)
    s.add(long_prompt)
    step = advance(s)
    rows = {item.seq.seq_id: item.num_tokens for item in step.items}
    assert rows[voice.seq_id] == 1
    assert step.program.name == "prefill[32]" and rows[long_prompt.seq_id] == 31  # fills the bucket
    assert step.predicted_s <= 20e-3
    s.remove(voice)  # the interactive stream ends: prefill takes the whole prompt chunk again
    step = advance(s)
    assert step.items[0].num_tokens == 256 and step.program.name == "prefill[256]"


def test_a_request_may_set_its_own_target() -> None:
    s = make_scheduler(itl_target_ms=1000)
    voice = make_seq(5, itl_target_ms=12.5)  # decode[8] = 12 ms fits, decode[16] = 20 ms does not
    batch = [make_seq(4, "batch", first_token=50 + i) for i in range(12)]
    for seq in [voice, *batch]:
        s.add(seq)
    decoding(s, [voice, *batch])
    assert advance(s).program.name == "decode[8]"


def test_starved_batch_work_runs_after_the_wait_bound() -> None:
    s = make_scheduler(itl_target_ms=5.5, batch_max_wait_ms=30)  # decode[1] 5 ms; decode[2] 6 ms never fits
    voice = make_seq(5)
    starved = make_seq(5, "batch", first_token=60)
    for seq in (voice, starved):
        s.add(seq)
    decoding(s, [voice, starved])
    clock = [1000.0]
    s.clock = lambda: clock[0]
    starved.last_served_time = clock[0]
    for _ in range(3):
        clock[0] += 0.010
        assert [item.seq for item in advance(s).items] == [voice]
    clock[0] += 0.025  # 35 ms since it was served
    assert {item.seq.seq_id for item in advance(s).items} == {voice.seq_id, starved.seq_id}


def test_paused_sequences_take_no_step_and_keep_their_blocks() -> None:
    s = make_scheduler()
    a, b = make_seq(20), make_seq(20, first_token=70)
    s.add(a)
    s.add(b)
    decoding(s, [a, b])
    a.paused = True
    s.invalidate()  # what Engine.pause does: a change made outside the scheduler
    held = s.kv.allocator.num_tokens(a.handle)
    for _ in range(3):
        assert [item.seq for item in advance(s).items] == [b]
    assert s.kv.allocator.num_tokens(a.handle) == held
    a.paused = False
    s.invalidate()
    assert a in [item.seq for item in advance(s).items]


def test_new_work_takes_a_paused_sequences_blocks() -> None:
    s = make_scheduler(num_blocks=6, max_num_seqs=4, prefix_cache=False)  # 96 tokens
    paused, batch, voice = make_seq(30), make_seq(30, "batch", first_token=100), make_seq(30, first_token=200)
    for seq in (paused, batch, voice):
        s.add(seq)
    decoding(s, [paused, batch, voice])
    paused.paused = True
    s.invalidate()
    newcomer = make_seq(20, first_token=300)
    s.add(newcomer)
    advance(s)
    assert paused.status is SeqStatus.WAITING and paused.handle is None and paused.num_computed == 0
    assert batch.status is SeqStatus.RUNNING and voice.status is SeqStatus.RUNNING
    assert newcomer.status is SeqStatus.RUNNING


def test_a_growing_decode_preempts_batch_work_before_interactive() -> None:
    s = make_scheduler(num_blocks=6, max_num_seqs=4, prefix_cache=False)
    voice, batch, late_voice = make_seq(32), make_seq(32, "batch", first_token=100), make_seq(32, first_token=200)
    for seq in (voice, batch, late_voice):
        s.add(seq)
    decoding(s, [voice, batch, late_voice])  # 32 computed tokens each: every block full
    step = advance(s)  # each decode needs a third block; the batch sequence gives way first
    assert batch.status is SeqStatus.WAITING and batch.handle is None
    assert {item.seq.seq_id for item in step.items} <= {voice.seq_id, late_voice.seq_id}


@pytest.mark.parametrize("costs", [True, False])
def test_steps_never_exceed_their_program(costs: bool) -> None:
    s = make_scheduler(costs=costs, max_num_seqs=8, max_batched_tokens=64, itl_target_ms=15)
    seqs = [make_seq(3 + 17 * i, "batch" if i % 2 else "interactive", first_token=400 + i) for i in range(8)]
    for seq in seqs:
        s.add(seq)
    for _ in range(40):
        step = advance(s)
        assert step is not None
        assert step.num_tokens <= step.program.num_tokens and len(step.items) <= step.program.num_seqs
        if step.program.kind == "decode":
            assert all(item.num_tokens == 1 for item in step.items)


def _one_take_each(self, seqs: list[Sequence]) -> None:
    """_StepBuilder.take_decodes as one take() a sequence: what its single C++ call must match."""
    for seq in seqs:
        self.take(seq, 1, force=True)


def _random_workload(seed: int) -> tuple[list, int]:
    """Random arrivals (both classes), decodes and finishes on a small arena, step by step; the
    trace of every step (program, items, statuses, handles, free blocks) and how many times a
    running sequence was preempted."""
    rng = random.Random(seed)
    s = make_scheduler(num_blocks=rng.randrange(8, 24), costs=rng.random() < 0.5, max_num_seqs=8,
                       prefix_cache=rng.random() < 0.5)
    seqs: list[Sequence] = []
    trace, preempted = [], 0
    for _ in range(120):
        if len(seqs) < 14 and rng.random() < 0.3:
            seqs.append(make_seq(rng.randrange(3, 50), rng.choice(["interactive", "batch"]),
                                 first_token=rng.randrange(1, 50)))
            s.add(seqs[-1])
        running = [q for q in seqs if q.status is SeqStatus.RUNNING]
        if running and rng.random() < 0.1:
            done = rng.choice(running)
            s.remove(done)
            done.status = SeqStatus.FINISHED  # as the engine's finish does
        before = {id(q): q.status for q in seqs}
        step = advance(s)
        preempted += sum(before[id(q)] is SeqStatus.RUNNING and q.status is SeqStatus.WAITING for q in seqs)
        index = {id(q): i for i, q in enumerate(seqs)}
        trace.append((step.program.name if step else None,
                      [(index[id(item.seq)], item.num_tokens) for item in step.items] if step else [],
                      [(q.status.value, q.handle is None, q.num_computed) for q in seqs],
                      s.kv.allocator.num_free_blocks()))
    return trace, preempted


@pytest.mark.parametrize("seed", range(10))
def test_decode_batches_reserve_kv_exactly_as_one_take_each(seed: int, monkeypatch) -> None:
    """A decode batch takes its KV slots in one C++ call (BlockAllocator.append_one_each) and
    falls back to take() where the arena is short; step for step, under KV pressure and
    preemption, it schedules what one take() per sequence would."""
    batched, preempted = _random_workload(seed)
    with monkeypatch.context() as patch:
        patch.setattr(_StepBuilder, "take_decodes", _one_take_each)
        reference, _ = _random_workload(seed)
    assert batched == reference
    assert preempted > 0, "no sequence was preempted: the workload did not reach the fallback"


def test_reserve_one_each_copies_kv_in_the_order_the_allocator_gives() -> None:
    """KVCache.reserve_one_each on the allocator's order-sensitive case (a's published tail is
    copied, then reused as b's copy target in the same call): each sequence's new tail holds the
    K and V its old tail held."""
    kv = KVCache(TINY, 5, 4, prefix_cache=True)
    alloc = kv.allocator
    handles = []
    for first in (10, 30):
        h = alloc.new_sequence()
        kv.reserve(h, 8)
        alloc.publish(h, np.arange(first, first + 8, dtype=np.int64), 8)
        alloc.truncate(h, 7)
        handles.append(h)
    kv.k.copy_(torch.randn(kv.k.shape, generator=torch.Generator().manual_seed(5)))
    kv.v.copy_(torch.randn(kv.v.shape, generator=torch.Generator().manual_seed(6)))
    block = lambda t, b: t[:, b * 4:(b + 1) * 4].clone()  # noqa: E731
    before = {h: (block(kv.k, alloc.block_table(h)[-1]), block(kv.v, alloc.block_table(h)[-1])) for h in handles}
    assert kv.reserve_one_each(np.array(handles, np.int64)) == 2
    for h in handles:
        tail = alloc.block_table(h)[-1]
        k, v = before[h]
        assert torch.equal(block(kv.k, tail)[:, :3], k[:, :3]) and torch.equal(block(kv.v, tail)[:, :3], v[:, :3]), h

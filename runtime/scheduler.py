"""Which sequences run in the next step, how many tokens each, and in which step program.

Each step is one of the programs fixed at start-up (runtime/step_program.py), and the cost
table (runtime/cost_model.py) says how long each takes. The scheduler builds a step in order:

1. every interactive decode (one token each): an interactive stream is never held back;
2. batch decodes, least recently served first, while the predicted step time stays inside the
   tightest inter-token-latency target of the interactive streams now decoding (no target
   while none is). A batch sequence unserved for longer than batch_max_wait_ms goes in
   regardless, which bounds its starvation. Seats a decode bucket pads anyway cost nothing,
   so the prediction lets batch decodes fill them;
3. prompt chunks, interactive before batch and otherwise in admission order: running
   sequences first, then waiting ones admitted while seats and KV blocks allow (reusing
   cached prefix blocks, and taking paused sequences' blocks if need be). A chunk is sized so the step fills a prefill bucket whose predicted
   time is inside the target.

A steady decode (the same sequences as the step before, one token each, nothing waiting to get
in, and every batch decode still inside the latency target where there is one, so the step is
what the full pass would build) is replayed: the previous step's items, their KV slots in one
C++ call, a few predictions where batch work is held to a target, and no pass over the sequences. Any
change to who runs or what they need (a sequence added, ended, preempted, paused, given input,
truncated, committed) drops the replay; the engine reports its own (invalidate()).

Paused sequences keep their blocks and take no part. Without a cost table (calibrate "off")
steps are limited by max_batched_tokens alone. When the arena runs dry, a sequence gives way:
a paused one first, then batch work, then the latest admitted; its blocks are freed (cached
prefix blocks stay cached) and it is recomputed from its tokens later, with identical output.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from operator import attrgetter
from typing import NamedTuple

import numpy as np

from .config import EngineConfig
from .cost_model import CostModel, CostTable
from .kv_cache import KVCache
from .sequence import Sequence, SeqStatus
from .step_program import ProgramLadder, StepProgram


class ScheduledSeq(NamedTuple):  # one per sequence per step: a tuple is the cheapest to make
    seq: Sequence
    num_tokens: int  # tokens from seq.num_computed on, computed this step


# Makes ScheduledSeq(seq, n) from a (seq, n) pair without a Python-level call per item.
_scheduled_from_pair = partial(tuple.__new__, ScheduledSeq)


@dataclass
class ScheduledStep:
    program: StepProgram
    items: list[ScheduledSeq] = field(default_factory=list)
    predicted_s: float | None = None  # from the cost table, when there is one
    budget_s: float = math.inf  # the latency target this step had to meet
    # The previous step's items again, each one token further (a steady decode): the same list.
    steady: bool = False
    pairs: int = 0  # attention pairs: what the prediction was for (CostModel.observe)
    # Every item is one token at the end of its sequence's input (no prompt chunk): the engine
    # gathers such a step's inputs without the per-item prompt bookkeeping.
    decode_only: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)


_last_scheduled = attrgetter("last_scheduled_step")
_handle = attrgetter("handle")
_num_computed = attrgetter("num_computed")


@dataclass(slots=True)
class _SteadyDecode:
    """A decode step that repeats while nothing changes: what the full pass would build again."""

    items: list[ScheduledSeq]  # interactive decodes, then batch ones, each in admission order
    handles: np.ndarray
    program: StepProgram
    pairs: int  # attention pairs of the latest step; one more per sequence each step
    budget_s: float
    # With batch decodes held to budget_s: (program, k, pairs) for the first k items, the prefixes
    # whose predicted time the full pass's take() would check last within each decode bucket.
    budget_checks: list[list] = field(default_factory=list)
    served_step: int = -1  # the latest step that replayed it, not yet written to the sequences
    served_time: float = 0.0


def attention_pairs(seq: Sequence, n: int) -> int:
    """Query-key pairs of computing n more tokens of seq: token i sees num_computed + i + 1 keys."""
    return n * seq.num_computed + n * (n + 1) // 2


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCache, ladder: ProgramLadder,
                 costs: CostTable | CostModel | None) -> None:
        self.config = config
        self.kv = kv
        self.ladder = ladder
        self.costs = costs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.step_index = 0
        self.clock = time.perf_counter  # what the starvation bound measures waits with
        self._steady: _SteadyDecode | None = None
        self._unsettled: _SteadyDecode | None = None  # served times the replay has not written yet

    # --- membership ------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.invalidate()
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A fork of a running sequence joins right after it, sharing its blocks."""
        self.invalidate()
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def invalidate(self) -> None:
        """A sequence's input, state or parameters change outside the scheduler (the engine's
        fork, append, truncate, commit, pause, resume): the next step is planned in full, and
        the replayed steps' service is written to their sequences now (a fork copies it)."""
        self._steady = None
        self._settle()

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out of scheduling and frees its blocks (finish or cancel)."""
        self.invalidate()
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def has_work(self) -> bool:
        return any(not s.paused for s in self.waiting) or any(s.num_uncomputed and not s.paused for s in self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # --- the step ------------------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep | None:
        self.step_index += 1
        now = self.clock()
        steady = self._steady
        if steady is not None:
            step = self._replay(steady, now)
            if step is not None:
                return step
        self._settle()
        # One pass sorts the running sequences by what they need; it runs every step.
        interactive_decodes: list[Sequence] = []
        batch: list[Sequence] = []
        prefills: list[Sequence] = []
        for seq in self.running:
            if seq.paused:
                continue
            left = len(seq.token_ids) + seq.num_pending - seq.num_computed  # seq.num_uncomputed, inlined
            if left == 1:
                (interactive_decodes if seq.params.latency_class == "interactive" else batch).append(seq)
            elif left:
                prefills.append(seq)
        budget = self._budget_s(interactive_decodes)
        step = _StepBuilder(self, budget, now)

        step.take_decodes(interactive_decodes)
        batch.sort(key=_last_scheduled)
        if budget == math.inf:
            step.take_decodes(batch)  # no target to keep: every one fits
        else:
            for seq in batch:
                step.take(seq, 1, force=self.starved(seq, now))

        prefills.sort(key=lambda s: not s.params.interactive)
        for seq in prefills:
            step.take_chunk(seq)
        admission = sorted((s for s in self.waiting if not s.paused), key=lambda s: not s.params.interactive)
        for seq in admission:
            if len(self.running) >= self.config.max_num_seqs or not step.has_rows():
                break
            if not self._admit(seq, step):
                break
        if not step.items:
            return None
        index = self.step_index
        for seq, _ in step.items:
            seq.last_scheduled_step = index
            seq.last_served_time = now
        scheduled = step.finish()
        self._steady = self._steady_after(step, scheduled, interactive_decodes, batch, prefills)
        return scheduled

    def _steady_after(self, built: _StepBuilder, step: ScheduledStep, interactive_decodes: list[Sequence],
                      batch: list[Sequence], prefills: list[Sequence]) -> _SteadyDecode | None:
        """The replay of this step for the next ones, if the full pass would build it again: every
        running sequence that is not paused decodes one token in it (so none is held back or
        left out), each is generating (it gets a token, and decodes again), and none waits to be
        admitted. Batch decodes held to a target stay in while each replay's predictions fit it
        (_budget_checks)."""
        n = len(step.items)
        if prefills or n != len(interactive_decodes) + len(batch) or built.prefill_rows \
                or (len(self.running) < self.config.max_num_seqs and any(not s.paused for s in self.waiting)):
            return None
        if not all(item.num_tokens == 1 and item.seq.generating for item in step.items):
            return None
        # The next full pass orders batch decodes by last_scheduled_step, which is now the same
        # for all of them: admission order (batch is sorted in place, so it is taken again).
        in_batch = {id(s) for s in batch}
        order = interactive_decodes + [s for s in self.running if id(s) in in_batch]
        items = step.items if [item.seq for item in step.items] == order else [ScheduledSeq(s, 1) for s in order]
        handles = np.array(list(map(_handle, order)), np.int64)
        held = batch and step.budget_s != math.inf and self.costs is not None  # else every one fits
        checks = self._budget_checks(order, len(interactive_decodes)) if held else []
        return _SteadyDecode(items, handles, step.program, built.pairs, step.budget_s, checks)

    def _budget_checks(self, order: list[Sequence], num_interactive: int) -> list[list]:
        """What a replay must check so that it stays the step the full pass would build while batch
        decodes are held to a latency target (every one of them was taken: none was left out).

        The full pass takes batch decodes one by one, each only if the step's predicted time with
        it (the first k items, in the smallest decode bucket that holds k) stays inside the target.
        Within one bucket the prediction grows with attention pairs (the table's slope is never
        negative, and a correction is a positive factor), so the prefix that ends each
        bucket's range is the one that binds; across buckets it need not grow (each program has
        its own measured correction), so each bucket's is checked. Each replay adds k pairs to
        the prefix of k (each of its sequences is one token longer)."""
        pairs = np.cumsum([s.num_computed + 1 for s in order], dtype=np.int64)  # attention_pairs(s, 1) each
        checks, smaller = [], 0
        for program in self.ladder.decode:
            k = min(program.num_seqs, len(order))
            if k > num_interactive and k > smaller:  # the bucket holds some prefix the full pass checks
                checks.append([program, k, int(pairs[k - 1])])
            smaller = program.num_seqs
            if smaller >= len(order):
                break
        return checks

    def _replay(self, steady: _SteadyDecode, now: float) -> ScheduledStep | None:
        """The steady decode again, one token further; None (and no replay from now on) when
        the arena may be too short for a token each: the full pass then preempts."""
        n = len(steady.items)
        # One token takes at most one new block (a fresh one, or a copy of a shared last block).
        if self.kv.allocator.num_free_blocks() < n:
            self._steady = None
            return None
        if steady.budget_checks:
            for check in steady.budget_checks:
                check[2] += check[1]
            if any(self.costs.predict(program, pairs) > steady.budget_s for program, _, pairs in steady.budget_checks):
                self._steady = None  # some batch decode no longer fits: the full pass picks who runs
                return None
        grown = self.kv.reserve_one_each(steady.handles)
        assert grown == n, f"the arena supplied {grown} of {n} decode slots despite the free blocks"
        steady.pairs += n
        steady.served_step, steady.served_time = self.step_index, now
        self._unsettled = steady
        predicted = None if self.costs is None else self.costs.predict(steady.program, steady.pairs)
        return ScheduledStep(steady.program, steady.items, predicted, steady.budget_s, steady=True,
                             pairs=steady.pairs, decode_only=True)

    def _settle(self) -> None:
        """Writes the replayed steps' service to their sequences, for round-robin and the
        starvation bound, which only the full pass reads."""
        steady, self._unsettled = self._unsettled, None
        if steady is not None:
            for seq, _ in steady.items:
                seq.last_scheduled_step = steady.served_step
                seq.last_served_time = steady.served_time

    def starved(self, seq: Sequence, now: float) -> bool:
        """Whether batch work has waited past its bound (interactive work is never held back)."""
        return now - seq.last_served_time > self.config.batch_max_wait_ms / 1000

    def _budget_s(self, interactive_decodes: list[Sequence]) -> float:
        """The tightest inter-token latency target of the interactive streams decoding now (a
        request's own, else the engine's); no limit while none is."""
        if not interactive_decodes:
            return math.inf
        default = self.config.itl_target_ms
        targets = {s.params.itl_target_ms for s in interactive_decodes}
        return min(default if t is None else t for t in targets) / 1000

    def _admit(self, seq: Sequence, step: _StepBuilder) -> bool:
        """Gives a waiting sequence its KV (cached prefix blocks first) and a first chunk, if both fit."""
        alloc = self.kv.allocator
        # Prompt logprobs need every prompt token's logits, so such a request computes them all.
        if self.config.prefix_cache and seq.params.prompt_logprobs is None:
            handle, cached = alloc.new_sequence_cached(np.asarray(seq.token_ids, np.int64))
        else:
            handle, cached = alloc.new_sequence(), 0
        seq.handle, seq.num_computed = handle, cached
        n = step.chunk_size(seq)
        # A paused sequence's blocks are the first to go to new work.
        paused = [s for s in self.running if s.paused]
        while n and alloc.blocks_needed(handle, n) > alloc.num_free_blocks() and paused:
            self._preempt(paused.pop())
        # Admit only what fits now; the rest of a long prompt is reserved chunk by chunk.
        if n == 0 or alloc.blocks_needed(handle, n) > alloc.num_free_blocks():
            alloc.free(handle)
            seq.handle, seq.num_computed = None, 0
            return False
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        step.take(seq, n, force=True)
        return True

    # --- KV pressure ------------------------------------------------------------------------------

    def reserve(self, seq: Sequence, n: int, in_step: list[ScheduledSeq]) -> bool:
        """Makes room for n more tokens of seq, preempting others if needed; False if seq itself gave way."""
        alloc = self.kv.allocator
        while alloc.blocks_needed(seq.handle, n) > alloc.num_free_blocks():
            victim = self._victim(seq, in_step)
            self._preempt(victim)
            if victim is seq:
                return False
        self.kv.reserve(seq.handle, n)
        return True

    def _victim(self, seq: Sequence, in_step: list[ScheduledSeq]) -> Sequence:
        """Paused first, then batch, then interactive; the latest admitted within each. Never one
        already in this step; seq itself if nothing else can give way."""
        taken = {id(item.seq) for item in in_step}
        candidates = [s for s in self.running if s is not seq and id(s) not in taken]
        if not candidates:
            return seq
        rank = {id(s): i for i, s in enumerate(self.running)}
        return max(candidates, key=lambda s: (s.paused, not s.params.interactive, rank[id(s)]))

    def _preempt(self, seq: Sequence) -> None:
        self.invalidate()
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.handle is not None:
            self.kv.allocator.free(seq.handle)
            seq.handle = None


class _StepBuilder:
    """One step under construction: what it holds, and whether more fits its program and budget."""

    def __init__(self, scheduler: Scheduler, budget_s: float, now: float) -> None:
        self.scheduler = scheduler
        self.budget = budget_s
        self.now = now
        self.items: list[ScheduledSeq] = []
        self.rows = 0
        self.pairs = 0
        self.prefill_rows = 0
        self.max_rows = scheduler.ladder.largest_rows

    def has_rows(self) -> bool:
        return self.rows < self.max_rows

    def _cost(self, rows: int, seqs: int, pairs: int) -> float:
        costs = self.scheduler.costs
        if costs is None:
            return 0.0
        return costs.predict(self.scheduler.ladder.for_step(rows, seqs), pairs)

    def _fits(self, rows: int, seqs: int, pairs: int) -> bool:
        if rows > self.max_rows or seqs > self.scheduler.config.max_num_seqs:
            return False
        return self._cost(rows, seqs, pairs) <= self.budget

    def take_decodes(self, seqs: list[Sequence]) -> None:
        """One token of each, not held to the budget (interactive streams, or any when there is
        no target): the KV slots of all of them in one C++ call. One the arena cannot supply,
        and those after it, go through take() one by one, which preempts to make room."""
        room = min(self.max_rows - self.rows, self.scheduler.config.max_num_seqs - len(self.items))
        handles = list(map(_handle, seqs))
        if None in handles:  # rare: a sequence without KV goes through take(), which skips it
            ready = [s for s in seqs if s.handle is not None][:room]
            handles = list(map(_handle, ready))
        else:
            ready, handles = seqs[:room], handles[:room]
        # np.array from a list: a third of the time of np.fromiter over a generator at 64.
        grown = self.scheduler.kv.reserve_one_each(np.array(handles, np.int64)) if ready else 0
        taken = ready[:grown]
        self.items.extend(map(_scheduled_from_pair, zip(taken, repeat(1))))
        self.rows += grown
        self.pairs += sum(map(_num_computed, taken)) + grown  # attention_pairs(s, 1) for each
        for seq in ready[grown:]:
            self.take(seq, 1, force=True)

    def take(self, seq: Sequence, n: int, force: bool = False) -> bool:
        pairs = attention_pairs(seq, n)
        if not force and not self._fits(self.rows + n, len(self.items) + 1, self.pairs + pairs):
            return False
        if self.rows + n > self.max_rows or len(self.items) >= self.scheduler.config.max_num_seqs:
            return False
        if seq.handle is None or not self.scheduler.reserve(seq, n, self.items):
            return False
        self.items.append(ScheduledSeq(seq, n))
        self.rows += n
        self.pairs += pairs
        if n > 1 or seq.num_uncomputed > 1:
            self.prefill_rows += n
        return True

    def chunk_size(self, seq: Sequence) -> int:
        """The most tokens of seq's prompt this step can take: capped by the prompt chunk size, the
        largest program and the latency budget; sized to fill a prefill bucket when it is capped."""
        cap = min(seq.num_uncomputed, self.scheduler.config.prefill_chunk - self.prefill_rows, self.max_rows - self.rows)
        if cap <= 0:
            return 0
        if self.scheduler.costs is None or self.budget == math.inf:
            return cap
        seqs = len(self.items) + 1
        best = 0
        for program in self.scheduler.ladder.prefill_fitting(self.rows + 1):
            n = min(cap, program.num_tokens - self.rows)
            if n > best and self._fits(self.rows + n, seqs, self.pairs + attention_pairs(seq, n)):
                best = n
        if best == 0 and self.scheduler.starved(seq, self.now):
            # Past its wait bound, a prompt gets the smallest chunk even if the step runs long.
            best = min(cap, max(1, self.scheduler.ladder.prefill[0].num_tokens - self.rows))
        return best

    def take_chunk(self, seq: Sequence) -> bool:
        n = self.chunk_size(seq)
        return n > 0 and self.take(seq, n, force=True)

    def finish(self) -> ScheduledStep:
        program = self.scheduler.ladder.for_step(self.rows, len(self.items))
        predicted = None if self.scheduler.costs is None else self.scheduler.costs.predict(program, self.pairs)
        return ScheduledStep(program, self.items, predicted, self.budget, pairs=self.pairs,
                             decode_only=self.prefill_rows == 0)

"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget. Running sequences go first, decodes (one token) before
prefill chunks, so a long prompt never stalls the streams already generating; waiting
sequences are then admitted first-come first-served while the budget, the seat count and the
KV arena allow. A prompt longer than the budget is prefilled in chunks over several steps.
When the arena runs dry mid-generation, the most recently admitted sequence is preempted: its
blocks are freed and it is recomputed from its tokens later (blocks shared with forks stay).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .config import EngineConfig
from .kv_cache import KVCache
from .sequence import Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens from seq.num_computed on, computed this step


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCache) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A fork of a running sequence joins right after it, sharing its blocks."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out of scheduling and frees its blocks (finish or cancel)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s.num_uncomputed for s in self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_batched_tokens
        plan: list[ScheduledSeq] = []
        alloc = self.kv.allocator
        # Decodes first, then chunks of prompts already under way; admission order within each.
        order = sorted((s for s in self.running if s.num_uncomputed),
                       key=lambda s: s.num_uncomputed > 1)
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted below to make room for an earlier one
            n = min(seq.num_uncomputed, budget)
            while alloc.blocks_needed(seq.handle, n) > alloc.num_free_blocks():
                # The latest admitted sequence not already in this step gives way; if there is
                # none, this one waits (a lone sequence always fits: max_model_len <= arena).
                victim = next((s for s in reversed(self.running)
                               if s is not seq and all(p.seq is not s for p in plan)), seq)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.kv.reserve(seq.handle, n)
            plan.append(ScheduledSeq(seq, n))
            budget -= n

        while self.waiting and budget and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            # Admit only what fits now; the rest of a long prompt is reserved chunk by chunk.
            if -(-n // self.kv.block_size) > alloc.num_free_blocks():
                break
            self.waiting.popleft()
            seq.handle = alloc.new_sequence()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self.kv.reserve(seq.handle, n)
            plan.append(ScheduledSeq(seq, n))
            budget -= n
        return plan

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.handle is not None:
            self.kv.allocator.free(seq.handle)
            seq.handle = None

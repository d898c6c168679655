"""Step programs: the fixed shapes a step may take, chosen from a ladder fixed at start-up.

Like an SRAM chip's compiled schedule, the engine runs only shapes it planned and timed at
start-up (runtime/cost_model.py):
- `decode[B]`: B sequences, one new token each, for B in 1, 2, 4, ... max_num_seqs. A step
  with fewer sequences is padded up to B with inert sequences (one token at the arena's
  scratch block, context 1), so on CUDA each bucket is one captured graph.
- `prefill[T]`: T token rows holding prompt chunks (and any decodes running alongside), for
  T on a ladder of powers of two and their midpoints (16, 24, 32, 48, ...) up to
  max_batched_tokens. Rows past the real tokens are inert: they write the scratch block,
  belong to no sequence and are never read.
The ladder's 1.5x midpoints keep padding under a third of a prefill step; the scheduler fills
a chunk up to its bucket anyway, so a prompt being prefilled pads at most its last chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import InvalidRequestError

Kind = Literal["decode", "prefill"]
MIN_PREFILL_BUCKET = 16


@dataclass(frozen=True, order=True)
class StepProgram:
    kind: Kind
    num_tokens: int  # token rows, padded
    num_seqs: int  # sequence slots, padded (decode); the most a prefill program can hold

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.num_tokens}]"


def decode_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, ... and max_num_seqs itself when it is not a power of two."""
    buckets, b = [], 1
    while b < max_num_seqs:
        buckets.append(b)
        b *= 2
    return buckets + [max_num_seqs]


def prefill_buckets(max_batched_tokens: int) -> list[int]:
    """16, 24, 32, 48, 64, 96, ... up to max_batched_tokens, which is always the last rung."""
    buckets, b = [], MIN_PREFILL_BUCKET
    while b < max_batched_tokens:
        buckets.append(b)
        if b + b // 2 < max_batched_tokens:
            buckets.append(b + b // 2)
        b *= 2
    return buckets + [max_batched_tokens]


class ProgramLadder:
    """Every step program of an engine, and the smallest one that holds a given step."""

    def __init__(self, max_num_seqs: int, max_batched_tokens: int) -> None:
        if max_batched_tokens < max_num_seqs:
            raise InvalidRequestError(f"max_batched_tokens ({max_batched_tokens}) must be at least "
                                      f"max_num_seqs ({max_num_seqs}): every sequence must fit one step")
        self.decode = [StepProgram("decode", b, b) for b in decode_buckets(max_num_seqs)]
        self.prefill = [StepProgram("prefill", t, min(t, max_num_seqs)) for t in prefill_buckets(max_batched_tokens)]
        self.programs = self.decode + self.prefill
        # Fixed with the ladder; the scheduler reads largest_rows every full pass.
        self.largest_rows = max(p.num_tokens for p in self.programs)
        self.largest_seqs = max(p.num_seqs for p in self.programs)

    def for_step(self, num_tokens: int, num_seqs: int) -> StepProgram:
        """The program for a step of `num_tokens` rows over `num_seqs` sequences (decode when
        every sequence brings one token)."""
        if num_tokens == num_seqs:
            for program in self.decode:
                if program.num_seqs >= num_seqs:
                    return program
        for program in self.prefill:
            if program.num_tokens >= num_tokens and program.num_seqs >= num_seqs:
                return program
        raise ValueError(f"no step program holds {num_tokens} tokens over {num_seqs} sequences")

    def prefill_fitting(self, num_tokens: int) -> list[StepProgram]:
        """Prefill programs with room for at least `num_tokens` rows, smallest first."""
        return [p for p in self.prefill if p.num_tokens >= num_tokens]

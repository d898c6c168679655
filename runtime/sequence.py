"""A sequence: one stream of tokens with its KV, sampling parameters and output so far."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from .detokenizer import IncrementalDetokenizer
from .sampling_params import SamplingParams


class SeqStatus(Enum):
    WAITING = "waiting"  # holds no KV; queued for admission (new, or preempted)
    RUNNING = "running"  # holds KV blocks; scheduled every step it has work
    FINISHED = "finished"


class FinishReason(str, Enum):
    STOP = "stop"  # end-of-sequence/turn token, a stop token or a stop string
    LENGTH = "length"  # max_tokens, or the context is full
    CANCELLED = "cancelled"
    ERROR = "error"  # the step it was in failed; the engine kept running


@dataclass(eq=False)  # identity, not field-by-field: two sequences are never the same one
class Sequence:
    seq_id: int
    params: SamplingParams
    token_ids: list[int]  # prompt, appended input and generated output, in order
    num_prompt_tokens: int
    detok: IncrementalDetokenizer
    seed: int
    branch: int = 0
    # While False the sequence only prefills what it is given (incremental input) and waits.
    generating: bool = True
    stop_ids: frozenset[int] = frozenset()  # token ids that end it: the model's stops and the request's
    status: SeqStatus = SeqStatus.WAITING
    handle: int | None = None  # block allocator handle while it holds KV
    held_slot: int | None = None  # its last input token's logits, kept in Engine.held (runtime/held_logits.py)
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    # In overlap mode, 1 while its sampled token is still on the device, not yet in token_ids
    # (Engine._resolve takes it in once the next step is launched); pending_index is its row in
    # that sampling's result.
    num_pending: int = 0
    pending_index: int = -1
    output_ids: list[int] = field(default_factory=list)
    output_positions: list[int] = field(default_factory=list)  # index of each output in token_ids
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    outputs_at_commit: int = 0  # max_tokens counts from here
    num_chars_sent: int = 0
    finish_reason: FinishReason | None = None
    cancel_requested: bool = False
    paused: bool = False  # keeps its KV, runs no step until resumed
    error: str | None = None  # why it ended with FinishReason.ERROR
    last_scheduled_step: int = -1  # for round-robin and the starvation bound of batch work
    last_served_time: float = field(default_factory=time.perf_counter)
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def text(self) -> str:
        """Output text so far, cut at a stop string (the detokenizer keeps it)."""
        return self.detok.text

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_computed

    @property
    def num_new_outputs(self) -> int:
        """Outputs since the last commit: what max_tokens and min_tokens count."""
        return len(self.output_ids) - self.outputs_at_commit

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass(slots=True)  # one per sequence per step: slots make it cheaper to build and read
class SeqOutput:
    """What one step produced for one sequence: a token, text safe to stream, or its end."""

    seq_id: int
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None  # with FinishReason.ERROR: what failed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

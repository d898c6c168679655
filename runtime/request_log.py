"""The request log of `lockstep serve --log-requests`: each request's prompt, sampling parameters
and output text, logged to the `lockstep.requests` logger when it ends.

Prompts and outputs are users' data, so nothing of them is logged unless the operator asks; the
server otherwise logs only errors and counts. An AsyncEngine observer (runtime/async_engine.py),
so HTTP and gRPC requests are logged alike, on the engine thread.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .sequence import FinishReason, SeqOutput, Sequence

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("lockstep.requests")


@dataclass
class _Open:
    text: list[str] = field(default_factory=list)
    tokens: int = 0


class RequestLog:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._open: dict[int, _Open] = {}

    def on_added(self, seq: Sequence, now: float) -> None:
        self._open[seq.seq_id] = _Open()
        prompt = self.tokenizer.decode(list(seq.token_ids), skip_special_tokens=False)
        log.info("request %d: %d prompt tokens %r, %s", seq.seq_id, seq.num_prompt_tokens, prompt, seq.params)

    def on_forked(self, parent: Sequence, children: list[Sequence], now: float) -> None:
        for child in children:
            self._open[child.seq_id] = _Open()
            log.info("request %d: forked from %d at %d tokens", child.seq_id, parent.seq_id, len(child.token_ids))

    def on_step(self, engine: Engine, seconds: float) -> None:
        pass

    def on_outputs(self, outputs: list[SeqOutput], now: float) -> None:
        opened = self._open
        for out in outputs:
            entry = opened.get(out.seq_id)
            if entry is None:
                continue
            entry.text.append(out.text)
            entry.tokens += out.token_id is not None
            if out.finished:
                del opened[out.seq_id]
                error = f" ({out.error})" if out.finish_reason is FinishReason.ERROR else ""
                log.info("request %d: %s after %d tokens%s, output %r", out.seq_id,
                         FinishReason(out.finish_reason).value, entry.tokens, error, "".join(entry.text))

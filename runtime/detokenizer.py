"""Turns a stream of token ids into a stream of text deltas.

One token is not always whole text: byte-level BPE splits rare characters (emoji, CJK) into
byte tokens, and SentencePiece drops the leading space of whatever comes first in a decode.
So text is emitted by comparing two decodes of a short window of recent tokens, as vLLM and
TGI do:

    prefix_text = decode(ids[prefix:read])   # already emitted
    new_text    = decode(ids[prefix:])       # the same plus the tokens not yet emitted

and new_text[len(prefix_text):] is emitted unless it ends in U+FFFD, which means the last
character is still incomplete and its remaining bytes are coming. The window then slides
forward, so a token costs two decodes of a few tokens, however long the output grows. Unlike
vLLM's, the window is also bounded when the bytes never complete (a model emitting stray
UTF-8 bytes): past MOST_HELD_TOKENS held tokens, they come out as U+FFFD.

The per-token path runs that algorithm in Rust: `tokenizers`' DecodeStream keeps the window
and its prefix text, one call a token (~0.7 us here, against ~5 us for two decodes from
Python). The window's indices (prefix, read) are also kept in Python, and they are the truth:
the stream is a cache of them. It is rebuilt where Python moves the window itself (flush,
truncate) and dropped, with the two decodes from Python taking over, wherever it cannot hold
that state exactly: DecodeStream compares byte lengths and would emit a whole window whose
prefix text ends in U+FFFD, a case the algorithm above handles (after flushing half a
character). The next emission past such a spot brings the stream back.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Sequence

from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# How many prompt tokens the window starts with: enough context that the first output
# token decodes as it would in the middle of text (its leading space kept).
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"
# Tokens held back at most: a UTF-8 character is at most 4 bytes, so at most 4 byte tokens.
MOST_HELD_TOKENS = 8
MOST_PIECES = 256  # text pieces kept apart before they are joined into one


class IncrementalDetokenizer:
    """Streams the text of one sequence's output tokens.

    `text` is everything push()/flush() have returned so far, in order: the output's text up to
    the last complete character (after flush(), all of it). Concatenated deltas always equal it.
    Without prompt context it equals tokenizer.decode(outputs) at character boundaries; with
    context, a first token's leading space is kept (SentencePiece), as in prompt + completion.

    The text is kept as its pieces, joined when `text` is read or MOST_PIECES have gathered:
    appending to one string copies it, O(length) a token, which an output of tens of thousands
    of tokens makes the largest cost of a step; joining every MOST_PIECES tokens is that copy
    once per MOST_PIECES, and bounds the pieces' memory. What a step reads is the end of the
    text (tail(): what is not yet sent, or where a stop string may complete), at the cost of
    that end's length.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend
        self._skip = skip_special_tokens
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        if context and self._decode(context).endswith(_REPLACEMENT):
            # The prompt ends mid-character; output bytes cannot be split from it cleanly.
            context = []
        self._ids = context
        self._num_context = len(context)
        self._prefix = 0
        self._read = len(context)
        self._pieces: list[str] = []
        self.length = 0  # of text
        # State after each output token: (prefix, read, len(text)), so truncate() needs no decode
        # of the whole output.
        self._checkpoints: list[tuple[int, int, int]] = []
        self._stream: DecodeStream | None = DecodeStream(context, skip_special_tokens=skip_special_tokens)

    @property
    def num_outputs(self) -> int:
        return len(self._ids) - self._num_context

    def push(self, token_id: int) -> str:
        """Adds one output token; returns the text that became safe to show ("" if none yet)."""
        self._ids.append(token_id)
        delta = self._step_stream(token_id) if self._stream is not None else self._step_window()
        if delta:
            self._prefix, self._read = self._read, len(self._ids)
            self._append(delta)
            if self._stream is None:
                self._restart_stream()
        elif len(self._ids) - self._read > MOST_HELD_TOKENS:
            # No character spans this many tokens, so what is held can never become valid text
            # (a run of stray UTF-8 bytes): let it out as U+FFFD. Held, it would grow the window
            # every push decodes, making each token cost more than the last.
            delta = self.flush()
        self._checkpoints.append((self._prefix, self._read, self.length))
        return delta

    def _append(self, delta: str) -> None:
        pieces = self._pieces
        pieces.append(delta)
        self.length += len(delta)
        if len(pieces) > MOST_PIECES:
            self._pieces = ["".join(pieces)]

    @property
    def text(self) -> str:
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def tail(self, start: int) -> str:
        """text[start:], reading only the pieces it spans (of the first, only its end)."""
        pieces, at = self._pieces, self.length
        i = len(pieces)
        while i and at > start:
            i -= 1
            at -= len(pieces[i])
        if i == len(pieces):
            return ""
        first = pieces[i][start - at:]
        return first if i + 1 == len(pieces) else first + "".join(pieces[i + 1:])

    def cut(self, length: int) -> None:
        """Ends the text at `length` (a stop string found there): nothing after it is shown."""
        self._pieces, self.length = [self.text[:length]], length

    def flush(self) -> str:
        """Returns all text still held back (an incomplete character shows as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        delta = self._decode(self._ids[self._prefix:])[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._append(delta)
        self._restart_stream()
        # Checkpoints stay as pushes left them: truncate() then forgets the flush, as if it never was.
        return delta

    def truncate(self, num_outputs: int) -> None:
        """Rolls back to the first `num_outputs` output tokens, as if only they had been pushed."""
        if not 0 <= num_outputs <= self.num_outputs:
            raise ValueError(f"truncate to {num_outputs} outputs, but there are {self.num_outputs}")
        del self._ids[self._num_context + num_outputs:]
        del self._checkpoints[num_outputs:]
        if num_outputs:
            self._prefix, self._read, length = self._checkpoints[-1]
        else:
            self._prefix, self._read, length = 0, self._num_context, 0
        self.cut(length)
        self._restart_stream()
        if self._stream is not None:
            # Tokens after the last emission are held in the window; stepping them again returns
            # nothing (they emitted nothing the first time) and leaves the stream where it was.
            for token_id in self._ids[self._read:]:
                if self._stream.step(self._backend, token_id):
                    raise AssertionError("a held token emitted text when replayed")

    def clone(self) -> IncrementalDetokenizer:
        """An independent copy (for a forked sequence)."""
        twin = object.__new__(IncrementalDetokenizer)
        twin.__dict__.update(self.__dict__)
        twin._ids = list(self._ids)
        twin._pieces = list(self._pieces)
        twin._checkpoints = list(self._checkpoints)
        twin._stream = copy.copy(self._stream)
        return twin

    def _step_stream(self, token_id: int) -> str:
        try:
            return self._stream.step(self._backend, token_id) or ""
        except Exception:  # noqa: BLE001 - e.g. a decoder whose prefix text changed: use the window
            self._stream = None
            return self._step_window()

    def _step_window(self) -> str:
        """The algorithm from Python, on the window (prefix, read); the last id is pushed already."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            return new_text[len(prefix_text):]
        return ""

    def _restart_stream(self) -> None:
        """A stream holding the window (prefix, read) as emitted text, or None where it cannot."""
        window = self._ids[self._prefix:self._read]
        exact = not window or not self._decode(window).endswith(_REPLACEMENT)
        self._stream = DecodeStream(window, skip_special_tokens=self._skip) if exact else None

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

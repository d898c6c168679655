"""Turns a stream of token ids into a stream of text deltas.

One token is not always whole text: byte-level BPE splits rare characters (emoji, CJK) into
byte tokens, and SentencePiece drops the leading space of whatever comes first in a decode.
So each step decodes a short window of recent tokens twice, as vLLM and TGI do:

    prefix_text = decode(ids[prefix:read])   # already emitted
    new_text    = decode(ids[prefix:])       # the same plus the tokens not yet emitted

and emits new_text[len(prefix_text):] unless it ends in U+FFFD, which means the last character
is still incomplete and its remaining bytes are coming. The window then slides forward, so a
step costs two decodes of a few tokens, however long the output grows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# How many prompt tokens the window starts with: enough context that the first output
# token decodes as it would in the middle of text (its leading space kept).
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Streams the text of one sequence's output tokens.

    `text` is everything push()/flush() have returned so far, in order: the output's text up to
    the last complete character (after flush(), all of it). Concatenated deltas always equal it.
    Without prompt context it equals tokenizer.decode(outputs) at character boundaries; with
    context, a first token's leading space is kept (SentencePiece), as in prompt + completion.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        if context and self._decode(context).endswith(_REPLACEMENT):
            # The prompt ends mid-character; output bytes cannot be split from it cleanly.
            context = []
        self._ids = context
        self._num_context = len(context)
        self._prefix = 0
        self._read = len(context)
        self.text = ""
        # State after each output token: (prefix, read, len(text)), so truncate() is O(1).
        self._checkpoints: list[tuple[int, int, int]] = []

    @property
    def num_outputs(self) -> int:
        return len(self._ids) - self._num_context

    def push(self, token_id: int) -> str:
        """Adds one output token; returns the text that became safe to show ("" if none yet)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        delta = ""
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            self.text += delta
        self._checkpoints.append((self._prefix, self._read, len(self.text)))
        return delta

    def flush(self) -> str:
        """Returns all text still held back (an incomplete character shows as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        delta = self._decode(self._ids[self._prefix:])[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
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
        self.text = self.text[:length]

    def clone(self) -> IncrementalDetokenizer:
        """An independent copy (for a forked sequence)."""
        twin = object.__new__(IncrementalDetokenizer)
        twin.__dict__.update(self.__dict__)
        twin._ids = list(self._ids)
        twin._checkpoints = list(self._checkpoints)
        return twin

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

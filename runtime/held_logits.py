"""Logits kept for sequences that stopped at the end of their input without sampling.

A prefill-only sequence (a voice session while the user speaks, the parent of an n > 1
request or of a search) computes its input and waits for commit(). Its first token comes from
the logits of its last input token, which the prefill that computed that token already had.
Keeping that row here lets commit() sample at once, with no forward: without it, commit had
to compute the last token again (one more step on the end-of-input -> first-token path, and
a copy-on-write block for every fork that did so).

The rows are one planned region ([slots, vocab] float32 on the engine's device, in the memory
plan), handed out as slots. Forks of a sequence share its slot by reference count; a slot is
given back when its sequence samples, takes more input, is truncated or ends. When every slot
is taken, a sequence simply holds none and commit() computes its last token again, as before.
The logits are those any other path samples from (the last prompt row of a prefill), so the
tokens are the same whichever way they were kept.
"""
from __future__ import annotations

import torch


class HeldLogits:
    def __init__(self, slots: int, vocab: int, device: torch.device) -> None:
        self.rows = torch.empty(slots, vocab, dtype=torch.float32, device=device)
        self._free = list(range(slots - 1, -1, -1))  # popped from the end: slot 0 first
        self._refs = [0] * slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    def hold(self, logits_row: torch.Tensor) -> int | None:
        """Copies one row of logits into a free slot; its slot, or None if none is free."""
        if not self._free:
            return None
        slot = self._free.pop()
        self.rows[slot].copy_(logits_row)
        self._refs[slot] = 1
        return slot

    def share(self, slot: int) -> None:
        """One more sequence reads this slot (a fork)."""
        self._refs[slot] += 1

    def release(self, slot: int) -> None:
        if self._refs[slot] <= 0:  # checked first: a second release must not free the slot twice
            raise RuntimeError(f"held logits slot {slot} released more often than held")
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._free.append(slot)

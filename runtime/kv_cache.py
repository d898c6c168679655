"""The paged KV cache: one fixed arena of blocks, handed out by the C++ block allocator.

K and V live in two tensors of shape [layers, (num_blocks + 1) * block_size, kv_heads, head_dim];
a token's "slot" is block * block_size + offset. The last block is scratch: no sequence owns
it, and padded rows of a fixed-shape step (runtime/step_program.py) write and read it there. The allocator (lockstep._core) decides which
blocks a sequence owns, shares them between forks by refcount, and says which blocks must be
copied before a shared partial block is written (copy-on-write).
"""
from __future__ import annotations

import numpy as np
import torch

from lockstep._core import ArenaExhaustedError, BlockAllocator

from .config import ModelConfig
from .errors import CapacityError


class KVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 prefix_cache: bool = False) -> None:
        if num_blocks < 1:
            raise CapacityError("the KV memory budget holds no block besides the scratch block; raise --kv-memory")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        shape = (config.num_layers, (num_blocks + 1) * block_size, config.num_kv_heads, config.head_dim)
        # Allocated once, here; serving never allocates KV memory again. `empty`, not `zeros`:
        # attention reads only slots a step has written, and zeroing a 1 GiB arena on the CPU
        # would add ~0.7 s to start-up for nothing.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks, block_size, prefix_cache=prefix_cache)

    @classmethod
    def for_budget(cls, config: ModelConfig, memory_bytes: int, block_size: int,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   prefix_cache: bool = False) -> KVCache:
        """As many blocks as `memory_bytes` holds, the scratch block included."""
        per_block = config.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * block_size
        return cls(config, memory_bytes // per_block - 1, block_size, dtype, device, prefix_cache)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - self.allocator.num_free_blocks() / self.num_blocks

    def reserve(self, handle: int, num_tokens: int) -> None:
        """Makes room for `num_tokens` more tokens of a sequence, doing any copy-on-write first."""
        try:
            copies = self.allocator.append(handle, num_tokens)
        except ArenaExhaustedError as exc:
            raise CapacityError(str(exc)) from None
        for src, dst in copies:
            self._copy_block(src, dst)

    def reserve_one_each(self, handles: np.ndarray) -> int:
        """Makes room for one more token of each handle's sequence, in order (one C++ call for a
        decode step), stopping before the first the arena is too short for; returns how many."""
        grown, copies = self.allocator.append_one_each(handles)
        for src, dst in copies:  # in order: a later copy may write a block an earlier one reads
            self._copy_block(src, dst)
        return grown

    def _copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        self.k[:, dst * bs:(dst + 1) * bs] = self.k[:, src * bs:(src + 1) * bs]
        self.v[:, dst * bs:(dst + 1) * bs] = self.v[:, src * bs:(src + 1) * bs]

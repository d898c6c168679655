"""The step workspace: every buffer a step reads or writes besides weights and KV, allocated once.

Sized for the largest step program (runtime/step_program.py), a step uses leading slices of
these buffers, so serving allocates nothing for them. Two groups:
- step metadata, filled by the C++ step planner (lockstep._core.StepPlanner) in one call:
  token ids, positions, slot mapping, block tables, sequence lengths, query offsets, and the
  rows whose logits are wanted. It lives in host memory (pinned on CUDA, with a device mirror
  that a step's CUDA graph reads);
- activations of the native CPU forward (runtime/model.py forward_native): the residual
  stream, normed rows, Q/K/V, attention output, MLP halves and logits. GPU backends allocate
  theirs inside captured graphs instead.
Each group is one allocation carved into aligned views, so "is this buffer planned?" is a
pointer-range test (runtime/memory_plan.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig

ALIGN = 64  # bytes: a cache line, and the widest vector load the CPU kernels issue

METADATA = ("token_ids", "positions", "slot_mapping", "logit_rows", "block_tables", "seq_lens", "query_start")


@dataclass(frozen=True)
class BufferSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.tensor([], dtype=self.dtype).element_size()


class Arena:
    """One allocation carved into named, aligned tensors."""

    def __init__(self, specs: list[BufferSpec], device: torch.device, pin: bool = False) -> None:
        offsets, total = {}, 0
        for spec in specs:
            offsets[spec.name] = total
            total += -(-spec.nbytes // ALIGN) * ALIGN
        self.specs = specs
        self.device = device
        self.storage = torch.empty(max(total, ALIGN), dtype=torch.uint8, device=device, pin_memory=pin)
        self.tensors: dict[str, torch.Tensor] = {
            s.name: self.storage[offsets[s.name]:offsets[s.name] + s.nbytes].view(s.dtype).view(s.shape)
            for s in specs
        }

    @property
    def nbytes(self) -> int:
        return self.storage.numel()

    def span(self) -> tuple[int, int]:
        start = self.storage.data_ptr()
        return start, start + self.storage.numel()


def metadata_specs(rows: int, seqs: int, max_blocks: int) -> list[BufferSpec]:
    return [
        BufferSpec("token_ids", (rows,), torch.int64),
        BufferSpec("positions", (rows,), torch.int64),
        BufferSpec("slot_mapping", (rows,), torch.int64),
        BufferSpec("logit_rows", (rows,), torch.int64),
        BufferSpec("block_tables", (seqs, max_blocks), torch.int32),
        BufferSpec("seq_lens", (seqs,), torch.int32),
        BufferSpec("query_start", (seqs + 1,), torch.int32),
        # Overlap mode on CUDA: input tokens still on the device, from the step before's sampling
        # (ProgramRunner.plan): which rows, from which of its rows, and the tokens picked out.
        BufferSpec("pending_rows", (rows,), torch.int64),
        BufferSpec("pending_src", (rows,), torch.int64),
        BufferSpec("pending_tokens", (rows,), torch.int64),
    ]


def activation_specs(config: ModelConfig, rows: int) -> list[BufferSpec]:
    f32, hidden, inter = torch.float32, config.hidden_size, config.intermediate_size
    return [
        BufferSpec("x", (rows, hidden), f32),
        BufferSpec("h", (rows, hidden), f32),
        BufferSpec("qkv", (rows, config.q_size + 2 * config.kv_size), f32),
        BufferSpec("attn", (rows, config.q_size), f32),
        BufferSpec("out", (rows, hidden), f32),
        BufferSpec("gate_up", (rows, 2 * inter), f32),
        BufferSpec("act", (rows, inter), f32),
        BufferSpec("last", (rows, hidden), f32),
        BufferSpec("logits", (rows, config.vocab_size), f32),
    ]


class StepWorkspace:
    def __init__(self, config: ModelConfig, rows: int, seqs: int, max_blocks: int, device: torch.device,
                 activations: bool, dtype: torch.dtype = torch.float32) -> None:
        """Buffers for steps of up to `rows` token rows over `seqs` sequences of `max_blocks` blocks.
        `activations`: also the native CPU forward's activation buffers. `dtype`: the model's."""
        self.rows, self.seqs, self.max_blocks = rows, seqs, max_blocks
        cuda = device.type == "cuda"
        specs = metadata_specs(rows, seqs, max_blocks)
        self.host = Arena(specs, torch.device("cpu"), pin=cuda)
        # What the step reads: on CUDA a device copy (a graph's fixed input addresses), else the host arena.
        self.device_metadata = Arena(specs, device) if cuda else self.host
        self.activations = Arena(activation_specs(config, rows), device) if activations else None
        # CUDA decode graphs compute logits for every row (a graph has one shape); a step copies
        # the rows it wants into `logits` here. `row_ids` (0, 1, 2, ...) is what the graphs read
        # as their logit rows.
        self.graph_io = None
        if cuda:
            self.graph_io = Arena([BufferSpec("row_ids", (rows,), torch.int64),
                                   BufferSpec("logits", (rows, config.vocab_size), dtype)], device)
            self.graph_io.tensors["row_ids"].copy_(torch.arange(rows))

    def host_array(self, name: str) -> np.ndarray:
        return self.host.tensors[name].numpy()

    def metadata(self, name: str) -> torch.Tensor:
        """The buffer a step reads (device mirror on CUDA)."""
        return self.device_metadata.tensors[name]

    def activation(self, name: str) -> torch.Tensor:
        if self.activations is None:
            raise RuntimeError("this workspace has no activation buffers (only the native CPU forward uses them)")
        return self.activations.tensors[name]

    def upload(self, rows: int, seqs: int, logit_rows: int) -> None:
        """Copies a planned step's metadata to the device mirror (no-op on the CPU): leading slices only."""
        if self.device_metadata is self.host:
            return
        sizes = {"token_ids": rows, "positions": rows, "slot_mapping": rows, "logit_rows": logit_rows,
                 "block_tables": seqs, "seq_lens": seqs, "query_start": seqs + 1}
        for name, n in sizes.items():
            self.device_metadata.tensors[name][:n].copy_(self.host.tensors[name][:n], non_blocking=True)

    @property
    def arenas(self) -> list[tuple[str, Arena]]:
        found = [("workspace.metadata", self.host)]
        if self.device_metadata is not self.host:
            found.append(("workspace.metadata (device)", self.device_metadata))
        if self.activations is not None:
            found.append(("workspace.activations", self.activations))
        if self.graph_io is not None:
            found.append(("workspace.graph_io", self.graph_io))
        return found

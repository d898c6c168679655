"""The sampling kernel's inputs and outputs, placed once at start-up (the static memory plan).

sample_with_kernel (runtime/sampler.py) needs seven per-row columns on the device (temperature,
top-k, top-p, min-p, seed, position, branch) and gives back each row's token and logprob. Made
per step, those are seven small tensors to the device and two back: nine allocations and as many
copies, each a host round trip on the step's critical path. Here the columns are written into
three host staging tensors (float32, int64, int32; pinned on CUDA, so each copy is queued on the
stream and the host does not wait for the forward) and copied up in three copies; the outputs
come back through two pinned tensors and one stream sync. Nothing is allocated per step.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch

from .sampling_params import SamplingParams


class SamplerBuffers:
    def __init__(self, max_rows: int, device: torch.device) -> None:
        self.max_rows = max_rows
        self.device = device
        pinned = device.type == "cuda"

        def host(shape, dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pinned)

        # Rows: float32 [temperature, top_p, min_p]; int64 [seed, position, branch]; int32 top_k.
        self.host_floats, self.host_ints, self.host_top_k = host((3, max_rows), torch.float32), \
            host((3, max_rows), torch.int64), host(max_rows, torch.int32)
        self.floats = torch.zeros((3, max_rows), dtype=torch.float32, device=device)
        self.ints = torch.zeros((3, max_rows), dtype=torch.int64, device=device)
        self.top_k = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.tokens = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.logprobs = torch.zeros(max_rows, dtype=torch.float32, device=device)
        self.host_tokens, self.host_logprobs = host(max_rows, torch.int64), host(max_rows, torch.float32)
        self._floats_np, self._ints_np = self.host_floats.numpy(), self.host_ints.numpy()
        self._top_k_np = self.host_top_k.numpy()
        # Marks the outputs' copy to the host on the stream, so a reader waits for that copy and
        # not for the next step's forward queued after it (overlap mode).
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        """Every buffer, for the memory plan."""
        return {"device": [self.floats, self.ints, self.top_k, self.tokens, self.logprobs],
                "host": [self.host_floats, self.host_ints, self.host_top_k, self.host_tokens, self.host_logprobs]}

    def columns(self, params: Seq[SamplingParams], keys: Seq[tuple[int, int, int]], vocab: int
                ) -> dict[str, torch.Tensor]:
        """The kernel's seven columns for these rows, on the device (views of the planned buffers)."""
        rows = len(params)
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows to sample; the sampler's buffers hold {self.max_rows}")
        floats, ints = self._floats_np, self._ints_np
        floats[0, :rows] = [0.0 if p.greedy else p.temperature for p in params]
        floats[1, :rows] = [p.top_p for p in params]
        floats[2, :rows] = [p.min_p for p in params]
        if rows:  # seeds are 64-bit unsigned; the kernel takes their two's-complement int64 bits
            ints[:, :rows] = np.array(keys, dtype=np.uint64).view(np.int64).T
        self._top_k_np[:rows] = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]  # k >= vocab: off
        for device_buffer, host_buffer in ((self.floats, self.host_floats), (self.ints, self.host_ints),
                                           (self.top_k, self.host_top_k)):
            device_buffer[..., :rows].copy_(host_buffer[..., :rows], non_blocking=True)
        return {"temperature": self.floats[0, :rows], "top_p": self.floats[1, :rows], "min_p": self.floats[2, :rows],
                "seeds": self.ints[0, :rows], "positions": self.ints[1, :rows], "branches": self.ints[2, :rows],
                "top_k": self.top_k[:rows]}

    def outputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the kernel writes each row's token and logprob."""
        return self.tokens[:rows], self.logprobs[:rows]

    def read(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The tokens and logprobs the kernel wrote (copies, as the buffers are reused next step):
        two copies to pinned memory and one wait for them."""
        self.start_read(rows)
        return self.finish_read(rows)

    def start_read(self, rows: int) -> None:
        """Queues the outputs' copies to pinned host memory behind the kernel, and marks them."""
        self.host_tokens[:rows].copy_(self.tokens[:rows], non_blocking=True)
        self.host_logprobs[:rows].copy_(self.logprobs[:rows], non_blocking=True)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self.device))

    def finish_read(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Waits for start_read's copies; the tokens and logprobs, copied out of the staging
        buffers (the next start_read reuses them)."""
        if self._copied is not None:
            self._copied.synchronize()
        return self.host_tokens[:rows].numpy().copy(), self.host_logprobs[:rows].numpy().copy()

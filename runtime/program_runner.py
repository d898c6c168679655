"""Runs one step program: the C++ planner fills the workspace, then the model's forward reads it.

The engine decides what a step holds (runtime/scheduler.py); this module turns that into the
program's fixed-shape inputs. `lockstep._core.StepPlanner` writes every sequence's positions,
slot mapping, block table row, length and query offset, and the padding, in one call, so the
host's share of a step does not grow with Python loops over blocks. `run_scratch` runs a
program on throwaway sequences for the cost model (runtime/cost_model.py).

On CUDA each decode bucket is captured once as a CUDA graph at start-up (`capture_decode_graphs`)
and replayed: a graph reads the workspace's fixed device buffers, which a step refills, and
all its intermediate memory comes from one pool taken at capture, so a replay allocates nothing.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np
import torch

from lockstep import _core

from .config import ModelConfig
from .kv_cache import KVCache
from .model import StepInputs
from .step_program import StepProgram
from .workspace import StepWorkspace


class Forward(Protocol):
    config: ModelConfig

    def forward(self, inputs: StepInputs) -> torch.Tensor: ...


class ProgramRunner:
    def __init__(self, model: Forward, kv: KVCache, workspace: StepWorkspace) -> None:
        self.model = model
        self.kv = kv
        self.workspace = workspace
        ws = workspace
        self.planner = _core.StepPlanner(
            kv.allocator, ws.host_array("token_ids"), ws.host_array("positions"), ws.host_array("slot_mapping"),
            ws.host_array("block_tables"), ws.host_array("seq_lens"), ws.host_array("query_start"),
            null_block=kv.scratch_block)
        self.graphs: dict[str, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # The workspace's leading slices, kept by length (see inputs()).
        self._per_row: dict[int, tuple[torch.Tensor, ...]] = {}
        self._per_seq: dict[int, tuple[torch.Tensor, ...]] = {}
        self._logit_rows: dict[int, torch.Tensor] = {}
        self._logit_rows_host = ws.host_array("logit_rows")
        # On CUDA the metadata goes up from pinned host memory with queued copies. In overlap mode
        # the next step is planned before the host has waited for anything after this step's
        # upload, so the planner must not overwrite that memory before the copies have run.
        self._uploaded = torch.cuda.Event() if ws.device_metadata is not ws.host else None

    def inputs(self, program: StepProgram, num_seqs: int, num_logits: int) -> StepInputs:
        """The program's views of the workspace (what a captured graph reads, on CUDA). The
        leading slices are made once per length and kept (slicing seven tensors was most of
        plan()'s time): the per-row ones by the program's rows, the per-sequence ones by the
        number of sequences, the logit rows by their number, so they stay bounded by those."""
        rows = program.num_tokens
        per_row = self._per_row.get(rows)
        if per_row is None:
            per_row = self._per_row[rows] = tuple(self.workspace.metadata(name)[:rows]
                                                  for name in ("token_ids", "positions", "slot_mapping"))
        per_seq = self._per_seq.get(num_seqs)
        if per_seq is None:
            per_seq = self._per_seq[num_seqs] = (self.workspace.metadata("block_tables")[:num_seqs],
                                                 self.workspace.metadata("seq_lens")[:num_seqs],
                                                 self.workspace.metadata("query_start")[:num_seqs + 1])
        logit_rows = self._logit_rows.get(num_logits)
        if logit_rows is None:
            logit_rows = self._logit_rows[num_logits] = self.workspace.metadata("logit_rows")[:num_logits]
        (token_ids, positions, slot_mapping), (block_tables, seq_lens, query_start) = per_row, per_seq
        return StepInputs(program=program, token_ids=token_ids, positions=positions, slot_mapping=slot_mapping,
                          block_tables=block_tables, seq_lens=seq_lens, query_start=query_start,
                          logit_rows=logit_rows)

    def plan(self, program: StepProgram, handles: np.ndarray, starts: np.ndarray, counts: np.ndarray,
             tokens: np.ndarray, logit_rows: np.ndarray | list[int],
             device_tokens: tuple[np.ndarray | None, np.ndarray | None, torch.Tensor] | None = None) -> StepInputs:
        """Fills the workspace for one step; returns the inputs the forward reads.

        `device_tokens` (overlap mode): (rows, src, sampled), input tokens the host does not have
        yet. Row rows[i] takes sampled[src[i]], copied where `sampled` lies after the rest is
        uploaded (`tokens` holds placeholders there); rows None: every row takes sampled's, in order."""
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the previous step's upload has run: its host memory is free
        num_seqs = program.num_seqs if program.kind == "decode" else len(handles)
        self.planner.plan(handles, starts, counts, tokens, num_seqs, program.num_tokens)
        self._logit_rows_host[:len(logit_rows)] = logit_rows
        self.workspace.upload(program.num_tokens, num_seqs, len(logit_rows))
        if device_tokens is not None:
            self._fill_tokens(*device_tokens)
        if self._uploaded is not None:
            self._uploaded.record()
        return self.inputs(program, num_seqs, len(logit_rows))

    def _fill_tokens(self, rows: np.ndarray | None, src: np.ndarray | None, sampled: torch.Tensor) -> None:
        """Writes input tokens from a sampling's output tensor into the step's token ids, on the
        tensor's device: queued behind the kernel that wrote them, with no wait for it and through
        planned buffers only (index_select and index_copy_ into them allocate nothing)."""
        token_ids = self.workspace.metadata("token_ids")
        if rows is None:
            token_ids[:sampled.shape[0]].copy_(sampled)
            return
        ws, n = self.workspace, len(rows)
        ws.host_array("pending_rows")[:n] = rows
        ws.host_array("pending_src")[:n] = src
        on_device = [ws.metadata(name)[:n] for name in ("pending_rows", "pending_src")]
        if ws.device_metadata is not ws.host:
            for name, device_view in zip(("pending_rows", "pending_src"), on_device):
                device_view.copy_(ws.host.tensors[name][:n], non_blocking=True)
        picked = ws.metadata("pending_tokens")[:n]
        torch.index_select(sampled, 0, on_device[1], out=picked)
        token_ids.index_copy_(0, on_device[0], picked)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [len(logit_rows), vocab] of the step whose inputs plan() made."""
        captured = self.graphs.get(inputs.program.name)
        if captured is None:
            return self.model.forward(inputs)
        graph, all_logits = captured
        graph.replay()
        wanted = self.workspace.graph_io.tensors["logits"][:inputs.logit_rows.shape[0]]
        return torch.index_select(all_logits, 0, inputs.logit_rows, out=wanted)

    def capture_decode_graphs(self, programs: list[StepProgram]) -> None:
        """Captures each decode program's forward as a CUDA graph, largest first, in one pool."""
        pool = None
        for program in sorted((p for p in programs if p.kind == "decode"), key=lambda p: -p.num_seqs):
            handles = self._scratch_sequences(program, context=self.kv.block_size)
            try:
                planned = self.plan(program, *self._scratch_plan(program, handles, self.kv.block_size),
                                    logit_rows=[])
                inputs = replace(planned, logit_rows=self.workspace.graph_io.tensors["row_ids"][:program.num_tokens])
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # compiles the kernels outside the capture
                    for _ in range(2):
                        self.model.forward(inputs)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.model.forward(inputs)
                pool = graph.pool()
                self.graphs[program.name] = (graph, logits)
            finally:
                self._free(handles)
        torch.cuda.synchronize()

    def scratch_length(self, program: StepProgram) -> int:
        """Tokens each throwaway sequence of a prefill program holds: a program may have more rows
        than one sequence can (max_model_len) or than the arena holds, so its rows are spread
        over forks of one sequence."""
        limit = min(self.workspace.max_blocks * self.kv.block_size, self.kv.capacity_tokens)
        return min(program.num_tokens, limit)

    def _scratch_sequences(self, program: StepProgram, context: int) -> list[int]:
        """Throwaway sequences for `program`: forks of one sequence (blocks shared, so any program
        fits a small arena). decode[B]: B of them at `context` tokens; prefill[T]: enough to hold
        T rows, each computing its first scratch_length() tokens."""
        alloc = self.kv.allocator
        base = alloc.new_sequence()
        length = context if program.kind == "decode" else self.scratch_length(program)
        self.kv.reserve(base, length)
        count = program.num_seqs if program.kind == "decode" else -(-program.num_tokens // length)
        return [base] + [alloc.fork(base) for _ in range(count - 1)]

    def _scratch_plan(self, program: StepProgram, handles: list[int], context: int):
        n = len(handles)
        if program.kind == "decode":
            starts, counts = np.full(n, context - 1, np.int64), np.ones(n, np.int64)
        else:
            length = self.scratch_length(program)
            starts = np.zeros(n, np.int64)
            counts = np.full(n, length, np.int64)
            counts[-1] = program.num_tokens - length * (n - 1)
        vocab = self.model.config.vocab_size
        tokens = np.random.default_rng(program.num_tokens).integers(0, vocab, int(counts.sum()), dtype=np.int64)
        return np.array(handles, np.int64), starts, counts, tokens

    def _free(self, handles: list[int]) -> None:
        for handle in handles:
            self.kv.allocator.free(handle)

    def run_scratch(self, program: StepProgram, context: int) -> None:
        """One step of `program` on throwaway sequences (random tokens; the KV they write is
        freed after): decode[B] with every sequence at `context` tokens, prefill[T] as one
        sequence's first T tokens."""
        handles = self._scratch_sequences(program, context)
        try:
            handles_arr, starts, counts, tokens = self._scratch_plan(program, handles, context)
            logit_rows = (np.cumsum(counts) - 1).tolist()
            self.run(self.plan(program, handles_arr, starts, counts, tokens, logit_rows))
            if self.kv.k.device.type == "cuda":
                torch.cuda.synchronize()
        finally:
            self._free(handles)

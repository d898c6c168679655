"""The engine: owns the model, the KV cache and the scheduler, and runs one step at a time.

A step is: apply pending cancels, ask the scheduler what runs, build the step's inputs, run
the forward, sample where a sequence needs its next token, and turn tokens into outputs
(text safe to stream, stop checks, finishing). A step after commit() of prefill-only sequences
whose last logits are held (runtime/held_logits.py) runs no forward: it only samples their
first tokens, so those come out before the next forward. Sequence operations (fork, append,
commit, truncate, cancel) happen between steps, so a step always sees a consistent state.

A sampled token is taken in (_commit_tokens: what the next step's plan reads, and whether it
ends the sequence) and its output made apart (_emit: text, stop strings, the SeqOutput).
Without overlap both happen in the step that sampled it. In overlap mode (EngineConfig.overlap,
on by default on CUDA), as in vLLM's async scheduling and SGLang's overlap scheduler, the next
step is planned and launched first, with the sampled tokens as its input where they lie (on
CUDA the sampling kernel's output tensor: ProgramRunner.plan copies them in on the device).
Only then does the host wait for them, take them in and make their outputs, while the device
runs that step. The device then waits for the host only when the host's whole step takes longer
than its own. Two consequences:
- a token that ends its sequence is known only after the next step was launched with the
  sequence in it. That row's token is dropped: a stop token, a stop string. A sequence whose
  token ends it whatever it is (max_tokens, the context) is left out of the next step;
- every sequence operation (fork, append, truncate, commit, pause, resume) takes in a pending
  token first, so it acts on every token sampled so far.
What a client sees is the same either way (tests/test_overlap.py); on the CPU the forward is
synchronous, so overlap would only delay each token by a step, and it is off there.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from enum import Enum
from itertools import count
from operator import attrgetter
from pathlib import Path
from typing import Callable, Iterator, Sequence as Seq

import torch

import numpy as np

from lockstep import _core

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .errors import ContextLengthError, InvalidRequestError
from .held_logits import HeldLogits
from .kv_cache import KVCache
from .linear import Linears, native_cpu_matmul
from .loader import LoadedModel
from .memory_plan import build_memory_plan, human_bytes
from .model import TorchModel
from .program_runner import ProgramRunner
from .quantized_weights import QuantizedWeights, load_quantized_gguf, with_float_rows
from .sampler import DeferredSample, SampleResult, log_softmax_rows, sample, sample_with_kernel
from .sampler_buffers import SamplerBuffers
from .sampling_params import SamplingParams
from .scheduler import ScheduledStep, Scheduler
from .step_program import ProgramLadder
from .weights import ModelWeights
from .workspace import StepWorkspace
from .cost_model import CostModel, CostTable, load_or_measure
from .fetch import lockstep_home
from .sequence import FinishReason, SeqOutput, Sequence, SeqStatus

log = logging.getLogger("lockstep")

FINISHED_MEMORY = 1 << 16  # finished ids remembered so cancel() can tell "finished" from "unknown"
_NOTHING_BANNED: frozenset[int] = frozenset()
_FINISHED = SeqStatus.FINISHED
# A token taken in whose output is not made yet: (seq, token, logprob, top logprobs, how the
# token itself ended the sequence, if it did). Engine._commit_tokens makes one, Engine._emit reads it.
_Committed = tuple[Sequence, int, float, list[tuple[int, float]], FinishReason | None]
# A step's sampling whose tokens the host has not taken in yet (overlap mode): the sequences, in
# the result's row order, the result (runtime/sampler.py; `ready()` waits for its tokens), the
# step, and when its launch began (for its time on the device: Engine._resolve).
_Pending = tuple[list[Sequence], SampleResult | DeferredSample, ScheduledStep, float]


class CancelStatus(str, Enum):
    CANCELLING = "cancelling"  # live: it ends with FinishReason.CANCELLED at the next step
    ALREADY_FINISHED = "already_finished"
    UNKNOWN = "unknown"


@dataclass
class RequestResult:
    """A finished sequence, for callers that wait for the whole answer."""

    seq_id: int
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    prompt_logprobs: list[float]
    ttft_s: float
    e2e_s: float
    token_times: list[float] = field(default_factory=list)


@dataclass(slots=True)
class _StepBatch:
    """What Engine._gather reads off a scheduled step: the planner's inputs, per item, and which
    logit rows go where after the forward."""

    handles: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)
    prompt_lp: list[tuple[Sequence, int, int, int]] = field(default_factory=list)  # (seq, logits index, position, count)
    to_sample: list[Sequence] = field(default_factory=list)  # their rows are logits[sample_at[i]]
    sample_at: list[int] = field(default_factory=list)
    to_hold: list[tuple[Sequence, int]] = field(default_factory=list)  # prefill-only, at the end of their input
    # Rows whose input token the step before sampled and the host has not taken in yet (overlap
    # mode): row pending_rows[i] reads row pending_src[i] of that sampling's result.
    pending_rows: list[int] = field(default_factory=list)
    pending_src: list[int] = field(default_factory=list)
    # The planner's numpy inputs (handles, starts, counts, tokens), made once from the lists.
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    items: list | None = None  # the step's items, when a steady replay of it can reuse this batch
    # The tokens sampled for to_sample, in order, when every row was: on the host, or on the
    # device while they are pending (a deferred sampling on CUDA).
    sampled: np.ndarray | torch.Tensor | None = None
    device_tokens: torch.Tensor | None = None  # a replay's input tokens when `sampled` was on the device
    logit_rows_array: np.ndarray | None = None

    def planner_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self.arrays is None:
            self.arrays = (np.array(self.handles, np.int64), np.array(self.starts, np.int64),
                           np.array(self.counts, np.int64), np.array(self.tokens, np.int64))
        return self.arrays

    def one_token_on(self) -> _StepBatch:
        """This plain decode batch a step later: every sequence one token further, its input the
        token it was just given (the sampler's own array of them, when it gave one). Only the
        starts and tokens change; the rest is shared."""
        handles, starts, counts, tokens = self.planner_arrays()
        sampled, on_device = self.sampled, None
        if isinstance(sampled, torch.Tensor):
            on_device = sampled  # the planner's token column is a placeholder, overwritten on the device
        elif sampled is not None:
            tokens = sampled
        else:
            # A token still pending is not in token_ids yet (a replay after a deferred sampling
            # always has `sampled`): reading the one before it would be wrong.
            assert not any(seq.num_pending for seq in self.to_sample), "replaying a batch whose tokens are pending"
            tokens = np.fromiter((seq.token_ids[-1] for seq in self.to_sample), np.int64, len(self.to_sample))
        return _StepBatch(handles=self.handles, starts=self.starts, counts=self.counts, tokens=self.tokens,
                          logit_rows=self.logit_rows, to_sample=self.to_sample, sample_at=self.sample_at,
                          arrays=(handles, starts + 1, counts, tokens), items=self.items,
                          logit_rows_array=self.logit_rows_array, device_tokens=on_device)


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.model_config = model.config
        self.tokenizer = model.tokenizer
        self.device, self.backend = select_backend(self.config)
        native_cpu = self.device.type == "cpu" and self.backend == "torch" and self.config.cpu_kernels == "native"
        if native_cpu:
            # The matmuls run on _core's thread pool; what is left for torch per step is small
            # element-wise work. torch's OpenMP workers spin after every parallel region and would
            # take the cores the pool needs (15.5 -> 8.9 ms a decode step on 2 cores), so torch
            # gets one thread.
            _core.set_num_threads(self.config.threads or _core.get_num_threads())
            torch.set_num_threads(1)
        elif self.config.threads:
            torch.set_num_threads(self.config.threads)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        quantized = quantized_weights(model, self.config, self.device) if self.backend == "triton" else None
        native_blocks = native_cpu_blocks(model) if native_cpu else None
        # A matrix read as blocks needs no float copy (8B in bf16 is 16 GB never read; the default
        # model's float32 linear layers are 405 MiB beside 63 MiB of blocks), and a GGUF file's are
        # then never dequantized. The native CPU forward also looks tokens up in the embedding's
        # blocks (_core.dequantize_rows), so it holds no float table either.
        weights = model.weights_except(quantized or native_blocks, embedding=native_cpu).to(self.device, dtype)
        self.kv = KVCache.for_budget(model.config, self.config.kv_memory_bytes, self.config.block_size,
                                     dtype=dtype, device=self.device, prefix_cache=self.config.prefix_cache)
        limits = [model.config.max_position, self.kv.capacity_tokens]
        if self.config.max_model_len:
            limits.append(self.config.max_model_len)
        self.max_model_len = min(limits)
        # The static plan: programs, then the workspace for the largest one (runtime/memory_plan.py).
        self.ladder = ProgramLadder(self.config.max_num_seqs, self.config.max_batched_tokens)
        self.workspace = StepWorkspace(model.config, self.ladder.largest_rows, self.ladder.largest_seqs,
                                       -(-self.max_model_len // self.kv.block_size), self.device,
                                       activations=self.device.type == "cpu", dtype=dtype)
        blocks = quantized
        if self.backend == "triton":
            from .triton_model import TritonModel

            self.runner = TritonModel(model.config, weights, self.kv, attention=self.config.attention,
                                      quantized=quantized)
        else:
            linears = cpu_linears(native_blocks, weights) if native_cpu else None
            blocks = None if linears is None else linears.blocks
            # With the native matmuls come the native norm, RoPE and attention (cpp/cpu/cpu_ops.h).
            self.runner = TorchModel(model.config, weights, self.kv, linears, native_ops=linears is not None,
                                     workspace=self.workspace)
        self.memory_plan = build_memory_plan(weights, blocks, self.kv, (self.runner.cos, self.runner.sin),
                                             self.workspace, self.config.max_num_seqs)
        # The last input row's logits of prefill-only sequences, so commit() samples without a forward.
        # The sampling kernel's columns and outputs (the triton backend's sampler), placed once.
        self.sampler_buffers = SamplerBuffers(self.ladder.largest_rows, self.device) if self.backend == "triton" else None
        if self.sampler_buffers is not None:
            for where, tensors in self.sampler_buffers.tensors().items():
                for tensor in tensors:
                    self.memory_plan.add(f"sampler_buffers ({where})", tensor)
        slots = self.config.max_num_seqs if self.config.held_logits else 0
        self.held = HeldLogits(slots, model.config.vocab_size, self.device)
        if slots:
            self.memory_plan.add("held_logits", self.held.rows)
        if self.config.guard_memory and native_cpu:
            self.runner.guard = self.memory_plan
        self.programs = ProgramRunner(self.runner, self.kv, self.workspace)
        if self.device.type == "cuda" and self.config.cuda_graphs:
            before = torch.cuda.memory_reserved(self.device)
            self.programs.capture_decode_graphs(self.ladder.decode)
            self.memory_plan.add_opaque("cuda_graphs.pool", torch.cuda.memory_reserved(self.device) - before,
                                        f"{len(self.programs.graphs)} decode graphs", str(self.device))
        self.costs = self._cost_table(model)
        self.cost_model = CostModel(self.costs) if self.costs is not None and self.config.cost_correction else None
        self.scheduler = Scheduler(self.config, self.kv, self.ladder, self.cost_model or self.costs)
        self.seqs: dict[int, Sequence] = {}  # live sequences
        self._finished: OrderedDict[int, FinishReason] = OrderedDict()  # recent ends, for cancel's answer
        self._ids = count()
        self._next_branch: dict[int, int] = {}  # per fork family: the next branch number
        self._family: dict[int, int] = {}  # seq id -> id of the family's first sequence
        self._ready: dict[int, Sequence] = {}  # committed, to sample from held logits next step
        self._cancelling: list[Sequence] = []  # cancel() asked, not yet ended: no scan of seqs a step
        self.last_step: ScheduledStep | None = None
        self.last_error: str | None = None  # the latest failed step's error, for logs and tests
        self.last_error_step: ScheduledStep | None = None
        self._step_outputs: list[SeqOutput] = []  # the current step's outputs so far (fail_step)
        # Overlap mode: the next step is launched before the host has this step's tokens (they
        # are its input on the device), and the tokens are taken in and their outputs made
        # (detokenizing, stop strings, output objects, and whatever the caller does with them)
        # while the device runs it. The device then waits for the host only when the host's
        # whole step takes longer than the device's. Only where the forward runs asynchronously
        # (CUDA) does that hide anything; on the CPU it would hold each token back by a step.
        self.overlap = self.config.overlap == "on" or (self.config.overlap == "auto" and self.device.type == "cuda")
        self._pending: _Pending | None = None  # sampled, not yet taken in (overlap mode, _resolve)
        # What the cost model hears in overlap mode on an asynchronous device. A step's wall time
        # there is the previous step's device time (the wait is for its tokens), so a step is
        # timed instead from its launch, or the previous step's tokens if they came later (the
        # device was still busy), to its own tokens: D(k) = ready(k) - max(launch(k), ready(k-1)).
        # A step that samples nothing is never waited for, so the one after it goes untimed.
        self._times_on_resolve = self.overlap and self.device.type == "cuda"
        self._last_ready = 0.0
        self._timing_gap = False
        self._launched_at = 0.0
        self._committed: list[_Committed] = []  # taken in, outputs not made yet (_flush)
        self._early_outputs: list[SeqOutput] = []  # made between steps, for the next step()
        self._last_batch: _StepBatch | None = None  # the latest plain decode batch, for a steady replay
        log.info("engine: %s backend on %s%s", self.backend, self.device,
                 ", each step launched before the step before's tokens are taken in (overlap)" if self.overlap else "")
        log.info("engine: %d KV blocks of %d tokens (%d tokens), max_model_len %d, %d torch threads",
                 self.kv.num_blocks, self.kv.block_size, self.kv.capacity_tokens, self.max_model_len,
                 torch.get_num_threads())
        log.info("engine: memory plan %s; %d step programs, cost table %s", human_bytes(self.memory_plan.total_bytes),
                 len(self.ladder.programs), "off" if self.costs is None else self.costs.source)

    def _cost_table(self, model: LoadedModel) -> CostTable | None:
        if self.config.calibrate == "off":
            return None
        if self.backend == "triton" and self.device.type == "cpu":
            # The interpreter runs kernels for correctness; its step times predict nothing.
            log.info("cost model: off (triton on the CPU runs under the interpreter)")
            return None
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() \
            or platform.machine()
        key = {
            "model": str(model.source), "model_name": model.config.name, "layers": model.config.num_layers,
            "backend": self.backend, "device": device, "cpu_kernels": self.config.cpu_kernels,
            "weights": self.config.weights, "attention": self.config.attention,
            "threads": _core.get_num_threads() if self.runner_is_native else torch.get_num_threads(),
            "isa": _core.cpu_features()["auto_isa"], "programs": [p.name for p in self.ladder.programs],
            "block_size": self.kv.block_size, "max_blocks": self.workspace.max_blocks, "version": importlib.metadata.version("lockstep"),
        }
        if is_gguf_file(model):
            stat = model.source.stat()
            key["model_file"] = [stat.st_size, stat.st_mtime_ns]
        # A rebuilt native module (new kernels) times differently under the same version number.
        core = Path(_core.__file__).stat()
        key["core_build"] = [core.st_size, core.st_mtime_ns]
        return load_or_measure(self.ladder.programs, self.programs.run_scratch, self.max_model_len, key,
                               lockstep_home() / "costs", force=self.config.calibrate == "measure")

    @property
    def runner_is_native(self) -> bool:
        return isinstance(self.runner, TorchModel) and self.runner.native_ops

    # --- requests -------------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Renders messages with the model's chat template and tokenizes the result.

        The template writes any BOS itself, so none is added here.
        """
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_bos=False)

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    generate: bool = True) -> Sequence:
        """Queues a prompt (text or token ids). With generate=False it only prefills until commit()."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        self.check_token_ids(ids)
        self.check_token_ids(params.stop_token_ids, what="stop token id")
        self._check_length(len(ids), params.max_tokens if generate else 0)
        seq = Sequence(
            seq_id=next(self._ids), params=params, token_ids=ids, num_prompt_tokens=len(ids),
            detok=IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
            seed=params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little"),
            generating=generate, stop_ids=self._stop_ids(params),
        )
        self.seqs[seq.seq_id] = seq
        self._family[seq.seq_id] = seq.seq_id
        self._next_branch[seq.seq_id] = 1
        self.scheduler.add(seq)
        return seq

    def check_token_ids(self, ids: Seq[int], what: str = "token id") -> None:
        """Raises InvalidRequestError naming the first id that is not in the vocabulary (pure:
        any thread may call it)."""
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"{what} {bad!r} is out of range for a vocabulary of {vocab}")

    def _check_length(self, num_tokens: int, max_tokens: int | None) -> None:
        need = num_tokens + (max_tokens or 0)
        if num_tokens >= self.max_model_len or need > self.max_model_len:
            extra = f" plus max_tokens {max_tokens}" if max_tokens else ""
            raise ContextLengthError(
                f"the prompt has {num_tokens} tokens{extra}, but this model's context holds "
                f"{self.max_model_len}; shorten the prompt or lower max_tokens"
            )

    # --- sequence operations (between steps) -------------------------------------------------------

    def _changing(self, seq_id: int) -> Sequence:
        """A live sequence an operation is about to change: its committed tokens' outputs made
        first (kept for the next step), and the scheduler told to plan the next step in full."""
        self._flush_early()
        seq = self._live(seq_id)
        self.scheduler.invalidate()
        return seq

    def _live(self, seq_id: int) -> Sequence:
        seq = self.seqs.get(seq_id)
        if seq is None:
            raise InvalidRequestError(f"sequence {seq_id} is not live (finished, cancelled or unknown)")
        return seq

    def fork(self, seq_id: int, n: int = 1, seeds: Seq[int] | None = None) -> list[Sequence]:
        """n new sequences continuing from this one. KV is shared by refcount, not copied: O(1).

        Each fork samples with its own branch number, so seeded forks still differ. With `seeds`,
        fork i samples with seeds[i] on branch 0 instead: exactly what a request with that seed,
        unforked from the same tokens, would sample.
        """
        parent = self._changing(seq_id)  # before the children copy the parent's state
        if n < 1:
            raise InvalidRequestError(f"fork needs n >= 1, got {n}")
        if seeds is not None and (len(seeds) != n or any(not isinstance(x, int) or not 0 <= x < 2**64 for x in seeds)):
            raise InvalidRequestError(f"fork seeds must be {n} integers in [0, 2**64)")
        family = self._family[seq_id]
        children = []
        for i in range(n):
            child = replace(
                parent, seq_id=next(self._ids), branch=self._next_branch[family] if seeds is None else 0,
                seed=parent.seed if seeds is None else seeds[i],
                token_ids=list(parent.token_ids), detok=parent.detok.clone(),
                output_ids=list(parent.output_ids), output_positions=list(parent.output_positions),
                output_logprobs=list(parent.output_logprobs),
                output_top_logprobs=list(parent.output_top_logprobs),
                prompt_logprobs=list(parent.prompt_logprobs),
                prompt_top_logprobs=list(parent.prompt_top_logprobs),
                handle=None,
            )
            self._next_branch[family] += 1
            self._family[child.seq_id] = family
            self.seqs[child.seq_id] = child
            if child.held_slot is not None:
                self.held.share(child.held_slot)
                if child.generating:  # a fork of a sequence committed but not yet sampled
                    self._ready[child.seq_id] = child
            if parent.handle is not None:
                child.handle = self.kv.allocator.fork(parent.handle)
                self.scheduler.add_running(child)
            else:
                self.scheduler.add(child)
            children.append(child)
        return children

    def append(self, seq_id: int, tokens: str | Seq[int]) -> None:
        """Adds input to a live sequence; it is prefilled in the coming steps (incremental prefill)."""
        seq = self._changing(seq_id)
        ids = self.tokenizer.encode(tokens, add_bos=False) if isinstance(tokens, str) else list(tokens)
        self.check_token_ids(ids)
        self._check_length(seq.num_tokens + len(ids), 0)
        self._drop_held(seq)
        if seq.output_ids:
            # Output text must not run on into what comes after the new input: emit any
            # character still pending in the detokenizer now.
            seq.detok.flush()
        seq.token_ids.extend(ids)

    def commit(self, seq_id: int, params: SamplingParams | None = None) -> None:
        """Starts generating from everything the sequence holds (e.g. after incremental input)."""
        seq = self._changing(seq_id)
        if params is not None:
            self.check_token_ids(params.stop_token_ids, what="stop token id")
            seq.params = params
            seq.stop_ids = self._stop_ids(params)
            if params.seed is not None:
                seq.seed = params.seed  # the reply is then what a request with that seed would sample
        self._check_length(seq.num_tokens, seq.params.max_tokens)
        seq.generating = True
        seq.outputs_at_commit = len(seq.output_ids)
        if seq.held_slot is not None and seq.num_uncomputed == 0:
            self._ready[seq.seq_id] = seq  # its first token is sampled from the held logits
        else:
            self._ensure_logits_pending(seq)

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Rolls a live sequence back to its first `num_tokens` tokens, output included."""
        seq = self._changing(seq_id)
        if not 1 <= num_tokens <= seq.num_tokens:
            raise InvalidRequestError(f"truncate position must be in [1, {seq.num_tokens}], got {num_tokens}")
        self._drop_held(seq)
        del seq.token_ids[num_tokens:]
        kept = sum(1 for p in seq.output_positions if p < num_tokens)
        for lst in (seq.output_ids, seq.output_positions, seq.output_logprobs, seq.output_top_logprobs):
            del lst[kept:]
        seq.outputs_at_commit = min(seq.outputs_at_commit, kept)
        seq.num_prompt_tokens = min(seq.num_prompt_tokens, num_tokens)
        seq.detok.truncate(kept)
        seq.num_chars_sent = min(seq.num_chars_sent, seq.detok.length)
        seq.num_computed = min(seq.num_computed, num_tokens)
        if seq.handle is not None:
            self.kv.allocator.truncate(seq.handle, seq.num_computed)
        if seq.generating:
            self._ensure_logits_pending(seq)

    def _drop_held(self, seq: Sequence) -> None:
        """Gives back seq's held logits: its tokens are about to change, or it ends."""
        if seq.held_slot is not None:
            self.held.release(seq.held_slot)
            seq.held_slot = None

    def _ensure_logits_pending(self, seq: Sequence) -> None:
        # The next token is sampled from the logits of the last token, which only a forward over
        # it produces; if its K/V is already cached, compute it again (it rewrites the same slot).
        if seq.num_uncomputed == 0:
            self.scheduler.invalidate()
            seq.num_computed -= 1
            if seq.handle is not None:
                self.kv.allocator.truncate(seq.handle, seq.num_computed)

    def cancel(self, seq_id: int) -> CancelStatus:
        """Stops a sequence at the next step boundary and frees its blocks. Cancelling a finished
        or unknown sequence changes nothing and says so."""
        seq = self.seqs.get(seq_id)
        if seq is not None:
            seq.cancel_requested = True
            self._cancelling.append(seq)
            return CancelStatus.CANCELLING
        return CancelStatus.ALREADY_FINISHED if seq_id in self._finished else CancelStatus.UNKNOWN

    def pause(self, seq_id: int) -> None:
        """Holds a live sequence out of every step, keeping its KV (it may be preempted first)."""
        self._changing(seq_id).paused = True

    def resume(self, seq_id: int) -> None:
        """Lets a paused sequence run again from where it stopped."""
        self._changing(seq_id).paused = False

    def finish_all(self, reason: FinishReason, error: str | None = None) -> list[SeqOutput]:
        """Ends every live sequence now, each with one terminal output (shutdown, or a step that
        left the engine's state in doubt). Outputs of tokens already taken in come first."""
        outputs, self._early_outputs = self._early_outputs, []
        self._resolve()
        self._flush(outputs)
        outputs.extend(self._finish(seq, reason, error=error) for seq in list(self.seqs.values()))
        return outputs

    # --- the step --------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self._pending is not None or bool(self._committed or self._early_outputs) or bool(self._cancelling) \
            or any(not s.paused for s in self._ready.values()) or self.scheduler.has_work()

    def fail_step(self, error: str) -> list[SeqOutput]:
        """After step() raised outside the forward: the outputs that step had already made (its
        cancels and finishes, which have left `seqs`), then every live sequence ended with an
        error, so each still has exactly one terminal output."""
        made, self._step_outputs = self._step_outputs, []
        self._end_unmade(made, error)
        try:
            # Tokens still pending were sampled before the failure: taken in and given their
            # outputs, as without overlap, where the step before would have made them.
            self._resolve()
            self._flush(made)
        except Exception:  # noqa: BLE001 - the same failure again: end what is left as above
            log.exception("making the outputs of tokens sampled before a failed step failed too")
            self._end_unmade(made, error)
        return made + self.finish_all(FinishReason.ERROR, error)

    def _end_unmade(self, made: list[SeqOutput], error: str) -> None:
        """Tokens taken in whose outputs were not made (the error may have been in making one):
        a sequence that its token's commit already ended still needs its terminal output."""
        left, self._committed = self._committed, []
        for seq, *_ in left:
            if seq.status is _FINISHED:
                seq.finish_reason, seq.error = FinishReason.ERROR, error
                made.append(self._final_output(seq, SeqOutput(seq.seq_id, None, "")))

    def step(self, during_device: Callable[[list[SeqOutput]], None] | None = None) -> list[SeqOutput]:
        """Runs one step; returns its outputs (tokens, text, finishes) in order.

        In overlap mode a step's tokens come out with the next step: that step makes their
        outputs once its forward is launched, and hands them to `during_device` then, while the
        device computes, if given (the server delivers them to the streams); those are not
        returned again."""
        # The list is also kept on the engine while the step runs, so that fail_step() can hand
        # out what a step that raised had already made.
        outputs, self._early_outputs = self._early_outputs, []
        self._step_outputs = outputs
        start = time.perf_counter()
        self._step(outputs, during_device)
        step = self.last_step
        if step is not None and self.cost_model is not None and self.last_error_step is not step \
                and not self._times_on_resolve:
            self.cost_model.observe(step.program, step.pairs, time.perf_counter() - start)
        self._step_outputs = []
        return outputs

    def _step(self, outputs: list[SeqOutput], during_device: Callable[[list[SeqOutput]], None] | None) -> None:
        if self._cancelling:
            # In arrival order (the order of self.seqs), once each; one that ended meanwhile is skipped.
            cancelled = sorted(set(self._cancelling), key=attrgetter("seq_id"))
            self._cancelling = []
            self._resolve()
            self._flush(outputs)  # a cancelled sequence's tokens already taken in come out before its end
            outputs.extend(self._finish(seq, FinishReason.CANCELLED) for seq in cancelled if seq.status is not _FINISHED)
        ready = self._take_ready()
        if ready:
            self._resolve()  # a step of held logits samples at once: nothing left pending before it
            # Committed sequences whose first token needs no forward: sampled now, in a step of
            # their own, so that token is out before the next forward rather than after it.
            self.last_step = None
            self._flush(outputs)
            self._sample(ready, self.held.rows[torch.tensor([s.held_slot for s in ready],
                                                            device=self.held.rows.device)], outputs)
            self._flush(outputs)
            return
        step = self.scheduler.schedule()
        self.last_step = step
        if step is None:
            self._resolve()
            self._flush(outputs)
            return

        batch = self._gather(step)
        self._launched_at = time.perf_counter()
        try:
            logits = self._run_step(step, batch)
        except Exception as exc:  # noqa: BLE001 - one failed step must not take the engine down
            log.exception("step %s failed; failing its %d sequences", step.program.name, len(step.items))
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.last_error_step = step  # its time says nothing of the program's cost
            self._resolve()
            self._timing_gap = True  # the device may have run part of it
            self._flush(outputs)
            outputs.extend(self._finish(item.seq, FinishReason.ERROR, error=self.last_error)
                           for item in step.items if item.seq.status is not _FINISHED)
            return
        if self.overlap:
            # The forward is launched (on CUDA, queued on the stream, its input tokens read from
            # the previous step's sampling there): the previous step's tokens are taken in and
            # their outputs made now, while it runs. A stop token or string found here ends a
            # sequence already in this step; its row's token is dropped (_sample skips it).
            self._resolve()
            self._flush(outputs)
            if during_device is not None and outputs:
                during_device(list(outputs))
                outputs.clear()
        self._advance(step)
        self._record_prompt_logprobs(logits, batch.prompt_lp)
        for seq, index in batch.to_hold:
            if seq.status is not _FINISHED:
                seq.held_slot = self.held.hold(logits[index])
        if batch.to_sample:
            # Every row is a sampled one in a plain decode step: no gather needed then.
            rows = logits if len(batch.sample_at) == len(batch.logit_rows) else \
                logits[torch.tensor(batch.sample_at, device=logits.device)]
            self._sample(batch.to_sample, rows, outputs, defer=self.overlap)
        if not self.overlap:
            self._flush(outputs)
        elif self._pending is None:
            # It sampled nothing (no row, or each one's sequence ended while it ran): nothing of it
            # is waited for, so the next step's time would hold it too.
            self._timing_gap = True

    def _gather(self, step: ScheduledStep) -> _StepBatch:
        """The planner's inputs and the logit rows of a scheduled step, in one pass over its items;
        for a steady replay of the step before (the scheduler's), that step's batch one token on."""
        if step.steady:
            last = self._last_batch
            if last is not None and last.items is step.items:
                batch = self._last_batch = last.one_token_on()
                return batch
        batch = self._gather_items(step)
        # Reusable by a replay when every item decodes one token that is sampled (the steady
        # decodes the scheduler replays are such a step).
        plain = not batch.prompt_lp and not batch.to_hold and len(batch.to_sample) == len(step.items) == len(batch.tokens)
        batch.items = step.items if plain else None
        self._last_batch = batch if plain else None
        return batch

    def _gather_items(self, step: ScheduledStep) -> _StepBatch:
        if step.decode_only:
            batch = self._gather_decodes(step)
            if batch is not None:
                return batch
        batch = _StepBatch()
        handles, starts, counts, tokens, logit_rows = batch.handles, batch.starts, batch.counts, batch.tokens, \
            batch.logit_rows
        start = 0
        for item in step.items:
            seq, n = item.seq, item.num_tokens
            first = seq.num_computed
            ids = seq.token_ids
            handles.append(seq.handle)
            starts.append(first)
            counts.append(n)
            if first + n > len(ids):
                # Its last input token is still pending on the device: a decode, or a sequence
                # preempted and admitted again in this same schedule, recomputing from its cache.
                tokens.extend(ids[first:])
                batch.pending_rows.append(len(tokens))
                batch.pending_src.append(seq.pending_index)
                tokens.append(0)
            elif n == 1:
                tokens.append(ids[first])
            else:
                tokens.extend(ids[first:first + n])
            if seq.params.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens - 1:
                # Row i predicts token first + i + 1; only prompt tokens not yet scored.
                scored = [start + i for i in range(n) if len(seq.prompt_logprobs) <= first + i < seq.num_prompt_tokens - 1]
                if scored:
                    batch.prompt_lp.append((seq, len(logit_rows), scored[0] - start + first, len(scored)))
                    logit_rows.extend(scored)
            start += n
            if first + n == len(ids) + seq.num_pending:
                if seq.generating:
                    batch.to_sample.append(seq)
                    batch.sample_at.append(len(logit_rows))
                    logit_rows.append(start - 1)
                elif seq.held_slot is None and len(batch.to_hold) < self.held.num_free:
                    batch.to_hold.append((seq, len(logit_rows)))
                    logit_rows.append(start - 1)
        return batch

    def _gather_decodes(self, step: ScheduledStep) -> _StepBatch | None:
        """_gather_items for a step of one token per sequence, each its input's last, every one
        generating: the full pass's usual step, whose planner inputs this makes in one loop
        without the prompt bookkeeping (such a row predicts the token after the input, so it
        scores no prompt token). None if some sequence only listens (its logits are held): the
        general gather handles that."""
        batch = _StepBatch()
        handles, starts, tokens, to_sample = batch.handles, batch.starts, batch.tokens, batch.to_sample
        for seq, _ in step.items:
            if not seq.generating:
                return None
            first = seq.num_computed
            handles.append(seq.handle)
            starts.append(first)
            ids = seq.token_ids
            if first == len(ids):  # its input is a token still pending on the device
                batch.pending_rows.append(len(tokens))
                batch.pending_src.append(seq.pending_index)
                tokens.append(0)
            else:
                tokens.append(ids[first])
            to_sample.append(seq)
        n = len(handles)
        batch.counts = [1] * n
        batch.logit_rows = batch.sample_at = list(range(n))
        batch.logit_rows_array = np.arange(n, dtype=np.int64)
        return batch

    def _take_ready(self) -> list[Sequence]:
        """The committed sequences that sample from held logits now: not paused, and still at the
        end of their input with their logits held (a preempted one recomputes its input and
        samples at the end of that instead)."""
        ready = []
        for seq in list(self._ready.values()):
            if seq.paused:
                continue
            self.scheduler.invalidate()  # it decodes from now on, or computes its input again
            del self._ready[seq.seq_id]
            if seq.held_slot is not None and seq.num_uncomputed == 0 and seq.status is SeqStatus.RUNNING:
                ready.append(seq)
            else:
                # Its input changed or it was preempted: it samples after computing its input
                # again (truncate has already stepped it back one token; this is then a no-op).
                self._drop_held(seq)
                self._ensure_logits_pending(seq)
        return ready

    def _sample(self, seqs: list[Sequence], rows: torch.Tensor, outputs: list[SeqOutput], defer: bool = False) -> None:
        """Samples each sequence's next token from its row of logits and commits it (its output
        comes from _flush). A sequence already at max_tokens ends unsampled, its output appended
        to `outputs` (the step's own list, so a finish is never lost if a later one raises).

        With `defer` (overlap mode) the tokens are left pending: the next step is planned with
        them still on the device and _resolve commits them once it is launched. A sequence whose
        token ends it whatever the token is (max_tokens, the context) is left out of that plan."""
        # One pass builds the sampler's columns; it runs for every sequence of every step.
        sampled: list[Sequence] = []
        keep: list[int] = []
        params: list[SamplingParams] = []
        keys: list[tuple[int, int, int]] = []
        banned: list[frozenset[int]] | None = None  # only once some sequence is below min_tokens
        max_model_len, ending = self.max_model_len, False
        for i, seq in enumerate(seqs):
            if seq.status is _FINISHED:
                continue  # in overlap mode: ended (a stop string, a cancel) while the step ran
            p = seq.params
            made = len(seq.output_ids) - seq.outputs_at_commit  # seq.num_new_outputs, inlined
            if p.max_tokens is not None and made >= p.max_tokens:
                # Already at max_tokens (max_tokens 0: score the prompt only): it ends unsampled.
                outputs.append(self._finish(seq, FinishReason.LENGTH))
                continue
            if made < p.min_tokens and seq.stop_ids:
                if banned is None:
                    banned = [_NOTHING_BANNED] * len(sampled)
                banned.append(seq.stop_ids)
            elif banned is not None:
                banned.append(_NOTHING_BANNED)
            length = len(seq.token_ids)
            if defer:
                # Marked pending now, in this one pass (a sampler that raises fails the step, and
                # fail_step ends every live sequence, so no mark outlives a failed sampling).
                if (p.max_tokens is not None and made + 1 >= p.max_tokens) or length + 1 >= max_model_len:
                    ending = True  # its token is its last: the next step leaves it out (left 0 tokens)
                else:
                    seq.num_pending, seq.pending_index = 1, len(sampled)
            sampled.append(seq)
            keep.append(i)
            params.append(p)
            keys.append((seq.seed, length, seq.branch))
        if ending:
            self.scheduler.invalidate()  # a replay would keep it in
        if not sampled:
            return
        if len(keep) < len(seqs):
            rows = rows[torch.tensor(keep, device=rows.device)]
        if self.backend == "triton":
            result = sample_with_kernel(rows, params, keys, banned, self.sampler_buffers, defer=defer)
        else:
            result = sample(rows.cpu(), params, keys, banned)  # the C++ sampler reads host memory
        batch = self._last_batch
        if batch is not None and batch.to_sample is seqs and len(sampled) == len(seqs):
            batch.sampled = result.token_array  # the next steady step's input tokens (on the device if deferred)
        if not defer:
            result = result.ready()
            self._commit_tokens(sampled, result.token_ids, result.logprobs, result.top_logprobs)
            return
        self._pending = (sampled, result, self.last_step, self._launched_at)

    def _resolve(self) -> None:
        """Takes in the tokens of the latest deferred sampling (waiting for them if they are not
        on the host yet): what the next schedule, and every sequence operation, reads."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        seqs, result, step, launched = pending
        result = result.ready()
        if self._times_on_resolve:
            ready = time.perf_counter()
            if self.cost_model is not None and not self._timing_gap and step is not None:
                self.cost_model.observe(step.program, step.pairs, ready - max(launched, self._last_ready))
            self._last_ready, self._timing_gap = ready, False
        self._commit_tokens(seqs, result.token_ids, result.logprobs, result.top_logprobs)

    def _run_step(self, step: ScheduledStep, batch: _StepBatch) -> torch.Tensor:
        """Plans the step into the workspace (one C++ call) and runs its program; logits [R, vocab]."""
        if batch.logit_rows_array is None:
            batch.logit_rows_array = np.array(batch.logit_rows, np.int64)
        arrays = batch.planner_arrays()
        on_device = None
        if batch.pending_rows:
            # Input tokens the step before sampled: filled in from its result where the host has
            # it (the CPU's sampler), else copied on the device after the plan is uploaded.
            sampled = self._pending[1].token_array
            rows, src = np.array(batch.pending_rows, np.int64), np.array(batch.pending_src, np.int64)
            if isinstance(sampled, np.ndarray):
                arrays[3][rows] = sampled[src]
            else:
                on_device = (rows, src, sampled)
        elif batch.device_tokens is not None:  # a steady replay's input: every row's token still on the device
            on_device = (None, None, batch.device_tokens)
        inputs = self.programs.plan(step.program, *arrays, batch.logit_rows_array, device_tokens=on_device)
        # In the forward's dtype (bf16 on CUDA): the sampling kernel reads it as it is, and what
        # needs float32 (bans, top and prompt logprobs, held logits) converts its own rows.
        return self.programs.run(inputs)

    def _advance(self, step: ScheduledStep) -> None:
        """Counts the step's tokens as computed, and offers every newly completed full block to the
        prefix cache (lockstep._core's index)."""
        bs = self.kv.block_size if self.config.prefix_cache else 0
        for item in step.items:
            seq = item.seq
            if seq.status is _FINISHED:
                continue  # in overlap mode: ended by a stop string while the step ran; its blocks are gone
            before = seq.num_computed
            done = seq.num_computed = before + item.num_tokens
            if bs and done // bs > before // bs:
                # Only the tokens from the first block not yet published (the last full block's,
                # unless the cache was cleared): converting the whole context would cost
                # O(context) per block.
                alloc = self.kv.allocator
                first = alloc.num_published(seq.handle) * bs
                alloc.publish(seq.handle, np.asarray(seq.token_ids[first:done], np.int64), done, first)

    def _record_prompt_logprobs(self, logits: torch.Tensor,
                                prompt_lp: list[tuple[Sequence, int, int, int]]) -> None:
        for seq, index, position, count_rows in prompt_lp:
            if seq.status is _FINISHED:
                continue
            lp = log_softmax_rows(logits[index:index + count_rows])  # as the sampler scores its tokens
            targets = torch.tensor(seq.token_ids[position + 1:position + 1 + count_rows], device=logits.device)
            seq.prompt_logprobs.extend(lp.gather(1, targets[:, None]).squeeze(1).tolist())
            if seq.params.prompt_logprobs:
                vals, ids = torch.topk(lp, seq.params.prompt_logprobs, dim=-1)
                seq.prompt_top_logprobs.extend(
                    list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist()))

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The ids that end a sequence with these params (kept on the sequence: read every token)."""
        model_stops = frozenset() if params.ignore_eos else self.tokenizer.stop_ids
        return model_stops | frozenset(params.stop_token_ids)

    def _commit_tokens(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float],
                       tops: list[list[tuple[int, float]]]) -> None:
        """Takes each sampled token into its sequence: everything the next step's schedule and
        plan read (its token ids, and whether a stop token, max_tokens or the context ends it).
        Their outputs (text, stop strings, the SeqOutput) are made later, by _emit."""
        # Every token of every step passes here, and in overlap mode the device waits for this
        # loop: only what the next plan reads (the rest of a token's record is _emit's), one
        # loop with no call per token.
        committed = self._committed
        max_model_len = self.max_model_len
        for seq, token, logprob, top in zip(seqs, tokens, logprobs, tops):
            seq.num_pending = 0
            if seq.held_slot is not None:
                self._drop_held(seq)  # sampled from them, or recomputed them: they are stale now
            ids = seq.token_ids
            ids.append(token)
            made = seq.output_ids
            made.append(token)
            ended = None
            if token in seq.stop_ids:
                ended = FinishReason.STOP
            else:
                max_tokens = seq.params.max_tokens
                # seq.num_new_outputs, inlined.
                if (max_tokens is not None and len(made) - seq.outputs_at_commit >= max_tokens) \
                        or len(ids) >= max_model_len:
                    ended = FinishReason.LENGTH
            if ended is not None:
                self._end(seq, ended)  # out of the next schedule; its output comes from _emit
            committed.append((seq, token, logprob, top, ended))

    def _emit(self, seq: Sequence, token: int, logprob: float, top: list[tuple[int, float]],
              ended: FinishReason | None) -> SeqOutput:
        """A committed token's output: its text (held back where a stop string may still begin),
        and the sequence's end if the token or its text ended it."""
        seq.output_positions.append(len(seq.token_ids) - 1)  # no token is taken in before this one is emitted
        seq.output_logprobs.append(logprob)
        seq.output_top_logprobs.append(top)
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        out = SeqOutput(seq.seq_id, token, "", logprob, top)
        if ended is FinishReason.STOP:
            return self._final_output(seq, out)  # the stop token's own text is not part of the answer
        stops = seq.params.stop
        detok = seq.detok  # the text's owner (seq.text): it keeps it in pieces, read at the end
        before = detok.length
        piece = detok.push(token)
        if stops:
            cut = self._find_stop_string(detok, before, stops)
            if cut is not None:
                detok.cut(cut)
                if ended is None:
                    self._end(seq, FinishReason.STOP)
                else:  # the token that reached max_tokens also completed a stop string: a stop
                    seq.finish_reason = self._finished[seq.seq_id] = FinishReason.STOP
                return self._final_output(seq, out)
        if ended is not None:
            detok.flush()
            return self._final_output(seq, out)
        if stops:
            out.text = self._streamable(seq)
        else:  # _streamable without a stop string to hold back for: all text not yet sent
            sent, length = seq.num_chars_sent, detok.length
            if sent < length:
                out.text = piece if sent == before else detok.tail(sent)
                seq.num_chars_sent = length
        return out

    def _flush(self, outputs: list[SeqOutput]) -> None:
        """Makes the outputs of every committed token not yet emitted, in commit order."""
        committed = self._committed
        if not committed:
            return
        self._committed = []
        emit = self._emit
        for i, entry in enumerate(committed):
            try:
                outputs.append(emit(*entry))
            except BaseException:
                # Left for fail_step, which ends each of their sequences with one terminal output.
                self._committed = committed[i:] + self._committed
                raise

    def _flush_early(self) -> None:
        """Before an operation that reads or changes a sequence's text or tokens (fork, append,
        truncate, ...): the sampled tokens taken in and their outputs made, kept for the next
        step() to return."""
        self._resolve()
        self._flush(self._early_outputs)

    @staticmethod
    def _find_stop_string(detok: IncrementalDetokenizer, new_from: int, stops: list[str]) -> int | None:
        """Where in the text the earliest stop string starts, looking only where text new from
        `new_from` on could complete one (the text's tail, not all of it)."""
        start = max(0, new_from - max(map(len, stops)) + 1)
        tail = detok.tail(start)
        hits = []
        for stop in stops:
            i = tail.find(stop, max(0, new_from - len(stop) + 1) - start)
            if i >= 0:
                hits.append(start + i)
        return min(hits) if hits else None

    def _streamable(self, seq: Sequence) -> str:
        # Hold back a tail that might still grow into a stop string, so it is never sent.
        stops = seq.params.stop
        hold = max(map(len, stops)) - 1 if stops else 0
        length, sent = seq.detok.length, seq.num_chars_sent
        end = length if seq.finished else length - hold
        if end <= sent:
            return ""
        seq.num_chars_sent = end
        return seq.detok.tail(sent)[:end - sent]

    def _finish(self, seq: Sequence, reason: FinishReason, out: SeqOutput | None = None,
                error: str | None = None) -> SeqOutput:
        self._end(seq, reason, error)
        return self._final_output(seq, out or SeqOutput(seq.seq_id, None, ""))

    def _end(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """Ends a sequence: out of scheduling, its blocks and held logits freed (its terminal
        output is _final_output's)."""
        self.scheduler.remove(seq)  # first: it finds the sequence by its status
        self._drop_held(seq)
        self._ready.pop(seq.seq_id, None)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
        self._finished[seq.seq_id] = reason
        if len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)
        seq.finish_time = time.perf_counter()
        self.seqs.pop(seq.seq_id, None)
        self._family.pop(seq.seq_id, None)

    def _final_output(self, seq: Sequence, out: SeqOutput) -> SeqOutput:
        """An ended sequence's terminal output: the rest of its text, and why it ended."""
        out.text = self._streamable(seq)
        out.finish_reason = seq.finish_reason
        out.error = seq.error
        return out

    # --- conveniences --------------------------------------------------------------------------------

    def run_until_done(self, seqs: list[Sequence]) -> dict[int, list[float]]:
        """Steps until every given sequence finishes; returns each one's token arrival times."""
        times: dict[int, list[float]] = {s.seq_id: [] for s in seqs}
        pending = {s.seq_id for s in seqs}
        while pending:
            for out in self.step():
                if out.seq_id in times:
                    if out.token_id is not None:
                        times[out.seq_id].append(time.perf_counter())
                    if out.finished:
                        pending.discard(out.seq_id)
        return times

    def generate(self, prompts: list[str | Seq[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestResult]:
        """Runs prompts to completion, batched together; results in prompt order."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        times = self.run_until_done(seqs)
        return [result_of(s, times[s.seq_id]) for s in seqs]

    def stream(self, prompt: str | Seq[int], params: SamplingParams | None = None) -> Iterator[SeqOutput]:
        """Yields one sequence's outputs as they come (single-user use: the CLI)."""
        seq = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.seq_id == seq.seq_id:
                        yield out
                        if out.finished:
                            return
        finally:
            if not seq.finished:
                self.cancel(seq.seq_id)
                self.step()


def select_backend(config: EngineConfig) -> tuple[torch.device, str]:
    """Resolves "auto" device and backend, failing loudly where a choice cannot work."""
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise InvalidRequestError("--device cuda: no CUDA device is visible to torch")
    device = torch.device("cuda" if config.device == "cuda" or (config.device == "auto" and cuda) else "cpu")
    backend = config.backend if config.backend != "auto" else ("triton" if device.type == "cuda" else "torch")
    if config.attention == "cuda" and (backend != "triton" or device.type != "cuda"):
        raise InvalidRequestError("--attention cuda needs the triton backend on a CUDA device")
    if config.weights == "quantized" and backend != "triton":
        raise InvalidRequestError("--weights quantized needs --backend triton; the torch backend uses float weights")
    if backend == "triton" and device.type == "cpu":
        # Triton runs on the CPU only through its interpreter, chosen when triton is imported.
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise InvalidRequestError("--backend triton on the CPU needs TRITON_INTERPRET=1 set before "
                                      "triton is imported; set it in the environment")
        os.environ["TRITON_INTERPRET"] = "1"
        log.warning("triton backend on the CPU runs under TRITON_INTERPRET=1: correct but very slow")
    return device, backend


def is_gguf_file(model: LoadedModel) -> bool:
    return model.source.is_file() and model.source.suffix == ".gguf"


def native_cpu_blocks(model: LoadedModel) -> QuantizedWeights | None:
    """The GGUF blocks the native CPU matmul reads as stored (QuantizedWeights, None where a
    matrix's type needs float rows; None for a model with no blocks)."""
    blocks = None if model.quantized is None else model.quantized.to("cpu")  # synthetic ones may be on a GPU
    if blocks is None and is_gguf_file(model):
        blocks = load_quantized_gguf(model.source, model.config)
    return blocks


def cpu_linears(blocks: QuantizedWeights | None, weights: ModelWeights) -> Linears:
    """The native CPU kernel for every matmul of the torch backend on the CPU: GGUF blocks where
    `blocks` has them, the float weights' rows elsewhere."""
    matrices = with_float_rows(blocks, weights)
    found, total = (blocks.count() if blocks is not None else (0, matrices.count()[1]))
    log.info("cpu kernels: native (%s), %d of %d linear layers read as GGUF blocks, %d threads",
             _core.cpu_features()["auto_isa"], found, total, _core.get_num_threads())
    return Linears(weights, matrices, native_cpu_matmul)


def quantized_weights(model: LoadedModel, config: EngineConfig, device: torch.device):
    """The GGUF blocks the triton backend's quantized matmul reads, or None for dense weights."""
    is_gguf = is_gguf_file(model)
    has_blocks = is_gguf or model.quantized is not None
    wanted = config.weights == "quantized" or (config.weights == "auto" and device.type == "cuda" and has_blocks)
    if not wanted:
        return None
    if not has_blocks:
        raise InvalidRequestError(f"--weights quantized needs a GGUF model file (or synthetic:NAME:q4_1); "
                                  f"{model.source} is neither")
    if model.quantized is not None:
        return replace(model.quantized, embed=None).to(device)  # the triton forward reads a float table
    quantized = replace(load_quantized_gguf(model.source, model.config), embed=None)
    found, total = quantized.count()
    if found == 0:
        if config.weights == "auto":
            log.info("triton backend: %s has no Q8_0/Q4_0/Q4_1 linear layers; dense weights", model.source.name)
            return None
        raise InvalidRequestError(f"--weights quantized: {model.source.name} has no Q8_0, Q4_0 or Q4_1 linear "
                                  "layers; use --weights dense")
    log.info("triton backend: %d of %d linear layers quantized (%.0f MB read per token)", found, total,
             quantized.nbytes() / 1e6)
    return quantized.to(device)


def result_of(seq: Sequence, token_times: list[float] | None = None) -> RequestResult:
    first = seq.first_token_time or seq.finish_time or seq.arrival_time
    return RequestResult(
        seq_id=seq.seq_id, prompt_ids=seq.token_ids[:seq.num_prompt_tokens], output_ids=list(seq.output_ids),
        text=seq.text, finish_reason=seq.finish_reason, logprobs=list(seq.output_logprobs),
        top_logprobs=list(seq.output_top_logprobs), prompt_logprobs=list(seq.prompt_logprobs),
        ttft_s=first - seq.arrival_time, e2e_s=(seq.finish_time or first) - seq.arrival_time,
        token_times=token_times or [],
    )

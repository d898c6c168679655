"""The host's share of an engine decode step at batch 1, 16 and 64, split by where it goes.

Issue 5's target is host overhead <= 50 us per step for a batch of 64, small against a GPU
decode step. bench/step_planner.py times the C++ step planner alone; this script times all of
Engine.step with the model's forward replaced by a null one (a slice of fixed random logits),
so what is left is host work only:

  schedule   Scheduler.schedule(): which sequences run, in which step program
  gather     Engine._gather: one pass over the step's sequences for the planner's inputs
             (handles, starts, counts, tokens) and the logit rows
  inputs     Engine._run_step turning those lists into the planner's numpy arrays
  plan       ProgramRunner.plan: the C++ planner (also shown alone) + logit rows + input views
  sample     runtime.sampler.sample over the B rows (the C++ CPU sampler; greedy here)
  detok      IncrementalDetokenizer.push for each new token
  other      the rest of Engine.step: cancels, KV bookkeeping after the forward, the sampler's
             columns, token bookkeeping, stop checks, outputs
The first four are the step's planning, everything the host does before the forward can start
(the "planning" row); the last three its epilogue, the work on the new tokens after it. These
steps are steady decodes, so the scheduler replays the step before (runtime/scheduler.py).
Timers wrap those functions from this script (instance attributes and the engine module's
`sample`); nothing in the runtime changes. The null forward's slice is timed too and left out
of the host total. Model: synthetic:tiny (vocabulary 1024), ~32-token random prompts, greedy
over logits that favour its ASCII byte tokens (text-like output, see build_engine), EOS ignored; contexts grow from 33 to ~450 tokens over the timed steps (the planner's cost
grows with context: step_planner.json has 64 sequences at 4096 tokens). A second table times
`sample` alone, greedy and sampled (temperature 0.8, top_p 0.9), at the tiny vocabulary and at
the default model's (49152), since the CPU sampler's cost grows with both batch and vocabulary.

What it measured (bench/results/host_overhead.json; one torch thread, 200 steps per batch) on a
shared machine whose speed changes by 2x between runs minutes apart (in brackets: the slow run
just before, then the fastest machine seen, from the round that built the first overlap):
- on a device that runs steps asynchronously (SimulatedDevice: a GPU's queue, 1 ms steps), with
  the server's whole loop (AsyncEngine._run) and the metrics and the request log as observers,
  the device waits 0 us per decode step of 64 for the host with overlap on (the runtime's
  default on CUDA) [0 us]: the next step is launched before the host takes in the step's
  tokens, so the host's step (338-421 us, launch to launch less its waits for tokens
  [432-642 us]) runs while the device does. That holds for the steady replay, for batch work
  held to an interactive stream's target, and for the scheduler's full pass every step
  (sequences coming and going, or a prompt prefilled beside the decodes). Without overlap the
  device waits 340 us [413 us; 159 us]. At 250 us device steps the host's step is about as long
  as the device's, and the device waits 5, 11 and 84 us in those three modes [46, 282, 394 us].
  Before overlap launched ahead, the device waited from a step's tokens to the next launch:
  120, 134 and 219 us in those modes at 1 ms steps on a machine as slow as the slow run [41 us
  with the replay, 93 us with the full pass];
- the step's planning (schedule, gather, inputs, plan) takes 18 us at batch 64 in a replay
  [46 us], the C++ step planner 3.4 us of it [6.9 us; 3 us];
- the whole host step of 64 without overlap (the CPU's mode: its forward is synchronous, so
  overlap would only hold each token back a step) takes 0.26 ms [0.56 ms; 0.22 ms]; the parts
  after the forward are most of it: per-token bookkeeping, stop checks and outputs 0.12 ms,
  the sampler 0.08 ms (greedy at a vocabulary of 1024: the chosen tokens' logprobs, an exp per
  logit, and the columns built from Python; on a GPU that is device work), the detokenizer
  0.07 ms;
- Engine._emit (a committed token's output) takes 1.58-1.59 us a token at 1,000, 8,000 and
  32,000 output tokens: the text is kept in pieces, so a token's work does not grow with it;
- the default model's tokenizer on real text: 0.90 us a token through DecodeStream [1.21 us;
  0.83 us], 2.07 us through the window path (two decodes from Python) it falls back to;
- sampling at the default model's vocabulary (49152, random logits): greedy 61 us for one row
  and 26 us a row at batch 64; temperature 0.8 / top_p 0.9 0.46 ms for one row and 0.21 ms a
  row at batch 64 (random logits keep most of the vocabulary; the sort-based sampler before it
  took 4.1 ms a row);
- a server's observers (the metrics and the request log) take 26 us [38 us; 20 us] on a step of
  64 tokens, in one call a step; in overlap mode that call is made while the device runs.
The machine is shared: back-to-back runs vary by up to 1.5x at batch 64, every part slower
by the same factor in the slow ones.
On CUDA the engine samples with kernels/sampling.py (sample_with_kernel) instead of the C++
sampler, and its host cost (the columns staged in planned buffers, one launch, and the tokens
read back, in overlap mode only once the next step is launched) is not measured here; the
scheduler, detokenizer and bookkeeping above are the same there.

    OMP_NUM_THREADS=1 .venv/bin/python bench/host_overhead.py            # ~15 s
    OMP_NUM_THREADS=1 .venv/bin/python bench/host_overhead.py --dry-run  # tiny, checks the script
"""
from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import lockstep.runtime.engine as engine_module
from lockstep import _core
from lockstep.runtime.async_engine import AsyncEngine
from lockstep.runtime.config import EngineConfig
from lockstep.runtime.cost_model import CostTable
from lockstep.runtime.detokenizer import IncrementalDetokenizer
from lockstep.runtime.engine import Engine
from lockstep.runtime.loader import load_model
from lockstep.runtime.metrics import EngineMetrics
from lockstep.runtime.request_log import RequestLog
from lockstep.runtime.sampler import sample
from lockstep.runtime.sampling_params import SamplingParams
from lockstep.runtime.sequence import SeqOutput, Sequence

from lockstep.bench.report import cpu_name, run_stamp, save_json as save_result  # noqa: E402
from lockstep.bench.stats import percentile  # noqa: E402

SAMPLE_TOKENS = _core.sample_tokens  # the C++ sampler's call, which SimulatedDevice stands in for
TARGET_US = 50.0  # issue 5: host overhead per step for a batch of 64
MODEL = "synthetic:tiny"
PROMPT_LEN = 32
PRINTABLE_ASCII = slice(32, 127)  # synthetic:tiny's ids of the bytes " " to "~"
BLOCK = 10  # steps with timers, then as many without, in turn
PARTS = ("schedule", "gather", "inputs", "plan", "planner", "sample", "detok", "other")
PLANNING = ("schedule", "gather", "inputs", "plan")  # before the forward: what a step's start waits on
LABELS = {
    "schedule": "Scheduler.schedule", "gather": "Engine._gather", "inputs": "planner inputs (numpy)",
    "plan": "ProgramRunner.plan", "planning": "planning (schedule + gather + inputs + plan)",
    "planner": "  of which C++ planner", "sample": "sampler.sample", "detok": "detokenizer",
    "other": "rest of Engine.step", "host": "host total (sum of parts)", "per_seq": "host per sequence",
    "plain": "Engine.step, no timers", "plain_per_seq": "  per sequence",
}
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=None)
GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


class StepTimer:
    """Nanoseconds spent in each wrapped function during the current step."""

    def __init__(self) -> None:
        self.current: dict[str, int] = {}

    def wrap(self, part: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[part] = self.current.get(part, 0) + time.perf_counter_ns() - start
        return timed

    def take(self) -> dict[str, int]:
        spent, self.current = self.current, {}
        return spent


class TimedPlanner:
    """Stands in for ProgramRunner.planner (a pybind object takes no new attributes)."""

    def __init__(self, planner, timer: StepTimer) -> None:
        self.plan = timer.wrap("planner", planner.plan)


def build_engine(overlap: str = "off") -> Engine:
    """synthetic:tiny with a null forward: a slice of fixed random logits, so greedy sampling does real work.

    The logits favour the tokens of printable ASCII bytes (synthetic:tiny's first 256 ids are its
    byte tokens, id = byte), so the output is text-like: its other 765 tokens are "<filler_N>"
    pieces that no real text has, each costing the detokenizer ~4 us against ~0.9 us a token for
    the default model's tokenizer on real text (the detokenizer table times that), and a lone
    byte >= 0x80 never completes a character."""
    engine = Engine(load_model(MODEL, quiet=True),
                    EngineConfig(max_num_seqs=64, kv_memory_bytes=256 << 20, calibrate="off", overlap=overlap))
    logits = torch.randn(engine.ladder.largest_rows, engine.model_config.vocab_size,
                         generator=torch.Generator().manual_seed(0))
    logits[:, PRINTABLE_ASCII] += 8.0
    engine.programs.run = lambda inputs: logits[:inputs.logit_rows.shape[0]]
    return engine


@contextmanager
def instrumented(engine: Engine, seqs: list[Sequence], timer: StepTimer) -> Iterator[None]:
    """Wraps the parts of a step with timers for the block's duration, then takes them off again.

    Instance attributes shadow the methods; `sample` is wrapped where Engine.step looks it up,
    the engine module."""
    programs, planner, forward = engine.programs, engine.programs.planner, engine.programs.run
    programs.run = timer.wrap("forward", forward)
    programs.plan = timer.wrap("plan", programs.plan)
    programs.planner = TimedPlanner(planner, timer)
    engine.scheduler.schedule = timer.wrap("schedule", engine.scheduler.schedule)
    engine._run_step = timer.wrap("run_step", engine._run_step)
    engine._gather = timer.wrap("gather", engine._gather)
    for seq in seqs:
        seq.detok.push = timer.wrap("detok", seq.detok.push)
    engine_module.sample = timer.wrap("sample", sample)
    try:
        yield
    finally:
        engine_module.sample = sample
        for seq in seqs:
            del seq.detok.push
        del engine._run_step, engine._gather, engine.scheduler.schedule, programs.plan
        programs.planner, programs.run = planner, forward


def decode_step(engine: Engine, batch: int) -> int:
    """One engine step, checked to be a decode of the whole batch; its wall time in ns."""
    start = time.perf_counter_ns()
    outputs = engine.step()
    total = time.perf_counter_ns() - start
    step = engine.last_step
    if step.program.name != f"decode[{batch}]" or len(step.items) != batch or len(outputs) != batch:
        raise RuntimeError(f"a step of batch {batch} ran {step.program.name} with {len(step.items)} "
                           f"sequences; expected decode[{batch}] with all of them")
    return total


def time_batch(engine: Engine, batch: int, warmup: int, steps: int) -> dict:
    """Adds `batch` requests and prefills them; then times `steps` decode steps split into parts
    (timers on) and `steps` whole (timers off), alternating blocks of BLOCK steps so both see the
    same contexts and the same load. The gap between the two totals is what the timers cost."""
    rng = np.random.default_rng(batch)
    vocab = engine.model_config.vocab_size
    # Never reached: sequences prefilled early decode while later ones prefill, so counts differ.
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4096)
    seqs = [engine.add_request(rng.integers(0, vocab, PROMPT_LEN).tolist(), params) for _ in range(batch)]
    while engine.scheduler.waiting or any(s.num_uncomputed > 1 for s in seqs):
        engine.step()
    first_context = seqs[0].num_tokens
    for _ in range(warmup):
        decode_step(engine, batch)
    timer, samples, plain = StepTimer(), [], []
    while len(samples) < steps:
        block = min(BLOCK, steps - len(samples))
        with instrumented(engine, seqs, timer):
            for _ in range(block):
                timer.take()
                total = decode_step(engine, batch)
                spent = timer.take()
                run_step, forward = spent.get("run_step", 0), spent.get("forward", 0)
                part = {name: spent.get(name, 0) / 1e3 for name in ("schedule", "gather", "plan", "planner", "sample", "detok")}
                part["inputs"] = (run_step - spent.get("plan", 0) - forward) / 1e3
                part["other"] = (total - spent.get("schedule", 0) - spent.get("gather", 0) - run_step
                                 - spent.get("sample", 0) - spent.get("detok", 0)) / 1e3
                part["planning"] = sum(part[name] for name in PLANNING)
                part["host"] = (total - forward) / 1e3
                part["forward"] = forward / 1e3
                samples.append(part)
        plain.extend(decode_step(engine, batch) / 1e3 for _ in range(block))
    last_context = seqs[0].num_tokens
    for seq in seqs:
        engine.cancel(seq.seq_id)
    engine.step()
    if engine.seqs:
        raise RuntimeError(f"{len(engine.seqs)} sequences still live after batch {batch}")
    stats = {name: {"median_us": statistics.median(s[name] for s in samples),
                    "p90_us": percentile([s[name] for s in samples], 90)}
             for name in (*PARTS, "planning", "host", "forward")}
    stats["per_seq"] = {key: value / batch for key, value in stats["host"].items()}
    stats["plain"] = {"median_us": statistics.median(plain), "p90_us": percentile(plain, 90)}
    stats["plain_per_seq"] = {key: value / batch for key, value in stats["plain"].items()}
    return {"batch": batch, "steps": steps, "context": [first_context, last_context], "parts": stats}


def time_sampling(vocab: int, batch: int, params: SamplingParams, budget_s: float, most: int) -> dict:
    """runtime.sampler.sample alone on [batch, vocab] random logits, repeated within a time budget."""
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(vocab + batch))
    plist, keys, banned = [params] * batch, [(7, 100 + r, 0) for r in range(batch)], [frozenset()] * batch
    start = time.perf_counter()
    sample(logits, plist, keys, banned)  # warm, and how many repeats fit the budget
    repeats = max(5, min(most, int(budget_s / (time.perf_counter() - start))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        sample(logits, plist, keys, banned)
        times.append((time.perf_counter_ns() - start) / 1e3)
    median = statistics.median(times)
    return {"vocab": vocab, "batch": batch, "mode": "greedy" if params.greedy else "top_p 0.9, T 0.8",
            "repeats": repeats, "median_us": median, "p90_us": percentile(times, 90), "us_per_row": median / batch}


DETOK_TEXT = ("The quick brown fox jumps over the lazy dog, and then it naps in the sun. "
              "Un café à Paris coûte deux euros — 東京の天気は晴れです 🎉. ")


def time_detokenizer(tokenizer, repeats: int) -> dict:
    """IncrementalDetokenizer.push per token on real text with a real model's tokenizer: through
    tokenizers' DecodeStream (the path every push takes) and through the window path it falls
    back to (two decodes from Python, what every push took before)."""
    ids = tokenizer.encode(DETOK_TEXT * 8)
    prompt = tokenizer.encode("A prompt before the output.")
    result = {"tokens": len(ids), "repeats": repeats}
    for name in ("stream", "window"):
        times = []
        for _ in range(repeats):
            detok = IncrementalDetokenizer(tokenizer, prompt)
            if name == "window":
                detok._stream = None  # the fallback path, kept off the stream for the whole run
                detok._restart_stream = lambda: None
            start = time.perf_counter_ns()
            for token in ids:
                detok.push(token)
            times.append((time.perf_counter_ns() - start) / 1e3 / len(ids))
            if detok.text + detok.flush() != tokenizer.decode(ids):
                raise RuntimeError(f"the {name} path's text differs from a whole decode")
        result[f"{name}_us_per_token"] = statistics.median(times)
    return result


def time_emit_by_length(engine: Engine, lengths: tuple[int, ...], repeats: int) -> list[dict]:
    """Engine._emit per token (a committed token's output: its text, the detokenizer, the
    SeqOutput) as one sequence's output grows to each of `lengths` tokens: the per-token output
    work must not grow with the output (a copy of the whole text a token would). The tokens are
    synthetic:tiny's printable ASCII bytes, one character each."""
    seq = engine.add_request([65] * 8, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=None))
    tokens = itertools.cycle(range(PRINTABLE_ASCII.start, PRINTABLE_ASCII.stop))

    def emit() -> int:
        token = next(tokens)
        seq.output_ids.append(token)
        seq.token_ids.append(token)
        start = time.perf_counter_ns()
        engine._emit(seq, token, -1.0, [], None)
        return time.perf_counter_ns() - start
    rows = []
    for length in lengths:
        while len(seq.output_ids) < length:
            emit()
        times = [emit() / 1e3 for _ in range(repeats)]
        rows.append({"output_tokens": length, "text_chars": len(seq.text), "us_per_token": statistics.median(times)})
    engine.cancel(seq.seq_id)
    engine.step()
    return rows


def time_observers(engine: Engine, batch: int, repeats: int) -> dict:
    """What a server adds on its engine thread per step: AsyncEngine._dispatch handing one step's
    outputs (a token for each of `batch` live requests) to the metrics and the request log, the
    observers `lockstep serve --log-requests` runs. No stream is attached, so only the observers
    and the dispatch loop are timed."""
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=16)
    seqs = [engine.add_request([1, 2, 3], params) for _ in range(batch)]
    served = AsyncEngine(engine, observers=[EngineMetrics(MODEL), RequestLog(engine.tokenizer)])
    now = time.perf_counter()
    for seq in seqs:
        served._notify("on_added", seq, now)
    outputs = [SeqOutput(seq.seq_id, 65, "A", -0.5) for seq in seqs]
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        served._dispatch(outputs)
        times.append((time.perf_counter_ns() - start) / 1e3)
    for seq in seqs:
        engine.cancel(seq.seq_id)
    engine.step()
    return {"batch": batch, "repeats": repeats, "median_us": statistics.median(times),
            "p90_us": percentile(times, 90)}


class SimulatedDevice:
    """Stands in for an asynchronous device (a GPU) with a queue: a launch returns at once, and a
    launched step starts when the device is free, its logits ready `step_us` later; the
    sampling launched after it then runs as device work, and reading its tokens waits for it.

    On the CPU the forward is synchronous, so overlap cannot be measured with the real one. This
    device makes the host's part measurable alone: the device waits for the host whenever its
    queue runs dry, from the end of the work queued on it to the next launch, and from a step's
    logits to its sampling's launch if that comes late. In overlap mode the engine launches the
    next step before it reads the step's tokens, so the device waits only where the host's
    whole step takes longer than the device's.

    The C++ sampler's call (_core.sample_tokens) is the sampling kernel's stand-in: it runs when
    launched (the tokens are on the host early, which the engine does not look at until it
    reads them) and its own time is counted as the device's, after the step's logits. Its
    inputs are made before it and its results read after: host time. A read waits for the
    sampling's end (result.ready(), runtime/sampler.py), as a sync on a GPU's tokens does."""

    def __init__(self, engine: Engine, step_us: float) -> None:
        self.step_ns = int(step_us * 1e3)
        self.free_at: int | None = None  # when the device has run everything queued on it
        self.logits_at = 0  # when the latest launched step's logits are ready
        self.idle_ns: list[int] = []  # per step: device waiting for the host
        self.launches: list[int] = []
        # Per step: host time that is not host work, the host waiting for tokens (ready()) and
        # the sampler's call (device work, run on the host here).
        self.not_host_ns: list[int] = []
        self._not_host_ns = 0
        self._logits = engine.programs.run  # build_engine's null forward: a slice of fixed logits

    def run(self, inputs):
        now = time.perf_counter_ns()
        if self.free_at is not None:
            self.idle_ns.append(max(0, now - self.free_at))
            self.not_host_ns.append(self._not_host_ns)
        self._not_host_ns = 0
        self.launches.append(now)
        self.logits_at = self.free_at = max(now, self.free_at or now) + self.step_ns
        return self._logits(inputs)

    def sample_tokens(self, *args, **kwargs):
        now = time.perf_counter_ns()
        if self.idle_ns:
            self.idle_ns[-1] += max(0, now - self.logits_at)  # the forward is done, its sampling not launched
        start = time.perf_counter_ns()
        result = SAMPLE_TOKENS(*args, **kwargs)
        took = time.perf_counter_ns() - start
        self.free_at = max(now, self.logits_at) + took
        self._not_host_ns += took
        return result

    def sample(self, *args, **kwargs):
        """runtime.sampler.sample as the engine calls it; its result's tokens are read only after
        the device has sampled them."""
        return _TokensOnDevice(self, sample(*args, **kwargs), self.free_at)

    def wait_until(self, done_at: int) -> None:
        start = time.perf_counter_ns()
        while time.perf_counter_ns() < done_at:
            pass  # the host waits on the device, as a sync on the sampled tokens does
        self._not_host_ns += time.perf_counter_ns() - start


class _TokensOnDevice:
    """A SampleResult whose ready() waits for the simulated device's sampling to end."""

    def __init__(self, device: SimulatedDevice, result, done_at: int) -> None:
        self.token_array = result.token_array  # where the next step's plan finds its input tokens
        self._device, self._result, self._done_at = device, result, done_at

    def ready(self):
        self._device.wait_until(self._done_at)
        return self._result


SCHEDULES = {  # time_device_idle's modes: what the scheduler does each step
    "replay": "steady replay",
    "held": "steady replay, batch held to a target",
    "full": "full pass",
}


def time_device_idle(batch: int, step_us: float, overlap: str, schedule: str, warmup: int, steps: int) -> dict:
    """How long a simulated device (SimulatedDevice) waits for the host per decode step of
    `batch`, with the server's loop around Engine.step as AsyncEngine._run runs it: its commands,
    the step (handing outputs to the streams while the device runs, in overlap mode), on_step,
    and the outputs left to hand out, with the metrics and the request log as observers. Also
    the host's own work per step (launch to launch, less its waits for tokens and the sampler's
    call): in overlap mode the device waits only where that is longer than the device's step.

    `schedule` (SCHEDULES): "replay", every stream interactive, so the steady decode is replayed;
    "held", one interactive stream with a target of two device steps beside batch streams, with
    a cost table that predicts one device step for every program: every batch decode fits, and
    the replay checks its predictions each step; "full", the scheduler's full pass every step
    (as when streams come and go, or a prompt is prefilled beside the decodes)."""
    engine = build_engine(overlap)
    if schedule == "full":
        engine.scheduler._steady_after = lambda *args: None
    elif schedule == "held":
        engine.scheduler.costs = CostTable({p.name: step_us * 1e-6 for p in engine.ladder.programs}, 0.0)
    rng = np.random.default_rng(batch)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4096)
    served = AsyncEngine(engine, observers=[EngineMetrics(MODEL), RequestLog(engine.tokenizer)])
    now = time.perf_counter()
    for i in range(batch):
        if schedule == "held":
            params = replace(params, latency_class="interactive" if i == 0 else "batch", itl_target_ms=2e-3 * step_us)
        served._notify("on_added", engine.add_request(rng.integers(0, 1024, PROMPT_LEN).tolist(), params), now)
    while engine.scheduler.waiting or any(s.num_uncomputed > 1 for s in engine.seqs.values()):
        served._dispatch(engine.step())
    device = SimulatedDevice(engine, step_us)
    engine.programs.run, _core.sample_tokens, engine_module.sample = device.run, device.sample_tokens, device.sample
    try:
        for _ in range(warmup + steps):
            served._apply_commands(block=False)
            served.serve_step()
            step = engine.last_step
            if step is None or step.program.name != f"decode[{batch}]":
                raise RuntimeError(f"expected decode[{batch}], ran {step and step.program.name}")
    finally:
        _core.sample_tokens, engine_module.sample = SAMPLE_TOKENS, sample
    idle = [ns / 1e3 for ns in device.idle_ns[warmup:]]
    # The host's own work per step: from one launch to the next, less its waits for tokens and
    # the sampler's call.
    host = [(b - a - other) / 1e3 for a, b, other in zip(device.launches[warmup:], device.launches[warmup + 1:],
                                                         device.not_host_ns[warmup:])]
    held = engine.scheduler._steady
    if schedule == "held" and (held is None or not held.budget_checks):
        raise RuntimeError("the held mode's steps were not replays checked against the target")
    return {"batch": batch, "device_step_us": step_us, "overlap": overlap, "schedule": schedule, "steps": len(idle),
            "idle_median_us": statistics.median(idle), "idle_p90_us": percentile(idle, 90),
            "host_median_us": statistics.median(host), "host_p90_us": percentile(host, 90),
            "device_busy": step_us / (step_us + statistics.median(idle))}


def verdict(rows: list[dict]) -> list[str]:
    """Plain sentences: the planner and the whole host step against the target, at the largest batch."""
    row = rows[-1]
    batch, parts = row["batch"], row["parts"]
    planner, plan, host, plain = (parts[k]["median_us"] for k in ("planner", "plan", "host", "plain"))
    planning = parts["planning"]["median_us"]
    lines = [(f"C++ step planner at batch {batch}: {planner:.1f} us median, "
              f"{'within' if planner <= TARGET_US else 'OVER'} the {TARGET_US:.0f} us target "
              f"(ProgramRunner.plan around it: {plan:.1f} us)."),
             (f"Step planning at batch {batch} (schedule, gather, inputs, plan: all the host does before the "
              f"forward): {planning:.1f} us median, {'within' if planning <= TARGET_US else 'OVER'} the "
              f"{TARGET_US:.0f} us target.")]
    whole = f"Whole host step at batch {batch}: {plain:.0f} us median without timers ({host:.0f} us with them)"
    if plain <= TARGET_US:
        lines.append(f"{whole}, within the {TARGET_US:.0f} us target.")
    else:
        ranked = sorted((k for k in PARTS if k != "planner"), key=lambda k: -parts[k]["median_us"])  # the parts, not "planning"
        shares = ", ".join(f"{LABELS[k]} {parts[k]['median_us']:.0f} us ({100 * parts[k]['median_us'] / host:.0f}%)"
                           for k in ranked[:3])
        lines.append(f"{whole}: OVER the {TARGET_US:.0f} us target, {plain / TARGET_US:.1f}x. "
                     f"Largest parts: {shares}.")
    return lines


def idle_verdict(idle: list[dict]) -> list[str]:
    """The host time a device waits for per step against the target, at each simulated step."""
    verdict_of = lambda us: "within" if us <= TARGET_US else "OVER"  # noqa: E731
    lines = []
    for step_us in sorted({r["device_step_us"] for r in idle}, reverse=True):
        by_mode = {(r["overlap"], r["schedule"]): r for r in idle if r["device_step_us"] == step_us}
        on, off, held, full = (by_mode[key] for key in (("on", "replay"), ("off", "replay"), ("on", "held"),
                                                          ("on", "full")))
        waits = ", ".join(f"{r['idle_median_us']:.0f} us {what} ({verdict_of(r['idle_median_us'])})"
                          for r, what in ((on, "with the steady replay"), (held, "with batch work held to a target"),
                                          (full, "with the full pass every step")))
        host_us = [r["host_median_us"] for r in (on, held, full)]
        hosts = f"{min(host_us):.0f}-{max(host_us):.0f}"
        lines.append(f"Host time an asynchronous device waits for per decode step at batch {on['batch']} (simulated "
                     f"{step_us:.0f} us steps, server loop and observers included), overlap on: {waits}; "
                     f"{off['idle_median_us']:.0f} us without overlap. The host's own step takes {hosts} us, so "
                     f"the device waits only where that is longer than its step.")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="batches 1 and 4, few steps, no JSON: checks the script")
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed per batch size")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "host_overhead.json")
    args = parser.parse_args()
    if not 1 <= args.steps <= 2000:
        parser.error("--steps must be in [1, 2000] (each batch decodes 2 * steps tokens within max_tokens 4096)")
    dry = args.dry_run
    batches, warmup, steps = ((1, 4), 3, 10) if dry else ((1, 16, 64), 20, args.steps)
    vocabs, budget_s, most = ((1024,), 0.05, 10) if dry else ((1024, 49152), 3.0, 200)
    device_steps_us = (250.0,) if dry else (250.0, 1000.0)

    engine = build_engine()
    rows = [time_batch(engine, b, warmup, steps) for b in batches]
    sampling = [time_sampling(v, b, p, budget_s, most) for v in vocabs for b in batches for p in (GREEDY, SAMPLED)]
    if dry:
        detok, detok_model = time_detokenizer(engine.tokenizer, 1), MODEL
        observers = time_observers(engine, 4, 5)
        emit_rows = time_emit_by_length(engine, (100, 400), 20)
    else:
        detok, detok_model = time_detokenizer(load_model(None, quiet=True).tokenizer, 20), "the default model"
        observers = time_observers(engine, 64, 2000)
        emit_rows = time_emit_by_length(engine, (1000, 8000, 32000), 2000)
    idle = [time_device_idle(batches[-1], us, overlap, schedule, warmup, steps)
            for us in device_steps_us
            for overlap, schedule in (("off", "replay"), ("on", "replay"), ("on", "held"), ("on", "full"))]

    print(f"Host work per decode step ({MODEL}, vocabulary {engine.model_config.vocab_size}, null forward, "
          f"{engine.backend} backend on {engine.device}, {torch.get_num_threads()} torch thread(s)); "
          f"target {TARGET_US:.0f} us at batch 64")
    print("| batch | part | median us | p90 us |")
    print("|---|---|---|---|")
    for row in rows:
        for name in (*PARTS, "planning", "host", "per_seq", "plain", "plain_per_seq"):
            s = row["parts"][name]
            print(f"| {row['batch']} | {LABELS[name]} | {s['median_us']:.1f} | {s['p90_us']:.1f} |")
    print(f"(contexts {rows[0]['context'][0]}-{rows[0]['context'][1]} tokens over the timed steps; "
          f"the null forward's slice, {rows[-1]['parts']['forward']['median_us']:.1f} us, is left out of the "
          "parts and in 'no timers'; the timers' own cost is the gap between the two totals)")
    print()
    print("runtime.sampler.sample alone")
    print("| vocab | batch | mode | median us | p90 us | us/row |")
    print("|---|---|---|---|---|---|")
    for s in sampling:
        print(f"| {s['vocab']} | {s['batch']} | {s['mode']} | {s['median_us']:.1f} | {s['p90_us']:.1f} | "
              f"{s['us_per_row']:.1f} |")
    print()
    print(f"IncrementalDetokenizer.push alone: {detok_model}'s tokenizer, {detok['tokens']} tokens of real text")
    print(f"  DecodeStream path {detok['stream_us_per_token']:.2f} us/token; window path (two decodes from "
          f"Python) {detok['window_us_per_token']:.2f} us/token")
    print("Engine._emit per token as one output grows: " + ", ".join(
        f"{r['output_tokens']} tokens {r['us_per_token']:.2f} us" for r in emit_rows))
    print(f"A server's observers (metrics and request log) on a step of {observers['batch']} tokens: "
          f"{observers['median_us']:.1f} us median (AsyncEngine._dispatch)")
    print()
    print(f"A simulated asynchronous device (SimulatedDevice) at batch {batches[-1]}, with the server's loop "
          "and observers: how long it waits for the host per decode step")
    print("| device step us | overlap | schedule | device idle median us | p90 us | device busy | host step median us |")
    print("|---|---|---|---|---|---|---|")
    for r in idle:
        print(f"| {r['device_step_us']:.0f} | {r['overlap']} | {SCHEDULES[r['schedule']]} | "
              f"{r['idle_median_us']:.1f} | {r['idle_p90_us']:.1f} | {100 * r['device_busy']:.0f}% | "
              f"{r['host_median_us']:.0f} |")
    print()
    lines = verdict(rows) + idle_verdict(idle)
    for line in lines:
        print(line)

    result = {
        **run_stamp(),
        "machine": {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
                    "numpy": np.__version__, "torch_threads": torch.get_num_threads()},
        "settings": {"model": MODEL, "vocab": engine.model_config.vocab_size, "prompt_len": PROMPT_LEN,
                     "warmup_steps": warmup, "backend": engine.backend, "device": str(engine.device)},
        "target_us": TARGET_US,
        "verdict": lines,
        "steps": rows,
        "sampling": sampling,
        "detokenizer": {"tokenizer": detok_model, **detok},
        "observers": observers,
        "emit_by_output_length": emit_rows,
        "device_idle": idle,
    }
    if not dry:
        save_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The cost table: how long each step program takes on this machine, measured at start-up.

The scheduler predicts a step's time as

    cost(program, pairs) = base[program] + attention_s_per_pair * (pairs - covered(program))

where `pairs` is the step's attention work, the sum over its sequences of new tokens times
context tokens (query-key pairs), `base` is the program's measured time and `covered` the pairs
that measurement already held: decode[B] is timed with every sequence at one block of context,
prefill[T] as one sequence's first T tokens. The slope is measured once, from decode[1] at a
short and a long context: attention is the only part of a step whose work grows with the tokens
already cached. (Prefill attention is cheaper per pair than decode's, so the slope errs long.)
Times are the median of up to five runs (two for long programs), after the cheap programs
have each run once.

Measuring every program takes a second or two on a small CPU, so a table is cached on disk
under the key of everything it depends on (model, backend, device, threads, the ladder) and
measured again only when one of those changes or when asked (`lockstep plan --calibrate`).

While serving, CostModel scales the table's predictions by what steps really take (below).
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .step_program import StepProgram

log = logging.getLogger("lockstep")

SHORT_CONTEXT = 16  # one block at the default block size
LONG_CONTEXT = 1024
RUNS = 5
MIN_RUNS = 2
LONG_ENOUGH_S = 0.2  # a program's runs stop at 2 once they have taken this long

# run(program, context) executes one step of the program on scratch data: for decode, every
# sequence at `context` tokens; for prefill, one sequence's first program.num_tokens tokens.
StepRunner = Callable[[StepProgram, int], None]


@dataclass
class CostTable:
    base_s: dict[str, float]  # program name -> seconds, as timed (see covered_pairs)
    attention_s_per_pair: float
    source: str = "measured"  # "measured" now, or "cached" from an earlier start-up
    key: str = ""
    measured_at: str = ""
    long_context: int = LONG_CONTEXT
    notes: list[str] = field(default_factory=list)

    def predict(self, program: StepProgram, pairs: int) -> float:
        """Seconds a step of `program` takes with `pairs` query-key pairs of attention."""
        return self.base_s[program.name] + self.attention_s_per_pair * max(0, pairs - covered_pairs(program))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> CostTable:
        return cls(**json.loads(text))


def covered_pairs(program: StepProgram) -> int:
    """Attention pairs in the step that timed `program` (see measure)."""
    if program.kind == "decode":
        return program.num_seqs * SHORT_CONTEXT
    return program.num_tokens * (program.num_tokens + 1) // 2


def measure(programs: list[StepProgram], run: StepRunner, max_context: int) -> CostTable:
    """Times every program and the attention slope (see the module docstring)."""
    def context_of(program: StepProgram) -> int:
        return SHORT_CONTEXT if program.kind == "decode" else program.num_tokens

    # The first steps after start-up pay for page faults on weights and workspaces and for cold
    # caches (up to 2x on a small CPU), so the cheap programs all run once before any is timed.
    # Long programs are timed fewer times: their run-to-run noise is a smaller fraction.
    for program in programs:
        if program.kind == "decode" or program.num_tokens <= 16:
            run(program, context_of(program))

    def timed(program: StepProgram, context: int) -> float:
        times = []
        while len(times) < RUNS and (len(times) < MIN_RUNS or sum(times) < LONG_ENOUGH_S):
            t0 = time.perf_counter()
            run(program, context)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    base = {p.name: timed(p, context_of(p)) for p in programs}
    decode1 = next(p for p in programs if p.kind == "decode" and p.num_seqs == 1)
    long_context = min(LONG_CONTEXT, max_context - 1)
    notes = []
    slope = 0.0
    if long_context > 4 * SHORT_CONTEXT:
        slope = max(0.0, (timed(decode1, long_context) - base[decode1.name]) / (long_context - SHORT_CONTEXT))
    else:
        notes.append(f"the arena holds {max_context} tokens: attention slope not measured")
    return CostTable(base, slope, key="", measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     long_context=long_context, notes=notes)


def table_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def load_or_measure(programs: list[StepProgram], run: StepRunner, max_context: int, key_parts: dict,
                    cache_dir: Path | None, force: bool = False) -> CostTable:
    """The cached table for `key_parts` if there is one (and not `force`), else a fresh measurement,
    saved for the next start-up. A cache that cannot be read or written is only logged."""
    key = table_key(key_parts)
    path = cache_dir / f"{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file() and not force:
        try:
            table = CostTable.from_json(path.read_text())
            if set(table.base_s) == {p.name for p in programs}:
                table.source = "cached"
                return table
        except (OSError, ValueError, TypeError) as exc:
            log.warning("cost table %s unreadable (%s); measuring again", path, exc)
    t0 = time.perf_counter()
    table = measure(programs, run, max_context)
    table.key = key
    log.info("cost model: timed %d step programs in %.2f s", len(programs), time.perf_counter() - t0)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(table.to_json())
        except OSError as exc:
            log.warning("cost table not cached (%s)", exc)
    return table


class CostModel:
    """The cost table, kept true by the steps the engine really runs.

    The table is measured once (or read from the cache), and a machine drifts from it: another
    tenant, a clock that changed, host work per sequence that the table's timing runs have not.
    A prediction that runs short lets a step exceed an interactive stream's target; one that runs
    long holds batch work back for nothing. So each step's measured time is set against the
    table's prediction for it, and predictions are scaled by the median of the latest ratios:
    per program once it has MIN_SAMPLES of its own. A program without them is scaled up by the
    median over every program when steps run slow, but never down: programs' costs drift apart
    (measured on the CPU: decode[1] at 0.69x the table while decode[2] beside 31 batch sequences
    ran at 0.92x), and a guess that runs short breaks an interactive stream's target. A median
    over a window, each ratio clamped, so one slow step (a page fault, a GC pause) moves
    nothing. Outputs never depend on it (batch invariance): only which work shares a step."""

    WINDOW = 32  # ratios kept per program
    MIN_SAMPLES = 4
    EVERY = 2  # a program's factor is recomputed every EVERY of its steps (a median costs ~2 us)
    CLAMP = (0.25, 4.0)

    def __init__(self, table: CostTable) -> None:
        self.table = table
        self._ratios: dict[str, deque[float]] = {}
        self._recent: deque[float] = deque(maxlen=2 * self.WINDOW)  # every program's
        self._factor: dict[str, float] = {}
        self.factor = 1.0  # the median over every program: the correction shown to operators
        self._unseen = 1.0  # a program's factor until it has its own: max(factor, 1)
        self._seen = 0
        self._told = 1.0  # the factor last logged

    def predict(self, program: StepProgram, pairs: int) -> float:
        return self.table.predict(program, pairs) * self._factor.get(program.name, self._unseen)

    def observe(self, program: StepProgram, pairs: int, seconds: float) -> None:
        """A step of `program` with `pairs` attention pairs took `seconds`."""
        raw = self.table.predict(program, pairs)
        if raw <= 0.0:
            return
        lo, hi = self.CLAMP
        ratio = min(max(seconds / raw, lo), hi)
        window = self._ratios.get(program.name)
        if window is None:
            window = self._ratios[program.name] = deque(maxlen=self.WINDOW)
        window.append(ratio)
        self._recent.append(ratio)
        if len(window) >= self.MIN_SAMPLES and len(window) % self.EVERY == 0:
            self._factor[program.name] = statistics.median(window)
        self._seen += 1
        if self._seen >= self.MIN_SAMPLES and self._seen % self.EVERY == 0:
            self.factor = statistics.median(self._recent)
            self._unseen = max(self.factor, 1.0)
            if not 0.8 < self.factor / self._told < 1.25:
                log.info("cost model: steps take %.2fx the cost table's prediction; predictions follow "
                         "(`lockstep plan --calibrate` measures the table again)", self.factor)
                self._told = self.factor

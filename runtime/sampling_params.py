"""Per-request sampling parameters, validated where they are made."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
LATENCY_CLASSES = ("interactive", "batch")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 is greedy decoding.

    Sampling randomness is keyed by (seed, branch, position) through a counter-based RNG, so a
    seeded request gives the same tokens whatever else runs. With no seed, one is drawn per
    request.
    """

    max_tokens: int | None = 256  # None: until the context is full
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; 0: the chosen token's; N: plus the N most likely
    prompt_logprobs: int | None = None  # same, for every prompt token after the first
    skip_special_tokens: bool = True
    # Scheduling (runtime/scheduler.py): an interactive stream is kept inside its inter-token
    # latency target (None: the engine's --itl-target); batch work fills the rest of each step.
    latency_class: str = "interactive"
    itl_target_ms: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        problems = []
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            problems.append(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0 or self.temperature != self.temperature:
            problems.append(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k == -1:
            self.top_k = 0
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be a non-negative integer (0 or -1 turns it off), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            problems.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            problems.append(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            problems.append("stop_token_ids must be non-negative integers")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            problems.append(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        elif self.max_tokens is not None and self.min_tokens > self.max_tokens:
            problems.append(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                problems.append(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if self.latency_class not in LATENCY_CLASSES:
            problems.append(f"latency_class must be one of {', '.join(LATENCY_CLASSES)}, got {self.latency_class!r}")
        if self.itl_target_ms is not None and not (isinstance(self.itl_target_ms, (int, float))
                                                   and 0 < self.itl_target_ms <= 600_000):
            problems.append(f"itl_target_ms must be a positive number of milliseconds, got {self.itl_target_ms!r}")
        if problems:
            raise InvalidRequestError("; ".join(problems))

    @property
    def interactive(self) -> bool:
        return self.latency_class == "interactive"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

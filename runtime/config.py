"""Configuration: what a model is (ModelConfig) and how the engine runs it (EngineConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidRequestError, UnsupportedModelError

# Architectures that share the Llama block (RMSNorm, RoPE, GQA attention, SwiGLU MLP).
# Qwen2 differs only by a bias on the Q/K/V projections.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1-style frequency scaling: long wavelengths are stretched by `factor`."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    rope_scaling: RopeScaling | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.arch!r} is not supported; lockstep runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (the Llama family)"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"model config has {name} = {getattr(self, name)}; it must be positive")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, itemsize: int) -> int:
        return 2 * self.num_layers * self.kv_size * itemsize


@dataclass
class EngineConfig:
    """How the engine runs a model. Defaults suit the CPU; every field is a user-facing knob."""

    block_size: int = 16
    kv_memory_bytes: int = 1 << 30
    max_num_seqs: int = 64
    # Tokens one step may process. Decodes take one each; prefill fills the rest in chunks.
    max_batched_tokens: int = 256
    max_model_len: int | None = None  # default: the model's context, capped by the KV arena
    # Prompt tokens one step may take (chunked prefill); default max_batched_tokens.
    prefill_chunk: int | None = None
    threads: int | None = None
    # Reuse KV blocks of earlier requests that share a prompt prefix (lockstep._core's index).
    prefix_cache: bool = True
    # Keep the last input token's logits of prefill-only sequences (max_num_seqs rows of the
    # vocabulary, runtime/held_logits.py) so commit() samples without a forward; off: commit
    # computes that token again.
    held_logits: bool = True
    # Inter-token latency an interactive request gets unless it asks for its own (runtime/scheduler.py).
    itl_target_ms: float = 50.0
    # The longest a batch sequence waits for a step while interactive streams hold it back.
    batch_max_wait_ms: float = 1000.0
    # The cost table of step programs: "auto" reuses one measured earlier on this machine for the
    # same model and settings, else measures; "measure" always measures; "off" keeps none (steps
    # are then limited by max_batched_tokens only, and latency targets are not enforced).
    calibrate: str = "auto"
    # Scale the cost table's predictions by what steps really take (runtime/cost_model.py's
    # CostModel), so latency targets hold as the machine drifts from the table.
    cost_correction: bool = True
    # Launch each step before taking in the step before's sampled tokens (they are its input on
    # the device), then take them in and make their outputs (text, stop strings, delivery) while
    # it runs: "auto" does where the forward runs asynchronously (CUDA); "on" forces it (tests);
    # "off" takes them in and makes them before the step returns. Outputs are the same either way.
    overlap: str = "auto"
    # On CUDA, capture each decode bucket once as a CUDA graph and replay it.
    cuda_graphs: bool = True
    # Check, every step, that the native CPU forward touches only planned buffers (tests, debugging).
    guard_memory: bool = False
    # "torch" (plain PyTorch, the reference) or "triton" (lockstep's kernels); "auto" picks triton
    # on CUDA and torch on the CPU, where triton only runs under its slow interpreter.
    backend: str = "auto"
    device: str = "auto"  # "cpu", "cuda" or "auto" (CUDA when there is one)
    # Decode attention in the triton backend: lockstep's Triton kernel, or its hand-written
    # CUDA C++ one (cpp/cuda, compiled at run time through CuPy).
    attention: str = "triton"
    # Linear layers of the triton backend: "quantized" reads a GGUF's Q8_0/Q4_0/Q4_1 blocks in
    # the matmul kernel (4-bit weights stream from memory); "dense" uses float weights through
    # torch's matmul; "auto" is quantized on CUDA when the model is such a GGUF, else dense.
    weights: str = "auto"
    # Matmuls of the torch backend on the CPU: "native" is lockstep's C++ kernel reading GGUF
    # blocks as stored (batch-invariant, fixed reduction order); "torch" is torch's float GEMM.
    cpu_kernels: str = "native"

    def __post_init__(self) -> None:
        checks = {
            "backend": self.backend in ("auto", "torch", "triton"),
            "device": self.device in ("auto", "cpu", "cuda"),
            "attention": self.attention in ("triton", "cuda"),
            "weights": self.weights in ("auto", "quantized", "dense"),
            "cpu_kernels": self.cpu_kernels in ("native", "torch"),
            "calibrate": self.calibrate in ("auto", "measure", "off"),
            "overlap": self.overlap in ("auto", "on", "off"),
            "prefill_chunk": self.prefill_chunk is None or self.prefill_chunk >= 1,
            "itl_target_ms": self.itl_target_ms > 0,
            "batch_max_wait_ms": self.batch_max_wait_ms > 0,
            "block_size": self.block_size >= 1,
            "kv_memory_bytes": self.kv_memory_bytes > 0,
            "max_num_seqs": self.max_num_seqs >= 1,
            "max_batched_tokens": self.max_batched_tokens >= 1,
            "max_model_len": self.max_model_len is None or self.max_model_len >= 2,
            "threads": self.threads is None or self.threads >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InvalidRequestError(
                "invalid engine setting " + ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            )
        if self.max_batched_tokens < self.max_num_seqs:
            # Every running sequence must be able to decode in the same step.
            self.max_batched_tokens = self.max_num_seqs
        if self.prefill_chunk is None or self.prefill_chunk > self.max_batched_tokens:
            self.prefill_chunk = self.max_batched_tokens


@dataclass
class LoadStats:
    """How long loading took, for `lockstep` to report honestly."""

    parse_s: float = 0.0
    weights_s: float = 0.0
    tokenizer_s: float = 0.0
    index_cached: bool = False
    notes: list[str] = field(default_factory=list)

"""Synthetic models: real architectures with random weights, for benchmarks where the model file
cannot travel (the GPU machine has no network).

`synthetic:llama-3.2-1b` has Llama 3.2 1B's exact shapes, so a step moves exactly the bytes the
real model moves and a benchmark's tok/s and bandwidth figures hold for it; its outputs are
meaningless. The tokenizer is byte-level over a vocabulary padded with filler tokens to the real
size, so text prompts still work.

`synthetic:llama-3.2-1b:q4_1` (or `:q4_0`, `:q8_0`) draws its linear layers as random GGUF
blocks instead, for the quantized matmuls; the float weights are those blocks dequantized, so
the torch backend computes the same model (on a GPU, up to rounding those weights to bf16).
"""
from __future__ import annotations

import time

import torch

from .config import LoadStats, ModelConfig, RopeScaling
from .errors import ModelLoadError
from .quantized_weights import KERNEL_QTYPES, QuantizedWeights, assemble_quantized
from .tokenizer import Tokenizer
from .weights import ModelWeights, assemble, expected_shapes

PREFIX = "synthetic:"

SYNTHETIC_CONFIGS = {
    # Two small layers: for checking scripts on the CPU, where Triton runs in its interpreter.
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                 num_kv_heads=1, head_dim=64, tie_word_embeddings=True, rope_theta=10000.0, rope_scaling=None),
    # The default model's shapes (GQA group 3, head_dim 64), for GPU checks without its file.
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True,
                         rope_theta=100000.0, rope_scaling=None),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                         num_heads=32, num_kv_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position=8192)),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                         num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=False,
                         rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position=8192)),
}


def is_synthetic(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def synthetic_config(name: str, max_position: int = 8192) -> ModelConfig:
    shapes = SYNTHETIC_CONFIGS.get(name)
    if shapes is None:
        raise ModelLoadError(f"unknown synthetic model {name!r}; choose one of "
                             f"{', '.join(PREFIX + n for n in SYNTHETIC_CONFIGS)}")
    shapes = {"rope_theta": 500000.0, **shapes}
    return ModelConfig(arch="llama", rms_norm_eps=1e-5, max_position=max_position,
                       qkv_bias=False, name=PREFIX + name, **shapes)


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    from .tokenizer import _byte_alphabet

    alphabet = [_byte_alphabet()[b] for b in range(256)]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    merged = ["\u0120t", "he"]  # byte-level BPE needs merges; two real ones keep it a real BPE
    fillers = merged + [f"<filler_{i}>" for i in range(vocab_size - len(alphabet) - len(specials) - 2)]
    tokens = alphabet + fillers + specials
    types = [1] * (len(alphabet) + len(fillers)) + [3] * len(specials)
    return Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": ["\u0120 t", "h e"],
        "tokenizer.ggml.bos_token_id": vocab_size - 3, "tokenizer.ggml.eos_token_id": vocab_size - 1,
    })


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`synthetic:NAME[:QTYPE]` -> (NAME, QTYPE or None)."""
    name, _, qtype = spec[len(PREFIX):].partition(":")
    if qtype and qtype.upper() not in KERNEL_QTYPES:
        raise ModelLoadError(f"synthetic model {spec!r}: unknown weight type {qtype!r}; use one of "
                             f"{', '.join(q.lower() for q in KERNEL_QTYPES)}, or none for float weights")
    return name, qtype.upper() or None


# Per-block scale (and min) that give quantized weights a standard deviation near 0.02, like the
# float ones: uniform 4-bit codes have a std of 4.6, uniform int8 codes one of 74.
_BLOCK_SCALE = {"Q4_0": 0.02 / 4.6, "Q4_1": 0.02 / 4.6, "Q8_0": 0.02 / 74}


def random_blocks(rows: int, cols: int, qtype: str, generator: torch.Generator, device: str) -> torch.Tensor:
    """Random GGUF blocks: uniform codes, scales jittered around _BLOCK_SCALE, Q4_1 mins centring them."""
    block_bytes = KERNEL_QTYPES[qtype]
    blocks = torch.randint(0, 256, (rows, cols // 32, block_bytes), dtype=torch.uint8, device=device,
                           generator=generator)
    scale = _BLOCK_SCALE[qtype] * (0.5 + torch.rand(rows, cols // 32, 1, device=device, generator=generator))
    blocks[..., 0:2] = scale.half().view(torch.uint8)
    if qtype == "Q4_1":
        blocks[..., 2:4] = (-7.5 * scale).half().view(torch.uint8)
    return blocks.view(rows, -1)


def load_synthetic(spec: str, seed: int = 0) -> tuple[ModelConfig, ModelWeights, Tokenizer, LoadStats,
                                                      QuantizedWeights | None]:
    """Random weights (std 0.02, norms 1) in the architecture's exact shapes.

    With a GPU they are drawn there, in bfloat16 (the engine's GPU dtype): an 8B model in
    float32 on the host would be 32 GB to draw and copy for nothing.
    """
    from gguf import GGMLQuantizationType

    from .dequant import dequantize_blocks

    stats = LoadStats()
    name, qtype = parse_spec(spec)
    config = synthetic_config(name)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(seed)
    shapes = expected_shapes(config)
    blocks: dict[str, torch.Tensor] = {}

    def load(name: str) -> torch.Tensor:
        shape = shapes[name]
        if len(shape) == 1:
            return torch.ones(shape, device=device, dtype=dtype)
        if qtype is None:
            return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=generator)
        blocks[name] = random_blocks(*shape, qtype, generator, device)
        return dequantize_blocks(blocks[name], GGMLQuantizationType[qtype]).to(dtype)

    weights = assemble(config, load)
    quantized = None if qtype is None else assemble_quantized(config, lambda n: (qtype, blocks[n]))
    stats.weights_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer = synthetic_tokenizer(config.vocab_size)
    stats.tokenizer_s = time.perf_counter() - t0
    return config, weights, tokenizer, stats, quantized

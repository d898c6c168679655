"""Writes small, real GGUF files with random weights, for loader and bad-input tests.

The files are complete models (Llama-family metadata, a byte-level BPE tokenizer, every
tensor) so both lockstep and HF transformers can load them, or deliberately broken in one
named way so lockstep's error for that case can be checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

T = GGMLQuantizationType
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@dataclass
class TinySpec:
    arch: str = "llama"
    hidden: int = 64
    ffn: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    qtype: GGMLQuantizationType = T.F32  # for the 2-D projection weights
    embed_qtype: GGMLQuantizationType = T.F32
    tied: bool = True
    qkv_bias: bool = False
    bad_shape: bool = False  # attn_k one head too wide


def tokenizer_tokens() -> tuple[list[str], list[str], list[int]]:
    alphabet = byte_level_alphabet()
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]
    tokens = alphabet + ["".join(m.split()) for m in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    return tokens, merges, types


def _encode(w: np.ndarray, qtype: GGMLQuantizationType, rng: np.random.Generator) -> tuple[np.ndarray, GGMLQuantizationType]:
    if qtype == T.F32:
        return w.astype(np.float32), qtype
    if qtype in (T.F16,):
        return w.astype(np.float16), qtype
    try:
        return quantize(w.astype(np.float32), qtype), qtype
    except (NotImplementedError, ValueError):
        # gguf-py cannot quantize K-quants: write random blocks with finite, small scales.
        block, size = GGML_QUANT_SIZES[qtype]
        rows, cols = w.shape
        raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
        scale_at = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}.get(qtype, ())
        for off in scale_at:
            raw[:, off:off + 2] = (rng.random(len(raw)) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
        return raw.reshape(rows, -1), qtype


def write_tiny_gguf(path: Path, spec: TinySpec | None = None, seed: int = 0) -> Path:
    spec = spec or TinySpec()
    rng = np.random.default_rng(seed)
    tokens, merges, types = tokenizer_tokens()
    vocab = len(tokens)
    head_dim = spec.hidden // spec.heads
    writer = GGUFWriter(str(path), spec.arch)
    writer.add_name(f"tiny-{spec.arch}")
    writer.add_block_count(spec.layers)
    writer.add_context_length(256)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if spec.arch == "llama" else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHATML)

    def add(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, scale: float = 0.1) -> None:
        w = (rng.standard_normal(shape) * scale).astype(np.float32)
        if len(shape) == 1:
            writer.add_tensor(name, (1.0 + w) if name.endswith("norm.weight") else w)
            return
        data, qt = _encode(w, qtype, rng)
        writer.add_tensor(name, data, raw_dtype=qt)  # shape follows from the byte shape

    kv = spec.kv_heads * head_dim + (head_dim if spec.bad_shape else 0)
    add("token_embd.weight", (vocab, spec.hidden), spec.embed_qtype, 1.0)
    for i in range(spec.layers):
        add(f"blk.{i}.attn_norm.weight", (spec.hidden,), T.F32)
        add(f"blk.{i}.attn_q.weight", (spec.hidden, spec.hidden), spec.qtype)
        add(f"blk.{i}.attn_k.weight", (kv, spec.hidden), spec.qtype)
        add(f"blk.{i}.attn_v.weight", (spec.kv_heads * head_dim, spec.hidden), spec.qtype)
        if spec.qkv_bias:
            add(f"blk.{i}.attn_q.bias", (spec.hidden,), T.F32)
            add(f"blk.{i}.attn_k.bias", (spec.kv_heads * head_dim,), T.F32)
            add(f"blk.{i}.attn_v.bias", (spec.kv_heads * head_dim,), T.F32)
        add(f"blk.{i}.attn_output.weight", (spec.hidden, spec.hidden), spec.qtype)
        add(f"blk.{i}.ffn_norm.weight", (spec.hidden,), T.F32)
        add(f"blk.{i}.ffn_gate.weight", (spec.ffn, spec.hidden), spec.qtype)
        add(f"blk.{i}.ffn_up.weight", (spec.ffn, spec.hidden), spec.qtype)
        add(f"blk.{i}.ffn_down.weight", (spec.hidden, spec.ffn), spec.qtype)
    add("output_norm.weight", (spec.hidden,), T.F32)
    if not spec.tied:
        add("output.weight", (vocab, spec.hidden), spec.qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

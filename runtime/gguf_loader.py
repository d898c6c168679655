"""Loads a GGUF file: metadata and tensor index through the `gguf` package, weights by memmap.

Parsing a GGUF with `gguf.GGUFReader` costs ~2 s on the default model, nearly all of it in
the 98k tokenizer strings. That is most of lockstep's start-up budget, so the first load
writes what it learned (config metadata, tensor offsets, the built tokenizer) to an index in
lockstep's cache, keyed by the file's path, size and mtime. Later loads memmap the file and
read the index: no re-parse, and a changed file gets a new key.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import LoadStats, ModelConfig
from .dequant import SUPPORTED_TYPES, dequantize
from .errors import ModelLoadError, UnsupportedModelError
from .fetch import lockstep_home
from .tokenizer import Tokenizer
from .weights import ModelWeights, assemble, check_shapes

INDEX_VERSION = 1
# Arrays too big for the index: they live on in the serialised tokenizer instead.
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.scores")
# GGUF architectures lockstep maps onto its own; Mistral GGUFs are written as "llama".
_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
_LAYER_TENSORS = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "q", "attn_k.weight": "k", "attn_v.weight": "v",
    "attn_output.weight": "o", "ffn_norm.weight": "ffn_norm", "ffn_gate.weight": "gate",
    "ffn_up.weight": "up", "ffn_down.weight": "down",
    "attn_q.bias": "q_bias", "attn_k.bias": "k_bias", "attn_v.bias": "v_bias",
}
_GLOBAL_TENSORS = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}


@dataclass
class TensorEntry:
    name: str  # as in the file
    qtype: int
    shape: tuple[int, ...]  # numpy order: (rows, cols)
    offset: int
    nbytes: int


@dataclass
class GGUFIndex:
    meta: dict[str, Any]
    tensors: list[TensorEntry]
    tokenizer_json: str
    tokenizer_info: dict[str, Any]


def canonical_name(name: str) -> str | None:
    """Maps a GGUF tensor name to lockstep's canonical one (None for tensors we do not use)."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def load_gguf(path: Path, home: Path | None = None) -> tuple[ModelConfig, Callable[[frozenset[str]], ModelWeights],
                                                            Tokenizer, LoadStats]:
    """The file's config, tokenizer and a builder of its float weights: `build(skip)` dequantizes
    each tensor the first time a caller needs it (entries in `skip`, assemble's names, are left
    out), so an engine that reads the linear layers as GGUF blocks never dequantizes them."""
    stats = LoadStats()
    t0 = time.perf_counter()
    index, stats.index_cached = _load_index(path, home)
    stats.parse_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        tokenizer = Tokenizer.from_json(index.tokenizer_json, index.tokenizer_info)
    except ModelLoadError:
        if not stats.index_cached:
            raise
        # A cached tokenizer this version cannot read is only a stale cache: parse the file again.
        _index_path(path, home).unlink(missing_ok=True)
        index, stats.index_cached = _load_index(path, home)
        tokenizer = Tokenizer.from_json(index.tokenizer_json, index.tokenizer_info)
    stats.tokenizer_s = time.perf_counter() - t0

    tensors = {canonical_name(t.name): t for t in index.tensors}
    tensors.pop(None, None)
    config = config_from_metadata(index.meta, tie_word_embeddings="lm_head" not in tensors,
                                  qkv_bias="layers.0.q_bias" in tensors,
                                  vocab_fallback=tokenizer.vocab_size)
    source = lambda name: tensors[name].name if name in tensors else _gguf_name(name)  # noqa: E731
    check_shapes(config, {name: t.shape for name, t in tensors.items()}, source)
    for name, t in tensors.items():
        if t.qtype not in SUPPORTED_TYPES:
            import gguf
            raise UnsupportedModelError(
                f"tensor {t.name} is quantized as {gguf.GGMLQuantizationType(t.qtype).name}, which lockstep "
                f"does not support; use a GGUF quantized as one of "
                f"{', '.join(sorted(q.name for q in SUPPORTED_TYPES))}"
            )

    data = np.memmap(path, dtype=np.uint8, mode="r")
    # Llama GGUFs store Q and K with rows interleaved for ggml's RoPE; undo it so every
    # model (and HF directories) uses the same rotate-half layout.
    unpermute = {"q": config.num_heads, "k": config.num_kv_heads} if config.arch in ("llama", "mistral") else {}

    def load(name: str) -> torch.Tensor:
        t = tensors[name]
        w = dequantize(data[t.offset:t.offset + t.nbytes], t.qtype, t.shape)
        heads = unpermute.get(name.rsplit(".", 1)[-1].removesuffix("_bias"))
        if heads is not None:
            w = _unpermute_rows(w, heads)
        return w

    rope = next((t for t in index.tensors if t.name == "rope_freqs.weight"), None)
    rope_freqs = None if rope is None else dequantize(data[rope.offset:rope.offset + rope.nbytes], rope.qtype,
                                                      rope.shape)
    cache: dict[str, torch.Tensor] = {}

    def build(skip: frozenset[str] = frozenset()) -> ModelWeights:
        t0 = time.perf_counter()
        weights = assemble(config, load, skip, cache)
        weights.rope_freqs = rope_freqs
        stats.weights_s += time.perf_counter() - t0  # dequantizing, wherever it happens
        return weights

    return config, build, tokenizer, stats


def _gguf_name(canonical: str) -> str:
    reverse = {v: k for k, v in _GLOBAL_TENSORS.items()}
    if canonical in reverse:
        return reverse[canonical]
    _, n, part = canonical.split(".")
    return f"blk.{n}.{ {v: k for k, v in _LAYER_TENSORS.items()}[part] }"


def _unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert-time permutation of Q/K rows within each head."""
    rows = w.shape[0]
    head_dim = rows // heads
    rest = w.shape[1:]
    return w.reshape(heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest).contiguous()


def config_from_metadata(meta: dict[str, Any], tie_word_embeddings: bool, qkv_bias: bool,
                         vocab_fallback: int) -> ModelConfig:
    arch_name = meta.get("general.architecture")
    if arch_name not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch_name!r} is not supported; lockstep runs "
            f"{', '.join(sorted(_ARCHITECTURES))} (the Llama family)"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch_name}.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata is missing {arch_name}.{key}")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(meta.get(f"{arch_name}.attention.key_length") or hidden // heads)
    rope_dims = int(meta.get(f"{arch_name}.rope.dimension_count") or head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModelError(f"partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported")
    scaling = None
    if meta.get(f"{arch_name}.rope.scaling.type") not in (None, "none"):
        raise UnsupportedModelError(
            f"RoPE scaling {meta[f'{arch_name}.rope.scaling.type']!r} is not supported"
        )
    return ModelConfig(
        arch=_ARCHITECTURES[arch_name],
        vocab_size=int(meta.get(f"{arch_name}.vocab_size") or vocab_fallback),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch_name}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=int(get("context_length", 4096)),
        tie_word_embeddings=tie_word_embeddings,
        qkv_bias=qkv_bias,
        rope_scaling=scaling,
        name=str(meta.get("general.name", "")),
    )


# --- the index -------------------------------------------------------------------------------

def _index_path(path: Path, home: Path | None) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{INDEX_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return (home or lockstep_home()) / "index" / f"{path.stem}-{digest}.json"


def _load_index(path: Path, home: Path | None) -> tuple[GGUFIndex, bool]:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    cache = _index_path(path, home)
    if cache.is_file():
        try:
            raw = json.loads(cache.read_text())
            return GGUFIndex(raw["meta"], [TensorEntry(*t) for t in raw["tensors"]],
                             raw["tokenizer_json"], raw["tokenizer_info"]), True
        except (ValueError, KeyError, TypeError):
            cache.unlink(missing_ok=True)  # a damaged index is only a cache: rebuild it
    index = _parse(path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({
        "meta": index.meta,
        "tensors": [[t.name, t.qtype, list(t.shape), t.offset, t.nbytes] for t in index.tensors],
        "tokenizer_json": index.tokenizer_json,
        "tokenizer_info": index.tokenizer_info,
    }))
    os.replace(tmp, cache)
    return index, False


def _parse(path: Path) -> GGUFIndex:
    import gguf

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        meta = {}
        for key, f in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            meta[key] = f.contents()
    except (ValueError, KeyError, IndexError, TypeError, struct.error, OverflowError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a valid GGUF file, or truncated ({exc or type(exc).__name__})") from None
    tensors = []
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelLoadError(
                f"{path}: truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes} "
                f"but the file has {size}; download it again"
            )
        # GGUF stores dims innermost first; numpy order is the reverse.
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
        tensors.append(TensorEntry(t.name, int(t.tensor_type), shape, int(t.data_offset), int(t.n_bytes)))
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    tokenizer_json, tokenizer_info = tokenizer.to_json()
    small_meta = {k: v for k, v in meta.items() if k not in _TOKENIZER_ARRAYS}
    return GGUFIndex(small_meta, tensors, tokenizer_json, tokenizer_info)

"""The weight layout of a Llama-family model, shared by every loader and backend.

Loaders name tensors canonically (`embed`, `layers.3.q`, ...) and hand them over one at a
time; `assemble` checks each shape against the config and packs them into the layout the
forward wants: Q, K and V fused into one matrix and gate and up into another, so a layer
runs three matmuls fewer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .config import ModelConfig
from .errors import ModelLoadError, UnsupportedModelError

LAYER_PARTS = ("attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up", "down")
BIAS_PARTS = ("q_bias", "k_bias", "v_bias")


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    bqkv: torch.Tensor | None  # [q_size + 2 * kv_size] (Qwen2)
    wo: torch.Tensor  # [hidden, q_size]
    ffn_norm: torch.Tensor  # [hidden]
    w_gate_up: torch.Tensor  # [2 * intermediate, hidden]
    w_down: torch.Tensor  # [hidden, intermediate]


@dataclass
class ModelWeights:
    embed: torch.Tensor | None  # [vocab, hidden]; None when the forward reads its GGUF blocks instead
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor | None  # [vocab, hidden]; the same tensor as `embed` when tied; None: read as blocks
    # Per-frequency divisors for RoPE (Llama 3.1 GGUFs store them as `rope_freqs.weight`).
    rope_freqs: torch.Tensor | None = None

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in self._tensors():
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ModelWeights:
        """The same weights on `device` in `dtype`; a tied head stays one tensor."""
        moved: dict[int, torch.Tensor] = {}

        def conv(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if id(t) not in moved:
                moved[id(t)] = t.to(device=device, dtype=dtype)
            return moved[id(t)]

        layers = [LayerWeights(**{k: conv(v) for k, v in vars(layer).items()}) for layer in self.layers]
        return ModelWeights(embed=conv(self.embed), layers=layers, final_norm=conv(self.final_norm),
                            lm_head=conv(self.lm_head),
                            rope_freqs=None if self.rope_freqs is None else self.rope_freqs.to(device))

    def _tensors(self):
        yield from (self.embed, self.final_norm, self.lm_head, self.rope_freqs)
        for layer in self.layers:
            yield from vars(layer).values()


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape (out, in) of every tensor the config calls for."""
    h, i = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embed": (config.vocab_size, h),
        "final_norm": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (config.vocab_size, h)
    per_layer = {
        "attn_norm": (h,), "q": (config.q_size, h), "k": (config.kv_size, h), "v": (config.kv_size, h),
        "o": (h, config.q_size), "ffn_norm": (h,), "gate": (i, h), "up": (i, h), "down": (h, i),
    }
    if config.qkv_bias:
        per_layer.update(q_bias=(config.q_size,), k_bias=(config.kv_size,), v_bias=(config.kv_size,))
    for n in range(config.num_layers):
        for part, shape in per_layer.items():
            shapes[f"layers.{n}.{part}"] = shape
    return shapes


def check_shapes(config: ModelConfig, found: dict[str, tuple[int, ...]], source: Callable[[str], str]) -> None:
    """Raises a clear error for a missing tensor or one whose shape the config does not allow.

    `found` maps canonical names to shapes; `source(name)` gives the file's own tensor name.
    """
    for name, shape in expected_shapes(config).items():
        if name not in found:
            raise ModelLoadError(f"model is missing tensor {source(name)} (needed by a {config.arch} model)")
        if tuple(found[name]) != shape:
            raise UnsupportedModelError(
                f"tensor {source(name)} has shape {tuple(found[name])}, expected {shape} "
                f"from the model's config"
            )


def assemble(config: ModelConfig, load: Callable[[str], torch.Tensor], skip: frozenset[str] = frozenset(),
             cache: dict[str, torch.Tensor] | None = None) -> ModelWeights:
    """Builds ModelWeights by asking `load` for each canonical tensor (float32, shape checked).

    Entries named in `skip` (the layout's own names: "layers.3.wqkv", "lm_head") are None and
    never loaded. With `cache`, each entry is loaded once across calls: a GGUF file's tensors are
    dequantized only when some caller first needs them."""
    cache = {} if cache is None else cache

    def once(key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def entry(key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        return None if key in skip else once(key, make)

    layers = []
    for n in range(config.num_layers):
        part = lambda p: load(f"layers.{n}.{p}")  # noqa: E731
        key = lambda field: f"layers.{n}.{field}"  # noqa: E731
        layers.append(LayerWeights(
            attn_norm=entry(key("attn_norm"), lambda: part("attn_norm")),
            wqkv=entry(key("wqkv"), lambda: torch.cat([part("q"), part("k"), part("v")])),
            bqkv=entry(key("bqkv"), lambda: torch.cat([part("q_bias"), part("k_bias"), part("v_bias")]))
            if config.qkv_bias else None,
            wo=entry(key("wo"), lambda: part("o")),
            ffn_norm=entry(key("ffn_norm"), lambda: part("ffn_norm")),
            w_gate_up=entry(key("w_gate_up"), lambda: torch.cat([part("gate"), part("up")])),
            w_down=entry(key("w_down"), lambda: part("down")),
        ))
    embed = entry("embed", lambda: load("embed"))
    # A tied head is the embedding table itself, one tensor (loaded for it if "embed" is skipped).
    lm_head = entry("lm_head", (lambda: once("embed", lambda: load("embed"))) if config.tie_word_embeddings
                    else (lambda: load("lm_head")))
    return ModelWeights(embed=embed, layers=layers, final_norm=entry("final_norm", lambda: load("final_norm")),
                        lm_head=lm_head)


def without_matrices(weights: ModelWeights, skip: frozenset[str]) -> ModelWeights:
    """The same weights with None for every entry `skip` names (assemble's names)."""
    if not skip:
        return weights
    layers = [replace(layer, **{f: None for f in vars(layer) if f"layers.{n}.{f}" in skip})
              for n, layer in enumerate(weights.layers)]
    return replace(weights, layers=layers, lm_head=None if "lm_head" in skip else weights.lm_head,
                   embed=None if "embed" in skip else weights.embed)

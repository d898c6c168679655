"""Loads a Hugging Face model directory: config.json, *.safetensors and tokenizer.json."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .config import LoadStats, ModelConfig, RopeScaling
from .errors import ModelLoadError, UnsupportedModelError
from .tokenizer import Tokenizer
from .weights import ModelWeights, assemble, check_shapes

_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v", "self_attn.o_proj.weight": "o",
    "post_attention_layernorm.weight": "ffn_norm", "mlp.gate_proj.weight": "gate",
    "mlp.up_proj.weight": "up", "mlp.down_proj.weight": "down",
    "self_attn.q_proj.bias": "q_bias", "self_attn.k_proj.bias": "k_bias", "self_attn.v_proj.bias": "v_bias",
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm",
                   "lm_head.weight": "lm_head"}


def canonical_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER_TENSORS:
        return f"layers.{parts[2]}.{_LAYER_TENSORS[parts[3]]}"
    return None


def load_hf_dir(path: Path) -> tuple[ModelConfig, ModelWeights, Tokenizer, LoadStats]:
    from safetensors import SafetensorError, safe_open

    stats = LoadStats()
    t0 = time.perf_counter()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: not a model directory (no config.json); pass a GGUF file or an HF directory")
    try:
        raw_config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{config_file}: invalid JSON ({exc})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights (PyTorch .bin checkpoints are not supported)")

    handles = {}  # keeps each file open while its tensors are read
    tensors: dict[str, tuple[Any, str]] = {}
    try:
        for file in files:
            handle = safe_open(str(file), framework="pt")
            handles[file] = handle
            for name in handle.keys():
                canonical = canonical_name(name)
                if canonical is not None:
                    tensors[canonical] = (handle, name)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable safetensors ({exc})") from None

    tie = "lm_head" not in tensors or bool(raw_config.get("tie_word_embeddings", False))
    config = config_from_hf(raw_config, tie_word_embeddings=tie)
    if tie:
        tensors.pop("lm_head", None)
    shapes = {name: tuple(h.get_slice(n).get_shape()) for name, (h, n) in tensors.items()}
    check_shapes(config, shapes, lambda name: tensors[name][1] if name in tensors else name)
    stats.parse_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_hf_dir(path)
    stats.tokenizer_s = time.perf_counter() - t0

    t0 = time.perf_counter()

    def load(name: str) -> torch.Tensor:
        handle, file_name = tensors[name]
        return handle.get_tensor(file_name).to(torch.float32)

    weights = assemble(config, load)
    stats.weights_s = time.perf_counter() - t0
    return config, weights, tokenizer, stats


def config_from_hf(raw: dict[str, Any], tie_word_embeddings: bool) -> ModelConfig:
    archs = raw.get("architectures") or []
    arch = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"architecture {archs or raw.get('model_type')!r} is not supported; lockstep runs "
            f"{', '.join(sorted(_ARCHITECTURES))}"
        )
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        # transformers 5 moved RoPE settings into `rope_parameters`; older configs keep them flat.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_theta = float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type != "default":
            raise UnsupportedModelError(f"RoPE scaling {rope_type!r} is not supported")
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise UnsupportedModelError("attention_bias / mlp_bias on a Llama model is not supported")
        max_position = int(raw.get("max_position_embeddings", 4096))
        window = raw.get("sliding_window")
        if window and (arch == "mistral" or raw.get("use_sliding_window")):
            # Sliding-window attention is not implemented; inside one window it is exact.
            max_position = min(max_position, int(window))
        return ModelConfig(
            arch=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rope_theta=rope_theta,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position=max_position,
            tie_word_embeddings=tie_word_embeddings,
            qkv_bias=arch == "qwen2",
            rope_scaling=scaling,
            name=str(raw.get("_name_or_path", "")),
        )
    except KeyError as exc:
        raise ModelLoadError(f"config.json is missing {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"config.json has an invalid value ({exc})") from None

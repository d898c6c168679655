"""Finds and loads a model: the default one, a GGUF file, an HF directory or a synthetic one."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .config import LoadStats, ModelConfig
from .errors import ModelLoadError
from .fetch import ensure_model
from .quantized_weights import QuantizedWeights
from .synthetic import is_synthetic, load_synthetic
from .tokenizer import Tokenizer
from .weights import ModelWeights

log = logging.getLogger("lockstep")


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: ModelWeights
    tokenizer: Tokenizer
    source: Path
    stats: LoadStats
    load_s: float
    # Linear layers as GGUF blocks, when the source provides them without a file (synthetic:NAME:q4_1);
    # a GGUF file's blocks are read from the file by the backend that wants them.
    quantized: QuantizedWeights | None = None


def resolve_model(model: str | Path | None, quiet: bool = False) -> Path:
    """None means the default model, fetched into the cache on first use."""
    if model is None or str(model) == "":
        return ensure_model(quiet=quiet)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory; pass a .gguf file or an HF model directory")
    return path


def load_model(model: str | Path | None = None, quiet: bool = False) -> LoadedModel:
    """Loads the default model (None), a GGUF file, an HF directory or `synthetic:NAME`."""
    t0 = time.perf_counter()
    if is_synthetic(model):
        config, weights, tokenizer, stats, quantized = load_synthetic(str(model))
        return LoadedModel(config, weights, tokenizer, Path(str(model)), stats, time.perf_counter() - t0,
                           quantized)
    path = resolve_model(model, quiet=quiet)
    if path.is_dir():
        from .hf_loader import load_hf_dir

        config, weights, tokenizer, stats = load_hf_dir(path)
    else:
        from .gguf_loader import load_gguf

        config, weights, tokenizer, stats = load_gguf(path)
    load_s = time.perf_counter() - t0
    log.info("loaded %s (%s, %d layers, %.0f MB of fp32 weights) in %.2f s",
             path.name, config.arch, config.num_layers, weights.nbytes() / 1e6, load_s)
    return LoadedModel(config, weights, tokenizer, path, stats, load_s)

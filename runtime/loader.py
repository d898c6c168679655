"""Finds and loads a model: the default one, a GGUF file, an HF directory or a synthetic one."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from .config import LoadStats, ModelConfig
from .errors import ModelLoadError
from .fetch import ensure_model
from .quantized_weights import QuantizedWeights, blocked_names
from .synthetic import is_synthetic, load_synthetic
from .tokenizer import Tokenizer
from .weights import ModelWeights, without_matrices

log = logging.getLogger("lockstep")


@dataclass
class LoadedModel:
    config: ModelConfig
    tokenizer: Tokenizer
    source: Path
    stats: LoadStats
    load_s: float
    # Builds the float weights, with None for the entries it is told to skip (weights.assemble's
    # names). A GGUF file's tensors are dequantized the first time one is asked for, then kept, so
    # a matrix an engine reads as blocks is never dequantized at all.
    build_weights: Callable[[frozenset[str]], ModelWeights]
    # Linear layers as GGUF blocks, when the source provides them without a file (synthetic:NAME:q4_1);
    # a GGUF file's blocks are read from the file by the backend that wants them.
    quantized: QuantizedWeights | None = None

    @property
    def weights(self) -> ModelWeights:
        """Every tensor in float (for a GGUF file: dequantized now, where not already)."""
        return self.build_weights(frozenset())

    def weights_except(self, blocks: QuantizedWeights | None, embedding: bool = False) -> ModelWeights:
        """The float weights with None for each linear layer `blocks` holds (and, with
        `embedding`, the embedding table if it has blocks): what an engine that reads those as
        blocks needs in float."""
        return self.build_weights(blocked_names(blocks, embedding))


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
        return LoadedModel(config, tokenizer, Path(str(model)), stats, time.perf_counter() - t0,
                           partial(without_matrices, weights), quantized)
    path = resolve_model(model, quiet=quiet)
    if path.is_dir():
        from .hf_loader import load_hf_dir

        config, weights, tokenizer, stats = load_hf_dir(path)
        build = partial(without_matrices, weights)
        what = f"{weights.nbytes() / 1e6:.0f} MB of fp32 weights"
    else:
        from .gguf_loader import load_gguf

        config, build, tokenizer, stats = load_gguf(path)
        what = "weights dequantized as needed"
    load_s = time.perf_counter() - t0
    log.info("loaded %s (%s, %d layers, %s) in %.2f s", path.name, config.arch, config.num_layers, what, load_s)
    return LoadedModel(config, tokenizer, path, stats, load_s, build)

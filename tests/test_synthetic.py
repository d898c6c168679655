"""Synthetic models have the real architectures' shapes and run through the engine."""
from __future__ import annotations

import pytest

from lockstep.runtime.errors import ModelLoadError
from lockstep.runtime.synthetic import SYNTHETIC_CONFIGS, synthetic_config, synthetic_tokenizer
from lockstep.runtime.weights import expected_shapes

# Published parameter counts (model cards): SmolLM2 134.5M, Llama 3.2 1.24B (tied), Llama 3.1 8.03B.
PUBLISHED_PARAMS = {"smollm2-135m": 134.5e6, "llama-3.2-1b": 1.236e9, "llama-3.1-8b": 8.030e9}


@pytest.mark.parametrize("name", list(SYNTHETIC_CONFIGS))
def test_shapes_add_up_to_the_published_size(name: str) -> None:
    config = synthetic_config(name)
    shapes = expected_shapes(config)
    total = sum(int(__import__("math").prod(s)) for n, s in shapes.items()
                if not (n == "lm_head" and config.tie_word_embeddings))
    assert abs(total - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.005, total


def test_tokenizer_round_trips_text() -> None:
    tok = synthetic_tokenizer(128256)
    assert tok.vocab_size == 128256
    text = "Hello, wörld! 日本"
    assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ModelLoadError, match="synthetic:llama-3.2-1b"):
        synthetic_config("gpt-5")

"""Synthetic models have the real architectures' shapes and run through the engine."""
from __future__ import annotations

import pytest

from lockstep.runtime.errors import ModelLoadError
from lockstep.runtime.synthetic import synthetic_config, synthetic_tokenizer
from lockstep.runtime.weights import expected_shapes

# Published parameter counts (model cards): SmolLM2 134.5M, Llama 3.2 1.24B (tied), Llama 3.1 8.03B.
PUBLISHED_PARAMS = {"smollm2-135m": 134.5e6, "llama-3.2-1b": 1.236e9, "llama-3.1-8b": 8.030e9}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
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


@pytest.mark.parametrize("qtype", ["q4_1", "q4_0", "q8_0"])
def test_quantized_synthetic_weights_are_their_blocks_dequantized(qtype: str) -> None:
    """The float weights the torch backend uses are gguf's own dequantization of the blocks."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from lockstep.runtime.loader import load_model

    model = load_model(f"synthetic:smollm2-135m:{qtype}")
    assert model.quantized is not None and model.quantized.count() == (1 + 4 * 30, 1 + 4 * 30)
    layer, q_layer = model.weights.layers[7], model.quantized.layers[7]
    for name in ("wqkv", "w_down"):
        matrix = getattr(q_layer, name)
        assert matrix.qtype == qtype.upper()
        want = dequantize(matrix.blocks.numpy(), GGMLQuantizationType[qtype.upper()])
        np.testing.assert_array_equal(getattr(layer, name).numpy(), want.reshape(matrix.rows, -1))
    std = float(model.weights.layers[0].w_gate_up.std())
    assert 0.01 < std < 0.04, std  # the float models' scale, so activations stay sane


def test_unknown_weight_type_is_refused() -> None:
    from lockstep.runtime.loader import load_model

    with pytest.raises(ModelLoadError, match="unknown weight type 'q3_k'"):
        load_model("synthetic:smollm2-135m:q3_k")

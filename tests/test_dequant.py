"""lockstep's dequantizer against gguf-py's own numpy reference, on fresh random blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from lockstep.runtime.dequant import SUPPORTED_TYPES, dequantize
from lockstep.runtime.errors import ModelLoadError, UnsupportedModelError

T = GGMLQuantizationType

# Byte offsets of each block's fp16 scale/min fields. Random bytes there could spell inf or
# NaN, which would make the comparison vacuous, so they are overwritten with finite scales.
_FP16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_tensor_bytes(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_size
    if qtype == T.F32:
        return rng.standard_normal(rows * cols, dtype=np.float32).view(np.uint8)
    if qtype == T.F16:
        return rng.standard_normal(rows * cols).astype(np.float16).view(np.uint8)
    if qtype == T.BF16:
        f32 = rng.standard_normal(rows * cols, dtype=np.float32)
        return (f32.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in _FP16_FIELDS[qtype]:
        scales = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES, key=lambda t: t.name), ids=lambda t: t.name)
@pytest.mark.parametrize("rows, blocks_per_row", [(1, 1), (3, 2), (37, 5)])
def test_matches_gguf_reference(qtype: GGMLQuantizationType, rows: int, blocks_per_row: int) -> None:
    rng = np.random.default_rng([int(qtype), rows, blocks_per_row])
    block_size, _ = GGML_QUANT_SIZES[qtype]
    cols = block_size * blocks_per_row * (32 if block_size == 1 else 1)
    raw = random_tensor_bytes(qtype, rows, cols, rng)
    expected = gguf_dequantize(raw.reshape(rows, -1), qtype).astype(np.float32)
    got = dequantize(raw, qtype, (rows, cols))
    assert got.dtype == torch.float32 and tuple(got.shape) == (rows, cols)
    assert np.isfinite(expected).all()
    np.testing.assert_array_equal(got.numpy(), expected)


def test_spans_several_chunks() -> None:
    """A tensor bigger than one staging chunk must decode the same as gguf's reference."""
    rng = np.random.default_rng(7)
    rows, cols = 600, 4096  # 2.4M values: three chunks of 2**20
    raw = random_tensor_bytes(T.Q4_1, rows, cols, rng)
    expected = gguf_dequantize(raw.reshape(rows, -1), T.Q4_1)
    np.testing.assert_array_equal(dequantize(raw, T.Q4_1, (rows, cols)).numpy(), expected)


def test_unsupported_type_names_the_supported_ones() -> None:
    raw = np.zeros(GGML_QUANT_SIZES[T.Q2_K][1], dtype=np.uint8)
    with pytest.raises(UnsupportedModelError, match="Q2_K.*Q4_1"):
        dequantize(raw, T.Q2_K, (1, 256))


def test_wrong_byte_count_is_a_load_error() -> None:
    raw = np.ones(GGML_QUANT_SIZES[T.Q8_0][1] * 2 - 1, dtype=np.uint8)
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        dequantize(raw, T.Q8_0, (1, 64))


def test_row_not_a_multiple_of_the_block_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="multiple of the 32-value block"):
        dequantize(np.ones(34, dtype=np.uint8), T.Q8_0, (1, 33))

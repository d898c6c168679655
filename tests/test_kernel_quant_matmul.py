"""Quantized matmul (kernels/quant_matmul.py) against a float64 matmul on dequantized weights.

Weights are random float matrices quantized with gguf-py (`gguf.quants.quantize`); the
reference dequantizes them with lockstep's GGUF dequantizer, which is bit-exact with gguf-py's.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from kernel_harness import GPU_ARCHS, TEST_DTYPES, assert_close, assert_no_spills, compile_many, poisoned

from lockstep.kernels.quant_matmul import (
    _LAYOUTS,
    _config,
    _input_precision,
    _quant_matmul_kernel,
    quant_matmul,
    quant_matmul_reference,
)
from lockstep.runtime.dequant import dequantize

QTYPES = list(_LAYOUTS)


def quantized(qtype: str, n: int, k: int, seed: int) -> torch.Tensor:
    """gguf-quantized random weights with O(1) outputs for unit-variance x."""
    w = np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32) / np.sqrt(k)
    return torch.from_numpy(quantize(w, GGMLQuantizationType[qtype]))


def check(x: torch.Tensor, w_q: torch.Tensor, qtype: str, out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = poisoned((x.shape[0], w_q.shape[0]), x.dtype)
    got = quant_matmul(x, w_q, qtype, out=out)
    assert got is out and got.dtype == x.dtype
    # Accumulating K products in fp32: allow sqrt(K)/8 times the base tolerance (at least 1x).
    assert_close(got, quant_matmul_reference(x, w_q, qtype), x.dtype, scale=max(1.0, x.shape[1] ** 0.5 / 8))
    return got


# (M, N, K): decode (M = 1, 3) and a second M tile (17); N of 1, 7 and several N tiles with a
# ragged end (200); K of one block, less than one K step (96) and a ragged last K step (576).
SHAPES = [(1, 7, 96), (3, 200, 576), (17, 1, 576), (17, 200, 96), (1, 1, 32)]


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_matches_reference(m: int, n: int, k: int, qtype: str, dtype: torch.dtype) -> None:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * n + k)).to(dtype)
    check(x, quantized(qtype, n, k, seed=n + k), qtype)


def random_blocks(qtype: str, n: int, k: int, seed: int) -> torch.Tensor:
    """Random GGUF bytes: every quant value, and fp16 scales/mins of both signs, tiny (subnormal) to large."""
    _, type_size = _LAYOUTS[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n * k // 32, type_size), dtype=np.uint8)
    for offset in (0, 2) if qtype == "Q4_1" else (0,):
        exponent = rng.integers(-24, 12, size=blocks.shape[0])  # 2**-24 is the smallest fp16 subnormal
        scales = (rng.choice([-1.0, 1.0], size=blocks.shape[0]) * rng.uniform(1, 2, blocks.shape[0])
                  * np.exp2(exponent)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(n, -1))


@pytest.mark.parametrize("qtype", QTYPES)
def test_decodes_every_weight_exactly(qtype: str) -> None:
    """x = identity gives out = W.T: each output is one weight, decoded with no rounding beyond fp32's."""
    n, k = 40, 64
    w_q = random_blocks(qtype, n, k, seed=len(qtype) + ord(qtype[-1]))
    expected = dequantize(w_q.numpy().reshape(-1), GGMLQuantizationType[qtype], (n, k))
    got = quant_matmul(torch.eye(k), w_q, qtype, out=poisoned((k, n), torch.float32))
    torch.testing.assert_close(got, expected.T, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_strided_and_misaligned_inputs(qtype: str, dtype: torch.dtype) -> None:
    """x transposed and column-strided; w_q rows at an odd stride from an odd base; out a column slice."""
    m, n, k = 5, 33, 160
    dense = quantized(qtype, n, k, seed=11)
    row_bytes = dense.shape[1]
    arena = torch.randint(0, 256, (1 + n * (row_bytes + 3),), dtype=torch.uint8)
    w_q = arena[1:].view(n, row_bytes + 3)[:, :row_bytes]  # odd base address, odd row stride
    w_q.copy_(dense)
    assert w_q.data_ptr() % 2 == 1 and w_q.stride(0) % 2 == 1
    x_base = torch.randn(k, 2 * m, generator=torch.Generator().manual_seed(12)).to(dtype)
    x = x_base.t()[::2]  # strides (2, 2 * m): neither dimension contiguous
    wide = poisoned((m, n + 4), dtype)
    check(x, w_q, qtype, out=wide[:, 2:n + 2])
    assert torch.isnan(wide[:, :2]).all() and torch.isnan(wide[:, n + 2:]).all()
    # Same numbers as from contiguous inputs.
    assert torch.equal(wide[:, 2:n + 2], quant_matmul(x.contiguous(), dense, qtype))


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_rows_do_not_depend_on_batch_size(qtype: str, dtype: torch.dtype) -> None:
    """Batch invariance: a row's output is bit-identical alone and inside batches of any size.

    Row r keeps its index while M grows (fewer or more real rows in its tile, more tiles), and is
    also computed alone, at index 0 of its tile (conftest makes the interpreter's tl.dot
    independent of a row's place in the tile, as a GPU's MMA is).
    """
    w_q = quantized(qtype, 40, 288, seed=13)
    x = torch.randn(40, 288, generator=torch.Generator().manual_seed(14)).to(dtype)
    for row in (0, 7, 18):
        alone = quant_matmul(x[row:row + 1], w_q, qtype)[0]
        for m in (row + 1, 19, 40):
            assert torch.equal(quant_matmul(x[:m], w_q, qtype)[row], alone), f"row {row} changed at M={m}"


def test_empty_batch_and_output_allocation() -> None:
    w_q = quantized("Q4_0", 8, 64, seed=15)
    assert quant_matmul(torch.randn(0, 64), w_q, "Q4_0").shape == (0, 8)
    out = quant_matmul(torch.randn(2, 64, dtype=torch.float16), w_q, "Q4_0")
    assert out.shape == (2, 8) and out.dtype == torch.float16 and out.is_contiguous()


def _args() -> dict:
    return dict(x=torch.randn(3, 64), w_q=quantized("Q4_1", 5, 64, seed=16), qtype="Q4_1")


@pytest.mark.parametrize("name, change, message", [
    ("qtype", lambda a: a.update(qtype="Q4_K"), "qtype must be one of Q8_0, Q4_0, Q4_1"),
    ("x", lambda a: a.update(x=a["x"].to(torch.int32)), "x must have dtype"),
    ("x", lambda a: a.update(x=a["x"][0]), "x must have 2 dimensions"),
    ("x", lambda a: a.update(x=torch.randn(3, 96)), "x has 96 columns but w_q holds 64"),
    ("w_q", lambda a: a.update(w_q=a["w_q"].to(torch.int8)), "w_q must have dtype torch.uint8"),
    ("w_q", lambda a: a.update(w_q=a["w_q"][:, :30]), "w_q rows must be whole Q4_1 blocks of 20 bytes"),
    ("w_q", lambda a: a.update(w_q=a["w_q"].t().contiguous().t()), "w_q must have a contiguous last dimension"),
    ("w_q", lambda a: a.update(w_q=a["w_q"].to("meta")), "w_q is on meta"),
    ("out", lambda a: a.update(out=torch.empty(3, 6)), "out must have shape"),
    ("out", lambda a: a.update(out=torch.empty(3, 5, dtype=torch.float16)), "out must have dtype"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(name: str, change, message: str) -> None:
    args = _args()
    change(args)
    with pytest.raises(ValueError, match=message) as err:
        quant_matmul(**args)
    assert name in str(err.value)


def test_compiles_for_gpus_without_spills() -> None:
    # Every branch of the kernel: Q8_0's fp16 bit trick and plain conversion, the 4-bit fp16 and
    # bf16 bit tricks, the fp32 path, and Q4_1's min term.
    variants = [("Q8_0", torch.float16), ("Q8_0", torch.bfloat16), ("Q8_0", torch.float32),
                ("Q4_0", torch.float16), ("Q4_0", torch.bfloat16),
                ("Q4_1", torch.float16), ("Q4_1", torch.bfloat16), ("Q4_1", torch.float32)]
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    jobs, labels = [], []
    for qtype, dtype in variants:
        cfg = _config(qtype)
        qid, type_size = _LAYOUTS[qtype]
        constexprs = dict(QTYPE=qid, TYPE_SIZE=type_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          BLOCKS_PER_ITER=cfg.blocks_per_iter, INPUT_PRECISION=_input_precision(dtype))
        ty = names[dtype]
        signature = {"x_ptr": f"*{ty}", "w_ptr": "*u8", "out_ptr": f"*{ty}",
                     **{a: "i32" for a in ("M", "N", "num_blocks", "stride_xm", "stride_xk", "stride_wn",
                                           "stride_om")},
                     **{c: "constexpr" for c in constexprs}}
        for arch in GPU_ARCHS:
            jobs.append(dict(signature=signature, constexprs=constexprs, arch=arch, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages))
            labels.append((f"quant_matmul {qtype} {ty}", arch))
    for (label, arch), usage in zip(labels, compile_many(_quant_matmul_kernel, jobs)):
        assert_no_spills(label, arch, usage)

"""kernels/silu_and_mul.py: SwiGLU's silu(gate) * up against the float64 definition."""
from __future__ import annotations

import pytest
import torch
from kernel_harness import GPU_ARCHS, TEST_DTYPES, assert_close, assert_no_spills, compile_many, poisoned

from lockstep.kernels.silu_and_mul import (BLOCK_F, NUM_WARPS, _silu_and_mul_kernel, silu_and_mul,
                                           silu_and_mul_reference)

# Intermediate sizes that are not powers of two (576; SmolLM2's 1536, which spans two blocks), one
# that is exactly a block, one just past it, and a tiny odd one; token counts 1, 16 and 17.
SHAPES = [(1, 1536), (16, 576), (17, 1536), (2, BLOCK_F), (3, BLOCK_F + 1), (17, 5)]


def _gate_up(num_tokens: int, f: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tokens, 2 * f, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens,f", SHAPES)
def test_matches_reference(num_tokens: int, f: int, dtype: torch.dtype) -> None:
    gate_up = _gate_up(num_tokens, f, dtype, seed=num_tokens * 1000 + f)
    before = gate_up.clone()
    out = silu_and_mul(gate_up, out=poisoned((num_tokens, f), dtype))
    assert out.dtype == dtype and out.shape == (num_tokens, f)
    assert_close(out, silu_and_mul_reference(gate_up), dtype)
    assert torch.equal(gate_up, before), "the input must not be modified"
    assert torch.equal(silu_and_mul(gate_up), out)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_strided_rows(dtype: torch.dtype) -> None:
    """gate_up and out may be row-strided slices of bigger buffers; nothing outside out changes."""
    num_tokens, f = 17, 576
    gate_up = _gate_up(num_tokens, f, dtype, seed=2)
    big_in = poisoned((num_tokens, 2 * f + 24), dtype)
    big_in[:, 8:8 + 2 * f] = gate_up
    big_out = poisoned((num_tokens, f + 40), dtype)
    out = silu_and_mul(big_in[:, 8:8 + 2 * f], out=big_out[:, 16:16 + f])
    assert_close(out, silu_and_mul_reference(gate_up), dtype)
    assert torch.isnan(big_out[:, :16]).all() and torch.isnan(big_out[:, 16 + f:]).all(), \
        "the kernel wrote outside the rows it was given"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy, on purpose
def test_extreme_gates() -> None:
    """Large negative gates must give -0 times up, not NaN from exp overflow; large positive ones, gate * up."""
    gate = torch.tensor([[-1000.0, -100.0, -20.0, 0.0, 20.0, 100.0, 1000.0]])
    up = torch.linspace(-2, 2, gate.shape[1]).unsqueeze(0)
    gate_up = torch.cat([gate, up], dim=1)
    out = silu_and_mul(gate_up, out=poisoned(gate.shape, torch.float32))
    assert_close(out, silu_and_mul_reference(gate_up), torch.float32)


def test_no_tokens() -> None:
    assert silu_and_mul(torch.randn(0, 10)).shape == (0, 5)


def _bad_calls():
    gate_up = torch.randn(4, 64)
    return {
        "odd-width": (lambda: silu_and_mul(torch.randn(4, 63)), "gate_up"),
        "3d": (lambda: silu_and_mul(gate_up.view(2, 2, 64)), "gate_up"),
        "int": (lambda: silu_and_mul(gate_up.long()), "gate_up"),
        "last-dim-strided": (lambda: silu_and_mul(torch.randn(64, 4).t()), "gate_up"),
        "out-shape": (lambda: silu_and_mul(gate_up, out=torch.empty(4, 64)), "out"),
        "out-dtype": (lambda: silu_and_mul(gate_up, out=torch.empty(4, 32, dtype=torch.float16)), "out"),
        "out-device": (lambda: silu_and_mul(gate_up, out=torch.empty(4, 32, device="meta")), "out"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_rejects_bad_inputs(case: str) -> None:
    call, name = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()


def test_compiles_for_gpu() -> None:
    jobs, labels = [], []
    for arch in GPU_ARCHS:
        for dtype in ("fp16", "bf16", "fp32"):
            sig = dict(gate_up_ptr="*" + dtype, out_ptr="*" + dtype, F="i32", in_row_stride="i32",
                       out_row_stride="i32", BLOCK="constexpr")
            jobs.append(dict(signature=sig, constexprs=dict(BLOCK=BLOCK_F), arch=arch, num_warps=NUM_WARPS))
            labels.append((f"silu_and_mul {dtype}", arch))
    for (label, arch), usage in zip(labels, compile_many(_silu_and_mul_kernel, jobs)):
        assert_no_spills(label, arch, usage)

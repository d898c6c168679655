"""kernels/rms_norm.py: RMSNorm and its fused residual-add variant against the float64 definition."""
from __future__ import annotations

import pytest
import torch
from kernel_harness import GPU_ARCHS, TEST_DTYPES, assert_close, assert_no_spills, compile_many, poisoned

from lockstep.kernels.rms_norm import (
    MAX_HIDDEN,
    _launch_config,
    _rms_norm_kernel,
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)

EPS = 1e-5
# Hidden sizes that are not powers of two (SmolLM2's 576, 1536) and an odd tiny one; token counts
# of 1, a block's worth (16) and one more.
SHAPES = [(1, 576), (16, 576), (17, 1536), (16, 1536), (3, 5)]


def _inputs(num_tokens: int, hidden: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(num_tokens, hidden, generator=g) * 3 + 0.5).to(dtype)
    residual = (torch.randn(num_tokens, hidden, generator=g) * 2).to(dtype)
    weight = (1 + 0.5 * torch.randn(hidden, generator=g)).to(dtype)
    return x, residual, weight


def _strided(t: torch.Tensor, pad: int = 13) -> torch.Tensor:
    """A copy of t [T, H] at columns 7..7+H of a NaN-filled [T, H + pad] buffer (pad > 7)."""
    buf = poisoned((t.shape[0], t.shape[1] + pad), t.dtype)
    view = buf[:, 7:7 + t.shape[1]]
    view.copy_(t)
    return view


def _assert_rest_is_nan(view: torch.Tensor) -> None:
    """The buffer around a _strided view is untouched: nothing was written past the row."""
    buf = view.as_strided((view.shape[0], view.stride(0)), (view.stride(0), 1), view.storage_offset() - 7)
    rest = torch.cat([buf[:, :7], buf[:, 7 + view.shape[1]:]], dim=1)
    assert torch.isnan(rest).all(), "the kernel wrote outside the rows it was given"


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens,hidden", SHAPES)
def test_rms_norm_matches_reference(num_tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x, _, weight = _inputs(num_tokens, hidden, dtype, seed=hidden + num_tokens)
    out = rms_norm(x, weight, EPS, out=poisoned((num_tokens, hidden), dtype))
    assert out.dtype == dtype
    assert_close(out, rms_norm_reference(x, weight, EPS), dtype)
    # Allocated output (no out=) gives the same bits.
    assert torch.equal(rms_norm(x, weight, EPS), out)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens,hidden", SHAPES)
def test_fused_add_rms_norm_matches_reference(num_tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x, residual, weight = _inputs(num_tokens, hidden, dtype, seed=7 * hidden + num_tokens)
    x_before = x.clone()
    want_out, want_residual = fused_add_rms_norm_reference(x, residual, weight, EPS)
    out, new_residual = fused_add_rms_norm(x, residual, weight, EPS, out=poisoned((num_tokens, hidden), dtype))
    assert new_residual is residual, "the residual must be updated in place and returned"
    assert_close(residual, want_residual, dtype)
    assert_close(out, want_out, dtype)
    assert torch.equal(x, x_before), "x must not be modified"


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_strided_rows(dtype: torch.dtype) -> None:
    """x, residual and out may be row-strided slices of bigger buffers; nothing outside them changes."""
    x, residual, weight = _inputs(17, 576, dtype, seed=3)
    want = rms_norm_reference(x, weight, EPS)
    want_fused, want_residual = fused_add_rms_norm_reference(x, residual, weight, EPS)
    xs, rs = _strided(x), _strided(residual, pad=30)
    out = _strided(poisoned(x.shape, dtype), pad=21)
    assert rms_norm(xs, weight, EPS, out=out) is out
    assert_close(out, want, dtype)
    _assert_rest_is_nan(out)

    out = _strided(poisoned(x.shape, dtype), pad=9)
    fused_add_rms_norm(xs, rs, weight, EPS, out=out)
    assert_close(out, want_fused, dtype)
    assert_close(rs, want_residual, dtype)
    for view in (out, rs, xs):
        _assert_rest_is_nan(view)


def test_eps_inside_the_square_root() -> None:
    """Tiny activations, where eps dominates the mean square: eps must be added before the rsqrt."""
    x, residual, weight = _inputs(4, 576, torch.float32, seed=12)
    x, residual = x * 1e-3, residual * 1e-3
    assert_close(rms_norm(x, weight, EPS), rms_norm_reference(x, weight, EPS), torch.float32)
    want, _ = fused_add_rms_norm_reference(x, residual, weight, EPS)
    assert_close(fused_add_rms_norm(x, residual, weight, EPS)[0], want, torch.float32)


def test_weight_dtype_may_differ() -> None:
    """An fp32 norm weight with fp16 activations: the weight is read as float32 either way."""
    x, _, weight = _inputs(4, 576, torch.float16, seed=11)
    out = rms_norm(x, weight.float(), EPS)
    assert out.dtype == torch.float16
    assert_close(out, rms_norm_reference(x, weight.float(), EPS), torch.float16)


def test_row_is_independent_of_batch() -> None:
    """Batch invariance: a row's bits do not depend on the other rows or on the row count."""
    x, residual, weight = _inputs(17, 1536, torch.float16, seed=5)
    batched = rms_norm(x, weight, EPS)
    for row in (0, 9, 16):
        assert torch.equal(rms_norm(x[row:row + 1], weight, EPS)[0], batched[row])
    fused, _ = fused_add_rms_norm(x, residual.clone(), weight, EPS)
    alone, _ = fused_add_rms_norm(x[9:10], residual[9:10].clone(), weight, EPS)
    assert torch.equal(alone[0], fused[9])


def test_no_tokens() -> None:
    x, residual, weight = _inputs(0, 576, torch.float32, seed=0)
    assert rms_norm(x, weight, EPS).shape == (0, 576)
    assert fused_add_rms_norm(x, residual, weight, EPS)[0].shape == (0, 576)


def _bad_calls():
    x, residual, weight = _inputs(4, 64, torch.float32, seed=1)
    big = torch.randn(2, MAX_HIDDEN + 1)
    return {
        "x-1d": (lambda: rms_norm(x[0], weight, EPS), "x"),
        "x-int": (lambda: rms_norm(x.long(), weight, EPS), "x"),
        "x-last-dim-strided": (lambda: rms_norm(torch.randn(64, 4).t(), weight, EPS), "x"),
        "weight-shape": (lambda: rms_norm(x, weight[:63], EPS), "weight"),
        "weight-device": (lambda: rms_norm(x, weight.to("meta"), EPS), "weight"),
        "eps-negative": (lambda: rms_norm(x, weight, -1e-5), "eps"),
        "eps-none": (lambda: rms_norm(x, weight, None), "eps"),
        "out-dtype": (lambda: rms_norm(x, weight, EPS, out=torch.empty(4, 64, dtype=torch.float16)), "out"),
        "out-shape": (lambda: rms_norm(x, weight, EPS, out=torch.empty(4, 65)), "out"),
        "hidden-too-big": (lambda: rms_norm(big, torch.ones(MAX_HIDDEN + 1), EPS), "hidden"),
        "residual-shape": (lambda: fused_add_rms_norm(x, residual[:3], weight, EPS), "residual"),
        "residual-dtype": (lambda: fused_add_rms_norm(x, residual.half(), weight, EPS), "residual"),
        "out-aliases-residual": (lambda: fused_add_rms_norm(x, residual, weight, EPS, out=residual), "out"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_rejects_bad_inputs(case: str) -> None:
    call, name = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()


def test_compiles_for_gpu() -> None:
    """Compiles at SmolLM2's size and at the largest size the launcher accepts."""
    jobs, labels = [], []
    for arch in GPU_ARCHS:
        for hidden in (576, MAX_HIDDEN):
            block, num_warps = _launch_config(hidden)
            for dtype in ("fp16", "bf16"):
                for has_residual in (False, True):
                    sig = dict(x_ptr="*" + dtype, res_ptr="*" + dtype, w_ptr="*" + dtype, out_ptr="*" + dtype,
                               H="i32", x_row_stride="i32", res_row_stride="i32", out_row_stride="i32", eps="fp32",
                               HAS_RESIDUAL="constexpr", BLOCK_H="constexpr")
                    jobs.append(dict(signature=sig, constexprs=dict(HAS_RESIDUAL=has_residual, BLOCK_H=block),
                                     arch=arch, num_warps=num_warps))
                    labels.append((f"rms_norm{'_fused_add' if has_residual else ''} H={hidden} {dtype}", arch))
    for (label, arch), usage in zip(labels, compile_many(_rms_norm_kernel, jobs)):
        assert_no_spills(label, arch, usage)

"""The CPU quantized matmul (lockstep._core.quant_matmul, cpp/cpu/) against a float64 reference,
and its bitwise promises: an output row does not depend on the rows batched with it, on the
thread count, or on the instruction set (AVX-512, AVX2 or scalar).

Weights are random floats quantized with gguf-py (`gguf.quants.quantize`); the reference
dequantizes them with gguf-py too and multiplies in float64. Decoding is exact, so the only
difference from the reference is fp32 accumulation, whose worst case the tolerance bounds.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from cpu_harness import assert_bitwise_equal

from lockstep import _core

QTYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
HAVE_AVX512 = _core.cpu_features()["auto_isa"] == "avx512"
HAVE_AVX2 = _core.cpu_features()["auto_isa"] in ("avx512", "avx2")
ISAS = ("avx512",) * HAVE_AVX512 + ("avx2",) * HAVE_AVX2 + ("scalar",)
NO_AVX2 = "this CPU lacks AVX2, FMA or F16C, so only the scalar kernels run"
NO_AVX512 = "this CPU lacks AVX-512 F/BW/VL (or AVX2, FMA, F16C), so the AVX-512 kernels cannot run"
if not HAVE_AVX512:
    print(f"test_cpu_quant_matmul: skipping the AVX-512 cases: {NO_AVX512}")


def quantized(qtype: str, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(GGUF bytes [n, row_bytes], their exact float32 values [n, k]) for random weights."""
    w = np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32) / np.sqrt(k)
    stored = quantize(w, GGMLQuantizationType[qtype])
    raw = np.ascontiguousarray(stored).view(np.uint8).reshape(n, -1)
    return raw, dequantize(raw, GGMLQuantizationType[qtype]).reshape(n, k).astype(np.float32)


def random_x(m: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, k), dtype=np.float32)


def matmul(x: np.ndarray, w: np.ndarray, qtype: str, isa: str = "auto") -> np.ndarray:
    out = np.full((x.shape[0], w.shape[0]), np.nan, dtype=np.float32)  # unwritten slots show
    _core.quant_matmul(x, w, qtype, out, isa)
    return out


def assert_matches_reference(got: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """Within the worst-case fp32 error of the fixed order: each lane runs ceil(K/32) fmas, the
    lane tree adds 5 levels, and each step rounds by at most 2^-24 of a partial sum, which is
    bounded by sum_k |x_k w_k|."""
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} output slots were never written"
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    expected = x64 @ w64.T
    steps = -(-x.shape[1] // 32) + 5
    bound = steps * 2.0 ** -24 * (np.abs(x64) @ np.abs(w64).T) + 1e-30
    bad = np.abs(got - expected) > bound
    if bad.any():
        where = np.argwhere(bad)
        i = tuple(int(v) for v in where[0])
        raise AssertionError(f"{len(where)} of {bad.size} outputs off the float64 reference beyond the "
                             f"fp32 bound; first at {i}: got {got[i]!r}, expected {expected[i]!r}, "
                             f"bound {bound[i]:.3g}")


# (M, N, K): decode (M = 1), a few rows, a full batch of 64; N = 1, 7, 49 and a vocabulary's
# 49152 (with small K); K of one block, a few, and a long row (1536, the MLP down projection).
SHAPES = [(1, 1, 32), (5, 7, 96), (64, 49, 160), (1, 49152, 64), (5, 49152, 32), (64, 7, 1536), (1, 7, 1536)]
# F32/F16 rows may end mid-block: K below, around and well past the 32-lane width.
TAIL_SHAPES = [(1, 7, 37), (5, 49, 100), (64, 1, 31), (3, 5, 1), (1, 49152, 33)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_matches_reference(m: int, n: int, k: int, qtype: str, isa: str) -> None:
    w, w_ref = quantized(qtype, n, k, seed=n + k)
    x = random_x(m, k, seed=m * 1000 + k)
    assert_matches_reference(matmul(x, w, qtype, isa), x, w_ref)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", ["F32", "F16"])
@pytest.mark.parametrize("m, n, k", TAIL_SHAPES)
def test_ragged_k_matches_reference(m: int, n: int, k: int, qtype: str, isa: str) -> None:
    w, w_ref = quantized(qtype, n, k, seed=n + k)
    x = random_x(m, k, seed=m * 1000 + k)
    assert_matches_reference(matmul(x, w, qtype, isa), x, w_ref)


def random_blocks(qtype: str, n: int, k: int, seed: int) -> np.ndarray:
    """Random GGUF bytes: every quant value, and scales/mins of both signs from fp16
    subnormals (2^-24) to large; F32/F16 weights spanning their exponent range (finite)."""
    rng = np.random.default_rng(seed)
    if qtype in ("F32", "F16"):
        dtype, low = (np.float32, -140) if qtype == "F32" else (np.float16, -24)
        values = rng.choice([-1.0, 1.0], (n, k)) * rng.uniform(1, 2, (n, k)) * np.exp2(rng.integers(low, 12, (n, k)))
        return values.astype(dtype).view(np.uint8).reshape(n, -1)
    blocks = rng.integers(0, 256, size=(n * k // 32, BLOCK_BYTES[qtype]), dtype=np.uint8)
    for offset in (0, 2) if qtype == "Q4_1" else (0,):
        count = blocks.shape[0]
        scales = (rng.choice([-1.0, 1.0], count) * rng.uniform(1, 2, count)
                  * np.exp2(rng.integers(-24, 12, count))).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_decodes_every_weight_exactly(qtype: str, isa: str) -> None:
    """x = identity makes out = W.T: each output is one weight, which must come out exactly
    as gguf-py decodes it. (The one place x is not random: it isolates the decoder.)"""
    n, k = 40, 96
    w = random_blocks(qtype, n, k, seed=len(qtype) + ord(qtype[-1]))
    expected = dequantize(w, GGMLQuantizationType[qtype]).reshape(n, k).astype(np.float32)
    got = matmul(np.eye(k, dtype=np.float32), w, qtype, isa)
    np.testing.assert_array_equal(got, expected.T)


def invariance_case(qtype: str, n: int, k: int, m: int = 64) -> tuple[np.ndarray, np.ndarray]:
    w, _ = quantized(qtype, n, k, seed=7 * n + k)
    return random_x(m, k, seed=11 * n + k), w


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_row_alone_equals_row_in_batch(qtype: str, isa: str) -> None:
    """Every row of a 64-row batch has the same bits computed alone, in the first M rows for
    every M = 1..63, or in a batch starting mid-way."""
    x, w = invariance_case(qtype, n=50, k=100 if qtype.startswith("F") else 96)
    full = matmul(x, w, qtype, isa)
    for m in range(1, 64):
        assert_bitwise_equal(matmul(x[:m], w, qtype, isa), full[:m], f"first {m} rows vs the batch of 64")
    for lo, hi in ((17, 40), (61, 64), (30, 31)):
        assert_bitwise_equal(matmul(x[lo:hi], w, qtype, isa), full[lo:hi], f"rows {lo}:{hi} vs the batch")
    for i in range(64):
        assert_bitwise_equal(matmul(x[i:i + 1], w, qtype, isa), full[i:i + 1], f"row {i} alone vs the batch")


def test_batch_invariance_across_m_tiles() -> None:
    """With K = 8192 an M tile is 32 rows (1 MiB of x / (K * 4 B)), so a batch of 64 spans two
    tiles and a batch of 40 ends mid-tile; rows must not notice."""
    x, w = invariance_case("Q4_1", n=9, k=8192)
    full = matmul(x, w, "Q4_1")
    for m in (1, 31, 33, 40):
        assert_bitwise_equal(matmul(x[:m], w, "Q4_1"), full[:m], f"first {m} rows vs the batch of 64")
    assert_bitwise_equal(matmul(x[31:35], w, "Q4_1"), full[31:35], "rows across the tile edge")


@pytest.mark.parametrize("qtype", QTYPES)
def test_thread_count_does_not_change_bits(qtype: str, threads) -> None:
    """Sizes with work enough to wake the workers (>= 1 MiB of weights times rows) and an N
    that splits into ragged chunks; 3 threads on 2 cores also moves every chunk edge."""
    k = 512 if qtype.startswith("Q") else 160
    x, w = invariance_case(qtype, n=4099, k=k, m=7)
    results = {}
    for t in (1, 2, 3):
        threads(t)
        results[t] = (matmul(x[:1], w, qtype), matmul(x, w, qtype))
    for t in (2, 3):
        assert_bitwise_equal(results[t][0], results[1][0], f"M = 1, {t} threads vs 1")
        assert_bitwise_equal(results[t][1], results[1][1], f"M = 7, {t} threads vs 1")


@pytest.mark.skipif(not HAVE_AVX512, reason=NO_AVX512)
@pytest.mark.parametrize("qtype", QTYPES)
def test_avx512_matches_scalar_and_avx2_bitwise(qtype: str) -> None:
    """The same cases as for AVX2, plus the default model's shapes at decode (M = 1, 2)."""
    ks = (32, 37, 100, 576, 1536) if qtype.startswith("F") else (32, 96, 576, 1536)
    for k in ks:
        for w in (quantized(qtype, 37, k, seed=k)[0], random_blocks(qtype, 37, k, seed=k + 1)):
            x = random_x(64, k, seed=k + 2)
            for m in (1, 2, 3, 5, 64):
                ours = matmul(x[:m], w, qtype, "avx512")
                assert_bitwise_equal(ours, matmul(x[:m], w, qtype, "scalar"), f"{qtype} K={k} M={m}: avx512 vs scalar")
                assert_bitwise_equal(ours, matmul(x[:m], w, qtype, "avx2"), f"{qtype} K={k} M={m}: avx512 vs avx2")
    for m, n, k in SHAPES + (TAIL_SHAPES if qtype.startswith("F") else []):
        w, _ = quantized(qtype, n, k, seed=n + k)
        x = random_x(m, k, seed=m * 1000 + k)
        ours = matmul(x, w, qtype, "avx512")
        assert_bitwise_equal(ours, matmul(x, w, qtype, "scalar"), f"{qtype} ({m}, {n}, {k}): avx512 vs scalar")
        assert_bitwise_equal(ours, matmul(x, w, qtype, "avx2"), f"{qtype} ({m}, {n}, {k}): avx512 vs avx2")


@pytest.mark.skipif(not HAVE_AVX2, reason=NO_AVX2)
@pytest.mark.parametrize("qtype", QTYPES)
def test_avx2_matches_scalar_bitwise(qtype: str) -> None:
    ks = (32, 37, 100, 1536) if qtype.startswith("F") else (32, 96, 1536)
    for k in ks:
        for w in (quantized(qtype, 37, k, seed=k)[0], random_blocks(qtype, 37, k, seed=k + 1)):
            x = random_x(64, k, seed=k + 2)
            for m in (1, 2, 3, 5, 64):
                assert_bitwise_equal(matmul(x[:m], w, qtype, "avx2"), matmul(x[:m], w, qtype, "scalar"),
                                     f"{qtype} K={k} M={m}: avx2 vs scalar")


def misaligned(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of `a` whose data starts `offset` bytes past an aligned address."""
    buf = np.zeros(a.nbytes + 64, np.uint8)
    start = (-buf.ctypes.data) % 64 + offset
    view = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=start).reshape(a.shape)
    view[...] = a
    return view


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_misaligned_buffers_give_the_same_bits(qtype: str, isa: str) -> None:
    """numpy views (np.frombuffer at an offset) can start anywhere; the kernels must not care."""
    k = 100 if qtype.startswith("F") else 96
    x, w = invariance_case(qtype, n=21, k=k, m=5)
    expected = matmul(x, w, qtype, isa)
    odd_x, odd_w = misaligned(x, 2), misaligned(w, 1)
    assert not odd_x.flags.aligned
    assert_bitwise_equal(matmul(odd_x, odd_w, qtype, isa), expected, "misaligned x and w vs aligned")
    assert_bitwise_equal(matmul(odd_x[:1], odd_w, qtype, isa), expected[:1], "misaligned, M = 1")


def test_cpu_features_and_auto() -> None:
    features = _core.cpu_features()
    assert set(features) == {"avx2", "fma", "f16c", "avx512", "auto_isa"}
    assert all(isinstance(features[key], bool) for key in ("avx2", "fma", "f16c", "avx512"))
    avx2 = features["avx2"] and features["fma"] and features["f16c"]
    assert features["auto_isa"] == ("avx512" if avx2 and features["avx512"] else "avx2" if avx2 else "scalar")
    print(f"cpu_features: {features}")
    x, w = invariance_case("Q4_1", n=33, k=64, m=5)
    assert_bitwise_equal(matmul(x, w, "Q4_1", "auto"), matmul(x, w, "Q4_1", features["auto_isa"]), "auto vs its isa")


@pytest.mark.skipif(HAVE_AVX2, reason="this CPU has AVX2, so isa='avx2' is available")
def test_avx2_request_without_avx2_raises() -> None:
    x, w = invariance_case("Q4_1", n=3, k=32, m=1)
    with pytest.raises(ValueError, match="isa: 'avx2'"):
        matmul(x, w, "Q4_1", "avx2")


@pytest.mark.skipif(HAVE_AVX512, reason="this CPU has AVX-512, so isa='avx512' is available")
def test_avx512_request_without_avx512_raises() -> None:
    x, w = invariance_case("Q4_1", n=3, k=32, m=1)
    with pytest.raises(ValueError, match="isa: 'avx512' (needs|is not built)"):
        matmul(x, w, "Q4_1", "avx512")


def test_empty_dimensions() -> None:
    w, _ = quantized("Q8_0", 3, 32, seed=1)
    assert matmul(np.empty((0, 32), np.float32), w, "Q8_0").shape == (0, 3)
    assert matmul(random_x(2, 32, seed=1), np.empty((0, 34), np.uint8), "Q8_0").shape == (2, 0)
    np.testing.assert_array_equal(matmul(random_x(2, 0, seed=1), np.empty((3, 0), np.uint8), "F32"), 0.0)


def _bad_calls() -> dict[str, tuple[dict, str]]:
    """name -> (arguments that differ from a valid call, the message the ValueError must match)."""
    x = random_x(2, 64, seed=3)
    w, _ = quantized("Q4_1", 3, 64, seed=3)
    wide = random_x(2, 128, seed=4)
    frozen = np.full((2, 3), np.nan, np.float32)
    frozen.flags.writeable = False
    shared = random_x(2, 64, seed=5)
    return {
        "x float64": ({"x": x.astype(np.float64)}, r"^x: expected dtype float32, got float64"),
        "x 1-D": ({"x": x[0]}, r"^x: expected a 2-D array, got shape \(64,\)"),
        "x strided": ({"x": wide[:, ::2]}, r"^x: must be C-contiguous"),
        "x list": ({"x": x.tolist()}, r"^x: expected a numpy.ndarray of float32, got list"),
        "x tensor": ({"x": torch.from_numpy(x)}, r"^x: expected a numpy.ndarray .*tensor\.numpy\(\)"),
        "w int8": ({"w": w.view(np.int8)}, r"^w: expected dtype uint8, got int8"),
        "w 1-D": ({"w": w.reshape(-1)}, r"^w: expected a 2-D array"),
        "w strided": ({"w": np.ascontiguousarray(np.repeat(w, 2, axis=1))[:, ::2]}, r"^w: must be C-contiguous"),
        "w partial block": ({"w": np.zeros((3, 30), np.uint8)}, r"^w: Q4_1 rows must be a whole number of 20-byte blocks, got rows of 30 bytes"),
        "w partial F32": ({"w": np.zeros((3, 6), np.uint8), "qtype": "F32"}, r"^w: F32 rows must be a whole number of 4-byte elements"),
        "K mismatch": ({"w": np.zeros((3, 20), np.uint8)}, r"^x: has K=64 columns, but w's Q4_1 rows of 20 bytes hold 32 weights"),
        "K mismatch F16": ({"w": np.zeros((3, 64), np.uint8), "qtype": "F16"}, r"^x: has K=64 columns, but w's F16 rows of 64 bytes hold 32"),
        "out shape": ({"out": np.zeros((3, 2), np.float32)}, r"^out: expected shape \(2, 3\)"),
        "out float64": ({"out": np.zeros((2, 3), np.float64)}, r"^out: expected dtype float32"),
        "out strided": ({"out": np.zeros((2, 6), np.float32)[:, ::2]}, r"^out: must be C-contiguous"),
        "out broadcast": ({"out": np.broadcast_to(np.zeros(3, np.float32), (2, 3))}, r"^out: must be C-contiguous"),
        "out read-only": ({"out": frozen}, r"^out: is read-only"),
        "out aliases x": ({"x": shared, "out": shared.reshape(-1)[:6].reshape(2, 3)}, r"^out: overlaps x in memory"),
        "qtype": ({"qtype": "Q5_K"}, r"^qtype: unknown weight type 'Q5_K'; expected one of F32, F16, Q8_0, Q4_0, Q4_1"),
        "isa": ({"isa": "neon"}, r"^isa: unknown instruction set 'neon'"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_malformed_input_raises_value_error(case: str) -> None:
    x = random_x(2, 64, seed=3)
    w, _ = quantized("Q4_1", 3, 64, seed=3)
    changes, message = _bad_calls()[case]
    args = {"x": x, "w": w, "qtype": "Q4_1", "out": np.full((2, 3), np.nan, np.float32), "isa": "auto", **changes}
    before = args["out"].copy()
    with pytest.raises(ValueError, match=message):
        _core.quant_matmul(**args)
    np.testing.assert_array_equal(args["out"], before)  # nothing written


def test_bad_thread_counts_raise(threads) -> None:
    for n in (0, -1, 100000):
        with pytest.raises(ValueError, match=r"^n: the thread count must be in \[1, 1024\]"):
            _core.set_num_threads(n)
    threads(3)
    assert _core.get_num_threads() == 3


def test_concurrent_callers_get_the_same_bits(threads) -> None:
    """Calls from several Python threads at once (the GIL is released): the one that finds the
    pool busy runs alone, which must not change any result."""
    threads(2)
    x, w = invariance_case("Q4_1", n=2048, k=512, m=3)
    expected = matmul(x, w, "Q4_1")
    results: list[np.ndarray] = []

    def call() -> None:
        for _ in range(10):
            results.append(matmul(x, w, "Q4_1"))

    workers = [threading.Thread(target=call) for _ in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert len(results) == 30
    for r in results:
        assert_bitwise_equal(r, expected, "a concurrent call vs a lone one")


FORK_SCRIPT = """
import os, sys, numpy as np
from lockstep import _core
_core.set_num_threads(2)
x = np.random.default_rng(0).standard_normal((4, 512), dtype=np.float32)
blocks = np.random.default_rng(1).integers(0, 256, (4096, 16, 20), dtype=np.uint8)
blocks[:, :, 0:4] = np.frombuffer(np.array([0.01, -0.05], np.float16).tobytes(), np.uint8)  # d, m
w = blocks.reshape(4096, 320)
def run():
    out = np.empty((4, 4096), np.float32)
    _core.quant_matmul(x, w, "Q4_1", out)
    return out
parent = run()
assert not np.isnan(parent).any()
pid = os.fork()
if pid == 0:
    os._exit(0 if np.array_equal(run(), parent) else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_pool_works_in_a_forked_child() -> None:
    proc = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("qtype,k", [(q, 96) for q in QTYPES] + [("F32", 37), ("F16", 33)])
def test_dequantize_rows_gives_the_values_the_matmul_multiplies_by(qtype: str, k: int) -> None:
    """The embedding lookup on blocks (_core.dequantize_rows): each looked-up row equals gguf's
    dequantization of it (to one rounding: a Q4_1 weight d*q + m is one fma here), and bit for
    bit the weights quant_matmul uses: x = I makes its output W^T exactly (each sum is one term)."""
    raw, exact = quantized(qtype, 50, k, seed=3)
    ids = np.random.default_rng(4).integers(0, 50, size=23).astype(np.int64)
    ids[:3] = [0, 49, 0]  # the ends, and a row twice
    out = np.full((ids.size, k), np.nan, dtype=np.float32)
    _core.dequantize_rows(raw, qtype, ids, out)
    np.testing.assert_allclose(out, exact[ids], rtol=2.0 ** -23, atol=0)
    used = matmul(np.eye(k, dtype=np.float32), raw, qtype).T  # [50, k]: row n is W[n] as the kernel reads it
    assert_bitwise_equal(out, np.ascontiguousarray(used[ids]), "dequantize_rows vs the matmul's weights")


def test_dequantize_rows_refuses_bad_ids_before_writing() -> None:
    raw, _ = quantized("Q8_0", 8, 64, seed=5)
    out = np.full((3, 64), 7.0, dtype=np.float32)
    for bad in ([0, 8, 1], [-1, 0, 0]):
        with pytest.raises(ValueError, match="ids: id"):
            _core.dequantize_rows(raw, "Q8_0", np.array(bad, np.int64), out)
        assert (out == 7.0).all(), "nothing is written when an id is out of range"
    with pytest.raises(ValueError, match="out: expected shape"):
        _core.dequantize_rows(raw, "Q8_0", np.zeros(2, np.int64), out)
    with pytest.raises(ValueError, match="ids"):
        _core.dequantize_rows(raw, "Q8_0", np.zeros(3, np.int32), out)

"""Paged GQA decode attention in hand-written CUDA C++ (cpp/cuda/decode_attention.cu), run through CuPy.

Same contract as the Triton kernel (kernels/decode_attention.py): one new token per sequence,

    out[b, h] = softmax_j(scale * q[b, h] . K[j, h // group]) @ V[.., h // group],   j < seq_lens[b]

with key j of sequence b in cache slot block_tables[b, j // block_size] * block_size + j % block_size.

Flash-decoding: a sequence's keys are cut into splits of SPLIT_TOKENS (a constant), one thread block
per (sequence, kv head, split) computes a partial softmax for all the q heads of its kv head (each
K/V row is read once), and a second kernel merges the splits by log-sum-exp in split order. The
split count of a sequence depends on its own length only, so its output bits do not depend on the
rest of the batch (batch invariance). The grid is sized from the block table's width, never from
seq_lens' values, so the launcher does not sync with the device and can be captured in a graph.

The .cu source is compiled at run time by NVRTC through CuPy (`pip install 'lockstep[cuda]'`), once
per process and device. Pointers go to the kernels as integers (zero copy), on torch's current
stream. Importing this module needs neither CuPy nor a GPU; calling it does, and says so.
"""
from __future__ import annotations

import functools
import importlib
import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy
import torch

from ._checks import FLOAT_DTYPES, check_same_dtype, check_tensor

log = logging.getLogger(__name__)

SOURCE_NAME = "decode_attention.cu"
SPLIT_TOKENS = 512  # keys per split: kSplitTokens in the .cu (a test checks they agree)
HEAD_DIMS = (64, 128)
GROUP_TILES = (1, 2, 4, 8)  # q heads per thread block: one template instantiation each
_SPLIT_THREADS = 128  # kThreads in the .cu
_DTYPE_TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_LOG2E = math.log2(math.e)
_INSTALL_HINT = "install it with `pip install 'lockstep[cuda]'` (cupy-cuda13x), or use --attention triton"


class CudaKernelsUnavailable(RuntimeError):
    """The hand-written CUDA kernels cannot run here (no CuPy, or no CUDA device); the message says why."""


def group_tile(group: int) -> int:
    """q heads per thread block: the smallest instantiated tile that holds the whole group.

    Groups above 8 (rare: MQA) take several tiles of 8, each of which reads its K/V rows again.
    """
    for tile in GROUP_TILES:
        if group <= tile:
            return tile
    return GROUP_TILES[-1]


def kernel_names(dtype: torch.dtype, head_dim: int, group: int) -> tuple[str, str]:
    """(split kernel, merge kernel) entry points in the .cu for one configuration."""
    tag = _DTYPE_TAGS[dtype]
    return (f"decode_attention_split_{tag}_d{head_dim}_g{group_tile(group)}",
            f"decode_attention_merge_{tag}_d{head_dim}")


def all_kernel_names() -> list[str]:
    """Every extern "C" entry point the .cu defines."""
    names = []
    for dtype in _DTYPE_TAGS:
        for head_dim in HEAD_DIMS:
            names += [kernel_names(dtype, head_dim, tile)[0] for tile in GROUP_TILES]
            names.append(kernel_names(dtype, head_dim, 1)[1])
    return names


def source_path() -> Path:
    """The .cu file: the checkout's cpp/cuda/ in a development tree, else the installed lockstep/cuda/."""
    here = Path(__file__).resolve().parent  # <repo>/kernels, or <site-packages>/lockstep/kernels
    # The checkout comes first: it is the file being edited, while the installed copy (CMake puts
    # cpp/cuda/*.cu in lockstep/cuda/, also for editable installs) is only as new as the last build.
    candidates = [here.parent / "cpp" / "cuda" / SOURCE_NAME, here.parent / "cuda" / SOURCE_NAME]
    lockstep = importlib.import_module("lockstep")
    candidates += [Path(p) / "cuda" / SOURCE_NAME for p in getattr(lockstep, "__path__", [])]
    for path in candidates:
        if path.is_file():
            return path
    raise CudaKernelsUnavailable(f"{SOURCE_NAME} not found (looked in {', '.join(map(str, candidates))}); "
                                 "reinstall lockstep, or use --attention triton")


def _import_cupy() -> Any:
    try:
        return importlib.import_module("cupy")
    except ImportError as err:  # `from None`: the reason is in our message, not in a deep traceback
        raise CudaKernelsUnavailable(f"--attention cuda needs CuPy, which is not importable ({err}); "
                                     f"{_INSTALL_HINT}") from None


def require_cuda_kernels(device: torch.device | None = None) -> None:
    """Raises CudaKernelsUnavailable, saying what is missing, unless the kernels can run on `device`."""
    if not torch.cuda.is_available():
        raise CudaKernelsUnavailable("--attention cuda needs a CUDA device, and torch sees none "
                                     "(CPU-only torch, or no GPU/driver); use --attention triton or the torch backend")
    if device is not None and device.type != "cuda":
        raise CudaKernelsUnavailable(f"--attention cuda needs CUDA tensors, got tensors on {device}")
    _import_cupy()


def prepare_cuda_kernels(device: torch.device, dtype: torch.dtype, head_dim: int, group: int) -> None:
    """Everything a model's first decode step would find wrong, found now: no GPU or CuPy, a head
    size or dtype the .cu lacks, or a source NVRTC cannot compile for this device (CuPy's CUDA
    not matching the driver, say). Compiles and loads the entry points the model will call."""
    require_cuda_kernels(device)
    if head_dim not in HEAD_DIMS:
        raise CudaKernelsUnavailable(f"--attention cuda has kernels for head_dim {' and '.join(map(str, HEAD_DIMS))}; "
                                     f"this model's is {head_dim}: use --attention triton")
    if dtype not in _DTYPE_TAGS:
        raise CudaKernelsUnavailable(f"--attention cuda has no kernels for {dtype}")
    try:
        for name in kernel_names(dtype, head_dim, group):
            _function(device.index if device.index is not None else torch.cuda.current_device(), name)
    except CudaKernelsUnavailable:
        raise
    except Exception as err:  # CuPy's compile and driver errors, reported in one line
        raise CudaKernelsUnavailable(f"--attention cuda: the CUDA C++ kernels did not compile or load on this "
                                     f"device ({type(err).__name__}: {str(err).strip()[:300]}); "
                                     "use --attention triton") from None


@functools.lru_cache(maxsize=None)
def _module() -> Any:
    cupy = _import_cupy()
    path = source_path()
    # -std=c++17 for the constexpr/static_assert use; CuPy adds -arch for the device it loads on.
    module = cupy.RawModule(code=path.read_text(), options=("-std=c++17",))
    log.info("decode attention: hand-written CUDA C++ kernels from %s (NVRTC via CuPy %s)", path, cupy.__version__)
    return module


@functools.lru_cache(maxsize=None)
def _function(device_index: int, name: str) -> Any:
    cupy = _import_cupy()
    with cupy.cuda.Device(device_index):  # CuPy compiles and loads the module once per device
        return _module().get_function(name)


@functools.lru_cache(maxsize=64)
def _stream(ptr: int, device_index: int) -> Any:
    cupy = _import_cupy()
    return cupy.cuda.ExternalStream(ptr, device_index)


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, block_size: int, scale: float, out: torch.Tensor | None) -> None:
    """Shapes, dtypes, strides and alignment first (they need no GPU), then the device."""
    check_tensor("q", q, dtype=FLOAT_DTYPES, ndim=3, last_dim_contiguous=True)
    num_seqs, num_heads, head_dim = q.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"q's head_dim must be 64 or 128 for the CUDA kernels, got {head_dim} "
                         "(use --attention triton for other sizes)")
    check_tensor("k_cache", k_cache, dtype=FLOAT_DTYPES, shape=(None, None, head_dim), last_dim_contiguous=True)
    check_tensor("v_cache", v_cache, dtype=FLOAT_DTYPES, shape=tuple(k_cache.shape), last_dim_contiguous=True)
    check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    num_kv_heads = k_cache.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"q's {num_heads} heads must be a multiple of k_cache's {num_kv_heads} kv heads")
    # K/V rows are read as 16-byte vectors, so every row must start on a 16-byte boundary.
    per_vec = 16 // q.element_size()
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.data_ptr() % 16 or cache.stride(0) % per_vec or cache.stride(1) % per_vec:
            raise ValueError(f"{name} rows must be 16-byte aligned (data_ptr and strides multiples of {per_vec} "
                             f"elements), got strides {cache.stride()}")
    check_tensor("block_tables", block_tables, dtype=torch.int32, ndim=2, last_dim_contiguous=True)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must have one row per sequence ({num_seqs}), got shape "
                         f"{tuple(block_tables.shape)}")
    check_tensor("seq_lens", seq_lens, dtype=torch.int32, shape=(num_seqs,), contiguous=True)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if block_tables.shape[1] * block_size >= 2 ** 31:
        raise ValueError(f"block_tables covers {block_tables.shape[1] * block_size} tokens; the kernels index "
                         "keys with 32-bit ints")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if out is not None:
        check_tensor("out", out, dtype=q.dtype, shape=tuple(q.shape), last_dim_contiguous=True)
    if q.device.type != "cuda":
        raise ValueError(f"q is on {q.device}: cuda_decode_attention needs CUDA tensors "
                         "(on the CPU use the Triton kernel under the interpreter, or the torch backend)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens), ("out", out)):
        if t is not None:
            check_tensor(name, t, device=q.device)


def _ptr(t: torch.Tensor | None) -> numpy.uint64:
    return numpy.uint64(0 if t is None else t.data_ptr())


def cuda_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          seq_lens: torch.Tensor, block_size: int, scale: float,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """GQA attention of each sequence's one new token over its paged context.

    q [B, Hq, D] (D 64 or 128); k_cache, v_cache [num_slots, Hkv, D] in q's dtype (fp32, fp16,
    bf16), Hq % Hkv == 0, rows 16-byte aligned; block_tables [B, max_blocks] int32 covering
    seq_lens[b] slots; seq_lens [B] int32, context length including the new token. Returns
    out [B, Hq, D] in q's dtype. A sequence with seq_lens[b] <= 0 (padding) gets zeros.
    Raises ValueError for bad inputs and CudaKernelsUnavailable without CuPy or a CUDA device.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, out)
    require_cuda_kernels(q.device)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    device_index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    stream = _stream(torch.cuda.current_stream(q.device).cuda_stream, device_index)
    with _import_cupy().cuda.Device(device_index), stream:
        return _launch(q, k_cache, v_cache, block_tables, seq_lens, block_size, float(scale), out,
                       lambda name: _function(device_index, name))


def _launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor, block_size: int, scale: float, out: torch.Tensor,
            get_kernel: Callable[[str], Any]) -> torch.Tensor:
    """Sizes the grid and scratch from shapes and launches; get_kernel(name)(grid, block, args) runs a kernel.

    Inputs are already checked. The CPU tests pass a get_kernel that runs the .cu compiled for the
    host, so this function (grid, scratch, argument order and C types) is tested without a GPU.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_seqs == 0 or num_heads == 0:
        return out
    group = num_heads // num_kv_heads
    tile = group_tile(group)
    max_blocks = block_tables.shape[1]
    # The widest sequence the table can describe bounds the split count: a shape, not a value.
    max_splits = max(1, -(-max_blocks * block_size // SPLIT_TOKENS))
    grid_y = num_kv_heads * -(-group // tile)
    if grid_y > 65535 or max_splits > 65535:
        raise ValueError(f"grid too large: {grid_y} kv-head tiles, {max_splits} splits (CUDA allows 65535 each)")
    if max_splits > 1:
        part_out = torch.empty((num_seqs, num_heads, max_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, num_heads, max_splits), dtype=torch.float32, device=q.device)
    else:  # every sequence fits one split, which writes `out` itself: no scratch, no merge
        part_out = part_lse = None

    split_name, merge_name = kernel_names(q.dtype, head_dim, group)
    # numpy scalars give CuPy the exact C argument types (pointer, long long, int, float).
    i64, i32 = numpy.int64, numpy.int32
    get_kernel(split_name)((num_seqs, grid_y, max_splits), (_SPLIT_THREADS, 1, 1), (
        _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(out),
        _ptr(part_out), _ptr(part_lse), _ptr(block_tables), _ptr(seq_lens),
        i64(q.stride(0)), i64(q.stride(1)), i64(k_cache.stride(0)), i64(k_cache.stride(1)),
        i64(v_cache.stride(0)), i64(v_cache.stride(1)), i64(out.stride(0)), i64(out.stride(1)),
        i64(block_tables.stride(0)), i32(num_heads), i32(group), i32(block_size), i32(max_blocks),
        i32(max_splits), numpy.float32(scale * _LOG2E)))
    if max_splits > 1:
        get_kernel(merge_name)((num_seqs, num_heads, 1), (head_dim, 1, 1), (
            _ptr(out), _ptr(part_out), _ptr(part_lse), _ptr(seq_lens),
            i64(out.stride(0)), i64(out.stride(1)), i32(num_heads), i32(block_size), i32(max_blocks),
            i32(max_splits)))
    return out

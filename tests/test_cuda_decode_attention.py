"""The hand-written CUDA decode attention (cpp/cuda/decode_attention.cu + kernels/cuda_decode_attention.py).

On the CPU: the .cu compiles with nvcc for sm_80 and sm_90 with no register spills (and with NVRTC,
with no include path, where a libnvrtc is found), the launcher rejects bad inputs with a ValueError
that names the argument, and a missing CuPy or GPU gives an error that says how to fix it. The
kernels' arithmetic also runs on the CPU: the .cu compiled for the host, one fiber per CUDA thread,
driven by the launcher's own _launch (against the float64 reference, and bitwise batch invariance).
On a GPU (marked `gpu`, run by bench/gpu.sh): results against a float64 reference, and bitwise
batch invariance. Cache slots outside every sequence, and table padding (block 0 is never handed
out), hold NaN, so a stray read shows up as NaN in the output.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from kernel_harness import (
    GPU_ARCHS,
    assert_close,
    assert_no_spills,
    paged_cache,
    poisoned,
)

import lockstep.kernels.cuda_decode_attention as cda
from lockstep.kernels.cuda_decode_attention import (
    SPLIT_TOKENS,
    CudaKernelsUnavailable,
    all_kernel_names,
    cuda_decode_attention,
    group_tile,
    kernel_names,
    require_cuda_kernels,
    source_path,
)

SOURCE = source_path()


# ---------------------------------------------------------------- inputs and the reference


def make_batch(seq_lens: list[int], num_kv_heads: int, group: int, head_dim: int, block_size: int,
               dtype: torch.dtype, seed: int, device: str = "cpu") -> dict:
    """A decode step: sequence b has seq_lens[b] cached tokens, the last being the new one."""
    gen = torch.Generator().manual_seed(seed)
    k, v, tables = paged_cache(seq_lens, num_kv_heads, head_dim, block_size, gen)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen)
    return dict(q=q.to(device, dtype), k_cache=k.to(device, dtype), v_cache=v.to(device, dtype),
                block_tables=tables.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                block_size=block_size, scale=head_dim ** -0.5)


def reference(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale) -> torch.Tensor:
    """Float64 softmax attention over each sequence's gathered slots; zeros for empty sequences."""
    group = q.shape[1] // k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b, n in enumerate(seq_lens.tolist()):
        if n <= 0:
            continue
        pos = torch.arange(n, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].double().repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v_cache[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v)
    return out


# ---------------------------------------------------------------- source and launcher agree


def test_constants_match_the_source() -> None:
    text = SOURCE.read_text()
    assert re.search(rf"kSplitTokens = {SPLIT_TOKENS};", text), "SPLIT_TOKENS differs from kSplitTokens in the .cu"
    assert re.search(r"kThreads = kWarps \* 32;", text) and re.search(r"kWarps = 4;", text)
    assert cda._SPLIT_THREADS == 128
    assert "#include" not in text, "NVRTC compiles the file with no include path: keep it header-free"


def test_group_tiles_and_names() -> None:
    assert [group_tile(g) for g in (1, 2, 3, 4, 5, 7, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 8, 8, 8]
    assert kernel_names(torch.bfloat16, 128, 3) == ("decode_attention_split_bf16_d128_g4",
                                                   "decode_attention_merge_bf16_d128")
    assert len(set(all_kernel_names())) == 3 * 2 * 5


def test_source_is_found_in_the_checkout() -> None:
    repo = Path(__file__).resolve().parents[1]
    assert SOURCE == repo / "cpp" / "cuda" / "decode_attention.cu"


# ---------------------------------------------------------------- ahead-of-time compilation


def _nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _cuobjdump(nvcc: str) -> str:
    sibling = Path(nvcc).with_name("cuobjdump")
    if sibling.exists():
        return str(sibling)
    import triton  # ships a cuobjdump with its NVIDIA backend

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def parse_res_usage(report: str) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage: {function: {registers, shared, stack, local}}."""
    usage = {}
    for m in re.finditer(r"Function (\w+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report):
        usage[m.group(1)] = dict(registers=int(m.group(2)), stack=int(m.group(3)), shared=int(m.group(4)),
                                 local=int(m.group(5)))
    return usage


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_nvcc_compiles_without_spills(arch: int, tmp_path: Path) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH) - the .cu is not compile-checked")
    cubin = tmp_path / f"decode_attention_sm{arch}.cubin"
    proc = subprocess.run([nvcc, "-std=c++17", f"-arch=sm_{arch}", "-cubin", "-o", str(cubin), str(SOURCE)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]
    report = subprocess.run([_cuobjdump(nvcc), "-res-usage", str(cubin)], capture_output=True, text=True,
                            check=True).stdout
    usage = parse_res_usage(report)
    assert set(usage) == set(all_kernel_names()), f"entry points differ from the launcher's names: {sorted(usage)}"
    for name in all_kernel_names():
        assert_no_spills(name, arch, usage[name])  # prints registers / shared / stack / local


def _find_libnvrtc() -> Path | None:
    """A libnvrtc from a pip wheel on sys.path (CuPy's runtime), CUDA_HOME, or the loader's path."""
    patterns = ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so")
    dirs = [Path(p) / "nvidia" / sub / "lib" for p in sys.path if p for sub in ("cu13", "cuda_nvrtc", "cu12")]
    dirs += [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "lib64", Path("/usr/local/cuda/lib64")]
    for d in dirs:
        for name in patterns:
            if (d / name).exists():
                return d / name
    found = ctypes.util.find_library("nvrtc")
    return Path(found) if found else None


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_nvrtc_compiles_with_no_include_path(arch: int) -> None:
    """What CuPy does at run time: NVRTC, no headers, no include directories."""
    lib_path = _find_libnvrtc()
    if lib_path is None:
        pytest.skip("no libnvrtc found (comes with cupy-cuda13x / nvidia-cuda-nvrtc) - NVRTC compile not checked")
    # libnvrtc dlopens its builtins library by name; load it first from the same folder.
    for builtins in sorted(lib_path.parent.glob("libnvrtc-builtins.so.*")):
        if "alt" not in builtins.name:
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(lib_path))
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.read_bytes(), b"decode_attention.cu", 0, None, None) == 0
    opts = [b"-std=c++17", f"-arch=sm_{arch}".encode()]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    print(f"[nvrtc] {lib_path} sm_{arch}: rc {rc}")
    assert rc == 0, log.value.decode(errors="replace")[-4000:]


# ---------------------------------------------------------------- input checks (no GPU needed)


def _bad_inputs():
    """(description, mutation of a valid batch, word the ValueError must contain)."""
    def misaligned_k(b):
        wide = torch.zeros(b["k_cache"].shape[0], b["k_cache"].shape[1], 64 + 8, dtype=torch.float16)
        b["k_cache"] = wide[:, :, 4:68]  # every row starts 8 bytes past a 16-byte boundary
    return [
        ("q int", lambda b: b.update(q=b["q"].to(torch.int32)), "q"),
        ("q 2-D", lambda b: b.update(q=b["q"][:, 0]), "q"),
        ("head_dim 96", lambda b: b.update(q=torch.zeros(3, 4, 96, dtype=torch.float16)), "head_dim"),
        ("q last dim strided", lambda b: b.update(q=torch.zeros(3, 4, 128, dtype=torch.float16)[..., ::2]), "q"),
        ("k_cache dtype", lambda b: b.update(k_cache=b["k_cache"].float()), "k_cache"),
        ("k_cache head_dim", lambda b: b.update(k_cache=b["k_cache"][..., :32]), "k_cache"),
        ("k_cache misaligned", misaligned_k, "k_cache"),
        ("v_cache shape", lambda b: b.update(v_cache=b["v_cache"][:-1]), "v_cache"),
        ("v_cache dtype", lambda b: b.update(v_cache=b["v_cache"].to(torch.bfloat16)), "v_cache"),
        ("heads not a multiple", lambda b: b.update(q=b["q"][:, :3]), "kv heads"),
        ("block_tables int64", lambda b: b.update(block_tables=b["block_tables"].long()), "block_tables"),
        ("block_tables rows", lambda b: b.update(block_tables=b["block_tables"][:2]), "block_tables"),
        ("seq_lens int64", lambda b: b.update(seq_lens=b["seq_lens"].long()), "seq_lens"),
        ("seq_lens shape", lambda b: b.update(seq_lens=b["seq_lens"][:2]), "seq_lens"),
        ("block_size 0", lambda b: b.update(block_size=0), "block_size"),
        ("block_size float", lambda b: b.update(block_size=16.0), "block_size"),
        ("scale nan", lambda b: b.update(scale=float("nan")), "scale"),
        ("out dtype", lambda b: b.update(out=torch.empty(3, 4, 64, dtype=torch.float32)), "out"),
        ("out shape", lambda b: b.update(out=torch.empty(3, 4, 32, dtype=torch.float16)), "out"),
        ("CPU tensors", lambda b: None, "CUDA"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs_raise_value_error_naming_the_argument(case) -> None:
    _, mutate, word = case
    batch = make_batch([5, 16, 17], num_kv_heads=2, group=2, head_dim=64, block_size=16, dtype=torch.float16, seed=0)
    mutate(batch)
    with pytest.raises(ValueError, match=re.escape(word)):
        cuda_decode_attention(**batch)


def test_missing_gpu_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CudaKernelsUnavailable, match="CUDA device") as info:
        require_cuda_kernels()
    assert "--attention triton" in str(info.value)


def test_missing_cupy_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError, as when absent
    with pytest.raises(CudaKernelsUnavailable) as info:
        require_cuda_kernels()
    message = str(info.value)
    assert "CuPy" in message and "pip install 'lockstep[cuda]'" in message and "--attention triton" in message
    assert isinstance(info.value, RuntimeError) and not isinstance(info.value, ImportError)
    assert info.value.__suppress_context__, "the ImportError traceback should not be chained onto the message"


def test_module_imports_without_cupy() -> None:
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import lockstep.kernels.cuda_decode_attention as m\n"
            "assert callable(m.cuda_decode_attention)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------- the kernels' arithmetic on the CPU
#
# The .cu compiled for the host: each thread block runs as 128 (or D) ucontext fibers that switch at
# barriers; a shuffle is a store, a barrier, a load of the partner's slot and a barrier; blocks run
# one after another, so __shared__ arrays can be statics. The launcher's own _launch drives it
# through a get_kernel that calls these host entry points, so grid, scratch, argument order and
# C argument sizes are all checked too. Only the 16-bit conversions (inline PTX in the .cu) and
# exp2f's accuracy differ from the GPU.

_HOST_SHIM = r"""
#define LOCKSTEP_DECODE_HOST_EMULATION
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <utility>
#include <vector>
#include <ucontext.h>
#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
struct Dim3 { int x, y, z; };
static Dim3 blockIdx, threadIdx;
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
template <class T> T __ldg(const T* p) { return *p; }
using std::min;
static void emu_barrier();
static float emu_slots[1024];
inline void __syncthreads() { emu_barrier(); }
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const int t = threadIdx.x;
  emu_slots[t] = v;
  emu_barrier();
  const float r = emu_slots[(t & ~31) | ((t & 31) ^ off)];
  emu_barrier();
  return r;
}
inline float half_to_float(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline unsigned short float_to_half(float f) {
  _Float16 x = (_Float16)f; unsigned short h; std::memcpy(&h, &x, 2); return h;
}
inline unsigned short float_to_bfloat16(float f) {  // round to nearest even; inputs are finite
  unsigned u; std::memcpy(&u, &f, 4); u += 0x7fffu + ((u >> 16) & 1u); return (unsigned short)(u >> 16);
}
#include "decode_attention.cu"

static std::vector<ucontext_t> g_ctx;
static std::vector<std::vector<char>> g_stacks;
static std::vector<char> g_done;
static ucontext_t g_sched;
static int g_cur;
static void (*g_body)(void**);
static void** g_args;
static void emu_barrier() { swapcontext(&g_ctx[g_cur], &g_sched); }
static void fiber_main(int t) { g_body(g_args); g_done[t] = 1; }

template <class... A, std::size_t... I>
static void call_with(void (*f)(A...), void** args, std::index_sequence<I...>) { f(*static_cast<A*>(args[I])...); }
template <class... A> static constexpr int arity(void (*)(A...)) { return sizeof...(A); }
template <class... A> static bool sizes_match(void (*)(A...), const int* sizes) {
  const int want[] = {int(sizeof(A))...};
  for (int i = 0; i < int(sizeof...(A)); ++i) if (want[i] != sizes[i]) return false;
  return true;
}

// 0 ok, 1 unknown kernel, 2 wrong argument count, 3 wrong argument size, 4 threads left a barrier unmatched
template <class... A>
static int launch(void (*f)(A...), int gx, int gy, int gz, int threads, int nargs, void** args, const int* sizes) {
  if (nargs != arity(f)) return 2;
  if (!sizes_match(f, sizes)) return 3;
  static void (*s_f)(A...);
  s_f = f;
  g_body = [](void** a) { call_with(s_f, a, std::index_sequence_for<A...>()); };
  g_args = args;
  g_ctx.assign(threads, ucontext_t{});
  g_stacks.assign(threads, std::vector<char>(1 << 16));
  for (int z = 0; z < gz; ++z) for (int y = 0; y < gy; ++y) for (int x = 0; x < gx; ++x) {
    blockIdx = Dim3{x, y, z};
    g_done.assign(threads, 0);
    for (int t = 0; t < threads; ++t) {
      getcontext(&g_ctx[t]);
      g_ctx[t].uc_stack.ss_sp = g_stacks[t].data();
      g_ctx[t].uc_stack.ss_size = g_stacks[t].size();
      g_ctx[t].uc_link = &g_sched;
      makecontext(&g_ctx[t], (void (*)())fiber_main, 1, t);
    }
    for (;;) {
      int waiting = 0, finished = 0;
      for (int t = 0; t < threads; ++t) {
        if (g_done[t]) continue;
        g_cur = t;
        threadIdx = Dim3{t, 0, 0};
        swapcontext(&g_sched, &g_ctx[t]);
        if (g_done[t]) ++finished; else ++waiting;
      }
      if (!waiting) break;
      if (finished) return 4;
    }
  }
  return 0;
}

extern "C" int emu_launch(const char* name, int gx, int gy, int gz, int threads, int nargs, void** args,
                          const int* sizes) {
%(table)s
  return 1;
}
"""


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory: pytest.TempPathFactory):
    """get_kernel for _launch that runs the host-compiled .cu; skips where no g++ with _Float16 exists."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler: the host emulation of the CUDA kernels is not run")
    work = tmp_path_factory.mktemp("host_kernels")
    probe = work / "probe.cpp"
    probe.write_text("int main() { _Float16 h = (_Float16)1.5f; return (float)h == 1.5f ? 0 : 1; }\n")
    if subprocess.run([cxx, "-std=c++17", "-o", str(work / "probe"), str(probe)], capture_output=True).returncode:
        pytest.skip(f"{cxx} has no _Float16 (GCC >= 12 or clang >= 15 on x86-64 does): host emulation not run")
    table = "\n".join(f'  if (!std::strcmp(name, "{n}")) return launch(&{n}, gx, gy, gz, threads, nargs, args, sizes);'
                      for n in all_kernel_names())
    src = work / "host_kernels.cpp"
    src.write_text(_HOST_SHIM % {"table": table})
    lib_path = work / "host_kernels.so"
    proc = subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{SOURCE.parent}", "-o", str(lib_path),
                           str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lib = ctypes.CDLL(str(lib_path))
    lib.emu_launch.restype = ctypes.c_int
    c_types = {numpy.dtype(numpy.uint64): ctypes.c_uint64, numpy.dtype(numpy.int64): ctypes.c_int64,
               numpy.dtype(numpy.int32): ctypes.c_int32, numpy.dtype(numpy.float32): ctypes.c_float}

    def get_kernel(name: str):
        def run(grid, block, args) -> None:
            values = [c_types[numpy.asarray(a).dtype](a) for a in args]  # KeyError: not a CuPy-exact type
            ptrs = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
            sizes = (ctypes.c_int * len(values))(*[ctypes.sizeof(v) for v in values])
            rc = lib.emu_launch(name.encode(), *grid, block[0], len(values), ptrs, sizes)
            assert rc == 0, f"{name}: host launch failed ({['', 'unknown kernel', 'argument count', 'argument size', 'divergent barrier'][rc]})"
        return run

    return get_kernel


def host_run(get_kernel, batch: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = poisoned(batch["q"].shape, batch["q"].dtype)
    return cda._launch(**batch, out=out, get_kernel=get_kernel)


# Lengths 1, one block (16), one more (17), a padding sequence (0), one split and one more, three splits.
HOST_LENS = [1, 16, 17, 0, SPLIT_TOKENS + 1, 2 * SPLIT_TOKENS + 77]


@pytest.mark.parametrize("dtype,head_dim,group", [
    (torch.float32, 64, 3), (torch.float32, 128, 16), (torch.float16, 64, 1), (torch.float16, 128, 8),
    (torch.bfloat16, 64, 4), (torch.bfloat16, 128, 2),
], ids=lambda v: str(v).replace("torch.", ""))
def test_host_emulation_against_reference(host_kernels, dtype: torch.dtype, head_dim: int, group: int) -> None:
    batch = make_batch(HOST_LENS, num_kv_heads=2 if group < 8 else 1, group=group, head_dim=head_dim, block_size=16,
                       dtype=dtype, seed=group * 100 + head_dim)
    got = host_run(host_kernels, batch)
    assert torch.equal(got[3], torch.zeros_like(got[3])), "a padding sequence (seq_len 0) must give zeros"
    assert_close(got, reference(**batch), dtype)


def test_host_emulation_strided_q_and_out(host_kernels) -> None:
    """q sliced from a fused qkv projection, out a strided view, block size 32, one split only."""
    batch = make_batch([3, 32, 33, 200], num_kv_heads=2, group=4, head_dim=64, block_size=32, dtype=torch.float16,
                       seed=5)
    q = batch["q"]
    qkv = torch.randn(q.shape[0], q.shape[1] + 4, q.shape[2]).to(q.dtype)
    qkv[:, :q.shape[1]] = q
    batch["q"] = qkv[:, :q.shape[1]]
    wide = poisoned((q.shape[0], 2 * q.shape[1], q.shape[2]), q.dtype)
    got = host_run(host_kernels, batch, out=wide[:, ::2])
    assert_close(got, reference(**batch), torch.float16)
    assert torch.isnan(wide[:, 1::2]).all(), "the kernel wrote outside out's view"


def test_host_emulation_batch_invariance(host_kernels) -> None:
    lens = [1, 17, 2 * SPLIT_TOKENS + 77, SPLIT_TOKENS]
    batch = make_batch(lens, num_kv_heads=2, group=4, head_dim=64, block_size=16, dtype=torch.bfloat16, seed=9)
    together = host_run(host_kernels, batch)
    for b, n in enumerate(lens):
        own_width = max(1, math.ceil(n / batch["block_size"]))
        alone = host_run(host_kernels, dict(batch, q=batch["q"][b:b + 1], seq_lens=batch["seq_lens"][b:b + 1],
                                            block_tables=batch["block_tables"][b:b + 1, :own_width].contiguous()))
        assert torch.equal(alone[0], together[b]), f"sequence {b} (len {n}) differs alone vs in the batch"


# ---------------------------------------------------------------- on a GPU

# Lengths 1, one block (16), one more (17), exactly one split, one more, three splits, and a
# padding sequence (0) that must come out as zeros.
GPU_LENS = [1, 16, 17, 37, SPLIT_TOKENS, SPLIT_TOKENS + 1, 2 * SPLIT_TOKENS + 77, 0]


def _need_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: run bench/gpu.sh on a GPU machine")
    try:
        import cupy  # noqa: F401
    except ImportError:
        pytest.skip("cupy not installed: pip install 'lockstep[cuda]'")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8, 16])
def test_against_float64_reference(group: int, head_dim: int, dtype: torch.dtype) -> None:
    _need_gpu()
    batch = make_batch(GPU_LENS, num_kv_heads=2, group=group, head_dim=head_dim, block_size=16, dtype=dtype,
                       seed=group * 1000 + head_dim, device="cuda")
    out = torch.full_like(batch["q"], float("nan"))
    got = cuda_decode_attention(**batch, out=out)
    assert got is out
    expected = reference(**batch)
    assert torch.equal(got[-1], torch.zeros_like(got[-1])), "a padding sequence (seq_len 0) must give zeros"
    assert_close(got, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_strided_q_and_out_and_block_size(dtype: torch.dtype) -> None:
    """q sliced from a fused qkv projection (row stride > Hq*D), out a strided view, block size 32."""
    _need_gpu()
    batch = make_batch([3, 32, 33, 700], num_kv_heads=2, group=4, head_dim=128, block_size=32, dtype=dtype,
                       seed=7, device="cuda")
    q = batch["q"]
    qkv = torch.randn(q.shape[0], q.shape[1] + 4, q.shape[2], device="cuda", dtype=dtype)
    qkv[:, :q.shape[1]] = q
    batch["q"] = qkv[:, :q.shape[1]]
    out_wide = torch.full((q.shape[0], q.shape[1] * 2, q.shape[2]), float("nan"), device="cuda", dtype=dtype)
    got = cuda_decode_attention(**batch, out=out_wide[:, ::2])
    assert_close(got, reference(**batch), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_batch_invariance_is_bitwise(dtype: torch.dtype) -> None:
    """A sequence's output bits do not depend on the rest of the batch nor on the table's width."""
    _need_gpu()
    lens = [1, 17, 2 * SPLIT_TOKENS + 77, SPLIT_TOKENS, 3, 4 * SPLIT_TOKENS + 5]
    batch = make_batch(lens, num_kv_heads=2, group=4, head_dim=128, block_size=16, dtype=dtype, seed=11,
                       device="cuda")
    together = cuda_decode_attention(**batch)
    for b, n in enumerate(lens):
        own_width = max(1, math.ceil(n / batch["block_size"]))
        alone = cuda_decode_attention(batch["q"][b:b + 1], batch["k_cache"], batch["v_cache"],
                                      batch["block_tables"][b:b + 1, :own_width].contiguous(),
                                      batch["seq_lens"][b:b + 1], batch["block_size"], batch["scale"])
        assert torch.equal(alone[0], together[b]), f"sequence {b} (len {n}) differs alone vs in the batch"
    # Repeated calls are bit-identical too (no atomics, fixed reduction order).
    assert torch.equal(cuda_decode_attention(**batch), together)


"""Shared pieces of the kernel tests: tolerances, NaN poisoning, and ahead-of-time compilation.

Kernels run on the CPU under TRITON_INTERPRET=1 (set before triton is imported: see
conftest.py), in float32 and float16 (the interpreter mishandles bfloat16). Every kernel is
also compiled for real GPUs, sm_80 and sm_90, with no GPU present, so a kernel that would not
compile on a GPU fails CI; the compiled cubin's registers, shared memory and spills are reported.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

# dtype -> (atol, rtol) for a kernel against its float64/float32 reference.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
TEST_DTYPES = (torch.float32, torch.float16)
GPU_ARCHS = (80, 90)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """`scale` widens the tolerance for long reductions (e.g. sqrt of the reduction length / 8)."""
    atol, rtol = TOLERANCE[dtype]
    assert not torch.isnan(actual).any(), "NaN in the output: a slot was not written"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale)


def poisoned(shape, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer full of NaN, so a slot the kernel forgets to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype)


def paged_cache(seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float32 KV arena holding each sequence's seq_lens[b] tokens in blocks shuffled over it.

    Returns (k_cache, v_cache, block_tables). Block 0, which table padding points at, two spare
    blocks and the tail of each sequence's last block hold NaN, so a kernel that reads a slot
    outside a sequence's context produces NaN.
    """
    blocks = [math.ceil(max(n, 0) / block_size) for n in seq_lens]
    num_blocks = 1 + sum(blocks) + 2
    order = (1 + torch.randperm(num_blocks - 1, generator=gen)).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks + [1]), dtype=torch.int32)
    k = torch.full((num_blocks * block_size, num_kv_heads, head_dim), float("nan"))
    v = k.clone()
    for b, n in enumerate(blocks):
        tables[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
        slots = tables[b, :n].long().repeat_interleave(block_size) * block_size + torch.arange(block_size).repeat(n)
        slots = slots[:max(seq_lens[b], 0)]
        k[slots] = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)
        v[slots] = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)
    return k, v, tables


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _compile_here(fn, signature: dict[str, str], constexprs: dict[str, object], arch: int,
                  num_warps: int = 4, num_stages: int = 3, aligned: tuple[str, ...] = ()) -> dict[str, int]:
    if not isinstance(fn, JITFunction):
        fn = JITFunction(fn.fn)
    # What a launch with 16-byte-aligned pointers and strides that are multiples of 16 gets
    # specialized to: wide loads and cp.async pipelining, hence a different register count.
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    usage = {"shared": int(compiled.metadata.shared)}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        Path(f.name).write_bytes(compiled.asm["cubin"])
        out = subprocess.run([str(_cuobjdump()), "-res-usage", f.name], capture_output=True, text=True).stdout
    for key, field in (("registers", "REG"), ("stack", "STACK"), ("local", "LOCAL")):
        m = re.search(rf"\b{field}:(\d+)", out)
        usage[key] = int(m.group(1)) if m else -1
    return usage


_CHILD = """
import importlib, json, sys
from kernel_harness import _compile_here
module, name, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
fn = getattr(importlib.import_module(module), name)
print(json.dumps([_compile_here(fn, **job) for job in jobs]))
"""


def compile_many(fn, jobs: list[dict]) -> list[dict[str, int]]:
    """Compiles one kernel once per job (the keyword arguments of compile_for_gpu).

    Under TRITON_INTERPRET=1, triton.language's own @jit helpers (tl.sum, tl.max, ...) are
    interpreter objects that the compiler cannot inline, so the compile runs in one fresh Python
    without the variable: the kernel is compiled exactly as a GPU run would compile it.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return [_compile_here(fn, **job) for job in jobs]
    py_fn = getattr(fn, "fn", fn)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, py_fn.__module__, py_fn.__name__, json.dumps(jobs)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_for_gpu(fn, signature: dict[str, str], constexprs: dict[str, object], arch: int,
                    num_warps: int = 4, num_stages: int = 3, aligned: tuple[str, ...] = ()) -> dict[str, int]:
    """Compiles a @triton.jit kernel for sm_<arch> and returns its resource usage.

    `signature` maps every argument to its Triton type ("*fp16", "i32", "fp32", "constexpr");
    `aligned` names the arguments a real launch sees 16-byte aligned (pointers) or divisible by
    16 (integers), as triton's launcher specializes them.
    The usage holds registers, shared (bytes), stack and local (bytes): register spills show up
    as stack in cuobjdump's report.
    """
    job = dict(signature=signature, constexprs=constexprs, arch=arch, num_warps=num_warps, num_stages=num_stages,
               aligned=aligned)
    return compile_many(fn, [job])[0]


def assert_no_spills(name: str, arch: int, usage: dict[str, int]) -> None:
    report_usage(name, arch, usage)
    assert usage["registers"] > 0, f"{name} sm_{arch}: no register count in cuobjdump's report: {usage}"
    assert usage["stack"] == 0 and usage["local"] == 0, f"{name} sm_{arch} spills: {usage}"


def report_usage(name: str, arch: int, usage: dict[str, int]) -> None:
    print(f"[aot] {name} sm_{arch}: {usage['registers']} registers, {usage['shared']} B shared, "
          f"{usage['stack']} B stack, {usage['local']} B local (spills)")

"""The default model with --backend triton, under the interpreter, against the torch backend.

The whole forward runs on lockstep's Triton kernels (prefill then decode attention, fused
RMSNorm, RoPE + cache write, SiLU-and-mul); the greedy tokens must be the torch backend's.
"""
from __future__ import annotations

import pytest

from lockstep.runtime.sampling_params import SamplingParams


@pytest.mark.slow
def test_triton_backend_generates_the_torch_backends_tokens(make_engine) -> None:
    prompt = "The capital of France is"
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=0)
    reference = make_engine(backend="torch").generate([prompt], params)[0]
    ours = make_engine(backend="triton").generate([prompt], params)[0]
    assert ours.output_ids == reference.output_ids
    assert ours.logprobs == pytest.approx(reference.logprobs, abs=1e-3)


def test_triton_backend_samples_like_the_torch_backend(tmp_path) -> None:
    """Seeded top-k/top-p sampling, min_tokens (banned stop tokens) and top logprobs: the triton
    backend picks with the sampling kernel, the torch backend with the CPU sampler."""
    import numpy as np
    from tiny_gguf import TinySpec, write_tiny_gguf

    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine
    from lockstep.runtime.loader import load_model

    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(hidden=128, ffn=256, heads=2, kv_heads=1), seed=11)
    model = load_model(path, quiet=True)
    params = [SamplingParams(temperature=4.0, top_p=0.95, top_k=40, seed=5, max_tokens=6, min_tokens=3, logprobs=2),
              SamplingParams(temperature=3.0, min_p=0.02, seed=2**63 + 9, max_tokens=5, logprobs=0),
              SamplingParams(temperature=0.0, max_tokens=4, logprobs=1)]
    prompts = ["the theme", "a sin", "on the"]
    runs = {}
    for backend in ("torch", "triton"):
        engine = Engine(model, EngineConfig(backend=backend, kv_memory_bytes=4 << 20))
        runs[backend] = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    for ours, ref in zip(runs["triton"], runs["torch"]):
        assert ours.output_ids == ref.output_ids
        np.testing.assert_allclose(ours.logprobs, ref.logprobs, atol=1e-4)
        assert [[i for i, _ in top] for top in ours.top_logprobs] == [[i for i, _ in top] for top in ref.top_logprobs]


def test_triton_backend_in_overlap_mode_reads_pending_tokens_on_the_device(tmp_path) -> None:
    """Overlap mode with the sampling kernel: each step is launched with the step before's tokens
    still in the kernel's output tensor (DeferredSample), copied into the plan on the device
    (ProgramRunner.plan's device_tokens), CUDA's path, here on CPU tensors. Four requests at
    once, with a stop token, so steps are steady replays and full passes with rows left out. The
    reference is the torch backend without overlap."""
    from dataclasses import replace

    from tiny_gguf import TinySpec, write_tiny_gguf

    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine
    from lockstep.runtime.loader import load_model

    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(hidden=128, ffn=256, heads=2, kv_heads=1), seed=11)
    model = load_model(path, quiet=True)
    prompts = ["the theme", "a sin", "on the", "sin the a"]
    params = [SamplingParams(temperature=2.0, seed=3 + i, max_tokens=5 + 2 * i, ignore_eos=True) for i in range(4)]

    def reference() -> list:
        return Engine(model, EngineConfig(backend="torch", overlap="off", kv_memory_bytes=4 << 20)).generate(prompts, params)
    params[2] = replace(params[2], stop_token_ids=[reference()[2].output_ids[3]])  # it ends early, the others go on
    expected = reference()
    fills = []
    engine = Engine(model, EngineConfig(backend="triton", overlap="on", kv_memory_bytes=4 << 20))
    assert engine.overlap
    fill_tokens = engine.programs._fill_tokens
    engine.programs._fill_tokens = lambda rows, src, sampled: fills.append(rows is None) or fill_tokens(rows, src, sampled)
    ours = engine.generate(prompts, params)
    assert [r.output_ids for r in ours] == [r.output_ids for r in expected]
    assert [r.finish_reason.value for r in ours] == [r.finish_reason.value for r in expected]
    assert expected[2].finish_reason.value == "stop"
    assert True in fills and False in fills, "both the replay's copy of every row and the full pass's of some ran"

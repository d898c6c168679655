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

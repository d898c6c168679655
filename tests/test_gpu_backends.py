"""On a GPU: the triton backend against the torch backend on the same random weights, in bf16.

Skipped (with the reason printed) where torch sees no CUDA device; bench/gpu.sh runs these.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device: run bench/gpu.sh on a GPU machine")]


@pytest.mark.parametrize("name", ["synthetic:smollm2-135m", "synthetic:llama-3.2-1b"])
def test_triton_backend_matches_torch_backend(name: str) -> None:
    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine
    from lockstep.runtime.loader import load_model
    from lockstep.runtime.sampling_params import SamplingParams

    model = load_model(name)
    prompts = [list(range(100, 100 + n)) for n in (5, 17, 40)]
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    results = {}
    for backend in ("torch", "triton"):
        engine = Engine(model, EngineConfig(backend=backend, device="cuda", kv_memory_bytes=1 << 30))
        results[backend] = [r.prompt_logprobs for r in engine.generate(prompts, params)]
    for ours, ref in zip(results["triton"], results["torch"]):
        # bf16 activations: logprobs agree to a few hundredths, not bitwise.
        assert max(abs(a - b) for a, b in zip(ours, ref)) < 0.1

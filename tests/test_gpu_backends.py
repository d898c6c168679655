"""On a GPU: the triton backend against the torch backend on the same random weights, in bf16.

Skipped (with the reason printed) where torch sees no CUDA device; bench/gpu.sh runs these.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device: run bench/gpu.sh on a GPU machine")]


CASES = {
    "smollm2-135m": ("synthetic:smollm2-135m", {}),
    "llama-3.2-1b": ("synthetic:llama-3.2-1b", {}),
    "smollm2-135m-q4_1": ("synthetic:smollm2-135m:q4_1", {"weights": "quantized"}),
    "smollm2-135m-q8_0": ("synthetic:smollm2-135m:q8_0", {"weights": "quantized"}),
    "cuda-attention": ("synthetic:smollm2-135m", {"attention": "cuda"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_backend_matches_torch_backend(case: str) -> None:
    """Prefill (prompt logprobs) and decode (greedy tokens re-scored by the torch backend)."""
    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine
    from lockstep.runtime.loader import load_model
    from lockstep.runtime.sampling_params import SamplingParams

    name, extra = CASES[case]
    model = load_model(name)
    reference = Engine(model, EngineConfig(backend="torch", device="cuda", kv_memory_bytes=1 << 30))
    ours = Engine(model, EngineConfig(backend="triton", device="cuda", kv_memory_bytes=1 << 30, **extra))
    prompts = [list(range(100, 100 + n)) for n in (5, 17, 40)]
    score = SamplingParams(max_tokens=0, prompt_logprobs=0)
    # bf16 activations: logprobs agree to a few hundredths, not bitwise.
    for a, b in zip(ours.generate(prompts, score), reference.generate(prompts, score)):
        assert max(abs(x - y) for x, y in zip(a.prompt_logprobs, b.prompt_logprobs)) < 0.1

    generated = ours.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0))
    rescored = reference.generate([p + g.output_ids for p, g in zip(prompts, generated)], score)
    for prompt, g, r in zip(prompts, generated, rescored):
        # prompt_logprobs[j] is the logprob of token j + 1, so generated token t sits at len(prompt) - 1 + t.
        want = r.prompt_logprobs[len(prompt) - 1:]
        assert max(abs(x - y) for x, y in zip(g.logprobs, want)) < 0.1

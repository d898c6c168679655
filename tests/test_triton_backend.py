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

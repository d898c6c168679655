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


def test_decode_steps_replay_graphs_and_allocate_nothing() -> None:
    """Every decode bucket is a captured CUDA graph; 1,000 decode steps after warm-up leave
    torch's allocation counters where they were, and replays give the eager forward's logits."""
    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine
    from lockstep.runtime.loader import load_model
    from lockstep.runtime.sampling_params import SamplingParams

    model = load_model("synthetic:smollm2-135m")
    engine = Engine(model, EngineConfig(backend="triton", device="cuda", kv_memory_bytes=1 << 30,
                                        max_num_seqs=8, calibrate="off"))
    assert set(engine.programs.graphs) == {p.name for p in engine.ladder.decode}
    engine.generate([list(range(100, 140))], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))

    programs = engine.programs
    program = engine.ladder.decode[2]  # decode[4], three real sequences and one padded
    handles = programs._scratch_sequences(program, context=33)
    try:
        args = programs._scratch_plan(program, handles[:3], 33)
        inputs = programs.plan(program, *args, logit_rows=[0, 1, 2])
        replayed = programs.run(inputs).clone()
        eager = engine.runner.forward(inputs)
        assert (replayed.float() - eager.float()).abs().max().item() < 1e-2
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats(engine.device)
        for _ in range(1000):
            programs.run(programs.plan(program, *args, logit_rows=[0, 1, 2]))
        torch.cuda.synchronize()
        after = torch.cuda.memory_stats(engine.device)
    finally:
        programs._free(handles)
    for key in ("allocation.all.allocated", "segment.all.allocated"):
        assert after[key] == before[key], f"{key}: {before[key]} -> {after[key]} over 1,000 decode steps"


@pytest.mark.parametrize("overlap,schedule", [("off", "replay"), ("on", "replay"), ("on", "full")])
def test_whole_engine_steps_allocate_nothing_on_the_device(overlap: str, schedule: str) -> None:
    """Issue 5's invariant for serving, not only the forward: 1,000 whole Engine.step() calls
    (schedule, plan, graph replay, the sampling kernel through SamplerBuffers, token bookkeeping)
    of a sampled decode batch leave torch's device allocation counters where they were. In
    overlap mode the input tokens come from the sampling kernel's output on the device: copied
    whole in a steady replay, and row by row (index_select and index_copy_ into planned buffers)
    when the scheduler's full pass plans every step ("full")."""
    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine
    from lockstep.runtime.loader import load_model
    from lockstep.runtime.sampling_params import SamplingParams

    engine = Engine(load_model("synthetic:smollm2-135m"),
                    EngineConfig(backend="triton", device="cuda", kv_memory_bytes=1 << 30, max_num_seqs=8,
                                 calibrate="off", overlap=overlap))
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=1100, ignore_eos=True)
    if schedule == "full":
        engine.scheduler._steady_after = lambda *args: None
    seqs = [engine.add_request(list(range(100 + i, 130 + i)), params) for i in range(5)]
    for _ in range(20):  # prefill and warm-up
        engine.step()
    assert engine.last_step.program.name == "decode[8]"
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats(engine.device)
    for _ in range(1000):
        engine.step()
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats(engine.device)
    assert all(len(s.output_ids) >= 1000 for s in seqs)
    for key in ("allocation.all.allocated", "segment.all.allocated"):
        assert after[key] == before[key], f"{key}: {before[key]} -> {after[key]} over 1,000 engine steps"

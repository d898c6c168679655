"""The static plan on the CPU: planned memory only, fixed step programs, the cost table, and
the sequence primitives and faults around them (runtime/memory_plan.py, step_program.py,
cost_model.py, program_runner.py)."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch

from lockstep.runtime.cli import main
from lockstep.runtime.engine import CancelStatus
from lockstep.runtime.sampling_params import SamplingParams
from lockstep.runtime.sequence import FinishReason
from lockstep.runtime.step_program import ProgramLadder, decode_buckets, prefill_buckets
from lockstep.runtime.workspace import METADATA

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
PROMPT = "A short story about a lighthouse keeper and a storm:"


def test_program_ladders() -> None:
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert decode_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert prefill_buckets(256) == [16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert prefill_buckets(100) == [16, 24, 32, 48, 64, 96, 100]
    ladder = ProgramLadder(8, 64)
    assert ladder.for_step(3, 3).name == "decode[4]"
    assert ladder.for_step(9, 3).name == "prefill[16]"
    assert ladder.for_step(17, 8).name == "prefill[24]"
    with pytest.raises(ValueError, match="no step program"):
        ladder.for_step(65, 2)


def test_guarded_steps_use_only_planned_memory(make_engine) -> None:
    """With the guard on, every buffer a native op gets is checked against the plan; and numpy
    allocates nothing during a step (tracemalloc sees numpy's data allocations)."""
    engine = make_engine(guard_memory=True)
    engine.generate([PROMPT], GREEDY)  # warm-up
    seqs = [engine.add_request(PROMPT + " " * i, GREEDY) for i in range(3)]
    forward = engine.runner.forward
    allocated = []

    def traced(inputs):
        tracemalloc.start()
        try:
            return forward(inputs)
        finally:
            snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
            allocated.append(sum(stat.size for stat in snapshot.statistics("filename")))
            tracemalloc.stop()

    engine.runner.forward = traced
    engine.run_until_done(seqs)
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    assert len(allocated) >= 8 and max(allocated) == 0, f"numpy bytes allocated inside steps: {allocated}"


def test_the_guard_catches_an_unplanned_buffer_and_fails_only_that_step(make_engine) -> None:
    engine = make_engine(guard_memory=True)
    workspace = engine.workspace
    planned = workspace.activation
    workspace.activation = lambda name: planned(name).clone() if name == "attn" else planned(name)
    bad = engine.generate([PROMPT], GREEDY)[0]
    assert bad.finish_reason is FinishReason.ERROR
    assert "not in the memory plan" in engine.last_error
    workspace.activation = planned
    good = engine.generate([PROMPT], GREEDY)[0]
    assert good.finish_reason is FinishReason.LENGTH and len(good.output_ids) == 8
    assert engine.kv.allocator.num_sequences() == 0


def test_a_failed_step_fails_its_sequences_and_the_engine_keeps_serving(make_engine) -> None:
    engine = make_engine()
    victim = engine.add_request(PROMPT, GREEDY)
    paused = engine.add_request("Another prompt entirely", GREEDY)
    engine.pause(paused.seq_id)
    run = engine.programs.run
    calls = []

    def fail_once(inputs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return run(inputs)

    engine.programs.run = fail_once
    outputs = engine.step()
    assert [(o.seq_id, o.finish_reason) for o in outputs] == [(victim.seq_id, FinishReason.ERROR)]
    assert "injected fault" in outputs[0].error
    engine.resume(paused.seq_id)
    engine.run_until_done([paused])
    assert paused.finish_reason is FinishReason.LENGTH and len(paused.output_ids) == 8
    assert engine.kv.allocator.num_sequences() == 0


def test_cancel_answers_for_live_finished_and_unknown_sequences(make_engine) -> None:
    engine = make_engine()
    done = engine.generate([PROMPT], GREEDY)[0]
    assert engine.cancel(done.seq_id) is CancelStatus.ALREADY_FINISHED
    assert engine.cancel(10_000) is CancelStatus.UNKNOWN
    live = engine.add_request(PROMPT, GREEDY)
    engine.step()
    assert engine.cancel(live.seq_id) is CancelStatus.CANCELLING
    outputs = engine.step()
    assert [(o.seq_id, o.finish_reason) for o in outputs] == [(live.seq_id, FinishReason.CANCELLED)]
    assert engine.cancel(live.seq_id) is CancelStatus.ALREADY_FINISHED
    assert engine.step() == [] and engine.kv.allocator.num_free_blocks() == engine.kv.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.seqs


def test_pause_and_resume_continue_exactly(make_engine) -> None:
    engine = make_engine()
    reference = engine.generate([PROMPT], GREEDY)[0]
    seq = engine.add_request(PROMPT, GREEDY)
    other = engine.add_request("Meanwhile, somewhere else,", GREEDY)
    while len(seq.output_ids) < 3:
        engine.step()
    engine.pause(seq.seq_id)
    held = len(seq.output_ids)
    engine.run_until_done([other])
    assert len(seq.output_ids) == held and not seq.finished
    engine.resume(seq.seq_id)
    engine.run_until_done([seq])
    assert seq.output_ids == reference.output_ids and seq.output_logprobs == reference.logprobs


def test_append_to_a_paused_sequence_waits_for_resume(make_engine) -> None:
    engine = make_engine()
    whole = engine.generate([PROMPT + " It was a dark night."], GREEDY)[0]
    seq = engine.add_request(PROMPT, GREEDY, generate=False)
    engine.step()
    engine.pause(seq.seq_id)
    engine.append(seq.seq_id, " It was a dark night.")
    assert not engine.has_work()
    engine.resume(seq.seq_id)
    engine.commit(seq.seq_id)
    engine.run_until_done([seq])
    assert seq.output_ids == whole.output_ids


def test_plan_command_prints_regions_capacity_and_costs(capsys, default_model_path) -> None:
    assert main(["plan", "--kv-memory", "64MiB", "--max-num-seqs", "8", "--max-batched-tokens", "64"]) == 0
    out = capsys.readouterr().out
    for needle in ("kv.k", "kv.v", "weights.gguf.q8_0.lm_head", "weights.gguf.q4_1.wqkv", "workspace.activations",
                   "decode[8]", "prefill[64]", "KV arena:", "tokens/s"):
        assert needle in out, needle
    assert main(["plan", "--json", "--kv-memory", "64MiB", "--max-num-seqs", "8", "--max-batched-tokens", "64"]) == 0
    plan = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in plan["programs"]]
    assert names == ["decode[1]", "decode[2]", "decode[4]", "decode[8]",
                     "prefill[16]", "prefill[24]", "prefill[32]", "prefill[48]", "prefill[64]"]
    assert all(p["seconds"] > 0 for p in plan["programs"])
    # A bigger program takes longer: the table measures, it does not make numbers up.
    seconds = {p["name"]: p["seconds"] for p in plan["programs"]}
    assert seconds["prefill[64]"] > seconds["decode[1]"]
    kv = {r["name"]: r["nbytes"] for r in plan["regions"]}
    cap = plan["capacity"]
    assert kv["kv.k"] == kv["kv.v"] == (cap["kv_blocks"] + 1) * cap["block_size"] * 30 * 3 * 64 * 4
    assert plan["total_bytes"] == sum(r["nbytes"] for r in plan["regions"])
    # Resident memory is what the process really holds: at least its weights, which it has read.
    weights = sum(r["nbytes"] for r in plan["regions"] if r["name"].startswith("weights."))
    assert plan["resident_bytes"] is None or plan["resident_bytes"] > weights


def test_a_shapes_step_inputs_are_made_once_and_read_the_latest_plan(make_engine) -> None:
    """ProgramRunner keeps the workspace's leading slices by length: a second plan of a shape reads
    the same views, they show what that plan wrote, not the first one's, and there is at most one
    per program size, number of sequences and number of logit rows, even after prompt scoring
    (which asks for many numbers of logit rows). (Every engine test also runs through them.)"""
    engine = make_engine()
    programs, kv = engine.programs, engine.kv
    program = engine.ladder.for_step(2, 2)
    rng = np.random.default_rng(3)
    seen = []
    for context in (5, 9):
        handles = [kv.allocator.new_sequence() for _ in range(2)]
        for h in handles:
            kv.reserve(h, context)
        tokens = rng.integers(0, engine.model_config.vocab_size, 2, dtype=np.int64)
        inputs = programs.plan(program, np.array(handles, np.int64), np.full(2, context - 1, np.int64),
                               np.ones(2, np.int64), tokens, [0, 1])
        assert inputs.token_ids[:2].tolist() == tokens.tolist()
        assert inputs.positions[:2].tolist() == [context - 1] * 2
        assert inputs.seq_lens[:2].tolist() == [context] * 2
        assert inputs.logit_rows.tolist() == [0, 1]
        seen.append(inputs)
        for h in handles:
            kv.allocator.free(h)
    assert all(getattr(seen[0], name) is getattr(seen[1], name) for name in METADATA)
    other = programs.plan(program, np.array([], np.int64), np.array([], np.int64), np.array([], np.int64),
                          np.array([], np.int64), [0])  # another number of logit rows
    assert other.logit_rows.shape == (1,) and other.token_ids is seen[0].token_ids
    for _ in range(3):
        engine.generate([PROMPT + " again"], SamplingParams(max_tokens=3, prompt_logprobs=0, ignore_eos=True))
    assert set(programs._per_row) <= {p.num_tokens for p in engine.ladder.programs}
    assert max(programs._per_seq) <= engine.ladder.largest_seqs
    assert max(programs._logit_rows) <= engine.ladder.largest_rows


def test_input_tokens_still_on_the_device_are_copied_into_the_plan(make_engine) -> None:
    """Overlap mode's input tokens from the step before's sampling, which the host does not have
    yet (ProgramRunner.plan's device_tokens): copied where the sampling's tensor lies, through
    planned buffers, into the rows they belong to, the other rows untouched. On the CPU the
    "device" is host memory, so this runs the code CUDA runs. The reference is the plan made with
    every token given on the host."""
    engine = make_engine()
    programs, kv, vocab = engine.programs, engine.kv, engine.model_config.vocab_size
    rng = np.random.default_rng(11)
    program = engine.ladder.for_step(8, 3)  # a prefill program: rows of three sequences
    handles = [kv.allocator.new_sequence() for _ in range(3)]
    try:
        for h in handles:
            kv.reserve(h, 4)
        args = (np.array(handles, np.int64), np.array([0, 0, 0], np.int64), np.array([3, 1, 4], np.int64))
        tokens = rng.integers(0, vocab, 8, dtype=np.int64)
        expected = programs.plan(program, *args, tokens, [2, 3, 7]).token_ids.tolist()
        sampled = torch.from_numpy(rng.integers(0, vocab, 5, dtype=np.int64))  # a sampling's output rows
        rows, src = np.array([3, 0, 7]), np.array([4, 1, 2])
        tokens[rows] = sampled.numpy()[src]
        placeholders = tokens.copy()
        placeholders[rows] = -1
        got = programs.plan(program, *args, placeholders, [2, 3, 7],
                            device_tokens=(rows, src, sampled)).token_ids.tolist()
        assert got == programs.plan(program, *args, tokens, [2, 3, 7]).token_ids.tolist() != expected
        assert got[:8] == tokens.tolist()
        # Every row from the sampling, in order (a steady replay's input).
        decode = engine.ladder.for_step(3, 3)
        one_each = (np.array(handles, np.int64), np.array([3, 3, 3], np.int64), np.ones(3, np.int64))
        every = programs.plan(decode, *one_each, np.full(3, -1, np.int64), [0, 1, 2],
                              device_tokens=(None, None, sampled[:3])).token_ids.tolist()
        assert every[:3] == sampled[:3].tolist()
    finally:
        for h in handles:
            kv.allocator.free(h)

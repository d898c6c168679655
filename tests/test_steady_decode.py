"""The scheduler's steady-decode replay (runtime/scheduler.py): while nothing changes, a decode
step is the previous one again, one token further, built without a pass over the sequences.

The reference is the full pass, which the rest of tests/test_scheduler.py checks: the same
workload on an engine whose scheduler never replays must run exactly the same steps (programs,
sequences, tokens per sequence, predicted times, and every planner input) and give exactly the
same outputs. The workloads mix what must end a replay: arrivals, finishes, cancels, forks,
pauses, rewrites (truncate, append, commit), interactive streams holding batch work to a
latency target, and an arena small enough to preempt.
"""
from __future__ import annotations

import random
from dataclasses import replace
from itertools import count

import pytest

from lockstep.runtime.sampling_params import SamplingParams
from test_overlap import PROMPTS, drive, summary, workload


def recorded(engine, replay: bool) -> list:
    """Engine steps as (program, items, predicted, budget, planner inputs); a fake clock, so the
    starvation bound decides the same in both runs."""
    steps = []
    ticks = count()
    engine.scheduler.clock = lambda: next(ticks) * 0.002
    if not replay:
        engine.scheduler._steady_after = lambda *args: None
    plan = engine.programs.plan

    def recording_plan(program, handles, starts, counts, tokens, logit_rows, device_tokens=None):
        # On the CPU a pending token's value is on the host: the engine fills it into `tokens`.
        assert device_tokens is None, "the CPU's planner inputs are all on the host"
        step = engine.last_step
        steps.append((program.name, [(item.seq.seq_id, item.num_tokens) for item in step.items], step.predicted_s,
                      step.budget_s, handles.tolist(), starts.tolist(), counts.tolist(), tokens.tolist(),
                      list(logit_rows), step.steady))
        return plan(program, handles, starts, counts, tokens, logit_rows)
    engine.programs.plan = recording_plan
    return steps


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_replay_runs_exactly_the_steps_the_full_pass_would(make_engine, seed: int) -> None:
    rng = random.Random(seed)
    # A small arena at seed 3: sequences are preempted and recomputed while others decode.
    config = dict(max_num_seqs=6, prefill_chunk=16, kv_memory_bytes=(4 << 20) if seed == 3 else (32 << 20),
                  overlap="on" if seed % 2 else "off", cost_correction=False)  # timing-free predictions
    requests, actions = workload(make_engine(**config), rng)
    requests = [(prompt, replace(params, latency_class=rng.choice(["interactive", "batch"]),
                                 itl_target_ms=rng.choice([None, 5.0, 1000.0])))
                for prompt, params in requests]
    # Two long batch ones, so the steps settle once the others have ended (a replay never holds
    # batch work to a latency target: those steps are all full passes).
    requests += [(PROMPTS[i], SamplingParams(temperature=0.8, seed=i, max_tokens=40, ignore_eos=True,
                                             latency_class=cls)) for i, cls in ((0, "batch"), (3, "batch"))]
    runs = {}
    for replay in (False, True):
        engine = make_engine(**config)
        steps = recorded(engine, replay)
        outputs = [summary(o) for o in drive(engine, requests, actions, use_during_device=False)]
        runs[replay] = steps, outputs
        assert not engine.seqs and engine.kv.allocator.num_sequences() == 0
    (full_steps, full_outputs), (steps, outputs) = runs[False], runs[True]
    assert outputs == full_outputs
    assert [s[:-1] for s in steps] == [s[:-1] for s in full_steps], "a replayed step differs from the full pass"
    assert not any(s[-1] for s in full_steps)
    assert sum(s[-1] for s in steps) >= 5, "the workload never settled into a steady decode"


def test_each_change_ends_the_replay(make_engine) -> None:
    """After a few steady steps, each change makes the next step a full pass (and a later one
    steady again)."""
    # A target no prefill beside the decodes can miss: at the default 50 ms a slow or loaded
    # machine's predictions hold the arrival back (the starvation bound admits it only after
    # 1 s), and a waiting arrival rightly keeps every step a full pass.
    engine = make_engine(max_num_seqs=8, kv_memory_bytes=32 << 20, itl_target_ms=10_000.0)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in PROMPTS[:4]]

    def settle():
        for _ in range(20):
            engine.step()
            if engine.last_step is not None and engine.last_step.steady:
                engine.step()
                assert engine.last_step.steady
                return
        raise AssertionError("never steady")

    live = seqs[1]
    changes = {
        "arrival": lambda: engine.add_request(PROMPTS[5], replace(params, max_tokens=1)),
        "cancel": lambda: engine.cancel(seqs[0].seq_id),
        "fork": lambda: engine.fork(live.seq_id, 1),
        "pause": lambda: engine.pause(live.seq_id),
        "resume": lambda: engine.resume(live.seq_id),
        "append": lambda: engine.append(live.seq_id, " so"),
        "truncate": lambda: engine.truncate(live.seq_id, live.num_tokens - 2),
        "commit": lambda: engine.commit(live.seq_id),
    }
    for name, change in changes.items():
        settle()
        change()
        engine.step()
        assert engine.last_step is None or not engine.last_step.steady, f"{name}: replayed a changed step"
    settle()
    # A finish: max_tokens reached by one of them.
    ending = engine.add_request(PROMPTS[6], replace(params, max_tokens=3))
    while not ending.finished:
        engine.step()
    engine.step()
    assert not engine.last_step.steady, "a finish: replayed a changed step"


def test_a_short_arena_ends_the_replay_before_it_reserves(make_engine) -> None:
    """The replay reserves one KV slot per sequence only when the arena has a block for each;
    short of that the full pass runs (and may preempt), never a half-reserved replay."""
    engine = make_engine(max_num_seqs=4, kv_memory_bytes=32 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    for p in PROMPTS[:3]:
        engine.add_request(p, params)
    for _ in range(12):
        engine.step()
    assert engine.last_step.steady
    alloc = engine.kv.allocator
    hog = alloc.new_sequence()  # holds all but two free blocks: fewer than the three sequences
    alloc.append(hog, (alloc.num_free_blocks() - 2) * engine.kv.block_size)
    assert alloc.num_free_blocks() == 2
    engine.step()
    assert not engine.last_step.steady and len(engine.last_step.items) == 3
    alloc.free(hog)
    for _ in range(3):
        engine.step()
    assert engine.last_step.steady, "steady again once the arena has room"


def test_the_decode_gather_matches_the_general_one(make_engine) -> None:
    """Engine._gather_decodes (a step of one token per sequence at the end of its input) must
    make exactly what the general per-item gather makes for the same step: planner inputs, logit
    rows, which sequences are sampled and which hold their logits. Some sequences prefill
    without generating (incremental input): their last token's logits are held, and such a
    step falls back to the general gather."""
    engine = make_engine(max_num_seqs=8, kv_memory_bytes=32 << 20)
    rng = random.Random(7)
    general = engine._gather_items
    compared = []

    def checked(step):
        batch = general(step)
        if step.decode_only:
            reference = general(replace(step, decode_only=False))
            fields = ("handles", "starts", "counts", "tokens", "logit_rows", "sample_at", "to_sample", "to_hold",
                      "prompt_lp")
            assert {f: getattr(batch, f) for f in fields} == {f: getattr(reference, f) for f in fields}
            if batch.logit_rows_array is not None:
                assert batch.logit_rows_array.tolist() == reference.logit_rows
            compared.append((len(step.items), len(batch.to_hold)))
        return batch
    engine._gather_items = checked
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    listening = []
    for i, prompt in enumerate(PROMPTS[:6]):
        generate = i % 3 != 2
        seq = engine.add_request(prompt, replace(params, prompt_logprobs=1 if i == 1 else None), generate=generate)
        if not generate:
            listening.append(seq)
    for step in range(40):
        if step in (6, 14):
            for seq in listening:
                # One token: computed in a decode-only step beside the others' decodes.
                engine.append(seq.seq_id, [rng.randrange(300, 1000)])
        if step == 20:
            for seq in listening:
                engine.commit(seq.seq_id)
        engine.step()
    assert any(n > 1 and not held for n, held in compared), "no decode step of several sequences was gathered"
    assert any(held for _, held in compared), "no decode step held a listening sequence's logits"
    assert len(compared) >= 5


class _GrowingCosts:
    """A cost table whose decode predictions grow with attention pairs, with a per-bucket factor
    that does not grow with the bucket (as CostModel's measured corrections need not): a prefix
    in a small bucket can miss the target while the whole step, in a larger one, meets it."""

    FACTOR = {"decode[1]": 1.0, "decode[2]": 1.0, "decode[4]": 1.6, "decode[8]": 0.8}

    def __init__(self, per_pair_s: float) -> None:
        self.per_pair_s = per_pair_s

    def predict(self, program, pairs: int) -> float:
        return self.FACTOR.get(program.name, 1.0) * (0.0005 * program.num_seqs + self.per_pair_s * pairs)


@pytest.mark.parametrize("per_pair_us", [15.0, 25.0, 40.0])
def test_a_replay_holds_batch_work_to_the_target_as_the_full_pass_does(make_engine, per_pair_us: float) -> None:
    """One interactive stream with a 10 ms target beside batch streams: while every batch decode
    fits the target the steady step is replayed; as contexts grow, predictions cross the target
    (first in decode[4]'s range, whose factor is the larger) and the full pass leaves some out.
    Step for step the same as a scheduler that never replays."""
    requests = [(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, itl_target_ms=10.0))]
    requests += [(PROMPTS[i], SamplingParams(temperature=0.8, seed=i, max_tokens=60, ignore_eos=True,
                                             latency_class="batch")) for i in range(1, 6)]
    runs = {}
    for replay in (False, True):
        engine = make_engine(max_num_seqs=8, prefill_chunk=64, kv_memory_bytes=32 << 20, calibrate="off")
        engine.scheduler.costs = _GrowingCosts(per_pair_us * 1e-6)
        steps = recorded(engine, replay)
        outputs = [summary(o) for o in drive(engine, requests, [], use_during_device=False)]
        runs[replay] = steps, outputs
    (full_steps, full_outputs), (steps, outputs) = runs[False], runs[True]
    assert outputs == full_outputs
    assert [s[:-1] for s in steps] == [s[:-1] for s in full_steps], "a replayed step differs from the full pass"
    held = [s for s in steps if s[3] != float("inf") and s[0].startswith("decode")]
    assert sum(s[-1] for s in held) >= 3, "no batch work was replayed under the target"
    assert any(len(s[1]) < 6 for s in held if not s[-1]), "the target never left a batch decode out"

"""CostModel (runtime/cost_model.py): the cost table's predictions scaled by measured step times.

The reference is arithmetic on the table's own prediction (CostTable.predict, checked in
tests/test_scheduler.py): after steps that took k times the prediction, predictions are k
times the table's; a lone outlier moves nothing; and the scheduler, given the corrected model,
holds back batch work that the table alone would have let into an interactive stream's step.
"""
from __future__ import annotations

import random

import pytest

from lockstep.runtime.cost_model import CostModel, CostTable
from lockstep.runtime.sampling_params import SamplingParams
from lockstep.runtime.step_program import ProgramLadder
from test_scheduler import advance, decoding, make_scheduler, make_seq


def table_and_ladder() -> tuple[CostTable, ProgramLadder]:
    ladder = ProgramLadder(16, 64)
    rng = random.Random(5)
    base = {p.name: rng.uniform(1e-3, 2e-2) for p in ladder.programs}
    return CostTable(base, attention_s_per_pair=rng.uniform(1e-9, 1e-8)), ladder


def test_predictions_follow_the_measured_steps() -> None:
    table, ladder = table_and_ladder()
    model = CostModel(table)
    decode4, decode8 = ladder.decode[2], ladder.decode[3]
    assert model.predict(decode4, 500) == table.predict(decode4, 500), "no correction before any step"
    rng = random.Random(1)
    for _ in range(CostModel.MIN_SAMPLES):
        pairs = rng.randrange(100, 5000)
        model.observe(decode4, pairs, 1.8 * table.predict(decode4, pairs))
    assert model.predict(decode4, 700) == pytest.approx(1.8 * table.predict(decode4, 700))
    # A program with no steps of its own is scaled up with every program's median, never down.
    assert model.predict(decode8, 700) == pytest.approx(1.8 * table.predict(decode8, 700))
    # One slow step (a page fault, a GC pause) moves nothing; a run of them does.
    model.observe(decode4, 600, 50 * table.predict(decode4, 600))
    for _ in range(3):
        model.observe(decode4, 600, 1.8 * table.predict(decode4, 600))
    assert model.predict(decode4, 700) == pytest.approx(1.8 * table.predict(decode4, 700))
    for _ in range(CostModel.WINDOW):
        model.observe(decode4, 600, 0.6 * table.predict(decode4, 600))
    assert model.predict(decode4, 700) == pytest.approx(0.6 * table.predict(decode4, 700))
    assert model.predict(ladder.decode[4], 700) == pytest.approx(table.predict(ladder.decode[4], 700))
    # Ratios are clamped: steps 100x slower than the table scale it by the bound, not by 100.
    for _ in range(CostModel.WINDOW):
        model.observe(decode8, 600, 100 * table.predict(decode8, 600))
    assert model.predict(decode8, 700) == pytest.approx(CostModel.CLAMP[1] * table.predict(decode8, 700))


def test_a_slower_machine_holds_back_batch_work_the_table_would_let_in() -> None:
    """make_scheduler's table: decode[B] costs (4 + B) ms. With a 9.5 ms target, decode[4] fits
    by the table; once steps take 1.5x it (decode[4] then 12 ms, decode[2] 9 ms), only
    decode[2], one batch seat beside the voice, does."""
    s = make_scheduler(itl_target_ms=9.5, batch_max_wait_ms=10_000)
    s.costs = CostModel(s.costs)
    voice = make_seq(5)
    batch = [make_seq(5 + i, "batch", first_token=20 + i) for i in range(6)]
    for seq in [voice, *batch]:
        s.add(seq)
    decoding(s, [voice, *batch])
    assert advance(s).program.name == "decode[4]"
    for _ in range(2 * CostModel.MIN_SAMPLES):
        step = advance(s)
        s.costs.observe(step.program, step.pairs, 1.5 * s.costs.table.predict(step.program, step.pairs))
    step = advance(s)
    assert step.program.name == "decode[2]" and voice in [item.seq for item in step.items]
    assert step.predicted_s == pytest.approx(1.5 * s.costs.table.predict(step.program, step.pairs))
    assert step.predicted_s <= 9.5e-3


def test_the_engine_reports_each_forward_step_it_ran(make_engine) -> None:
    """Engine.step tells the cost model each step's program, attention pairs and wall time."""
    engine = make_engine(max_num_seqs=4)
    assert engine.cost_model is not None and engine.scheduler.costs is engine.cost_model
    seen = []
    observe = engine.cost_model.observe
    engine.cost_model.observe = lambda program, pairs, seconds: (seen.append((program.name, pairs, seconds)),
                                                                 observe(program, pairs, seconds))
    steps = []
    for prompt in ("The first rule of the garden is", "Three colours of the sea:"):
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    while engine.has_work():
        engine.step()
        if engine.last_step is not None:
            steps.append((engine.last_step.program.name, engine.last_step.pairs))
    assert [(name, pairs) for name, pairs, _ in seen] == steps and len(steps) >= 5
    assert all(0 < seconds < 10 for _, _, seconds in seen)
    assert make_engine(cost_correction=False).cost_model is None

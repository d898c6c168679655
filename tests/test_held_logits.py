"""commit() of a prefill-only sequence samples from the logits its prefill already computed.

Each expectation is the same request run another way: one-shot (generate=True, so its first
token comes from the last prompt row of the prefill) or, when no slot is free, commit's old
path (computing the last token again). Tokens and logprobs must match bit for bit, and the
first token after commit must come from a step that runs no forward.
"""
from __future__ import annotations

import pytest
import torch

from lockstep.runtime.sampling_params import SamplingParams
from lockstep.runtime.sequence import FinishReason

PROMPT = "Here is a list of the planets of the solar system, in order from the Sun: Mercury, Venus,"
SAMPLED = dict(temperature=0.8, top_p=0.9, max_tokens=8, ignore_eos=True)


def count_forwards(engine) -> list[int]:
    """Wraps the engine's program runner so each forward adds one to the returned counter."""
    calls = [0]
    run = engine.programs.run

    def counted(inputs):
        calls[0] += 1
        return run(inputs)

    engine.programs.run = counted
    return calls


def prefill_only(engine, prompt, params: SamplingParams):
    seq = engine.add_request(prompt, params, generate=False)
    while engine.has_work():
        assert not [o for o in engine.step() if o.token_id is not None]
    assert seq.num_uncomputed == 0
    return seq


def one_shot(make_engine, prompt, params: SamplingParams):
    return make_engine().generate([prompt], params)[0]


def test_commit_samples_the_first_token_without_a_forward(make_engine) -> None:
    params = SamplingParams(**SAMPLED, seed=11, logprobs=2)
    reference = one_shot(make_engine, PROMPT, params)
    engine = make_engine()
    seq = prefill_only(engine, PROMPT, params)
    assert seq.held_slot is not None
    forwards = count_forwards(engine)
    engine.commit(seq.seq_id)
    first = [o for o in engine.step() if o.seq_id == seq.seq_id]
    assert forwards[0] == 0 and engine.last_step is None
    assert [o.token_id for o in first] == reference.output_ids[:1]
    engine.run_until_done([seq])
    assert seq.output_ids == reference.output_ids
    assert seq.output_logprobs == reference.logprobs
    assert seq.output_top_logprobs == reference.top_logprobs
    assert engine.held.num_free == engine.config.max_num_seqs


def test_forks_of_a_held_parent_sample_like_unforked_requests(make_engine) -> None:
    """n > 1 as the server runs it: prefill once, fork, commit all. Each fork with its own seed
    must equal that seed's request run alone, and no fork recomputes (or copies) anything."""
    seeds = [5, 6, 7]
    references = [one_shot(make_engine, PROMPT, SamplingParams(**SAMPLED, seed=s)) for s in [4, *seeds]]
    engine = make_engine()
    parent = prefill_only(engine, PROMPT, SamplingParams(**SAMPLED, seed=4))
    blocks = engine.kv.allocator.block_table(parent.handle)
    children = engine.fork(parent.seq_id, len(seeds), seeds=seeds)
    forwards = count_forwards(engine)
    for seq in (parent, *children):
        engine.commit(seq.seq_id)
    firsts = {o.seq_id: o.token_id for o in engine.step()}
    assert forwards[0] == 0
    assert [firsts[s.seq_id] for s in (parent, *children)] == [r.output_ids[0] for r in references]
    # Nothing was written into the shared blocks: no fork made its own copy of the last block.
    for child in children:
        assert engine.kv.allocator.block_table(child.handle) == blocks
    engine.run_until_done([parent, *children])
    for seq, reference in zip((parent, *children), references):
        assert seq.output_ids == reference.output_ids and seq.output_logprobs == reference.logprobs
    assert engine.held.num_free == engine.config.max_num_seqs
    assert engine.kv.allocator.num_free_blocks() == engine.kv.num_blocks


def test_with_every_slot_taken_commit_computes_the_last_token_again(make_engine) -> None:
    params = SamplingParams(**SAMPLED, seed=21)
    reference = one_shot(make_engine, PROMPT, params)
    engine = make_engine(max_num_seqs=4)
    vocab = engine.model_config.vocab_size
    taken = [engine.held.hold(torch.randn(vocab)) for _ in range(engine.held.num_free)]
    seq = prefill_only(engine, PROMPT, params)
    assert seq.held_slot is None
    forwards = count_forwards(engine)
    engine.commit(seq.seq_id)
    engine.step()
    assert forwards[0] == 1 and seq.output_ids == reference.output_ids[:1]
    engine.run_until_done([seq])
    assert seq.output_ids == reference.output_ids and seq.output_logprobs == reference.logprobs
    for slot in taken:
        engine.held.release(slot)
    assert engine.held.num_free == 4


def test_truncating_a_held_sequence_drops_its_logits(make_engine) -> None:
    engine = make_engine()
    ids = engine.tokenizer.encode(PROMPT)
    params = SamplingParams(**SAMPLED, seed=8)
    reference = one_shot(make_engine, ids[:-3], params)
    seq = prefill_only(engine, ids, params)
    assert seq.held_slot is not None
    engine.truncate(seq.seq_id, len(ids) - 3)
    assert seq.held_slot is None and engine.held.num_free == engine.config.max_num_seqs
    engine.commit(seq.seq_id)
    engine.run_until_done([seq])
    assert seq.output_ids == reference.output_ids and seq.output_logprobs == reference.logprobs


def test_appending_replaces_the_held_logits_with_the_new_input_s(make_engine) -> None:
    engine = make_engine()
    first, rest = PROMPT[:40], PROMPT[40:]
    whole = engine.tokenizer.encode(first) + engine.tokenizer.encode(rest, add_bos=False)
    params = SamplingParams(**SAMPLED, seed=9)
    reference = one_shot(make_engine, whole, params)
    seq = prefill_only(engine, first, params)
    old_slot = seq.held_slot
    engine.append(seq.seq_id, rest)
    assert seq.held_slot is None and engine.held.num_free == engine.config.max_num_seqs
    while engine.has_work():
        engine.step()
    assert seq.held_slot is not None and old_slot is not None
    forwards = count_forwards(engine)
    engine.commit(seq.seq_id)
    engine.step()
    assert forwards[0] == 0
    engine.run_until_done([seq])
    assert seq.output_ids == reference.output_ids and seq.output_logprobs == reference.logprobs


def test_a_paused_commit_waits_and_a_cancelled_one_ends_once(make_engine) -> None:
    engine = make_engine()
    params = SamplingParams(**SAMPLED, seed=10)
    paused = prefill_only(engine, PROMPT, params)
    engine.commit(paused.seq_id)
    engine.pause(paused.seq_id)
    assert not engine.has_work()
    assert engine.step() == [] and paused.output_ids == []
    engine.resume(paused.seq_id)
    assert [o.seq_id for o in engine.step()] == [paused.seq_id] and len(paused.output_ids) == 1
    engine.cancel(paused.seq_id)
    engine.step()

    cancelled = prefill_only(engine, " ".join(PROMPT.split()[::-1]), params)
    engine.commit(cancelled.seq_id)
    engine.cancel(cancelled.seq_id)
    ends = [o for o in engine.step() if o.seq_id == cancelled.seq_id]
    assert [(o.token_id, o.finish_reason) for o in ends] == [(None, FinishReason.CANCELLED)]
    assert cancelled.output_ids == []
    assert engine.held.num_free == engine.config.max_num_seqs
    assert engine.kv.allocator.num_free_blocks() == engine.kv.num_blocks


def test_held_logits_off_plans_no_rows_and_commit_recomputes(make_engine) -> None:
    params = SamplingParams(**SAMPLED, seed=12)
    reference = one_shot(make_engine, PROMPT, params)
    engine = make_engine(held_logits=False)
    assert engine.held.num_free == 0 and "held_logits" not in engine.memory_plan.regions
    assert "held_logits" in make_engine().memory_plan.regions
    seq = prefill_only(engine, PROMPT, params)
    forwards = count_forwards(engine)
    engine.commit(seq.seq_id)
    engine.run_until_done([seq])
    assert forwards[0] == len(reference.output_ids)  # the first token needed a forward too
    assert seq.output_ids == reference.output_ids and seq.output_logprobs == reference.logprobs


def test_a_slot_is_freed_once_its_last_reader_releases_it_and_never_twice() -> None:
    from lockstep.runtime.held_logits import HeldLogits

    held = HeldLogits(2, 8, torch.device("cpu"))
    row = torch.randn(8)
    slot = held.hold(row)
    assert torch.equal(held.rows[slot], row) and held.num_free == 1
    held.share(slot)
    held.release(slot)
    assert held.num_free == 1  # a fork still reads it
    held.release(slot)
    assert held.num_free == 2
    with pytest.raises(RuntimeError, match="released more often"):
        held.release(slot)
    assert held.num_free == 2

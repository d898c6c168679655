"""The engine on the default model: batching, the sequence operations, stopping and sampling.

Every expectation is another run of lockstep under different circumstances (alone vs batched,
forked vs unforked, appended vs whole) or a property of the request itself; the numbers
themselves are checked against HF transformers in test_golden.py.
"""
from __future__ import annotations

import pytest

from lockstep.runtime.errors import ContextLengthError, InvalidRequestError
from lockstep.runtime.sampling_params import SamplingParams
from lockstep.runtime.sequence import FinishReason

GREEDY = dict(temperature=0.0, ignore_eos=True)

PROMPTS = [
    "The quick brown fox",
    "In a distant galaxy, a small robot named Pip discovered that",
    "def fibonacci(n):",
    "Once upon a time there was a princess who lived in a tall tower by the sea. Every morning she",
    "Paris is",
    "Here is a list of the planets of the solar system, in order from the Sun: Mercury, Venus,",
    "1, 2, 3, 4,",
    "The best way to learn a new language is",
]


def run_one(engine, prompt, **params):
    return engine.generate([prompt], SamplingParams(**params))[0]


def test_results_do_not_depend_on_the_thread_count(make_engine) -> None:
    one, two = (run_one(make_engine(threads=n), PROMPTS[2], **dict(GREEDY, max_tokens=8, logprobs=0)) for n in (1, 2))
    assert one.output_ids == two.output_ids and one.logprobs == two.logprobs


def test_results_do_not_depend_on_the_batch(make_engine) -> None:
    """The same request alone and inside a batch of 8 mixed-length, mixed-parameter requests.

    Bitwise, logprobs included: every matmul runs on the native CPU kernel, whose reduction order
    per output element does not depend on the batch (torch's GEMM fails this in the last bits).
    """
    greedy = dict(GREEDY, max_tokens=12, logprobs=0)
    sampled = dict(temperature=0.8, top_p=0.9, seed=42, max_tokens=12, ignore_eos=True)
    alone_greedy = run_one(make_engine(), PROMPTS[1], **greedy)
    alone_sampled = run_one(make_engine(), PROMPTS[3], **sampled)

    engine = make_engine(max_batched_tokens=32)  # forces chunked prefill beside decodes
    params = [SamplingParams(**dict(GREEDY, max_tokens=4 + 3 * i)) for i in range(8)]
    params[1] = SamplingParams(**greedy)
    params[3] = SamplingParams(**sampled)
    batch = engine.generate(PROMPTS, params)
    assert batch[1].output_ids == alone_greedy.output_ids
    assert batch[3].output_ids == alone_sampled.output_ids
    assert batch[1].logprobs == alone_greedy.logprobs
    assert batch[3].logprobs == alone_sampled.logprobs
    assert [len(r.output_ids) for r in batch] == [4 + 3 * i if i not in (1, 3) else 12 for i in range(8)]


def test_seeded_sampling_is_reproducible_and_seed_dependent(make_engine) -> None:
    engine = make_engine()
    params = dict(temperature=1.0, max_tokens=16, ignore_eos=True)
    a = run_one(engine, PROMPTS[0], seed=7, **params)
    b = run_one(engine, PROMPTS[0], seed=7, **params)
    c = run_one(engine, PROMPTS[0], seed=8, **params)
    assert a.output_ids == b.output_ids and a.logprobs == b.logprobs
    assert a.output_ids != c.output_ids


def test_chunked_prefill_matches_one_shot(make_engine) -> None:
    one_shot = run_one(make_engine(max_batched_tokens=256), PROMPTS[5], **GREEDY, max_tokens=8, prompt_logprobs=0)
    chunked = run_one(make_engine(max_batched_tokens=5, max_num_seqs=1), PROMPTS[5], **GREEDY, max_tokens=8,
                      prompt_logprobs=0)
    assert chunked.output_ids == one_shot.output_ids
    assert chunked.prompt_logprobs == pytest.approx(one_shot.prompt_logprobs, abs=1e-4)
    assert len(one_shot.prompt_logprobs) == len(one_shot.prompt_ids) - 1


def test_fork_continues_like_the_unforked_sequence(make_engine) -> None:
    reference = run_one(make_engine(), PROMPTS[2], **GREEDY, max_tokens=10)
    engine = make_engine()
    parent = engine.add_request(PROMPTS[2], SamplingParams(**GREEDY, max_tokens=10))
    while len(parent.output_ids) < 4:
        engine.step()
    parent_blocks = engine.kv.allocator.block_table(parent.handle)
    children = engine.fork(parent.seq_id, 2)
    # O(1) fork: the children hold the parent's blocks, shared, not copies.
    for child in children:
        assert engine.kv.allocator.block_table(child.handle) == parent_blocks
    assert all(engine.kv.allocator.refcount(b) == 3 for b in parent_blocks)
    engine.run_until_done([parent, *children])
    for seq in (parent, *children):
        assert seq.output_ids == reference.output_ids
    assert engine.kv.allocator.num_free_blocks() == engine.kv.num_blocks


def test_sampled_forks_take_different_branches(make_engine) -> None:
    engine = make_engine()
    parent = engine.add_request(PROMPTS[0], SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True))
    engine.step()  # prefill and the first token
    children = engine.fork(parent.seq_id, 3)
    engine.run_until_done([parent, *children])
    outputs = [tuple(s.output_ids) for s in (parent, *children)]
    assert len({o[0] for o in outputs}) == 1  # the shared token before the fork
    assert len(set(outputs)) == 4


def test_append_then_commit_equals_the_whole_prompt(make_engine) -> None:
    first, rest = "Here is a list of the planets of the solar system,", " in order from the Sun: Mercury,"
    engine = make_engine()
    whole_ids = engine.tokenizer.encode(first) + engine.tokenizer.encode(rest, add_bos=False)
    reference = run_one(make_engine(), whole_ids, **GREEDY, max_tokens=8)
    seq = engine.add_request(first, SamplingParams(**GREEDY, max_tokens=8), generate=False)
    while engine.has_work():
        assert not [o for o in engine.step() if o.token_id is not None]  # prefill only, no output
    assert seq.num_computed == seq.num_tokens
    engine.append(seq.seq_id, rest)
    engine.commit(seq.seq_id)
    engine.run_until_done([seq])
    assert seq.output_ids == reference.output_ids


def test_truncate_rolls_back_and_regenerates(make_engine) -> None:
    engine = make_engine()
    seq = engine.add_request(PROMPTS[4], SamplingParams(**GREEDY, max_tokens=10))
    while len(seq.output_ids) < 8:
        engine.step()
    first_run = list(seq.output_ids)
    prompt_len = seq.num_prompt_tokens
    engine.truncate(seq.seq_id, prompt_len + 3)
    assert seq.output_ids == first_run[:3]
    assert engine.kv.allocator.num_tokens(seq.handle) <= prompt_len + 3
    engine.run_until_done([seq])
    assert seq.output_ids[:8] == first_run  # greedy: the same continuation again
    assert len(seq.output_ids) == 10


def test_cancel_ends_once_at_the_next_step_and_frees_blocks(make_engine) -> None:
    engine = make_engine()
    keep = engine.add_request(PROMPTS[0], SamplingParams(**GREEDY, max_tokens=6))
    victim = engine.add_request(PROMPTS[1], SamplingParams(**GREEDY, max_tokens=50))
    engine.step()
    engine.step()
    engine.cancel(victim.seq_id)
    engine.cancel(victim.seq_id)  # twice: still one terminal status
    terminal = [o for o in engine.step() if o.seq_id == victim.seq_id]
    assert [o.finish_reason for o in terminal] == [FinishReason.CANCELLED]
    assert all(o.token_id is None for o in terminal)
    engine.run_until_done([keep])
    assert not [o for o in engine.step() if o.seq_id == victim.seq_id]
    assert engine.kv.allocator.num_free_blocks() == engine.kv.num_blocks
    with pytest.raises(InvalidRequestError, match="not live"):
        engine.append(victim.seq_id, [1])


def test_stop_string_cuts_text_and_is_never_streamed(make_engine) -> None:
    engine = make_engine()
    free = run_one(engine, PROMPTS[6], **GREEDY, max_tokens=20)
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    assert len(stop) == 3
    streamed = "".join(o.text for o in engine.stream(PROMPTS[6], SamplingParams(**GREEDY, max_tokens=20, stop=[stop])))
    assert streamed == free.text[:free.text.index(stop)]


def test_eos_stops_a_chat_answer(make_engine) -> None:
    engine = make_engine()
    ids = engine.encode_chat([{"role": "user", "content": "Say hello."}])
    result = run_one(engine, ids, temperature=0.0, max_tokens=200)
    assert result.finish_reason is FinishReason.STOP
    assert result.output_ids[-1] in engine.tokenizer.stop_ids
    assert "<|im_end|>" not in result.text


def test_min_tokens_holds_back_eos(make_engine) -> None:
    engine = make_engine()
    ids = engine.encode_chat([{"role": "user", "content": "Say hello."}])
    natural = run_one(engine, ids, temperature=0.0, max_tokens=200)
    forced = run_one(engine, ids, temperature=0.0, max_tokens=200, min_tokens=len(natural.output_ids) + 5)
    assert len(forced.output_ids) >= len(natural.output_ids) + 5
    assert not set(forced.output_ids[:-1]) & engine.tokenizer.stop_ids


def test_max_tokens_gives_length(make_engine) -> None:
    result = run_one(make_engine(), PROMPTS[0], **GREEDY, max_tokens=3)
    assert result.finish_reason is FinishReason.LENGTH and len(result.output_ids) == 3


def test_small_arena_preempts_and_still_finishes_identically(make_engine) -> None:
    params = [SamplingParams(**GREEDY, max_tokens=24) for _ in PROMPTS]
    roomy = make_engine().generate(PROMPTS, params)
    # 12 blocks for 8 requests, plus the scratch block padded rows write
    tight = make_engine(kv_memory_bytes=13 * 16 * 46080, max_model_len=150)
    assert tight.kv.num_blocks == 12
    cramped = tight.generate(PROMPTS, params)
    assert [r.output_ids for r in cramped] == [r.output_ids for r in roomy]
    assert tight.kv.allocator.num_free_blocks() == 12


def test_too_long_prompt_is_refused(make_engine) -> None:
    engine = make_engine(max_model_len=64)
    with pytest.raises(ContextLengthError, match="context holds 64"):
        engine.add_request(list(range(100, 170)), SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="out of range"):
        engine.add_request([1, 10**6], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="stop token id 1000000000 is out of range"):
        engine.add_request([1, 2], SamplingParams(max_tokens=1, min_tokens=1, stop_token_ids=[10**9]))


def test_commit_with_a_seed_samples_as_a_request_with_that_seed(make_engine) -> None:
    """A session opened with one seed (or none) and committed with another replies as a one-shot
    request with the commit's seed would."""
    sampled = dict(temperature=0.9, max_tokens=6, ignore_eos=True)
    reference = run_one(make_engine(), PROMPTS[1], **sampled, seed=77)
    engine = make_engine()
    seq = engine.add_request(PROMPTS[1], SamplingParams(**sampled, seed=1), generate=False)
    while engine.has_work():
        engine.step()
    engine.commit(seq.seq_id, SamplingParams(**sampled, seed=77))
    engine.run_until_done([seq])
    assert seq.output_ids == reference.output_ids and seq.output_logprobs == reference.logprobs


def test_commit_refuses_stop_token_ids_outside_the_vocabulary(make_engine) -> None:
    engine = make_engine()
    seq = engine.add_request(PROMPTS[0], SamplingParams(**GREEDY, max_tokens=4), generate=False)
    with pytest.raises(InvalidRequestError, match="stop token id"):
        engine.commit(seq.seq_id, SamplingParams(**GREEDY, max_tokens=4, min_tokens=1,
                                                 stop_token_ids=[engine.model_config.vocab_size + 5]))
    engine.commit(seq.seq_id)  # the sequence is untouched and still commits
    engine.run_until_done([seq])
    assert len(seq.output_ids) == 4


def test_a_tokens_logprob_is_one_number_whatever_else_the_request_asks(make_engine) -> None:
    """The chosen token's logprob comes from the C++ sampler; top logprobs, a min_tokens ban and
    prompt scoring take theirs from lockstep._core.log_softmax, by the same rule and sums. So a
    request's logprobs are the same numbers, bit for bit, with or without top logprobs, with a
    ban that changes no token, and when the output is scored back as a prompt."""
    engine = make_engine()
    prompt = PROMPTS[1]
    plain = run_one(engine, prompt, max_tokens=10, **GREEDY)
    with_tops = run_one(engine, prompt, max_tokens=10, logprobs=3, **GREEDY)
    unused = next(t for t in range(1000, 2000) if t not in plain.output_ids)
    banned = run_one(engine, prompt, max_tokens=10, min_tokens=10, stop_token_ids=[unused], **GREEDY)
    for other in (with_tops, banned):
        assert other.output_ids == plain.output_ids and other.logprobs == plain.logprobs
    for (token, logprob), top in zip(zip(plain.output_ids, plain.logprobs), with_tops.top_logprobs):
        assert dict(top)[token] == logprob  # greedy: the chosen token is in its row's top 3
    scored = engine.generate([plain.prompt_ids + plain.output_ids],
                             SamplingParams(max_tokens=0, prompt_logprobs=0, **GREEDY))[0]
    assert scored.prompt_logprobs[-len(plain.output_ids):] == plain.logprobs


def test_bans_in_a_batch_reach_their_own_rows(make_engine) -> None:
    """The sampler's ban list is built only once some sequence is below min_tokens, behind
    sequences that end unsampled (max_tokens 0) or have no ban: each request in such a batch
    gets what it gets alone, and the banned one never makes its stop token before min_tokens."""
    engine = make_engine()
    first = run_one(engine, PROMPTS[4], max_tokens=1, **GREEDY).output_ids[0]
    plist = [SamplingParams(max_tokens=0, **GREEDY), SamplingParams(max_tokens=6, **GREEDY),
             SamplingParams(max_tokens=6, min_tokens=3, stop_token_ids=[first], **GREEDY),
             SamplingParams(max_tokens=6, temperature=0.8, seed=3)]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4], PROMPTS[6]]
    together = engine.generate(prompts, plist)
    for prompt, params, got in zip(prompts, plist, together):
        alone = engine.generate([prompt], params)[0]
        assert (got.output_ids, got.logprobs, got.finish_reason) == (alone.output_ids, alone.logprobs,
                                                                     alone.finish_reason), prompt
    assert together[0].output_ids == [] and first not in together[2].output_ids[:3]
    assert len(together[2].output_ids) >= 3

"""Batch invariance end to end: the same (prompt, params, seed) gives bit-identical tokens and
logprobs whatever else the engine is doing (DESIGN.md, invariants).

Each test runs a request under one circumstance and again under another: alone vs amid 15
other requests, in every decode bucket, with prefill chunks of 16 and 256 tokens, with the
prefix cache cold and warm, and forked vs unforked. Greedy and sampled (temperature > 0)
requests both; logprobs are compared as exact floats. On the CPU this rests on the native
kernels' fixed reduction orders (cpp/cpu/quant_matmul.cpp, cpp/cpu/cpu_ops.cpp) and on the
counter-based sampler (runtime/sampler.py).
"""
from __future__ import annotations

import pytest

from lockstep.runtime.sampling_params import SamplingParams

PROMPTS = [
    "The lighthouse keeper climbed the stairs one last time and",
    "def merge_sort(items):",
    "Three facts about octopuses:",
    "The recipe calls for flour, butter, sugar and",
    "Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker who",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Roses are red,",
    "The stock market today",
    "Translate to French: good morning, my friend.",
    "A haiku about winter:",
    "In 1969, the first humans",
    "SELECT name, age FROM users WHERE",
    "My favourite thing about autumn is",
    "The mitochondria is",
    "Dear hiring manager, I am writing to apply for the position of",
    "Here are five tips for better sleep. First,",
]

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234, max_tokens=10, ignore_eos=True, logprobs=0)
CASES = {"greedy": GREEDY, "sampled": SAMPLED}


def tokens_and_logprobs(result):
    return result.output_ids, result.logprobs


def run_alone(engine, prompt, params):
    return tokens_and_logprobs(engine.generate([prompt], params)[0])


@pytest.fixture(scope="module")
def alone(make_engine):
    """Each case's request run alone on a fresh engine with no prefix cache: the reference."""
    engine = make_engine(prefix_cache=False)
    return {name: run_alone(engine, PROMPTS[4], params) for name, params in CASES.items()}


@pytest.mark.parametrize("case", CASES)
def test_amid_fifteen_concurrent_requests(make_engine, alone, case: str) -> None:
    engine = make_engine(kv_memory_bytes=128 << 20)
    others = [SamplingParams(temperature=0.7 * (i % 2), seed=i, max_tokens=3 + i, ignore_eos=True) for i in range(16)]
    others[4] = CASES[case]
    results = engine.generate(PROMPTS, others)
    assert tokens_and_logprobs(results[4]) == alone[case]
    assert [len(r.output_ids) for i, r in enumerate(results) if i != 4] == [3 + i for i in range(16) if i != 4]


@pytest.mark.parametrize("case", CASES)
def test_in_every_decode_bucket(make_engine, alone, case: str) -> None:
    """Batches of 1, 2, 3, 5 and 8 sequences: decode buckets 1, 2, 4 and 8, some padded."""
    engine = make_engine(max_num_seqs=8, prefix_cache=False)
    seen: set[str] = set()
    run = engine.programs.run
    engine.programs.run = lambda inputs: (seen.add(inputs.program.name), run(inputs))[1]
    for size in (1, 2, 3, 5, 8):
        prompts = [PROMPTS[4]] + PROMPTS[5:5 + size - 1]
        params = [CASES[case]] + [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)] * (size - 1)
        results = engine.generate(prompts, params)
        assert tokens_and_logprobs(results[0]) == alone[case], f"batch of {size}"
    assert {"decode[1]", "decode[2]", "decode[4]", "decode[8]"} <= seen


@pytest.mark.parametrize("case", CASES)
def test_prefill_chunk_16_and_256(make_engine, alone, case: str) -> None:
    for chunk in (16, 256):
        engine = make_engine(prefill_chunk=chunk, prefix_cache=False)
        assert run_alone(engine, PROMPTS[4], CASES[case]) == alone[case], f"prefill chunk {chunk}"



@pytest.mark.parametrize("clear_midway", [False, True])
def test_generated_blocks_are_cached_for_the_next_turn(make_engine, clear_midway: bool) -> None:
    """The blocks a decode fills are published as they complete (each with only the tokens from
    the first block not yet published, Engine._advance): a next turn whose prompt is the first
    turn's prompt and answer finds every full block of both cached, and answers as it does on a
    cold engine. Also when the cache is cleared while the first turn decodes: its next block
    publishes the whole chain again."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine = make_engine(prefix_cache=True)
    seq = engine.add_request(PROMPTS[4], params)
    while len(seq.output_ids) < 10:
        engine.step()
    if clear_midway:
        engine.kv.allocator.clear_prefix_cache()
    while engine.has_work():
        engine.step()
    turn = list(seq.token_ids) + engine.tokenizer.encode(" Next,", add_bos=False)
    hits = engine.kv.allocator.prefix_hits()
    warm = engine.generate([turn], params)[0]
    bs = engine.kv.block_size
    assert engine.kv.allocator.prefix_hits() - hits == (len(seq.token_ids) - 1) // bs * bs
    cold = make_engine(prefix_cache=False).generate([turn], params)[0]
    assert warm.output_ids == cold.output_ids and warm.logprobs == cold.logprobs


@pytest.mark.parametrize("case", CASES)
def test_prefix_cache_cold_and_warm(make_engine, alone, case: str) -> None:
    engine = make_engine(prefix_cache=True)
    allocator = engine.kv.allocator
    cold = run_alone(engine, PROMPTS[4], CASES[case])
    assert allocator.prefix_hits() == 0
    warm = run_alone(engine, PROMPTS[4], CASES[case])
    assert allocator.prefix_hits() > 0, "the second run should have reused the first one's blocks"
    assert cold == warm == alone[case]
    # A different request sharing only the prompt's first blocks, then the original again.
    engine.generate([PROMPTS[4] + " and then", PROMPTS[4][:40]], GREEDY)
    assert run_alone(engine, PROMPTS[4], CASES[case]) == alone[case]


@pytest.mark.parametrize("case", CASES)
def test_fork_against_the_unforked_continuation(make_engine, case: str) -> None:
    """A sequence forked after 4 tokens continues exactly as if never forked, and a fork given
    its own seed matches a fresh request for the same tokens with that seed."""
    params = CASES[case]
    engine = make_engine(prefix_cache=False)
    unforked = engine.generate([PROMPTS[2]], params)[0]

    parent = engine.add_request(PROMPTS[2], params)
    while len(parent.output_ids) < 4:
        engine.step()
    (child,) = engine.fork(parent.seq_id, 1, seeds=[99])
    engine.run_until_done([parent, child])
    assert parent.output_ids == unforked.output_ids and parent.output_logprobs == unforked.logprobs

    # The child's tokens after the fork, against a request holding the same tokens with seed 99.
    prefix = parent.token_ids[:parent.num_prompt_tokens + 4]
    fresh = engine.generate([prefix], SamplingParams(**{**vars(params), "seed": 99, "max_tokens": 6}))[0]
    assert child.output_ids[4:] == fresh.output_ids
    assert child.output_logprobs[4:] == fresh.logprobs

"""Overlap mode (EngineConfig.overlap): the next step's forward is launched before the host takes
in a step's sampled tokens (they are its input on the device), and those tokens are taken in and
their outputs made while it runs, one step later than without overlap. What a client sees must
not change.

The reference is the same engine with overlap off, the path every other engine test checks.
Each workload mixes what overlap makes subtle: stop strings (found a step late in overlap
mode, after the sequence was scheduled again), stop tokens, max_tokens, min_tokens, top
logprobs, prompt logprobs, forks, cancels, pause/resume and truncate/append, with more
requests than seats so admission waits. Operations fire on what a sequence has sampled (its
output_ids and a token still pending), the same in both modes, never on step counts, which
overlap shifts.
"""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from lockstep.runtime.errors import InvalidRequestError
from lockstep.runtime.sampling_params import SamplingParams
from lockstep.runtime.sequence import FinishReason

PROMPTS = [
    "The lighthouse keeper climbed the stairs one last time and",
    "Three facts about octopuses:",
    "Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker who",
    "Q: What is the boiling point of water at sea level?\nA:",
    "The recipe calls for flour, butter, sugar and",
    "Here are five tips for better sleep. First,",
    "My favourite thing about autumn is",
    "In 1969, the first humans",
]


def drive(engine, requests, actions, use_during_device):
    """Runs requests to the end, applying `actions` (seq index, sampled outputs, what) when a
    sequence has sampled that many outputs. Returns every output, by request order, and the
    ids of sequences made by forks, in the order they were made."""
    seqs = [engine.add_request(prompt, params) for prompt, params in requests]
    outs: dict[int, list] = {s.seq_id: [] for s in seqs}
    pending = list(actions)
    forks = []

    def take(outputs):
        for out in outputs:
            outs.setdefault(out.seq_id, []).append(out)

    steps = 0
    # A paused sequence is no work for the engine: its resume, still pending, keeps the run going
    # (whether anything else is left running when a pause lands depends on chunking, so on timing).
    while engine.has_work() or any(what == "resume" for _, _, what in pending):
        steps += 1
        assert steps < 2000, "the workload did not finish"
        for action in list(pending):
            index, at, what = action
            seq = seqs[index]
            # Sampled tokens count, pending ones too: in overlap mode the latest is taken in only
            # once the next step is launched, or by the operation itself (before it acts).
            if seq.finished or len(seq.output_ids) + seq.num_pending < at:
                continue
            pending.remove(action)
            try:
                apply(engine, seq, index, at, what, pending, forks, outs)
            except InvalidRequestError:
                # Its pending token (taken in by the operation, before it acts) ended it: the
                # reference saw it finished at this count and skipped the action too.
                assert seq.finished, "an operation on a live sequence failed"
        take(engine.step(during_device=take) if use_during_device else engine.step())
    return [outs[s.seq_id] for s in seqs] + [outs[i] for i in forks]


def apply(engine, seq, index: int, at: int, what: str, pending: list, forks: list, outs: dict) -> None:
    """One action of drive()'s on seq (a resume is queued after a pause)."""
    if what == "cancel":
        engine.cancel(seq.seq_id)
    elif what == "fork":
        children = engine.fork(seq.seq_id, 2)
        forks.extend(c.seq_id for c in children)
        for child in children:
            outs[child.seq_id] = []
    elif what == "pause":
        engine.pause(seq.seq_id)
        pending.append((index, at, "resume"))
    elif what == "resume":
        engine.resume(seq.seq_id)
    elif what == "append":  # more input while it generates: prefilled, then it goes on
        engine.append(seq.seq_id, " (as I was saying)")
    elif what == "rewrite":  # a voice turn's barge-in: roll back, say more, answer again
        engine.pause(seq.seq_id)
        engine.truncate(seq.seq_id, seq.num_prompt_tokens + 2)
        engine.append(seq.seq_id, " and then, quite suddenly,")
        engine.commit(seq.seq_id, SamplingParams(temperature=0.8, seed=5, max_tokens=6, ignore_eos=True))
        engine.resume(seq.seq_id)


def summary(outputs):
    """What a client of one request sees: tokens, text, logprobs, top logprobs, how it ended."""
    ends = [o for o in outputs if o.finished]
    assert len(ends) == 1 and outputs[-1] is ends[0], "exactly one terminal output, and nothing after it"
    return ([o.token_id for o in outputs if o.token_id is not None], "".join(o.text for o in outputs),
            [o.logprob for o in outputs if o.token_id is not None],
            [o.top_logprobs for o in outputs if o.token_id is not None], ends[0].finish_reason)


def workload(engine, rng: random.Random):
    """Requests and actions for one random workload. Stop strings and stop tokens are taken from
    what each prompt really produces (one plain run first), so they are hit, not merely set."""
    plain = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True))
    requests = []
    for i, (prompt, result) in enumerate(zip(PROMPTS, plain)):
        kind = rng.choice(["stop_string", "stop_token", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs"])
        params = dict(temperature=0.0, max_tokens=rng.randint(6, 14), ignore_eos=True)
        if kind == "stop_string" and len(result.text) > 8:
            start = rng.randrange(2, len(result.text) - 3)
            params["stop"] = [result.text[start:start + rng.randint(1, 3)]]
            params["max_tokens"] = 14
        elif kind == "stop_token":
            params["stop_token_ids"] = [result.output_ids[rng.randrange(1, len(result.output_ids))]]
            params["max_tokens"] = 14
        elif kind == "min_tokens":
            params.update(min_tokens=3, stop_token_ids=[result.output_ids[1]], temperature=0.8, seed=i)
        elif kind == "logprobs":
            params.update(logprobs=3, temperature=0.7, seed=100 + i)
        elif kind == "prompt_logprobs":
            params.update(prompt_logprobs=2)
        requests.append((prompt, SamplingParams(**params)))
    actions = []
    for index in rng.sample(range(len(PROMPTS)), 4):
        actions.append((index, rng.randint(1, 4), rng.choice(["cancel", "fork", "pause", "rewrite", "append"])))
    return requests, actions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlap_changes_no_output(make_engine, seed: int) -> None:
    rng = random.Random(seed)
    # Six seats for eight requests and their forks: admission waits, and seats free up late in
    # overlap mode (a stop string is found after its sequence was scheduled again).
    config = dict(max_num_seqs=6, prefill_chunk=16, kv_memory_bytes=32 << 20)
    reference_engine = make_engine(overlap="off", **config)
    requests, actions = workload(reference_engine, rng)
    reference = [summary(o) for o in drive(reference_engine, requests, actions, use_during_device=False)]
    for use_during_device in (False, True):
        engine = make_engine(overlap="on", **config)
        assert engine.overlap
        got = [summary(o) for o in drive(engine, requests, actions, use_during_device)]
        assert got == reference, f"overlap mode (during_device={use_during_device}) changed an output"
        assert not engine.seqs and engine.kv.allocator.num_sequences() == 0
    ends = {r[-1] for r in reference}
    assert FinishReason.STOP in ends and FinishReason.LENGTH in ends, f"the workload hit too little: {ends}"


def test_overlap_launches_the_next_step_before_taking_in_a_token(make_engine) -> None:
    """What overlap changes: the next step's forward is launched with a step's sampled token as
    its input before the host takes that token in, and the token's output comes with that next
    step, handed to during_device while its forward runs."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    off, on = make_engine(overlap="off"), make_engine(overlap="on")
    a, b = off.add_request(PROMPTS[0], params), on.add_request(PROMPTS[0], params)
    first = off.step()
    assert [o.token_id for o in first] == [a.output_ids[0]]
    assert on.step() == [] and b.output_ids == [] and b.num_pending == 1, "sampled, not yet taken in"
    run, launched = on.programs.run, []

    def launch(inputs):
        launched.append((list(b.output_ids), int(inputs.token_ids[0])))
        return run(inputs)
    on.programs.run = launch
    during = []
    assert on.step(during_device=during.extend) == []
    assert launched == [([], a.output_ids[0])], "launched before the token was taken in, with it as input"
    assert [o.token_id for o in during] == b.output_ids == a.output_ids[:1] and b.num_pending == 1


def test_overlap_still_ends_every_request_once_when_a_step_raises(make_engine) -> None:
    """In overlap mode tokens wait between steps, not yet taken in, their outputs not made. A step
    that raises while making them (here: the detokenizer) leaves fail_step to end each request
    once, including one its last token had already ended (max_tokens)."""
    engine = make_engine(overlap="on")
    short = engine.add_request(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    long = engine.add_request(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    outputs = engine.step()
    assert outputs == [] and not short.finished and long.num_pending == 1, "sampled, not yet taken in"

    def broken(token):
        raise RuntimeError("detokenizer bug")
    long.detok.push = broken
    with pytest.raises(RuntimeError, match="detokenizer bug"):
        outputs += engine.step()
    outputs += engine.fail_step("RuntimeError: detokenizer bug")
    ends = {o.seq_id: o.finish_reason for o in outputs if o.finished}
    assert sorted(o.seq_id for o in outputs if o.finished) == sorted([short.seq_id, long.seq_id])
    assert ends[long.seq_id] is FinishReason.ERROR and ends[short.seq_id] in (FinishReason.LENGTH, FinishReason.ERROR)
    assert not engine.seqs and engine.kv.allocator.num_sequences() == 0 and not engine.has_work()
    again = engine.generate([PROMPTS[3]], SamplingParams(temperature=0.0, max_tokens=3))[0]
    assert len(again.output_ids) == 3, "the engine serves on"


def tiny_model(tmp_path):
    from tiny_gguf import TinySpec, write_tiny_gguf

    from lockstep.runtime.loader import load_model
    return load_model(write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(), seed=5), quiet=True)


def test_a_sequence_preempted_with_its_token_pending_is_readmitted_from_the_cache(tmp_path) -> None:
    """An arena of a few blocks and two requests with one prompt: the scheduler preempts a batch
    sequence whose sampled token is still pending, and admits it again in the same schedule from
    the prefix cache (its twin published the blocks), so its chunk ends with the pending token.
    Each request's output must be what it is without overlap."""
    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine

    model = tiny_model(tmp_path)
    runs, readmitted = {}, []
    for overlap in ("off", "on"):
        engine = Engine(model, EngineConfig(backend="torch", overlap=overlap, kv_memory_bytes=20 << 10, block_size=4,
                                            calibrate="off"))
        admit = engine.scheduler._admit

        def watched(seq, step, admit=admit, overlap=overlap):
            if overlap == "on" and seq.num_pending:
                readmitted.append(seq.seq_id)
            return admit(seq, step)
        engine.scheduler._admit = watched
        batch = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, latency_class="batch")
        seqs = [engine.add_request(list(range(40, 49)), batch), engine.add_request(list(range(40, 49)), batch),
                engine.add_request([100, 101, 102], replace(batch, latency_class="interactive"))]
        outs = {s.seq_id: [] for s in seqs}
        while engine.has_work():
            for out in engine.step():
                outs[out.seq_id].append((out.token_id, out.finish_reason))
        runs[overlap] = outs
        assert engine.last_error is None, engine.last_error
    assert readmitted, "no sequence was admitted again with its token pending: the test lost its case"
    assert runs["on"] == runs["off"]
    assert all(len(o) == 12 and o[-1][1] is FinishReason.LENGTH for o in runs["on"].values()), runs["on"]


def test_a_failed_step_still_gives_the_tokens_sampled_before_it(tmp_path) -> None:
    """A step that raises before its forward (here: while gathering its inputs) in overlap mode,
    with tokens of the step before still pending, one of them a request's last: fail_step takes
    them in and makes their outputs, so each request ends as it does without overlap (the
    finished one with its last token and LENGTH, the other with an error), exactly once."""
    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine

    model = tiny_model(tmp_path)
    runs = {}
    for overlap in ("off", "on"):
        engine = Engine(model, EngineConfig(backend="torch", overlap=overlap, kv_memory_bytes=1 << 20, calibrate="off"))
        seqs = [engine.add_request([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)),
                engine.add_request([8, 9, 10], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))]
        outputs = []
        for _ in range(3):
            outputs += engine.step()

        def broken(step):
            raise RuntimeError("gather bug")
        engine._gather = broken
        try:
            outputs += engine.step()
        except RuntimeError:
            outputs += engine.fail_step("RuntimeError: gather bug")
        runs[overlap] = [[(o.token_id, o.finish_reason) for o in outputs if o.seq_id == s.seq_id] for s in seqs]
        assert not engine.seqs and engine.kv.allocator.num_sequences() == 0
    off = runs["off"]
    assert off[0][-1][1] is FinishReason.LENGTH and off[1][-1][1] is FinishReason.ERROR, off
    assert runs["on"] == off


class _AsyncDevice:
    """A stand-in asynchronous device for the engine (as bench/host_overhead.py's): a launch
    returns at once, each program kind takes a fixed time once the device is free, and a
    sampling's tokens are ready only when the device has run everything launched before them."""

    SECONDS = {"decode": 0.005, "prefill": 0.025}

    def __init__(self, engine) -> None:
        import torch

        self.free_at = 0.0
        self.logits = torch.randn(engine.ladder.largest_rows, engine.model_config.vocab_size,
                                  generator=torch.Generator().manual_seed(0))

    def run(self, inputs):
        import time

        self.free_at = max(time.perf_counter(), self.free_at) + self.SECONDS[inputs.program.kind]
        return self.logits[:inputs.logit_rows.shape[0]]

    def sample(self, *args, **kwargs):
        from lockstep.runtime.sampler import sample

        return _TokensOnDevice(sample(*args, **kwargs), self.free_at)


class _TokensOnDevice:
    def __init__(self, result, done_at: float) -> None:
        self.token_array, self._result, self._done_at = result.token_array, result, done_at

    def ready(self):
        import time

        while time.perf_counter() < self._done_at:
            pass  # a sync on the device's tokens
        return self._result


def timed_engine(monkeypatch):
    """synthetic:tiny in overlap mode on _AsyncDevice, timing steps as on CUDA; what its cost
    model hears, as (program kind, seconds)."""
    import lockstep.runtime.engine as engine_module
    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine
    from lockstep.runtime.loader import load_model

    engine = Engine(load_model("synthetic:tiny", quiet=True),
                    EngineConfig(max_num_seqs=4, prefill_chunk=32, calibrate="off", overlap="on"))
    device = _AsyncDevice(engine)
    engine.programs.run = device.run
    monkeypatch.setattr(engine_module, "sample", device.sample)
    engine._times_on_resolve = True  # what CUDA sets: the device is asynchronous
    heard = []

    class Recorder:
        def observe(self, program, pairs, seconds):
            heard.append((program.kind, seconds))
    engine.cost_model = Recorder()
    return engine, heard


def test_overlap_times_each_step_on_the_device_not_the_one_before(monkeypatch) -> None:
    """In overlap mode a step's wall time is the previous step's device time (it waits for that
    step's tokens), so the cost model must hear each step's own: from its launch, or the tokens
    before it, to its tokens. A decode beside a chunked prompt switches programs: the first
    prefill after a decode, and the first decode after the prefills, must each get their own
    time (25 ms and 5 ms on the stand-in device), not the other's."""
    engine, heard = timed_engine(monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    first = engine.add_request(list(range(10, 18)), params)
    while len(first.output_ids) < 4:
        engine.step()
    engine.add_request(list(range(100, 260)), params)  # five chunks of 32 beside the decode
    while engine.has_work():
        engine.step()
    kinds = [kind for kind, _ in heard]
    first_prefill, first_decode_after = kinds.index("prefill"), len(kinds) - kinds[::-1].index("prefill")
    assert first_decode_after < len(kinds) and kinds[first_decode_after] == "decode", kinds
    assert heard[first_prefill][1] > 0.015, f"the first prefill heard {heard[first_prefill][1] * 1e3:.1f} ms"
    assert heard[first_decode_after][1] < 0.015, f"the decode after heard {heard[first_decode_after][1] * 1e3:.1f} ms"


def test_a_step_that_samples_nothing_is_not_charged_to_the_next(monkeypatch) -> None:
    """A decode that a stop token ends while a prompt's first chunk runs beside it: that step
    samples nothing (its one sampled row's sequence has ended), so nobody waits for it, and the
    next step's time must not be heard with it inside (two prefills' time, 50 ms)."""
    engine, heard = timed_engine(monkeypatch)
    prompt = list(range(10, 18))
    stop = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))[0].output_ids[0]
    heard.clear()
    decode = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                       stop_token_ids=[stop], min_tokens=5))
    while len(decode.output_ids) < 6:
        engine.step()
    engine.add_request(list(range(100, 164)), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    while engine.has_work():
        engine.step()
    assert decode.finish_reason is FinishReason.STOP
    prefills = [seconds for kind, seconds in heard if kind == "prefill"]
    assert prefills and max(prefills) < 1.5 * _AsyncDevice.SECONDS["prefill"], [round(p * 1e3, 1) for p in prefills]

"""Streaming detokenization: the deltas must add up to what one whole decode gives.

The reference is the tokenizers library decoding the full output at once. Byte-level BPE
decoding has no context, so for the default model the streamed text must equal it exactly,
and no delta may show U+FFFD while a character's bytes are still arriving.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from lockstep.runtime.detokenizer import MOST_HELD_TOKENS, IncrementalDetokenizer
from lockstep.runtime.tokenizer import Tokenizer

FFFD = "\ufffd"
MULTIBYTE_TEXTS = [
    "emoji 😀👍🏽🤖🇫🇷 and families 👨‍👩‍👧‍👦 at the end 🦄",
    "中文测试，你好世界。日本語のテキストです。한국어 텍스트도 있어요.",
    "Café naïve résumé — Ångström façade jalapeño … “quotes” ½ ≤ ∞",
    "Mixed: Привет 😀 мир 中文 ok\n\n🎉🎉🎉 done",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𓀀 ꙮ",
]


@pytest.fixture(scope="module")
def tok(default_model_path: Path) -> Tokenizer:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(default_model_path)
    return Tokenizer.from_gguf_metadata({k: f.contents() for k, f in reader.fields.items()
                                         if not k.startswith("GGUF.")})


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push(t) for t in ids]


def test_stream_equals_whole_decode_for_random_tokens(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for trial in range(150):
        skip = trial % 2 == 0
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 8))]
        outputs = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        outputs += rng.sample(range(17), 2)  # special tokens in the mix
        rng.shuffle(outputs)
        detok = IncrementalDetokenizer(tok, prompt, skip)
        deltas = stream(detok, outputs)
        deltas.append(detok.flush())
        expected = tok.decode(outputs, skip_special_tokens=skip)
        assert "".join(deltas) == expected, (prompt, outputs, skip)
        assert detok.text == expected


def test_multibyte_text_streams_without_replacement_chars(tok: Tokenizer) -> None:
    split_chars = 0
    for text in MULTIBYTE_TEXTS:
        ids = tok.encode(text)
        # The test only means something if characters really are split across tokens.
        split_chars += sum(FFFD in tok.decode([i]) for i in ids)
        for prompt in ([], tok.encode("<|im_start|>assistant\n"), tok.encode("中文")):
            detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True)
            deltas = stream(detok, ids)
            bad = [(i, d) for i, d in enumerate(deltas) if FFFD in d]
            assert not bad, f"U+FFFD emitted mid-character in {text!r}: {bad[:3]}"
            assert detok.flush() == ""
            assert "".join(deltas) == text == detok.text
    assert split_chars > 10


def test_a_split_character_is_held_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("a🦄")
    assert len(ids) >= 3  # "a" plus the unicorn's 4 bytes in several tokens
    detok = IncrementalDetokenizer(tok, [])
    deltas = stream(detok, ids)
    assert deltas[0] == "a"
    assert all(d == "" for d in deltas[1:-1])
    assert deltas[-1] == "🦄"


def test_flush_emits_an_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🦄")[:-1]  # the last byte never comes
    detok = IncrementalDetokenizer(tok, [])
    shown = "".join(stream(detok, ids))
    assert shown.startswith("ok") and FFFD not in shown
    tail = detok.flush()
    assert tail.endswith(FFFD) and shown + tail == tok.decode(ids)
    assert detok.flush() == ""


def test_special_tokens_follow_skip_flag(tok: Tokenizer) -> None:
    ids = tok.encode("Hi<|im_end|> there")
    assert 2 in ids
    skipped = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(stream(skipped, ids)) == "Hi there"
    assert "".join(stream(kept, ids)) == "Hi<|im_end|> there"


def test_clone_is_independent(tok: Tokenizer) -> None:
    common, left, right = tok.encode("Once upon 🦄"), tok.encode(" a time 中文"), tok.encode(" the end 😀")
    cut = len(common) - 1  # fork with the unicorn's last byte still missing
    parent = IncrementalDetokenizer(tok, [])
    stream(parent, common[:cut])
    child = parent.clone()
    tail = common[cut:]
    a = stream(parent, tail + left)
    b = stream(child, tail + right)
    assert parent.text == tok.decode(common + left)
    assert child.text == tok.decode(common + right)
    assert "".join(a) != "".join(b)


def test_truncate_then_push_matches_a_fresh_detokenizer(tok: Tokenizer) -> None:
    rng = random.Random(1)
    texts = MULTIBYTE_TEXTS + ["plain ascii text, with some words and 12345 numbers."]
    for trial in range(60):
        text = texts[trial % len(texts)]
        ids = tok.encode(text)
        extra = tok.encode(rng.choice(MULTIBYTE_TEXTS))[: rng.randint(1, 12)]
        keep = rng.randint(0, len(ids))
        skip = rng.random() < 0.5
        prompt = tok.encode("<|im_start|>assistant\n")

        detok = IncrementalDetokenizer(tok, prompt, skip)
        stream(detok, ids)
        if trial % 3 == 0:
            detok.flush()  # truncation forgets a flush too
        detok.truncate(keep)
        after = stream(detok, extra)

        fresh = IncrementalDetokenizer(tok, prompt, skip)
        before_fresh = stream(fresh, ids[:keep])
        assert detok.num_outputs == keep + len(extra)
        assert after == stream(fresh, extra), (text, keep, extra)
        assert detok.text == fresh.text == "".join(before_fresh) + "".join(after)
        assert detok.flush() == fresh.flush()


def test_truncate_rejects_out_of_range(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [])
    stream(detok, tok.encode("abc"))
    with pytest.raises(ValueError):
        detok.truncate(detok.num_outputs + 1)
    detok.truncate(0)
    assert detok.text == "" and detok.num_outputs == 0


class _CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call from Python gets."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.backend = inner.backend  # what DecodeStream steps with, in Rust
        self.sizes: list[int] = []

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_per_token_work_does_not_grow_with_the_output(tok: Tokenizer) -> None:
    text = " ".join(["The quick brown fox jumps over the lazy dog 😀 中文."] * 40)
    ids = tok.encode(text)
    counting = _CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, tok.encode("a prompt of several tokens here"))  # type: ignore[arg-type]
    assert "".join(stream(detok, ids)) == text
    assert len(ids) > 400
    # Pushing runs in DecodeStream (Rust): Python decodes only to set the stream up.
    assert len(counting.sizes) <= 2, f"{len(counting.sizes)} decodes from Python for {len(ids)} pushes"
    detok.truncate(len(ids) - 3)  # rebuilding the stream decodes a window, not the output
    detok.flush()
    assert max(counting.sizes) <= 12, f"a decode saw {max(counting.sizes)} tokens; the window should stay small"


class WindowReference:
    """The windowed two-decode algorithm written plainly (vLLM's, from the module docstring),
    with no stream: what IncrementalDetokenizer must match delta for delta."""

    def __init__(self, tok: Tokenizer, prompt: list[int], skip: bool) -> None:
        self.tok, self.skip = tok, skip
        context = prompt[-5:]
        if context and self.decode(context).endswith(FFFD):
            context = []
        self.ids, self.num_context, self.prefix, self.read, self.text = list(context), len(context), 0, len(context), ""
        self.marks: list[tuple[int, int, int]] = []

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before, after = self.decode(self.ids[self.prefix:self.read]), self.decode(self.ids[self.prefix:])
        delta = ""
        if len(after) > len(before) and not after.endswith(FFFD):
            delta = after[len(before):]
            self.prefix, self.read, self.text = self.read, len(self.ids), self.text + delta
        elif len(self.ids) - self.read > MOST_HELD_TOKENS:
            delta = self.flush()  # what is held can never become a character: out it goes
        self.marks.append((self.prefix, self.read, len(self.text)))
        return delta

    def flush(self) -> str:
        if self.read == len(self.ids):
            return ""
        delta = self.decode(self.ids[self.prefix:])[len(self.decode(self.ids[self.prefix:self.read])):]
        self.prefix, self.read, self.text = self.read, len(self.ids), self.text + delta
        return delta

    def truncate(self, n: int) -> None:
        del self.ids[self.num_context + n:], self.marks[n:]
        self.prefix, self.read, length = self.marks[-1] if n else (0, self.num_context, 0)
        self.text = self.text[:length]


def test_random_pushes_flushes_truncates_and_clones_match_the_plain_algorithm(tok: Tokenizer) -> None:
    """Every delta equals the plain algorithm's, through flushes mid-character (where the stream
    must hand over to decodes from Python and come back), truncations and clones."""
    rng = random.Random(2)
    pieces = [tok.encode(t) for t in MULTIBYTE_TEXTS] + [tok.encode("plain words 42 and <|im_end|> tokens")]
    for trial in range(40):
        skip = trial % 2 == 0
        prompt = rng.choice(pieces)[: rng.randint(0, 9)]
        detok, ref = IncrementalDetokenizer(tok, prompt, skip), WindowReference(tok, prompt, skip)
        for _ in range(60):
            op = rng.random()
            if op < 0.75:
                token = rng.choice(rng.choice(pieces)) if rng.random() < 0.8 else rng.randrange(tok.vocab_size)
                assert detok.push(token) == ref.push(token), (trial, prompt, ref.ids)
            elif op < 0.85:
                assert detok.flush() == ref.flush()
            elif op < 0.95:
                keep = rng.randint(0, detok.num_outputs)
                detok.truncate(keep)
                ref.truncate(keep)
            else:
                detok = detok.clone()  # the original is dropped; the clone must carry on alike
            # The text's end as a step reads it, from its pieces (reading `text` joins them, so
            # only now and then, or the pieces would always be one).
            start = rng.randint(0, len(ref.text) + 2)
            assert detok.length == len(ref.text)
            assert detok.tail(start) == ref.text[start:] and detok.tail(0) == ref.text
            if rng.random() < 0.2:
                assert detok.text == ref.text


def test_stray_bytes_come_out_as_replacement_characters_at_a_bounded_cost(tok: Tokenizer) -> None:
    """A run of UTF-8 continuation bytes never completes a character. The detokenizer lets it out
    as U+FFFD instead of holding it, so no push decodes more than a few tokens."""
    continuation = next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == b"\x8f")  # a lone UTF-8 tail byte
    assert tok.decode([continuation]) == FFFD
    counting = _CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, [])  # type: ignore[arg-type]
    stray = [continuation] * 200
    deltas = stream(detok, stray) + [detok.flush()]
    assert "".join(deltas) == detok.text == tok.decode(stray)
    assert sum(1 for d in deltas if d) >= len(stray) // (MOST_HELD_TOKENS + 1)
    assert max(counting.sizes) <= 2 * (MOST_HELD_TOKENS + 1), f"a decode saw {max(counting.sizes)} tokens"
    detok.truncate(150)
    assert detok.text == "".join(deltas[:150]) and detok.push(tok.encode("a")[0]).endswith("a")


def test_the_text_end_reads_right_across_joins_of_its_pieces(tok: Tokenizer) -> None:
    """A long output: the text's pieces are joined every MOST_PIECES, and tail() (what a step
    reads) must give the text's end whether it lies in the joined part, across it, or after."""
    from lockstep.runtime.detokenizer import MOST_PIECES

    rng = random.Random(4)
    ids = tok.encode(" ".join(MULTIBYTE_TEXTS) * 6)
    assert len(ids) > 2 * MOST_PIECES
    detok, whole = IncrementalDetokenizer(tok, []), ""
    for token in ids:
        whole += detok.push(token)
        assert detok.length == len(whole) and len(detok._pieces) <= MOST_PIECES
        for start in (len(whole) - rng.randint(0, 40), rng.randint(0, len(whole)), 0):
            assert detok.tail(max(0, start)) == whole[max(0, start):]
    assert detok.text + detok.flush() == tok.decode(ids)

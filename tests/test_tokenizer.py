"""The tokenizer and chat template, checked against HF transformers loading the same GGUF.

transformers builds its tokenizer from the GGUF with its own converter, so agreement here means
two independent readings of the file agree. Where they differ on purpose (SmolLM's digit split,
below) the test says why and checks lockstep against llama.cpp's rule instead.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from lockstep.runtime.chat_template import CHATML_TEMPLATE, render_chat
from lockstep.runtime.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from lockstep.runtime.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>"]
FIXED_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))  # 5\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "3.14159 2024-01-31 1,000,000 -42 0x1F 1e-9",
    "    leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\ttabs",
    "line\n\nbreaks\r\nand\rcarriage",
    " \n \n\n   \t ",
    "It's we'll they're I'M you'VE",
    "Café naïve résumé Ångström façade jalapeño",
    "Straße Ærøskøbing Œuvre",
    "Привет, мир! Γειά σου Κόσμε",
    "中文测试，你好世界。日本語のテキスト。한국어 텍스트",
    "emoji: 😀👍🏽🤖🇫🇷 👨‍👩‍👧‍👦",
    "math: ∑ x² ≤ ∞, ½ ≠ ⅓ — “quotes” … ‘single’",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name>name",
    "<|im_start|",  # not quite a special token
    "a",
    " ",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth",
    "A\u030angstrom (decomposed) vs \u00c5",
]
_POOL = (list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789") + list(" \n\t.,;:'\"!?()[]{}<>-_=+*/\\|@#$%^&~`")
         + ["  ", "\n\n", "   ", "'s", "'ll", "'RE", "é", "ü", "ñ", "ß", "中", "文", "日本", "한", "😀", "👍🏽",
            "🤖", "€", "—", "…", "\u00a0", "\r\n", " 123", "4567", "ﬁ", "Å", "A\u030a"] + SPECIAL)


def random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_POOL) for _ in range(rng.randint(1, 40))) for _ in range(n)]


STRINGS = FIXED_STRINGS + random_strings(200, seed=0)

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another, in 中文 please 😀"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "{\"a\": 1}"},
     {"role": "assistant", "content": "{\"b\": 2}"}, {"role": "user", "content": "  spaces\n\nand lines  "}],
]


# --- fixtures: the GGUF is parsed once, transformers' tokenizer built once ------------------------

@pytest.fixture(scope="session")
def gguf_meta(default_model_path: Path) -> dict:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(default_model_path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="session")
def tok(gguf_meta: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_meta)


@pytest.fixture(scope="session")
def hf_tok(default_model_path: Path):
    return transformers.AutoTokenizer.from_pretrained(default_model_path.parent, gguf_file=default_model_path.name)


@pytest.fixture(scope="session")
def hf_smollm_tok(hf_tok):
    """transformers' GGUF tokenizer with SmolLM2's own pre-tokenizer restored.

    transformers' converter gives every 'gpt2' GGUF GPT-2's split rules and ignores
    tokenizer.ggml.pre = 'smollm'. SmolLM2's tokenizer.json (a StarCoder tokenizer) first splits
    off every digit, and llama.cpp does the same for 'smollm'; so does lockstep. The two rules
    differ only on whitespace before a digit ("  1" -> "ĠĠ","1" vs "Ġ","Ġ","1"). Vocabulary,
    merges and special tokens stay transformers' own.
    """
    from tokenizers import pre_tokenizers

    backend = tokenizers.Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return backend


def _hf_gguf_converter():
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                            convert_gguf_tokenizer)
    except ImportError:
        pytest.skip("this transformers version has no gguf_tokenizer_mapping.convert_gguf_tokenizer")

    def convert(meta: dict):
        names = GGUF_TOKENIZER_MAPPING["tokenizer"]
        tokenizer_dict = {name: meta[f"tokenizer.{key}"] for key, name in names.items() if f"tokenizer.{key}" in meta}
        backend, _ = convert_gguf_tokenizer("llama", tokenizer_dict)
        return backend

    return convert


def _report(mismatches: list, what: str) -> str:
    shown = "\n".join(f"  {m!r}" for m in mismatches[:5])
    return f"{len(mismatches)} {what} differ; first ones:\n{shown}"


# --- the default model ----------------------------------------------------------------------------

def test_model_facts(tok: Tokenizer, gguf_meta: dict) -> None:
    assert tok.vocab_size == 49152 == len(gguf_meta["tokenizer.ggml.tokens"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.kind == "byte_level"
    assert tok.special_ids == frozenset(range(17))  # the 17 control tokens
    assert 2 in tok.stop_ids
    # <|endoftext|> is neither EOS nor EOT in this file, and the template never writes it.
    assert tok.stop_ids == frozenset({2})
    assert gguf_meta["tokenizer.ggml.add_bos_token"] is False and tok.add_bos is False
    assert tok.chat_template == gguf_meta["tokenizer.chat_template"]


def test_encode_matches_transformers(tok: Tokenizer, hf_smollm_tok) -> None:
    bad = [(s, tok.encode(s), ref) for s in STRINGS
           if tok.encode(s) != (ref := hf_smollm_tok.encode(s, add_special_tokens=False).ids)]
    assert not bad, _report(bad, "encodings (text, lockstep, transformers)")


def test_encode_default_bos_matches_transformers(tok: Tokenizer, hf_tok) -> None:
    # No digits after whitespace here, so transformers' unmodified tokenizer applies.
    for text in ["Hello, world!", "<|im_start|>user\nhi<|im_end|>", "Café 中文 😀"]:
        assert tok.encode(text) == hf_tok.encode(text)  # add_bos=None: the model's default (none)
        assert tok.encode(text, add_bos=True) == [1] + hf_tok.encode(text)
        assert tok.encode(text, add_bos=False) == hf_tok.encode(text, add_special_tokens=False)


def test_smollm_splits_digits_like_llama_cpp(tok: Tokenizer) -> None:
    """llama.cpp's 'smollm' rule: split off each digit (\\p{N}), then GPT-2's regex on the rest."""
    pieces = lambda text: [tok.backend.id_to_token(i) for i in tok.encode(text)]  # noqa: E731
    assert pieces("12345") == ["1", "2", "3", "4", "5"]
    assert pieces("\n 1") == ["ĊĠ", "1"]  # GPT-2's regex alone gives "Ċ", "Ġ", "1"
    assert pieces("x  42") == ["x", "ĠĠ", "4", "2"]
    assert pieces("v2 rules") == ["v", "2", "Ġrules"]


def test_special_tokens_are_matched_whole(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    assert 1 not in tok.encode("<|im_start|")


def test_decode_round_trips(tok: Tokenizer) -> None:
    bad = [(s, tok.decode(tok.encode(s), skip_special_tokens=False)) for s in STRINGS
           if tok.decode(tok.encode(s), skip_special_tokens=False) != s]
    assert not bad, _report(bad, "round trips (text, decoded)")


def test_decode_matches_transformers(tok: Tokenizer, hf_tok) -> None:
    rng = random.Random(1)
    bad = []
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        ids += rng.sample(range(17), 2)  # make sure special tokens are in the mix
        rng.shuffle(ids)
        for skip in (True, False):
            ours, ref = tok.decode(ids, skip_special_tokens=skip), hf_tok.decode(ids, skip_special_tokens=skip)
            if ours != ref:
                bad.append((ids, skip, ours, ref))
    assert not bad, _report(bad, "decodes (ids, skip, lockstep, transformers)")


def test_token_bytes_spell_the_decode(tok: Tokenizer) -> None:
    """Joining each token's bytes must give what the whole-sequence decode gives."""
    rng = random.Random(2)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 20))]
        joined = b"".join(tok.token_bytes(i) for i in ids)
        assert joined.decode("utf-8", errors="replace") == tok.decode(ids, skip_special_tokens=False), ids
    assert tok.token_text(tok.encode(" hello")[0]) == " hello"
    assert tok.token_text(2) == "<|im_end|>"


def test_chat_template_matches_transformers(tok: Tokenizer, hf_tok) -> None:
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
            ref = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours == ref, (messages, gen)
    # The engine tokenizes the rendered prompt without BOS; it must equal transformers' ids.
    prompt = tok.apply_chat_template(CONVERSATIONS[0])
    assert tok.encode(prompt, add_bos=False) == hf_tok.apply_chat_template(
        CONVERSATIONS[0], tokenize=True, add_generation_prompt=True, return_dict=False)


def test_json_round_trip(tok: Tokenizer) -> None:
    tokenizer_json, info = tok.to_json()
    info = json.loads(json.dumps(info))  # the loader stores it as JSON
    start = time.perf_counter()
    again = Tokenizer.from_json(tokenizer_json, info)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"from_json took {elapsed:.2f} s; it is on the start-up path"
    for attr in ("vocab_size", "bos_id", "eos_id", "pad_id", "unk_id", "add_bos", "chat_template", "stop_ids",
                 "kind", "special_ids"):
        assert getattr(again, attr) == getattr(tok, attr), attr
    assert [again.encode(s) for s in STRINGS] == [tok.encode(s) for s in STRINGS]
    ids = list(range(0, tok.vocab_size, 97))
    assert again.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)
    with pytest.raises(ModelLoadError, match="format"):
        Tokenizer.from_json(tokenizer_json, dict(info, version=0))


# --- other GGUF tokenizer shapes ----------------------------------------------------------------

@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_pre_tokenizers_match_transformers(gguf_meta: dict, pre: str) -> None:
    """The split regexes for other pre-tokenizer names, on SmolLM's vocabulary, against transformers'."""
    convert = _hf_gguf_converter()
    meta = dict(gguf_meta, **{"tokenizer.ggml.pre": pre})
    ours, ref = Tokenizer.from_gguf_metadata(meta), convert(meta)
    plain = [s for s in STRINGS if "<" not in s]
    bad = [s for s in plain if ours.backend.pre_tokenizer.pre_tokenize_str(s) != ref.pre_tokenizer.pre_tokenize_str(s)]
    assert not bad, _report(bad, f"{pre} pre-tokenizations")
    if pre != "llama-bpe":  # Llama 3 also skips merges for whole-vocabulary words; transformers does not
        bad = [s for s in STRINGS if ours.encode(s) != ref.encode(s, add_special_tokens=False).ids]
        assert not bad, _report(bad, f"{pre} encodings")
    assert ours.add_bos is False  # the file says so, whatever llama.cpp's default for the family


def test_llama3_defaults_to_bos_without_a_flag(gguf_meta: dict) -> None:
    meta = {k: v for k, v in gguf_meta.items() if k != "tokenizer.ggml.add_bos_token"}
    meta["tokenizer.ggml.pre"] = "llama-bpe"
    assert Tokenizer.from_gguf_metadata(meta).add_bos is True  # llama.cpp's default for Llama 3
    meta["tokenizer.ggml.pre"] = "smollm"
    assert Tokenizer.from_gguf_metadata(meta).add_bos is False


def _sentencepiece_meta(gguf_meta: dict) -> dict:
    """A SentencePiece-style GGUF vocabulary made from SmolLM's: ▁ for space, byte tokens, scores."""
    from lockstep.runtime.tokenizer import _CHAR_TO_BYTE

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    seen = set(tokens)
    for t in gguf_meta["tokenizer.ggml.tokens"][17:]:
        try:
            text = bytes(_CHAR_TO_BYTE[c] for c in t).decode()
        except UnicodeDecodeError:
            continue
        text = text.replace(" ", "\u2581")
        if text not in seen and "\n" not in text:
            seen.add(text)
            tokens.append(text)
            types.append(1)
    tokens.append("<|user|>")
    types.append(4)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


def test_sentencepiece_gguf_matches_transformers(gguf_meta: dict) -> None:
    convert = _hf_gguf_converter()
    meta = _sentencepiece_meta(gguf_meta)
    ours, ref = Tokenizer.from_gguf_metadata(meta), convert(meta)
    assert ours.kind == "sentencepiece" and ours.add_bos is True  # no flag: llama.cpp adds BOS for SPM
    strings = STRINGS + ["<s>Hi", " Hello", "<|user|> hi", "\n\nx"]
    bad = [s for s in strings if ours.encode(s, add_bos=False) != ref.encode(s, add_special_tokens=False).ids]
    assert not bad, _report(bad, "SentencePiece encodings")
    assert ours.encode("Hello")[0] == 1
    rng = random.Random(3)
    for _ in range(100):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 20))]
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), (ids, skip)
    assert ours.token_text(ours.encode(" world", add_bos=False)[-1]) == " world"
    assert ours.token_bytes(meta["tokenizer.ggml.tokens"].index("<0x0A>")) == b"\n"


def test_added_tokens_outside_the_byte_alphabet(gguf_meta: dict) -> None:
    """Added tokens are stored as raw text; one with characters GPT-2's byte alphabet lacks
    (DeepSeek's full-width markers, a user-defined run of spaces) must still keep its id."""
    tokens = list(gguf_meta["tokenizer.ggml.tokens"])
    types = list(gguf_meta["tokenizer.ggml.token_type"])
    tokens[3], tokens[4], types[4] = "<｜User｜>", "<think> </think>", 4
    tok = Tokenizer.from_gguf_metadata(dict(gguf_meta, **{"tokenizer.ggml.tokens": tokens,
                                                          "tokenizer.ggml.token_type": types}))
    assert tok.vocab_size == len(tokens)
    assert tok.encode("<｜User｜>hi<think> </think>") == [3, tok.encode("hi")[0], 4]
    assert tok.decode([3, 4], skip_special_tokens=False) == "<｜User｜><think> </think>"
    assert tok.decode([3, 4]) == "<think> </think>"  # user-defined tokens are not special
    assert tok.token_text(3) == "<｜User｜>"


def test_stop_ids_follow_metadata_and_template(gguf_meta: dict) -> None:
    writes_endoftext = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    tok = Tokenizer.from_gguf_metadata(dict(gguf_meta, **{"tokenizer.chat_template": writes_endoftext}))
    assert tok.stop_ids == {2}  # <|endoftext|> only stops when the metadata makes it EOS/EOT
    tok = Tokenizer.from_gguf_metadata(dict(gguf_meta, **{"tokenizer.ggml.eot_token_id": 0}))
    assert tok.stop_ids == {0, 2}
    meta = dict(gguf_meta, **{"tokenizer.ggml.eos_token_id": 0})
    assert Tokenizer.from_gguf_metadata(meta).stop_ids == {0, 2}  # <|im_end|> is the template's end of turn
    del meta["tokenizer.chat_template"]
    assert Tokenizer.from_gguf_metadata(meta).stop_ids == {0, 2}  # ...and the ChatML fallback's


def test_unsupported_or_broken_tokenizers_fail_clearly(gguf_meta: dict) -> None:
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        Tokenizer.from_gguf_metadata(dict(gguf_meta, **{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(UnsupportedModelError, match="'made-up'"):
        Tokenizer.from_gguf_metadata(dict(gguf_meta, **{"tokenizer.ggml.pre": "made-up"}))
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"})
    with pytest.raises(ModelLoadError, match="token types"):
        Tokenizer.from_gguf_metadata(dict(gguf_meta, **{"tokenizer.ggml.token_type": [1, 1]}))
    broken = list(gguf_meta["tokenizer.ggml.merges"])
    broken[5] = "nota merge"
    with pytest.raises(ModelLoadError):
        Tokenizer.from_gguf_metadata(dict(gguf_meta, **{"tokenizer.ggml.merges": broken + ["x y z"]}))


# --- HF directories -----------------------------------------------------------------------------

def test_from_hf_dir_matches_transformers(hf_tok, tmp_path: Path) -> None:
    hf_tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours = Tokenizer.from_hf_dir(tmp_path)
    assert (ours.bos_id, ours.eos_id, ours.add_bos, ours.kind) == (1, 2, False, "byte_level")
    assert ours.stop_ids == frozenset({0, 2})
    bad = [s for s in STRINGS if ours.encode(s) != hf_tok.encode(s)]
    assert not bad, _report(bad, "HF-directory encodings")
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages) == hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path / "missing")


# --- chat templates -----------------------------------------------------------------------------

def test_chatml_fallback_when_the_model_has_none() -> None:
    text = render_chat(None, CONVERSATIONS[2], bos_token=None, eos_token=None)
    assert text == ("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"
                    "<|im_start|>user\nAnother, in 中文 please 😀<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(CHATML_TEMPLATE, CONVERSATIONS[1], bos_token=None, eos_token=None,
                       add_generation_prompt=False) == "<|im_start|>user\nHello!<|im_end|>\n"


def test_template_environment_is_like_transformers() -> None:
    template = ("{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
                "{{ tools is none }}|{{ strftime_now('%Y') | length }}|{{ extra_var }}")
    out = render_chat(template, [{"role": "user", "content": "<a & 'b'> ü"}, {"role": "user", "content": "x"}],
                      bos_token="<s>", eos_token="</s>", extra_var=7)
    assert out == '<s>{"role": "user", "content": "<a & \'b\'> ü"}True|4|7'


LLAMA3_STYLE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = "" %}
{%- endif %}
<|start_header_id|>system<|end_header_id|>

{{ system }}<|eot_id|>
{% for message in messages %}
    {% if message['role'] == 'user' %}
<|start_header_id|>user<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
    {% else %}
<|start_header_id|>assistant<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}
"""


def test_whitespace_control_matches_transformers(hf_tok) -> None:
    """trim_blocks / lstrip_blocks decide the newlines of indented, multi-line templates."""
    for messages in CONVERSATIONS:
        ours = render_chat(LLAMA3_STYLE, messages, bos_token="<|im_start|>", eos_token="<|im_end|>")
        ref = hf_tok.apply_chat_template(messages, chat_template=LLAMA3_STYLE, tokenize=False,
                                         add_generation_prompt=True)
        assert ours == ref


@pytest.mark.parametrize("messages, needle", [
    ("hello", "must be a list"),
    ([], "must not be empty"),
    ([{"content": "hi"}], r"messages\[0\].role"),
    ([{"role": "user", "content": None}], r"messages\[0\].content"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], r"messages\[0\].content"),
    (["hi"], r"messages\[0\] must be an object"),
])
def test_bad_messages_are_rejected(messages, needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        render_chat(CHATML_TEMPLATE, messages, bos_token=None, eos_token=None)


def test_template_failures_become_request_errors() -> None:
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", user, bos_token=None, eos_token=None)
    with pytest.raises(InvalidRequestError, match="does not parse"):
        render_chat("{% for %}", user, bos_token=None, eos_token=None)
    with pytest.raises(InvalidRequestError, match="TypeError"):
        render_chat("{{ messages[0]['content'] + 1 }}", user, bos_token=None, eos_token=None)
    with pytest.raises(InvalidRequestError):  # the sandbox refuses mutation
        render_chat("{{ messages.append(1) }}", user, bos_token=None, eos_token=None)

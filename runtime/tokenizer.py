"""Text to token ids and back, plus the chat template, for GGUF files and HF directories.

All tokenization runs in the `tokenizers` library. A GGUF carries no tokenizer.json, only
llama.cpp's description of one (vocabulary, merges, token types, a pre-tokenizer name), so
`from_gguf_metadata` rebuilds the tokenizers pipeline that description stands for, as llama.cpp
and transformers' GGUF converter read it:

- tokenizer.ggml.model "gpt2": byte-level BPE. tokenizer.ggml.pre picks the split regex.
- tokenizer.ggml.model "llama": SentencePiece BPE with byte fallback, merges recovered from the
  token scores when the file has none.

Building that takes ~0.1-0.5 s, so the GGUF loader caches the result as JSON (`to_json`) and
later starts from it (`from_json`), which only deserialises.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from .chat_template import CHATML_TEMPLATE, render_chat
from .errors import LockstepError, ModelLoadError, UnsupportedModelError

log = logging.getLogger(__name__)

JSON_VERSION = 1

# llama.cpp's token types (llama_token_type / gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Split regexes, from the models' own tokenizer.json files (llama.cpp carries the same ones).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> how text is split before BPE, grouped as llama.cpp groups them.
#   gpt2:        GPT-2's regex (built into ByteLevel).
#   digits+gpt2: every digit alone, then GPT-2's regex (StarCoder-derived vocabularies, SmolLM).
#   llama3:      Llama 3's regex; a word already in the vocabulary is not merged ("ignore_merges").
#   qwen2:       Qwen2's regex (single digits).
_PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "default"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"),
                    "digits+gpt2"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), "llama3"),
    **dict.fromkeys(("smaug-bpe", "dbrx"), "llama3-regex"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), "qwen2"),
}

# Tokens that close a turn in common chat formats. One that the chat template writes (and the
# vocabulary has as a special token) ends generation along with EOS. <|endoftext|> is not here:
# it stops generation only where the metadata names it EOS or EOT.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                "<|END_OF_TURN_TOKEN|>", "<|end_of_turn|>")

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


_BYTE_TO_CHAR = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the facts about it a runtime needs.

    Attributes: vocab_size, bos_id / eos_id / pad_id / unk_id (None when the model has none),
    add_bos (whether encode() adds BOS by default), chat_template (None: ChatML fallback),
    stop_ids (ids that end generation: EOS, EOT and the template's end-of-turn tokens),
    kind ("byte_level", "sentencepiece" or "other": how a token's bytes are spelled).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, kind: str, vocab_size: int, bos_id: int | None,
                 eos_id: int | None, pad_id: int | None = None, unk_id: int | None = None,
                 add_bos: bool = False, chat_template: str | None = None,
                 stop_ids: Iterable[int] = ()) -> None:
        self._backend = backend
        self.kind = kind
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.unk_id = unk_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.stop_ids = frozenset(stop_ids)
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._added_ids = frozenset(added)
        self._token_bytes: dict[int, bytes] = {}

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Builds the tokenizer a GGUF describes (its metadata as {key: field.contents()})."""
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or not tokens:
            raise ModelLoadError("the GGUF has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
        types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise ModelLoadError(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types")

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            if not 0 <= int(value) < len(tokens):
                log.warning("GGUF tokenizer.ggml.%s = %s is outside the vocabulary; ignoring it", key, value)
                return None
            return int(value)

        if model not in ("gpt2", "llama"):
            raise UnsupportedModelError(
                f"GGUF tokenizer model {model!r} is not supported; lockstep reads 'gpt2' (byte-level BPE) "
                f"and 'llama' (SentencePiece) tokenizers"
            )
        try:
            if model == "gpt2":
                backend, default_bos = _byte_level_bpe(tokens, types, meta.get("tokenizer.ggml.merges"),
                                                       meta.get("tokenizer.ggml.pre"))
                kind = "byte_level"
            else:
                add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
                backend = _sentencepiece_bpe(tokens, types, meta.get("tokenizer.ggml.scores"),
                                             meta.get("tokenizer.ggml.merges"), token_id("unknown_token_id"),
                                             add_space_prefix)
                default_bos, kind = True, "sentencepiece"  # llama.cpp's default for SentencePiece vocabularies
        except LockstepError:
            raise
        except Exception as exc:  # tokenizers reports bad vocabularies/merges as plain Exception
            raise ModelLoadError(f"the GGUF's tokenizer is malformed: {exc}") from None

        bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
        template = meta.get("tokenizer.chat_template")
        stops = {i for i in (eos_id, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None}
        stops |= _template_stops(template, {tokens[i]: i for i, t in enumerate(types) if t == _CONTROL})
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        return cls(backend, kind=kind, vocab_size=len(tokens), bos_id=bos_id, eos_id=eos_id,
                   pad_id=token_id("padding_token_id"), unk_id=token_id("unknown_token_id"),
                   add_bos=default_bos if add_bos is None else bool(add_bos),
                   chat_template=str(template) if template else None, stop_ids=stops)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Loads tokenizer.json, with tokenizer_config.json (template, BOS/EOS, add_bos_token),
        chat_template.jinja / chat_template.json and generation_config.json (extra EOS ids) when present."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(f"{path}: no tokenizer.json (lockstep needs the 'fast' tokenizer file)")
        try:
            raw = file.read_text(encoding="utf-8")
            backend = tokenizers.Tokenizer.from_str(raw)
        except Exception as exc:  # tokenizers raises plain Exception for malformed files
            raise ModelLoadError(f"{file}: unreadable tokenizer ({exc})") from None
        kind = _kind_of_decoder(json.loads(raw).get("decoder"))
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")

        def special(name: str) -> int | None:
            value = config.get(name, special_map.get(name))
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos_id, eos_id = special("bos_token"), special("eos_token")
        template = _hf_chat_template(path, config)
        stops = {eos_id} if eos_id is not None else set()
        for extra in (_read_json(path / "generation_config.json"), _read_json(path / "config.json")):
            ids = extra.get("eos_token_id")
            stops.update(int(i) for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int))
        added = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        stops |= _template_stops(template, added)

        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # No flag: add BOS exactly when the tokenizer's own post-processor would.
            with_special = backend.encode("a", add_special_tokens=True).ids
            plain = backend.encode("a", add_special_tokens=False).ids
            add_bos = bos_id is not None and len(with_special) > len(plain) and with_special[0] == bos_id
        return cls(backend, kind=kind, vocab_size=backend.get_vocab_size(with_added_tokens=True),
                   bos_id=bos_id, eos_id=eos_id, pad_id=special("pad_token"), unk_id=special("unk_token"),
                   add_bos=bool(add_bos), chat_template=template, stop_ids=stops)

    def to_json(self) -> tuple[str, dict[str, Any]]:
        """(the tokenizers pipeline as JSON, the rest as a JSON-safe dict); `from_json` inverts it."""
        info = {
            "version": JSON_VERSION, "kind": self.kind, "vocab_size": self.vocab_size,
            "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "unk_id": self.unk_id,
            "add_bos": self.add_bos, "chat_template": self.chat_template, "stop_ids": sorted(self.stop_ids),
        }
        return self._backend.to_str(), info

    @classmethod
    def from_json(cls, tokenizer_json: str, info: dict[str, Any]) -> Tokenizer:
        """Rebuilds a tokenizer saved by `to_json` (fast: no vocabulary processing)."""
        if info.get("version") != JSON_VERSION:
            raise ModelLoadError(f"cached tokenizer has format {info.get('version')!r}, expected {JSON_VERSION}; "
                                 f"delete lockstep's index cache to rebuild it")
        try:
            backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises plain Exception
            raise ModelLoadError(f"cached tokenizer is unreadable ({exc})") from None
        return cls(backend, kind=info["kind"], vocab_size=info["vocab_size"], bos_id=info["bos_id"],
                   eos_id=info["eos_id"], pad_id=info["pad_id"], unk_id=info["unk_id"], add_bos=info["add_bos"],
                   chat_template=info["chat_template"], stop_ids=info["stop_ids"])

    # --- use ------------------------------------------------------------------------------------

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self._backend.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self._backend.id_to_token(self.eos_id)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (read-only use)."""
        return self._backend

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. Special-token strings in it (e.g. "<|im_start|>") become their ids.

        add_bos=None follows the model (GGUF tokenizer.ggml.add_bos_token; HF add_bos_token or the
        tokenizer's post-processor). Nothing else is ever added (no EOS).
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that do not form valid UTF-8 become U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (e.g. for OpenAI logprobs' `bytes`)."""
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        if token_id in self._added_ids:
            out = piece.encode()
        elif self.kind == "byte_level" and all(c in _CHAR_TO_BYTE for c in piece):
            out = bytes(_CHAR_TO_BYTE[c] for c in piece)
        elif self.kind == "sentencepiece":
            byte = _BYTE_TOKEN.fullmatch(piece)
            out = bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()
        else:
            out = self._backend.decode([token_id], skip_special_tokens=False).encode()
        self._token_bytes[token_id] = out
        return out

    def token_text(self, token_id: int) -> str:
        """One token's text, leading space kept; a partial UTF-8 character shows as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """The prompt text for a chat, rendered with the model's template (ChatML if it has none)."""
        return render_chat(self.chat_template, messages, bos_token=self.bos_token, eos_token=self.eos_token,
                           add_generation_prompt=add_generation_prompt, **extra)


# --- building from GGUF metadata -------------------------------------------------------------------

def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[str] | None,
                    pre: str | None) -> tuple[tokenizers.Tokenizer, bool]:
    """Byte-level BPE; returns it and whether the pre-tokenizer family adds BOS by default."""
    if pre is None:
        log.warning("GGUF names no pre-tokenizer (tokenizer.ggml.pre); using GPT-2's split rules")
        pre = "default"
    family = _PRE_TOKENIZERS.get(pre)
    if family is None:
        raise UnsupportedModelError(
            f"GGUF pre-tokenizer {pre!r} is not supported; lockstep knows {', '.join(sorted(_PRE_TOKENIZERS))}"
        )
    if not merges:
        raise ModelLoadError("the GGUF's byte-level BPE tokenizer has no merges (tokenizer.ggml.merges)")
    alphabet = _CHAR_TO_BYTE.keys()
    vocab = {}
    for i, (token, ttype) in enumerate(zip(tokens, types)):
        # Added tokens are stored as raw text and matched whole before BPE; a plain token outside
        # the byte alphabet is respelled into it, as transformers does.
        if ttype in (_CONTROL, _USER_DEFINED) or all(c in alphabet for c in token):
            vocab[token] = i
        else:
            vocab["".join(_BYTE_TO_CHAR[b] for b in token.encode())] = i
    backend = tokenizers.Tokenizer(models.BPE(vocab, _split_merges(merges), ignore_merges=family == "llama3"))
    if family in ("gpt2", "digits+gpt2"):
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if family == "digits+gpt2":
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    else:
        regex = _QWEN2_SPLIT if family == "qwen2" else _LLAMA3_SPLIT
        steps = [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    _add_tokens(backend, tokens, types, special_types=(_CONTROL,))
    return backend, family == "llama3"


def _sentencepiece_bpe(tokens: list[str], types: list[int], scores: list[float] | None, merges: list[str] | None,
                       unk_id: int | None, add_space_prefix: bool) -> tokenizers.Tokenizer:
    """SentencePiece as BPE with byte fallback: the form transformers gives Llama 2 / Mistral tokenizers."""
    vocab = {token: i for i, token in enumerate(tokens)}
    if merges:
        pairs = _split_merges(merges)
    elif scores is not None and len(scores) == len(tokens):
        pairs = _merges_from_scores(tokens, scores, vocab)
    else:
        raise ModelLoadError("the GGUF's SentencePiece tokenizer has neither merges nor scores")
    backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, unk_token=None if unk_id is None else tokens[unk_id],
                                      fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))  # the space the pre-tokenizer added
    backend.decoder = decoders.Sequence(steps)
    _add_tokens(backend, tokens, types, special_types=(_CONTROL, _UNKNOWN))
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best merged-token score first (longer left, then right piece first among equals)."""
    found = []
    for token, score in dict(zip(tokens, scores)).items():
        cuts = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        cuts.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found.extend((float(score), left, right) for left, right in cuts)
    found.sort(key=lambda m: (-m[0], -len(m[1]), -len(m[2])))  # stable: ties keep vocabulary order
    return [(left, right) for _, left, right in found]


def _split_merges(merges: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ModelLoadError(f"GGUF merge {merge!r} is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _add_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int],
                special_types: tuple[int, ...]) -> None:
    """Registers control tokens as special and user-defined ones as plain added tokens, so both
    are matched whole in text (as llama.cpp does) instead of being cut up by BPE."""
    special = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k in special_types]
    plain = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    before = backend.get_vocab_size(with_added_tokens=True)
    backend.add_special_tokens(special)
    backend.add_tokens(plain)
    if backend.get_vocab_size(with_added_tokens=True) != before:
        # Every added token is in the vocabulary already; a new id would be past the model's embeddings.
        raise ModelLoadError("GGUF tokenizer: an added token is missing from the vocabulary")


def _template_stops(template: str | None, special_tokens: dict[str, int]) -> set[int]:
    text = template or CHATML_TEMPLATE
    return {special_tokens[t] for t in _END_OF_TURN if t in special_tokens and t in text}


# --- HF directories --------------------------------------------------------------------------------

def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{file}: unreadable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _hf_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja, chat_template.json, then tokenizer_config.json."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _kind_of_decoder(decoder: dict[str, Any] | None) -> str:
    text = json.dumps(decoder or {})
    if '"ByteLevel"' in text:
        return "byte_level"
    if '"ByteFallback"' in text or '"Metaspace"' in text:
        return "sentencepiece"
    return "other"

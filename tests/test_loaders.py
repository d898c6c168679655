"""Loaders against HF transformers on small random models of each supported architecture.

HF directories (config.json + safetensors + tokenizer.json) are written by transformers itself;
tiny GGUF files by gguf's writer (tests/tiny_gguf.py). Both lockstep and transformers load the
same files, and their next-token logprobs and greedy tokens must agree.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from lockstep.runtime.config import EngineConfig
from lockstep.runtime.engine import Engine
from lockstep.runtime.errors import ModelLoadError, UnsupportedModelError
from lockstep.runtime.loader import load_model
from lockstep.runtime.sampling_params import SamplingParams
from tiny_gguf import T, TinySpec, tokenizer_tokens, write_tiny_gguf

transformers = pytest.importorskip("transformers", reason="transformers is the reference for loader tests")

VOCAB = len(tokenizer_tokens()[0])
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
HF_CASES = {
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        SMALL, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, sliding_window=None, head_dim=16)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, tie_word_embeddings=False)),
}


def write_tokenizer_json(directory: Path) -> None:
    tokens, merges, _ = tokenizer_tokens()
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab, [tuple(m.split()) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(directory / "tokenizer.json"))


def make_hf_dir(directory: Path, case: str) -> torch.nn.Module:
    config_cls, model_cls, kwargs = HF_CASES[case]
    torch.manual_seed(sum(map(ord, case)))
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # default init leaves biases and norms trivial; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer_json(directory)
    return model


def reference_logprobs(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def reference_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def check_against(model: torch.nn.Module, path: Path, rng: np.random.Generator) -> None:
    engine = Engine(load_model(path, quiet=True), EngineConfig(kv_memory_bytes=8 << 20, max_batched_tokens=16))
    ids = rng.integers(3, VOCAB - 3, size=40).tolist()
    ours = engine.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0].prompt_logprobs
    np.testing.assert_allclose(ours, reference_logprobs(model, ids), atol=1e-4, rtol=0)
    greedy = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert greedy.output_ids == reference_greedy(model, ids, 8)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_directory_matches_transformers(tmp_path: Path, case: str) -> None:
    model = make_hf_dir(tmp_path, case)
    check_against(model, tmp_path, np.random.default_rng(len(case)))


def gguf_reference(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("spec", [
    TinySpec(),  # F32, tied
    TinySpec(qtype=T.Q8_0, embed_qtype=T.Q8_0, tied=False),
    TinySpec(qtype=T.Q4_1, embed_qtype=T.F16),
    TinySpec(qtype=T.Q4_K, hidden=256, ffn=512, heads=4, kv_heads=1),
    TinySpec(arch="qwen2", qtype=T.Q4_0, qkv_bias=True, tied=False),
], ids=["f32-tied", "q8_0", "q4_1", "q4_k-mqa", "qwen2-q4_0-bias"])
def test_gguf_matches_transformers(tmp_path: Path, spec: TinySpec) -> None:
    """Includes undoing llama.cpp's Q/K row permutation, which only a real reference catches."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", spec, seed=3)
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    check_against(gguf_reference(path), path, np.random.default_rng(9))


def test_hf_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path, quiet=True)
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(tmp_path, quiet=True)
    make_hf_dir(tmp_path, "llama-tied")
    cfg = (tmp_path / "config.json").read_text().replace("LlamaForCausalLM", "GPTNeoXForCausalLM")
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(UnsupportedModelError, match="not supported"):
        load_model(tmp_path, quiet=True)


def test_gguf_index_cache_is_used_and_invalidated(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOCKSTEP_HOME", str(tmp_path / "home"))
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(), seed=1)
    first = load_model(path, quiet=True)
    second = load_model(path, quiet=True)
    assert not first.stats.index_cached and second.stats.index_cached
    assert torch.equal(first.weights.embed, second.weights.embed)
    write_tiny_gguf(path, TinySpec(), seed=2)  # a changed file gets a new key
    third = load_model(path, quiet=True)
    assert not third.stats.index_cached and not torch.equal(third.weights.embed, first.weights.embed)

"""GGUF blocks kept for the quantized matmul (runtime/quantized_weights.py) and the triton backend on them.

The raw blocks, dequantized by gguf's own dequantizer, must be exactly the dense weights the
normal loader builds (same fusion, same Q/K row order); and the triton backend reading them
through kernels/quant_matmul.py must generate the torch backend's greedy tokens.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from tiny_gguf import T, TinySpec, write_tiny_gguf

from lockstep.runtime.config import EngineConfig
from lockstep.runtime.engine import Engine
from lockstep.runtime.errors import InvalidRequestError
from lockstep.runtime.loader import load_model
from lockstep.runtime.quantized_weights import load_quantized_gguf
from lockstep.runtime.sampling_params import SamplingParams

# head_dim 64 (the attention kernels' smallest tile), GQA 2, K a multiple of 32 everywhere.
SPEC = dict(hidden=128, ffn=256, heads=2, kv_heads=1)


def _dense(matrix) -> torch.Tensor:
    raw = matrix.blocks.numpy()
    cols = raw.shape[1] // {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[matrix.qtype] * 32
    return torch.from_numpy(dequantize(raw, GGMLQuantizationType[matrix.qtype]).reshape(-1, cols))


@pytest.mark.parametrize("qtype,embed", [(T.Q4_1, T.Q8_0), (T.Q4_0, T.Q4_0), (T.Q8_0, T.F32)], ids=str)
def test_blocks_dequantize_to_the_loaders_dense_weights(tmp_path: Path, qtype, embed) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(**SPEC, qtype=qtype, embed_qtype=embed), seed=5)
    model = load_model(path, quiet=True)
    quantized = load_quantized_gguf(path, model.config)
    for layer, q_layer in zip(model.weights.layers, quantized.layers):
        for name in ("wqkv", "wo", "w_gate_up", "w_down"):
            matrix = getattr(q_layer, name)
            assert matrix.qtype == qtype.name
            assert torch.equal(_dense(matrix), getattr(layer, name)), name
    if embed == T.F32:
        assert quantized.lm_head is None  # float head: the forward keeps the dense matmul
    else:
        assert torch.equal(_dense(quantized.lm_head), model.weights.lm_head)


def test_types_the_kernel_lacks_stay_dense(tmp_path: Path) -> None:
    spec = TinySpec(hidden=256, ffn=256, heads=4, kv_heads=2, qtype=T.Q4_K, embed_qtype=T.Q8_0)  # K-quant rows: 256
    path = write_tiny_gguf(tmp_path / "tiny.gguf", spec, seed=6)
    quantized = load_quantized_gguf(path, load_model(path, quiet=True).config)
    assert all(getattr(q, n) is None for q in quantized.layers for n in ("wqkv", "wo", "w_gate_up", "w_down"))
    assert quantized.lm_head is not None and quantized.count() == (1, 1 + 4 * len(quantized.layers))


@pytest.mark.parametrize("qtype,embed", [(T.Q4_1, T.Q8_0), (T.Q4_0, T.Q8_0)], ids=str)
def test_triton_backend_on_quantized_weights_matches_torch(tmp_path: Path, qtype, embed) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(**SPEC, qtype=qtype, embed_qtype=embed), seed=7)
    model = load_model(path, quiet=True)
    # A batch of three: ragged prefill padded to a bucket, then decode[4] with one padded sequence.
    prompts = ["the theme", "a sin on the", "on"]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=0)
    config = dict(kv_memory_bytes=4 << 20, block_size=16)
    reference = Engine(model, EngineConfig(backend="torch", **config)).generate(prompts, params)
    engine = Engine(model, EngineConfig(backend="triton", weights="quantized", **config))
    assert engine.runner.quantized is not None and engine.runner.quantized.count()[0] > 0
    ours = engine.generate(prompts, params)
    for got, want in zip(ours, reference):
        assert got.output_ids == want.output_ids
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)


def test_quantized_weights_need_a_gguf_and_the_triton_backend(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(**SPEC, qtype=T.Q4_1), seed=8)
    model = load_model(path, quiet=True)
    with pytest.raises(InvalidRequestError, match="needs --backend triton"):
        Engine(model, EngineConfig(backend="torch", weights="quantized", kv_memory_bytes=4 << 20))
    f32 = write_tiny_gguf(tmp_path / "f32.gguf", TinySpec(**SPEC), seed=8)
    with pytest.raises(InvalidRequestError, match="no Q8_0, Q4_0 or Q4_1"):
        Engine(load_model(f32, quiet=True), EngineConfig(backend="triton", weights="quantized",
                                                          kv_memory_bytes=4 << 20))


def test_auto_weights_fall_back_to_dense_and_blocked_matrices_leave_the_float_copy(tmp_path: Path) -> None:
    from lockstep.runtime.engine import quantized_weights

    f32 = load_model(write_tiny_gguf(tmp_path / "f32.gguf", TinySpec(**SPEC), seed=9), quiet=True)
    # auto on CUDA with a float GGUF: dense, not an error about a flag the user never passed
    assert quantized_weights(f32, EngineConfig(weights="auto"), torch.device("cuda")) is None
    q = load_model(write_tiny_gguf(tmp_path / "q.gguf", TinySpec(**SPEC, qtype=T.Q4_1, embed_qtype=T.Q8_0), seed=9),
                   quiet=True)
    blocks = load_quantized_gguf(q.source, q.config)
    slim = q.weights_except(blocks)
    assert slim.lm_head is None and slim.embed is q.weights.embed
    assert q.weights_except(blocks, embedding=True).embed is None
    assert all(layer.wqkv is None and layer.w_down is None and layer.attn_norm is not None for layer in slim.layers)
    assert slim.nbytes() < q.weights.nbytes() / 5


def test_the_native_cpu_engine_never_dequantizes_what_it_reads_as_blocks(tmp_path: Path, monkeypatch) -> None:
    """On the CPU the native matmul reads Q4_1/Q8_0 blocks as stored and the token lookup decodes
    only the embedding rows it needs, so a GGUF's matrices are never dequantized: not in the
    engine's weights, not in its memory plan, not in the loaded model. Its greedy tokens equal those of the torch matmuls over the float weights
    (--cpu-kernels torch), which dequantizes everything; a float matrix (F32 here) keeps its rows."""
    from lockstep.runtime import gguf_loader

    path = write_tiny_gguf(tmp_path / "q.gguf", TinySpec(**SPEC, qtype=T.Q4_1, embed_qtype=T.Q8_0), seed=5)
    dequantized: list[tuple[int, ...]] = []

    def recording(raw, qtype, shape):
        dequantized.append(tuple(shape))
        return real(raw, qtype, shape)
    real = gguf_loader.dequantize
    monkeypatch.setattr(gguf_loader, "dequantize", recording)
    model = load_model(path, quiet=True)
    engine = Engine(model, EngineConfig(kv_memory_bytes=8 << 20, calibrate="off"))
    assert [s for s in dequantized if len(s) == 2] == [], "no matrix, and not the embedding table either"
    assert engine.runner.w.embed is None and all(getattr(layer, f) is None for layer in engine.runner.w.layers
                                                 for f in ("wqkv", "wo", "w_gate_up", "w_down"))
    assert not [name for name in engine.memory_plan.regions if name.startswith(("weights.w", "weights.embed"))]
    model.weights  # a caller that wants every float tensor still gets them, dequantized now
    assert len([s for s in dequantized if len(s) == 2]) == 1 + 7 * model.config.num_layers
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    native = engine.generate([[1, 5, 9, 2]], sp)[0].output_ids
    dense = Engine(load_model(path, quiet=True), EngineConfig(kv_memory_bytes=8 << 20, calibrate="off",
                                                              cpu_kernels="torch"))
    assert dense.runner.w.layers[0].wqkv is not None
    assert dense.generate([[1, 5, 9, 2]], sp)[0].output_ids == native

    f32 = write_tiny_gguf(tmp_path / "f32.gguf", TinySpec(**SPEC), seed=5)
    engine = Engine(load_model(f32, quiet=True), EngineConfig(kv_memory_bytes=8 << 20, calibrate="off"))
    assert engine.runner.w.layers[0].wqkv is not None, "F32 matrices are read through their float rows"

"""The `torch` backend: a Llama-family forward in plain PyTorch over the paged KV cache.

It is the reference every other backend is compared against, so it follows HF transformers'
arithmetic (float32 RMSNorm, rotate-half RoPE from float32 tables, softmax attention with
1/sqrt(head_dim) scaling, SwiGLU) and keeps each step's work explicit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .kv_cache import KVCache
from .linear import Linears
from .memory_plan import MemoryPlan
from .step_program import StepProgram
from .weights import ModelWeights
from .workspace import StepWorkspace


@dataclass
class StepInputs:
    """One step program's inputs: leading slices of the planned workspace (runtime/workspace.py).

    Rows past the step's real tokens, and sequences past its real ones, are padding: they read
    token 0 at position 0 and write the arena's scratch block, so they change nothing else.
    """

    program: StepProgram
    token_ids: torch.Tensor  # [R] long, R = program.num_tokens
    positions: torch.Tensor  # [R] long
    slot_mapping: torch.Tensor  # [R] long: where each row's K and V are written
    block_tables: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32: context length of each sequence after this step
    query_start: torch.Tensor  # [S + 1] int32: sequence s owns rows query_start[s]:query_start[s + 1]
    logit_rows: torch.Tensor  # [L] long: rows whose next-token logits are wanted


@dataclass
class _LayerViews:
    """One layer's arrays as forward_native passes them to lockstep._core."""

    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    k_cache: np.ndarray
    v_cache: np.ndarray
    # (qtype, rows) of each matrix, as lockstep._core.quant_matmul reads them
    wqkv: tuple[str, np.ndarray]
    wo: tuple[str, np.ndarray]
    w_gate_up: tuple[str, np.ndarray]
    w_down: tuple[str, np.ndarray]
    bqkv: np.ndarray | None


def rope_inv_freq(config: ModelConfig, freq_divisors: torch.Tensor | None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama 3.1 scaling where the model asks for it."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if freq_divisors is not None:
        return inv_freq / freq_divisors.float()
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class TorchModel:
    def __init__(self, config: ModelConfig, weights: ModelWeights, kv: KVCache, linear: Linears | None = None,
                 native_ops: bool = False, workspace: StepWorkspace | None = None) -> None:
        """`linear` runs the matmuls (default: torch's, on the float weights). `native_ops` runs
        RMSNorm, RoPE and attention on lockstep._core's CPU kernels too (fp32 CPU tensors only),
        in `workspace`'s activation buffers."""
        self.config = config
        self.w = weights
        self.kv = kv
        self.workspace = workspace
        self.guard: MemoryPlan | None = None  # set by the engine: check every native op's buffers
        self.linear = linear or Linears(weights)
        freqs = torch.outer(torch.arange(config.max_position, dtype=torch.float32),
                            rope_inv_freq(config, weights.rope_freqs))
        self.cos = freqs.cos().to(kv.k.device)
        self.sin = freqs.sin().to(kv.k.device)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.native_ops = native_ops
        self._views: list[_LayerViews] | None = None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(variance + self.config.rms_norm_eps))

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE on x [T, heads, head_dim] with cos/sin [T, 1, head_dim/2]."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Runs one step; writes the step's K/V into the cache; returns logits [R, vocab]."""
        if self.native_ops:
            return self.forward_native(inputs)
        cfg = self.config
        if self.w.embed is not None:
            x = self.w.embed[inputs.token_ids]
        else:  # only GGUF blocks (a native CPU engine run with torch's ops, as a test does)
            x = torch.empty(inputs.token_ids.shape[0], cfg.hidden_size, dtype=torch.float32)
            self.embed_into(inputs.token_ids, x)
        cos = self.cos[inputs.positions].unsqueeze(1)
        sin = self.sin[inputs.positions].unsqueeze(1)
        for layer_idx, layer in enumerate(self.w.layers):
            h = self.rms_norm(x, layer.attn_norm)
            qkv = self.linear(h, layer_idx, "wqkv")
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = self.rope(q.view(-1, cfg.num_heads, cfg.head_dim), cos, sin)
            k = self.rope(k.view(-1, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            k_cache, v_cache = self.kv.k[layer_idx], self.kv.v[layer_idx]
            k_cache.index_copy_(0, inputs.slot_mapping, k)
            v_cache.index_copy_(0, inputs.slot_mapping, v.view(-1, cfg.num_kv_heads, cfg.head_dim))
            attn = self.attention(q, k_cache, v_cache, inputs)
            x = x + self.linear(attn, layer_idx, "wo")
            h = self.rms_norm(x, layer.ffn_norm)
            gate, up = self.linear(h, layer_idx, "w_gate_up").chunk(2, dim=-1)
            x = x + self.linear(F.silu(gate) * up, layer_idx, "w_down")
        x = self.rms_norm(x[inputs.logit_rows], self.w.final_norm)
        return self.linear(x, None, "lm_head")

    def embed_into(self, token_ids: torch.Tensor, out: torch.Tensor, op=None) -> None:
        """out[t] = the embedding of token_ids[t]: from the float table, or, where the engine kept
        only its GGUF blocks (the native CPU path), those rows decoded by `op` (lockstep._core)."""
        if self.w.embed is not None:
            torch.index_select(self.w.embed, 0, token_ids, out=out)
            return
        if op is None:
            from lockstep import _core as op
        table = self.linear.blocks.embed
        op.dequantize_rows(table.numpy(), table.qtype, token_ids.numpy(), out.numpy())

    def forward_native(self, inputs: StepInputs) -> torch.Tensor:
        """forward() with RMSNorm, RoPE + cache write and attention on lockstep._core's CPU ops.

        The same math in fp32, each op reduced per row (per sequence for attention) in a fixed
        order, so a sequence's logits do not depend on the batch or the thread count
        (cpp/cpu/cpu_ops.cpp). The residual add is fused into the norm that follows it. Every
        buffer is a slice of the planned workspace: the step allocates nothing.
        """
        cfg, eps, views = self.config, self.config.rms_norm_eps, self._native_views()
        op = self._native_ops()
        rows = inputs.token_ids.shape[0]
        buf = {name: self.workspace.activation(name)[:rows] for name in ("x", "h", "qkv", "attn", "out", "gate_up", "act")}
        x_t, gate_up_t, act_t = buf["x"], buf["gate_up"], buf["act"]
        x, h, qkv, attn, out, gate_up, act = (buf[n].numpy() for n in ("x", "h", "qkv", "attn", "out", "gate_up", "act"))
        self.embed_into(inputs.token_ids, x_t, op)  # the residual stream, updated in place
        gate_t, up_t = gate_up_t.chunk(2, dim=-1)
        q = qkv[:, :cfg.q_size].reshape(-1, cfg.num_heads, cfg.head_dim)
        k = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].reshape(-1, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[:, cfg.q_size + cfg.kv_size:].reshape(-1, cfg.num_kv_heads, cfg.head_dim)
        positions, slots = inputs.positions.numpy(), inputs.slot_mapping.numpy()
        block_tables, query_start, seq_lens = inputs.block_tables.numpy(), inputs.query_start.numpy(), inputs.seq_lens.numpy()
        op.rms_norm(x, views[0].attn_norm, eps, h)
        for layer_idx, layer in enumerate(views):
            op.quant_matmul(h, layer.wqkv[1], layer.wqkv[0], qkv)
            if layer.bqkv is not None:
                qkv += layer.bqkv
            op.rope_and_cache(q, k, v, self._cos, self._sin, positions, slots, layer.k_cache, layer.v_cache)
            op.paged_attention(q, layer.k_cache, layer.v_cache, block_tables, query_start, seq_lens,
                               self.kv.block_size, self.scale, attn)
            op.quant_matmul(attn, layer.wo[1], layer.wo[0], out)
            op.add_rms_norm(out, x, layer.ffn_norm, eps, h)
            op.quant_matmul(h, layer.w_gate_up[1], layer.w_gate_up[0], gate_up)
            torch.mul(F.silu(gate_t, inplace=True), up_t, out=act_t)
            op.quant_matmul(act, layer.w_down[1], layer.w_down[0], out)
            if layer_idx + 1 < len(views):
                op.add_rms_norm(out, x, views[layer_idx + 1].attn_norm, eps, h)
            else:
                x += out
        num_logits = inputs.logit_rows.shape[0]
        last_t = self.workspace.activation("last")[:num_logits]
        logits = self.workspace.activation("logits")[:num_logits]
        torch.index_select(x_t, 0, inputs.logit_rows, out=last_t)
        op.rms_norm(last_t.numpy(), self._final_norm, eps, last_t.numpy())
        op.quant_matmul(last_t.numpy(), self._lm_head[1], self._lm_head[0], logits.numpy())
        return logits

    def _native_ops(self):
        """lockstep._core's step ops; with the guard on, each checks its buffers are planned first."""
        from lockstep import _core

        if self.guard is None:
            return _core
        guard = self.guard

        def checked(name: str):
            fn = getattr(_core, name)

            def call(*args):
                guard.check(name, args)
                return fn(*args)
            return call
        return SimpleNamespace(**{name: checked(name) for name in
                                  ("rms_norm", "add_rms_norm", "quant_matmul", "rope_and_cache", "paged_attention",
                                   "dequantize_rows")})

    def _native_views(self) -> list[_LayerViews]:
        """numpy views of what forward_native reads every step; the KV arena and the weights are
        allocated once, so the views stay valid."""
        if self._views is None:
            self._cos, self._sin, self._final_norm = self.cos.numpy(), self.sin.numpy(), self.w.final_norm.numpy()
            blocks = self.linear.blocks  # every matrix: the native path is only on with with_float_rows
            rows = lambda m: (m.qtype, m.numpy())  # noqa: E731
            self._lm_head = rows(blocks.lm_head)
            self._views = [
                _LayerViews(layer.attn_norm.numpy(), layer.ffn_norm.numpy(), self.kv.k[i].numpy(),
                            self.kv.v[i].numpy(), rows(b.wqkv), rows(b.wo), rows(b.w_gate_up), rows(b.w_down),
                            None if layer.bqkv is None else layer.bqkv.numpy())
                for i, (layer, b) in enumerate(zip(self.w.layers, blocks.layers))]
        return self._views

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  inputs: StepInputs) -> torch.Tensor:
        """Causal GQA attention of each sequence's new queries over its whole context.

        One sequence at a time: a sequence's result never depends on what else is in the step.
        Rows of no sequence (padding) come out zero.
        """
        out = torch.zeros(q.shape[0], self.config.q_size, dtype=q.dtype, device=q.device)
        bs = self.kv.block_size
        starts, lens = inputs.query_start.tolist(), inputs.seq_lens.tolist()
        for s, ctx in enumerate(lens):
            rows = slice(starts[s], starts[s + 1])
            length = starts[s + 1] - starts[s]
            if length == 0:
                continue
            table = inputs.block_tables[s, :-(-ctx // bs)].to(q.device, torch.long)
            context_slots = (table[:, None] * bs + torch.arange(bs, device=q.device)).reshape(-1)[:ctx]
            qs = q[rows].transpose(0, 1)  # [heads, n, d]
            ks = k_cache[context_slots].transpose(0, 1)  # [kv_heads, ctx, d]
            vs = v_cache[context_slots].transpose(0, 1)
            mask = None
            if length > 1:
                # Query i sits at position ctx - length + i and sees keys up to there.
                first = ctx - length
                mask = torch.arange(ctx)[None, :] <= (first + torch.arange(length))[:, None]
                mask = mask.to(q.device)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[rows] = o.transpose(0, 1).reshape(length, -1)
        return out

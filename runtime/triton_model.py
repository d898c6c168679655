"""The `triton` backend: the whole forward on lockstep's own kernels (kernels/).

It computes what the `torch` backend (runtime/model.py) computes, in the same order, so the
torch backend is its oracle: RMSNorm with the residual add fused in, RoPE fused with writing
K/V into the paged cache, paged prefill or decode attention, and SiLU-and-mul. On CUDA it is
the fast path; on the CPU it runs under TRITON_INTERPRET=1, slowly, to check correctness.

Linear layers read a GGUF's Q8_0/Q4_0/Q4_1 blocks through the quantized matmul kernel
(kernels/quant_matmul.py) when `quantized` holds them, so decode streams 4-bit weights; a matrix
without quantized blocks (float checkpoints, other GGUF types) goes through torch's matmul.
"""
from __future__ import annotations

import logging
import math

import torch

from .config import ModelConfig
from .errors import InvalidRequestError
from .kv_cache import KVCache
from .linear import Linears
from .model import StepInputs, rope_inv_freq
from .quantized_weights import QuantizedWeights
from .weights import ModelWeights

log = logging.getLogger("lockstep")


class TritonModel:
    def __init__(self, config: ModelConfig, weights: ModelWeights, kv: KVCache, attention: str = "triton",
                 quantized: QuantizedWeights | None = None) -> None:
        # Imported here: choosing this backend is what brings in triton (and, on the CPU,
        # the interpreter, which must be selected before triton is first imported).
        from lockstep.kernels.decode_attention import decode_attention
        from lockstep.kernels.prefill_attention import prefill_attention
        from lockstep.kernels.quant_matmul import quant_matmul
        from lockstep.kernels.rms_norm import fused_add_rms_norm, rms_norm
        from lockstep.kernels.rope_cache import rope_and_cache
        from lockstep.kernels.silu_and_mul import silu_and_mul

        self._decode_attention = decode_attention
        if attention == "cuda":
            # Fails loudly (no cupy, no GPU) rather than falling back to the Triton kernel.
            from lockstep.kernels.cuda_decode_attention import (
                CudaKernelsUnavailable,
                cuda_decode_attention,
                prepare_cuda_kernels,
            )

            try:  # at start-up, not at the first decode step
                prepare_cuda_kernels(kv.k.device, kv.k.dtype, config.head_dim,
                                     config.num_heads // config.num_kv_heads)
            except CudaKernelsUnavailable as exc:
                raise InvalidRequestError(str(exc)) from None
            self._decode_attention = cuda_decode_attention
        log.info("triton backend: %s decode attention", attention)
        self._prefill_attention = prefill_attention
        self._rms_norm, self._fused_add_rms_norm = rms_norm, fused_add_rms_norm
        self._rope_and_cache = rope_and_cache
        self._silu_and_mul = silu_and_mul
        self.quantized = quantized
        self.linear = Linears(weights, quantized, lambda x, m: quant_matmul(x, m.blocks, m.qtype))

        self.config = config
        self.w = weights
        self.kv = kv
        self.device = kv.k.device
        freqs = torch.outer(torch.arange(config.max_position, dtype=torch.float32),
                            rope_inv_freq(config, weights.rope_freqs))
        self.cos = freqs.cos().to(self.device)
        self.sin = freqs.sin().to(self.device)
        self.scale = 1.0 / math.sqrt(config.head_dim)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        cfg = self.config
        eps = cfg.rms_norm_eps
        block_tables, seq_lens, query_start = inputs.block_tables, inputs.seq_lens, inputs.query_start
        is_decode = inputs.program.kind == "decode"
        num_tokens = inputs.token_ids.numel()
        residual = self.w.embed[inputs.token_ids]
        h = self._rms_norm(residual, self.w.layers[0].attn_norm, eps)
        for layer_idx, layer in enumerate(self.w.layers):
            qkv = self.linear(h, layer_idx, "wqkv")
            q = qkv[:, :cfg.q_size].view(num_tokens, cfg.num_heads, cfg.head_dim)
            k = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            v = qkv[:, cfg.q_size + cfg.kv_size:].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            k_cache, v_cache = self.kv.k[layer_idx], self.kv.v[layer_idx]
            q = self._rope_and_cache(q, k, v, inputs.positions, self.cos, self.sin, k_cache, v_cache,
                                     inputs.slot_mapping)
            if is_decode:
                attn = self._decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                              self.kv.block_size, self.scale)
            else:
                attn = self._prefill_attention(q, k_cache, v_cache, block_tables, query_start, seq_lens,
                                               self.kv.block_size, self.scale)
            out = self.linear(attn.view(num_tokens, cfg.q_size), layer_idx, "wo")
            h, residual = self._fused_add_rms_norm(out, residual, layer.ffn_norm, eps)
            gate_up = self.linear(h, layer_idx, "w_gate_up")
            mlp = self.linear(self._silu_and_mul(gate_up), layer_idx, "w_down")
            if layer_idx + 1 < len(self.w.layers):
                h, residual = self._fused_add_rms_norm(mlp, residual, self.w.layers[layer_idx + 1].attn_norm, eps)
        # Only the rows whose logits are wanted go through the final norm and the vocabulary.
        rows = inputs.logit_rows
        h, _ = self._fused_add_rms_norm(mlp[rows], residual[rows], self.w.final_norm, eps)
        return self.linear(h, None, "lm_head")

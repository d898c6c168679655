"""Dequantize GGUF tensor bytes to float32 torch tensors.

Each supported type has a kernel that turns a chunk of blocks, a (k, type_size) uint8
tensor, into a (k, block_size) float32 slice of the output. Kernels use whole-tensor
torch ops only (no Python loop over blocks) and stay in uint8/int8 until the final
cast and multiply-add, so the only float32-sized writes are into the output itself.

Every product below is exact in float32 (an fp16 scale has an 11-bit significand, the
6-bit sub-scales and <= 6-bit quants add at most 12 more bits), so the one rounding is
the final add of the min. That makes the results bit-identical to gguf-py's numpy
reference whatever order the multiplications are done in.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelLoadError, UnsupportedModelError

_T = GGMLQuantizationType

# Output elements decoded per chunk: 4 MiB of float32, so a chunk's staging bytes, uint8
# temporaries and output slice stay in cache across the few passes a kernel makes. Large
# enough (>= 2**15, torch's grain size) that each elementwise op still uses every thread.
_CHUNK_ELEMENTS = 1 << 20

_Kernel = Callable[[torch.Tensor, torch.Tensor], None]


def _fp16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of every block, as a (k, 1) float32 column."""
    return blocks[:, offset : offset + 2].view(torch.float16).float()


def _split_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 2, n) uint8: low nibbles first, then high nibbles.

    Every nibble-packed GGML layout stores value i in the low nibble and value i + n in
    the high nibble of byte i of a group of n bytes.
    """
    q = torch.empty((*packed.shape[:-1], 2, packed.shape[-1]), dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 0x0F, out=q.select(-2, 0))
    torch.bitwise_right_shift(packed, 4, out=q.select(-2, 1))
    return q


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte Q4_K/Q5_K field into eight 6-bit scales and eight 6-bit mins.

    Bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; sub-blocks 4-7
    take their low 4 bits from bytes 8-11 (scale low nibble, min high nibble) and their
    top 2 bits from the spare top bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    lo_sc, lo_min, hi = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((lo_sc & 0x3F, (hi & 0x0F) | ((lo_sc >> 2) & 0x30)), dim=1)
    mins = torch.cat((lo_min & 0x3F, (hi >> 4) | ((lo_min >> 2) & 0x30)), dim=1)
    return scales, mins


def _float(blocks: torch.Tensor, out: torch.Tensor, dtype: torch.dtype) -> None:
    out.copy_(blocks.view(dtype))


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # [d: fp16][q: 32 x int8]; x = d * q
    out.copy_(blocks[:, 2:].view(torch.int8))
    out.mul_(_fp16_field(blocks, 0))


def _q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # [d: fp16][q: 32 x 4 bit]; x = d * (q - 8)
    q = _split_nibbles(blocks[:, 2:]).view(torch.int8).sub_(8)
    out.view(q.shape).copy_(q)
    out.mul_(_fp16_field(blocks, 0))


def _q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # [d: fp16][m: fp16][q: 32 x 4 bit]; x = d * q + m
    q = _split_nibbles(blocks[:, 4:])
    out.view(q.shape).copy_(q)
    out.mul_(_fp16_field(blocks, 0)).add_(_fp16_field(blocks, 2))


def _q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # [d: fp16][dmin: fp16][12 B: 8 x (6-bit scale, 6-bit min)][q: 256 x 4 bit];
    # sub-block j of 32: x = d * scale_j * q - dmin * min_j
    # Each 32-byte group of q holds sub-block 2g in low nibbles and 2g + 1 in high ones.
    k = blocks.shape[0]
    q = _split_nibbles(blocks[:, 16:144].view(k, 4, 32))
    _k_multiply_add(blocks, q.view(k, 8, 32), out)


def _q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # As Q4_K plus [qh: 32 B] before q; bit j of qh[i] is bit 4 of element i of sub-block j.
    k = blocks.shape[0]
    q = _split_nibbles(blocks[:, 48:176].view(k, 4, 32)).view(k, 8, 32)
    high = torch.bitwise_right_shift(blocks[:, 16:48].unsqueeze(1), _SHIFTS_8)
    q |= high.bitwise_and_(1).bitwise_left_shift_(4)
    _k_multiply_add(blocks, q, out)


def _k_multiply_add(blocks: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
    """out = (d * scale_j) * q - dmin * min_j for the (k, 8, 32) sub-blocks q."""
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    d = _fp16_field(blocks, 0) * scales
    m = _fp16_field(blocks, 2) * mins
    out3 = out.view(q.shape)
    out3.copy_(q)
    out3.mul_(d.unsqueeze(-1)).sub_(m.unsqueeze(-1))


def _q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # [ql: 128 B][qh: 64 B][scales: 16 x int8][d: fp16]; 16 sub-blocks of 16:
    # x = d * scale_j * (q - 32), q = 4 low bits from ql | 2 high bits from qh << 4.
    # Element e = 128 h + 32 s + i (h < 2, s < 4, i < 32) takes nibble s // 2 of
    # ql[64 h + 32 (s % 2) + i] and bits 2s..2s+1 of qh[32 h + i].
    k = blocks.shape[0]
    q = _split_nibbles(blocks[:, 0:128].view(k, 2, 64)).view(k, 2, 4, 32)
    high = torch.bitwise_right_shift(blocks[:, 128:192].view(k, 2, 1, 32), _SHIFTS_4x2)
    q |= high.bitwise_and_(0x03).bitwise_left_shift_(4)
    q = q.view(torch.int8).sub_(32).view(k, 16, 16)
    scale = _fp16_field(blocks, 208) * blocks[:, 192:208].view(torch.int8)
    out3 = out.view(k, 16, 16)
    out3.copy_(q)
    out3.mul_(scale.unsqueeze(-1))


_SHIFTS_8 = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
_SHIFTS_4x2 = torch.arange(0, 8, 2, dtype=torch.uint8).view(1, 1, 4, 1)

_KERNELS: dict[GGMLQuantizationType, _Kernel] = {
    _T.F32: lambda b, o: _float(b, o, torch.float32),
    _T.F16: lambda b, o: _float(b, o, torch.float16),
    _T.BF16: lambda b, o: _float(b, o, torch.bfloat16),
    _T.Q8_0: _q8_0,
    _T.Q4_0: _q4_0,
    _T.Q4_1: _q4_1,
    _T.Q4_K: _q4_k,
    _T.Q5_K: _q5_k,
    _T.Q6_K: _q6_k,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_KERNELS)


def _supported_names() -> str:
    return ", ".join(sorted(t.name for t in SUPPORTED_TYPES))


def _blocks_per_chunk(block_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // block_size)


def dequantize(
    raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    """Decode a GGUF tensor's bytes into a new float32 tensor of numpy-order `shape`.

    The last dimension is split into blocks of GGML_QUANT_SIZES[qtype] = (block_size,
    type_size); a block of type_size bytes decodes to block_size values, x = d * q (+ m)
    with per-block (and, for K-quants, per-sub-block) scales d and mins m.
    `raw` (flat, C-contiguous uint8, may be a read-only memmap) is never written.
    """
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise UnsupportedModelError(
            f"unknown GGML tensor type id {qtype!r}; lockstep supports {_supported_names()}"
        ) from None
    kernel = _KERNELS.get(qtype)
    if kernel is None:
        raise UnsupportedModelError(
            f"GGUF tensor type {qtype.name} is not supported; use a model quantized as "
            f"one of {_supported_names()}"
        )
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or not raw.flags.c_contiguous:
        raise ValueError(
            f"raw must be a C-contiguous uint8 numpy array, got "
            f"{type(raw).__name__} of dtype {getattr(raw, 'dtype', None)}"
        )

    shape = tuple(int(s) for s in shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if not shape or min(shape) < 0:
        raise ModelLoadError(f"{qtype.name} tensor has invalid shape {shape}")
    if shape[-1] % block_size:
        raise ModelLoadError(
            f"{qtype.name} tensor of shape {shape}: last dimension {shape[-1]} is not a "
            f"multiple of the {block_size}-value block size"
        )
    n_blocks = int(np.prod(shape, dtype=np.int64)) // block_size
    if raw.nbytes != n_blocks * type_size:
        raise ModelLoadError(
            f"{qtype.name} tensor of shape {shape} needs {n_blocks * type_size} bytes "
            f"({n_blocks} blocks of {type_size}), got {raw.nbytes}; the file is truncated "
            f"or corrupt"
        )

    out = torch.empty((n_blocks, block_size), dtype=torch.float32)
    if n_blocks == 0:
        return out.view(shape)
    src = raw.reshape(n_blocks, type_size)
    chunk = min(n_blocks, _blocks_per_chunk(block_size))
    # raw is usually a read-only memmap, which torch cannot wrap without a warning, so each
    # chunk is copied into a staging buffer that stays in cache for the kernel's passes.
    staging = torch.empty((chunk, type_size), dtype=torch.uint8)
    for start in range(0, n_blocks, chunk):
        stop = min(start + chunk, n_blocks)
        blocks = staging[: stop - start]
        blocks.numpy()[...] = src[start:stop]
        kernel(blocks, out[start:stop])
    return out.view(shape)


def dequantize_blocks(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Decode (rows, n * type_size) uint8 blocks into float32 (rows, n * block_size) on their device.

    For Q8_0, Q4_0 and Q4_1 rows (the types the quantized matmul reads), wherever they live.
    """
    if qtype not in (_T.Q8_0, _T.Q4_0, _T.Q4_1):
        raise ValueError(f"dequantize_blocks reads Q8_0, Q4_0 or Q4_1 blocks, got {qtype.name}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if blocks.dim() != 2 or blocks.dtype != torch.uint8 or blocks.shape[1] % type_size:
        raise ValueError(f"blocks must be uint8 rows of whole {qtype.name} blocks ({type_size} bytes), "
                         f"got {blocks.dtype} of shape {tuple(blocks.shape)}")
    rows = blocks.shape[0]
    flat = blocks.reshape(-1, type_size)
    out = torch.empty((flat.shape[0], block_size), dtype=torch.float32, device=blocks.device)
    _KERNELS[qtype](flat, out)
    return out.view(rows, -1)

"""The 256-value "k-quant" super-block formats: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Layouts are ggml-common.h's block_q*_K; dequantizers follow dequantize_row_q*_K
(ggml-quants.c): the sub-block scale is formed first (`d * sc`, one rounding), then
`scale * q` (and `- d_min * m`), so results are bit-identical to ggml.

Quantizing (the scale searches) lives in kquant_quantize.py; these classes call it.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import QK_K, GGMLQuantizationType

from llmpress.formats.base import BlockFormat, bit_shifts, read_f16



def search_function(function_name: str):
    """A quantizer of kquant_quantize.py, imported at call time (the searches are heavy
    and only quantizing needs them)."""
    from llmpress.formats import kquant_quantize

    return getattr(kquant_quantize, function_name)


class _KQuant(BlockFormat):
    quantizer_name: str

    def quantize_blocks(self, values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return search_function(self.quantizer_name)(values, importance)


def unpack_scales_mins_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 scale bytes of Q4_K/Q5_K -> (scales, mins), each uint8 (n, 8) of 6 bits.

    ggml's get_scale_min_k4: sub-blocks 0-3 keep their 6 bits in bytes 0-3 (scales) and
    4-7 (mins); sub-blocks 4-7 take 4 low bits from bytes 8-11 and the 2 high bits from
    the top of bytes 0-3 (scales) / 4-7 (mins).
    """
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([first & 0x3F, (third & 0x0F) | ((first >> 6) << 4)], dim=1)
    mins = torch.cat([second & 0x3F, (third >> 4) | ((second >> 6) << 4)], dim=1)
    return scales, mins


def unpack_scales_q3_k(packed: torch.Tensor) -> torch.Tensor:
    """The 12 scale bytes of Q3_K -> int8 (n, 16) signed 6-bit scales (stored +32).

    Low 4 bits: scale i in byte i % 8, nibble i // 8. High 2 bits: byte 8 + i % 4,
    bit pair i // 4 (dequantize_row_q3_K's kmask shuffle).
    """
    device = packed.device
    low = (packed[:, 0:8].unsqueeze(1) >> bit_shifts(4, 2, device).view(1, 2, 1)) & 0x0F
    high = (packed[:, 8:12].unsqueeze(1) >> bit_shifts(2, 4, device).view(1, 4, 1)) & 0x03
    scales = low.flatten(1) | (high.flatten(1) << 4)  # (n, 16)
    return scales.to(torch.int8) - 32


class Q2_K(_KQuant):
    name = "Q2_K"
    ggml_type = GGMLQuantizationType.Q2_K
    # a block of 256 values: scales: 16 (4-bit scale | 4-bit min), qs: 64, d: f16, dmin: f16
    quantizer_name = "quantize_q2_k"

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        packed_scales, qs = blocks[:, 0:16], blocks[:, 16:80]
        d, d_min = read_f16(blocks, 80), read_f16(blocks, 82)
        scale = (d * (packed_scales & 0x0F).float()).unsqueeze(2)  # (n, 16, 1)
        offset = (d_min * (packed_scales >> 4).float()).unsqueeze(2)
        # Two halves of 32 bytes; each byte holds 4 values at bit pairs 0,2,4,6, which
        # are 32 apart in the output: output index = half*128 + pair*32 + byte.
        shifts = bit_shifts(2, 4, blocks.device).view(1, 1, 4, 1)
        q = (qs.view(n, 2, 1, 32) >> shifts) & 0x03  # (n, half, pair, byte)
        q = q.reshape(n, 16, 16).float()  # groups of 16 share one scale
        return q.mul_(scale).sub_(offset).reshape(n, QK_K)


class Q3_K(_KQuant):
    name = "Q3_K"
    ggml_type = GGMLQuantizationType.Q3_K
    # a block of 256 values: hmask: 32, qs: 64, scales: 12, d: f16
    quantizer_name = "quantize_q3_k"

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        hmask, qs = blocks[:, 0:32], blocks[:, 32:96]
        d = read_f16(blocks, 108)
        scale = (d * unpack_scales_q3_k(blocks[:, 96:108]).float()).unsqueeze(2)  # (n, 16, 1)
        device = blocks.device
        low = (qs.view(n, 2, 1, 32) >> bit_shifts(2, 4, device).view(1, 1, 4, 1)) & 0x03
        # hmask bit (half*4 + pair) of byte l is the third bit; when it is clear, q -= 4.
        high = (hmask.view(n, 1, 32) >> bit_shifts(1, 8, device).view(1, 8, 1)) & 0x01
        q = low.reshape(n, 8, 32).to(torch.int8) - ((high ^ 1) << 2).to(torch.int8)
        return q.view(n, 16, 16).float().mul_(scale).reshape(n, QK_K)


class Q4_K(_KQuant):
    name = "Q4_K"
    ggml_type = GGMLQuantizationType.Q4_K
    # a block of 256 values: d: f16, dmin: f16, scales: 12, qs: 128
    quantizer_name = "quantize_q4_k"

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, d_min = read_f16(blocks, 0), read_f16(blocks, 2)
        scales, mins = unpack_scales_mins_k4(blocks[:, 4:16])
        scale = (d * scales.float()).unsqueeze(2)  # (n, 8, 1)
        offset = (d_min * mins.float()).unsqueeze(2)
        # 4 chunks of 32 bytes: low nibbles are sub-block 2c, high nibbles 2c + 1.
        qs = blocks[:, 16:144].reshape(n, 4, 32)
        q = torch.stack([qs & 0x0F, qs >> 4], dim=2)  # (n, chunk, nibble, 32)
        return q.view(n, 8, 32).float().mul_(scale).sub_(offset).reshape(n, QK_K)


class Q5_K(_KQuant):
    name = "Q5_K"
    ggml_type = GGMLQuantizationType.Q5_K
    # a block of 256 values: d: f16, dmin: f16, scales: 12, qh: 32, qs: 128
    quantizer_name = "quantize_q5_k"

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, d_min = read_f16(blocks, 0), read_f16(blocks, 2)
        scales, mins = unpack_scales_mins_k4(blocks[:, 4:16])
        scale = (d * scales.float()).unsqueeze(2)  # (n, 8, 1)
        offset = (d_min * mins.float()).unsqueeze(2)
        qh, qs = blocks[:, 16:48], blocks[:, 48:176].reshape(n, 4, 32)
        low = torch.stack([qs & 0x0F, qs >> 4], dim=2).view(n, 8, 32)
        # Bit s of qh[l] is the fifth bit of value l in sub-block s.
        high = (qh.view(n, 1, 32) >> bit_shifts(1, 8, blocks.device).view(1, 8, 1)) & 0x01
        q = low | (high << 4)
        return q.float().mul_(scale).sub_(offset).reshape(n, QK_K)


class Q6_K(_KQuant):
    name = "Q6_K"
    ggml_type = GGMLQuantizationType.Q6_K
    # a block of 256 values: ql: 128, qh: 64, scales: 16 int8, d: f16
    quantizer_name = "quantize_q6_k"

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        ql, qh = blocks[:, 0:128], blocks[:, 128:192]
        d = read_f16(blocks, 208)
        scale = (d * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(2)  # (n, 16, 1)
        device = blocks.device
        # Per half of 128 values: quarter k takes nibble k // 2 of ql bytes (k % 2)*32..+32
        # and bit pair k of the 32 qh bytes.
        low = (ql.reshape(n, 2, 1, 64) >> bit_shifts(4, 2, device).view(1, 1, 2, 1)) & 0x0F
        high = (qh.reshape(n, 2, 1, 32) >> bit_shifts(2, 4, device).view(1, 1, 4, 1)) & 0x03
        q = low.reshape(n, 2, 4, 32) | (high << 4)
        q = q.to(torch.int8) - 32
        return q.view(n, 16, 16).float().mul_(scale).reshape(n, QK_K)

"""The 32-value block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (ggml-common.h layouts).

Dequantizers follow ggml's dequantize_row_q* (ggml-quants.c) operation for operation, so
the float32 results are bit-identical: a product `d * q` (and `+ m`), each rounded once.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from llmpress.formats.base import BlockFormat, bit_shifts, read_f16


# --- unpacking helpers (shared with the k-quant and IQ4 formats) ----------------------
def low_then_high_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., m) -> (..., 2m): all low nibbles first, then all high nibbles.

    The order every ggml 4-bit block uses: byte j holds values j and j + m.
    """
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., m) -> (..., 8m) of 0/1, bit i of byte k at position 8k + i (little-endian)."""
    bits = (packed.unsqueeze(-1) >> bit_shifts(1, 8, packed.device)) & 1
    return bits.flatten(-2)


def high_bits_q5(qh: torch.Tensor) -> torch.Tensor:
    """The 32-bit qh of Q5_0/Q5_1 -> (n, 32) of 0 or 16, the fifth bit of each value."""
    return unpack_bits(qh) << 4


class Q4_0(BlockFormat):
    name = "Q4_0"
    ggml_type = GGMLQuantizationType.Q4_0
    block_size = 32
    type_size = 18  # d: f16, qs: 16 bytes

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = read_f16(blocks, 0)
        q = low_then_high_nibbles(blocks[:, 2:]).float()
        return q.sub_(8).mul_(d)  # in place: one buffer, same roundings as (q - 8) * d


class Q4_1(BlockFormat):
    name = "Q4_1"
    ggml_type = GGMLQuantizationType.Q4_1
    block_size = 32
    type_size = 20  # d: f16, m: f16, qs: 16 bytes

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, m = read_f16(blocks, 0), read_f16(blocks, 2)
        q = low_then_high_nibbles(blocks[:, 4:])
        return q.float().mul_(d).add_(m)


class Q5_0(BlockFormat):
    name = "Q5_0"
    ggml_type = GGMLQuantizationType.Q5_0
    block_size = 32
    type_size = 22  # d: f16, qh: 4 bytes, qs: 16 bytes

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = read_f16(blocks, 0)
        q = low_then_high_nibbles(blocks[:, 6:]) | high_bits_q5(blocks[:, 2:6])
        return q.float().sub_(16).mul_(d)


class Q5_1(BlockFormat):
    name = "Q5_1"
    ggml_type = GGMLQuantizationType.Q5_1
    block_size = 32
    type_size = 24  # d: f16, m: f16, qh: 4 bytes, qs: 16 bytes

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, m = read_f16(blocks, 0), read_f16(blocks, 2)
        q = low_then_high_nibbles(blocks[:, 8:]) | high_bits_q5(blocks[:, 4:8])
        return q.float().mul_(d).add_(m)


class Q8_0(BlockFormat):
    name = "Q8_0"
    ggml_type = GGMLQuantizationType.Q8_0
    block_size = 32
    type_size = 34  # d: f16, qs: 32 int8

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = read_f16(blocks, 0)
        return blocks[:, 2:].view(torch.int8).float().mul_(d)

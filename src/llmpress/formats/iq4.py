"""IQ4_NL and IQ4_XS: 4-bit indices into ggml's non-linear table kvalues_iq4nl.

Dequantizers follow dequantize_row_iq4_nl / _xs (ggml-quants.c): `d * kvalue` for
IQ4_NL; for IQ4_XS the sub-block scale `d * (ls - 32)` first, then `scale * kvalue`.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from llmpress.formats.base import BlockFormat, bit_shifts, read_f16
from llmpress.formats.kquants import search_function
from llmpress.formats.legacy import low_then_high_nibbles

# kvalues_iq4nl from ggml-common.h.
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def iq4_values(indices: torch.Tensor) -> torch.Tensor:
    """uint8 indices 0..15 (any shape) -> float32 table values, on the indices' device."""
    table = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=indices.device)
    return table.index_select(0, indices.reshape(-1).to(torch.int32)).view(indices.shape)


class IQ4_NL(BlockFormat):
    name = "IQ4_NL"
    ggml_type = GGMLQuantizationType.IQ4_NL
    block_size = 32
    type_size = 18  # d: f16, qs: 16 bytes of two 4-bit indices

    def quantize_blocks(self, values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return search_function("quantize_iq4_nl")(values, importance)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = read_f16(blocks, 0)
        return iq4_values(low_then_high_nibbles(blocks[:, 2:])).mul_(d)


class IQ4_XS(BlockFormat):
    name = "IQ4_XS"
    ggml_type = GGMLQuantizationType.IQ4_XS
    block_size = 256
    type_size = 136  # d: f16, scales_h: u16, scales_l: 4 bytes, qs: 128 bytes

    def quantize_blocks(self, values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return search_function("quantize_iq4_xs")(values, importance)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        device = blocks.device
        d = read_f16(blocks, 0)
        # 6-bit scale of sub-block i: nibble i % 2 of scales_l[i // 2], and bit pair i of
        # the little-endian u16 scales_h (bit pairs 0-3 in byte 2, 4-7 in byte 3).
        low = (blocks[:, 4:8].unsqueeze(2) >> bit_shifts(4, 2, device)) & 0x0F  # (n, 4, 2)
        high = (blocks[:, 2:4].unsqueeze(2) >> bit_shifts(2, 4, device)) & 0x03  # (n, 2, 4)
        scales = (low.reshape(n, 8) | (high.reshape(n, 8) << 4)).to(torch.int8) - 32
        scale = (d * scales.float()).unsqueeze(2)  # (n, 8, 1)
        q = low_then_high_nibbles(blocks[:, 8:].reshape(n, 8, 16))  # (n, 8, 32)
        return iq4_values(q).mul_(scale).reshape(n, 256)

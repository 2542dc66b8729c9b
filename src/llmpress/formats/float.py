"""Unquantized element types: F32, F16, BF16 (one value per 'block')."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from llmpress.formats.base import BlockFormat


class F32(BlockFormat):
    name = "F32"
    ggml_type = GGMLQuantizationType.F32

    def quantize_blocks(self, values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return np.ascontiguousarray(values, dtype=np.float32).view(np.uint8).reshape(-1, 4)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float32)


def float32_to_fp16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> fp16 bit patterns (uint16), as ggml_compute_fp32_to_fp16 (ggml-impl.h).

    Round to nearest even (numpy's cast does that, overflow going to inf); every NaN
    becomes the canonical quiet NaN 0x7E00 with its sign, where numpy would keep payload bits.
    """
    values = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):
        bits = values.astype(np.float16).view(np.uint16)
    sign = (values.view(np.uint32) >> np.uint32(16)).astype(np.uint16) & np.uint16(0x8000)
    return np.where(np.isnan(values), sign | np.uint16(0x7E00), bits)


class F16(BlockFormat):
    name = "F16"
    ggml_type = GGMLQuantizationType.F16

    def quantize_blocks(self, values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return float32_to_fp16_bits(values).view(np.uint8).reshape(-1, 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float16).float()


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), as ggml_compute_fp32_to_bf16 (ggml-impl.h).

    NaNs are forced quiet (keep the sign and top mantissa bits, set bit 6 of the bf16
    mantissa); everything else rounds to nearest, ties to even.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(64)
    # The sum can pass 2**32 only for inputs already handled as NaN; uint64 keeps it exact.
    wide = bits.astype(np.uint64)
    rounded = (wide + np.uint64(0x7FFF) + ((wide >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16)


class BF16(BlockFormat):
    name = "BF16"
    ggml_type = GGMLQuantizationType.BF16

    def quantize_blocks(self, values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return float32_to_bf16_bits(values).view(np.uint8).reshape(-1, 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        # bf16 is the top half of a float32: shift the 16 bits up (ggml_compute_bf16_to_fp32).
        halves = blocks.contiguous().view(torch.int16).to(torch.int32)
        return (halves << 16).view(torch.float32)

"""The grid "i-quants" IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, and the
ternary TQ1_0, TQ2_0. llmpress loads and runs them all, and writes them all: the
IQ2_*, IQ1_* and IQ3_* types through its C quantizers only (quantize_iq2.c,
quantize_iq3.c), TQ1_0 and TQ2_0 in C or the numpy ports below.

An i-quant stores, per 4 or 8 weights, an index into a fixed grid of value patterns, plus
sign bits and a small per-group scale. The grids are gguf-py's (`gguf.quants.<TYPE>.grid`,
ggml's iq*_grid tables, formats/grids.py), read once per device: the one copy in the
project, which the C kernels and quantizers also receive (kernels/cpu.py, cquant.py).
Dequantizers follow dequantize_row_iq* / tq* (ggml-quants.c) rounding for rounding: the
group scale first (`d * (0.5 + s) * 0.25`, `d * (1 + 2 s)`, ...), then `scale * grid`, then
the sign (exact).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from gguf import GGMLQuantizationType

from llmpress.errors import LlmpressError
from llmpress.formats import cquant
from llmpress.formats.base import BlockFormat, bit_shifts, read_f16
from llmpress.formats.grids import grid_values, sign_patterns
from llmpress.formats.legacy import fp16_bytes

T = GGMLQuantizationType


def grid_levels(ggml_type: GGMLQuantizationType) -> np.ndarray:
    """The grid as levels: each value's rank among the grid's distinct values (0..2 for
    the IQ2/IQ1 grids), uint8 (entries, values per entry). ggml's quantizers search these."""
    grid = grid_values(ggml_type)
    _, ranks = np.unique(grid, return_inverse=True)
    return ranks.reshape(grid.shape).astype(np.uint8)


@lru_cache(maxsize=None)
def _grid(ggml_type: GGMLQuantizationType, device: str) -> torch.Tensor:
    return torch.from_numpy(grid_values(ggml_type)).to(device)


@lru_cache(maxsize=None)
def _ksigns(device: str) -> torch.Tensor:
    return torch.from_numpy(sign_patterns().copy()).to(device)


def lookup(ggml_type: GGMLQuantizationType, indices: torch.Tensor) -> torch.Tensor:
    """Grid entries for integer indices (any shape) -> float32 (*shape, entry length)."""
    grid = _grid(ggml_type, str(indices.device))
    return grid.index_select(0, indices.reshape(-1).long()).view(*indices.shape, grid.shape[1])


def signs_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 (...) of 8 sign bits -> float32 (..., 8): bit j set -> -1 for value j."""
    set_bits = (bits.unsqueeze(-1) >> bit_shifts(1, 8, bits.device)) & 1
    return 1 - 2 * set_bits.float()


def signs_from_index(index: torch.Tensor) -> torch.Tensor:
    """7-bit indices into ksigns (any integer dtype) -> float32 (..., 8) of +-1."""
    table = _ksigns(str(index.device))
    return signs_from_bits(table.index_select(0, index.reshape(-1).long()).view(index.shape))


def little_endian(blocks: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 (n, m * width) -> int64 (n, m): little-endian unsigned words of `width` bytes."""
    words = blocks.reshape(blocks.shape[0], -1, width).long()
    out = words[..., 0]
    for i in range(1, width):
        out = out | (words[..., i] << (8 * i))
    return out


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (n, m) -> (n, 2m): each byte's low nibble, then its high one."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(1)


def half_scale(d: torch.Tensor, s: torch.Tensor, factor: float) -> torch.Tensor:
    """ggml's `d * (0.5f + s) * factor` for IQ2_* and IQ3_XXS, in its float32 order."""
    return d * (s.float() + 0.5) * factor


class _Named(BlockFormat):
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "ggml_type" in cls.__dict__:
            cls.name = cls.ggml_type.name


class _CQuantized(_Named):
    """A grid type llmpress writes through its C quantizers only (quantize_iq2.c,
    quantize_iq3.c): the grid search has no numpy port."""

    def quantize_blocks(self, values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        raise LlmpressError(f"quantizing to {self.name} needs llmpress's C quantizer library: "
                            "it was not built (no C compiler at install) or "
                            "LLMPRESS_NUMPY_QUANTIZE turns it off")


class _GridQuantized(_CQuantized):
    """An IQ2_*/IQ1_* format: its grid is handed to the C library on first use, and ggml's
    rule on the importance matrix holds (ggml_quantize_requires_imatrix)."""
    needs_importance = True

    def quantize(self, values: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        if importance is None and self.needs_importance:
            raise LlmpressError(f"quantizing to {self.name} needs an importance matrix "
                                "(imatrix), as in llama.cpp")
        if cquant.supports(self.ggml_type):
            cquant.set_iq_grid(self.ggml_type, grid_levels(self.ggml_type))
        return super().quantize(values, importance)


class IQ2_XXS(_GridQuantized):
    """66 bytes: d, then 8 groups of 32 values as two u32: four 8-bit grid indices; four
    7-bit sign indices and a 4-bit scale."""
    ggml_type = T.IQ2_XXS

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = read_f16(blocks, 0)
        words = little_endian(blocks[:, 2:], 4).view(n, 8, 2)
        scale = half_scale(d, words[..., 1] >> 28, 0.25).view(n, 8, 1, 1)
        grid = lookup(self.ggml_type, blocks[:, 2:].reshape(n, 8, 8)[:, :, :4])  # (n, 8, 4, 8)
        sign_index = (words[..., 1:2] >> torch.tensor([0, 7, 14, 21], device=blocks.device)) & 127
        return (scale * grid * signs_from_index(sign_index)).reshape(n, 256)


class IQ2_XS(_GridQuantized):
    """74 bytes: d, 32 u16 (9-bit grid index | 7-bit sign index << 9), 8 bytes of two
    4-bit scales (one per 16 values)."""
    ggml_type = T.IQ2_XS

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = read_f16(blocks, 0)
        qs = little_endian(blocks[:, 2:66], 2)  # (n, 32)
        scale = half_scale(d, nibbles(blocks[:, 66:74]), 0.25).view(n, 16, 1, 1)
        grid = lookup(self.ggml_type, qs & 511).view(n, 16, 2, 8)
        signs = signs_from_index(qs >> 9).view(n, 16, 2, 8)
        return (scale * grid * signs).reshape(n, 256)


class IQ2_S(_GridQuantized):
    """82 bytes: d, 32 low bytes of 10-bit grid indices, 32 sign bytes, 8 bytes of the
    indices' top bit pairs, 8 bytes of two 4-bit scales."""
    ggml_type = T.IQ2_S
    needs_importance = False  # ggml quantizes IQ2_S and IQ1_M without one too

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = read_f16(blocks, 0)
        high = (blocks[:, 66:74].unsqueeze(2) >> bit_shifts(2, 4, blocks.device)) & 3
        index = blocks[:, 2:34].long() | (high.reshape(n, 32).long() << 8)
        scale = half_scale(d, nibbles(blocks[:, 74:82]), 0.25).view(n, 16, 1, 1)
        grid = lookup(self.ggml_type, index).view(n, 16, 2, 8)
        signs = signs_from_bits(blocks[:, 34:66]).view(n, 16, 2, 8)
        return (scale * grid * signs).reshape(n, 256)


class IQ3_XXS(_CQuantized):
    """98 bytes: d, 64 grid indices (4 values each), then 8 u32: four 7-bit sign indices
    and a 4-bit scale per group of 32."""
    ggml_type = T.IQ3_XXS

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = read_f16(blocks, 0)
        words = little_endian(blocks[:, 66:98], 4)  # (n, 8)
        scale = half_scale(d, words >> 28, 0.5).view(n, 8, 1, 1)
        grid = lookup(self.ggml_type, blocks[:, 2:66]).view(n, 8, 4, 8)
        shifts = torch.tensor([0, 7, 14, 21], device=blocks.device)
        sign_index = (words.unsqueeze(2) >> shifts) & 127
        return (scale * grid * signs_from_index(sign_index)).reshape(n, 256)


class IQ3_S(_CQuantized):
    """110 bytes: d, 64 low bytes of 9-bit grid indices, 8 bytes of their top bits, 32
    sign bytes, 4 bytes of two 4-bit scales (one per 32 values, as d * (1 + 2 s))."""
    ggml_type = T.IQ3_S

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = read_f16(blocks, 0)
        high = (blocks[:, 66:74].unsqueeze(2) >> bit_shifts(1, 8, blocks.device)) & 1
        index = blocks[:, 2:66].long() | (high.reshape(n, 64).long() << 8)
        scale = (d * (1 + 2 * nibbles(blocks[:, 106:110])).float()).view(n, 8, 1, 1)
        grid = lookup(self.ggml_type, index).view(n, 8, 4, 8)
        signs = signs_from_bits(blocks[:, 74:106]).view(n, 8, 4, 8)
        return (scale * grid * signs).reshape(n, 256)


IQ1_DELTA = 0.125  # ggml's IQ1S_DELTA: the ternary grid is shifted by +-delta


def ternary_grid_plus_delta(grid: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """grid (..., 8) + delta (-delta where `negative`), exact in float32."""
    delta = torch.where(negative, -IQ1_DELTA, IQ1_DELTA).to(torch.float32)
    return grid + delta.unsqueeze(-1)


class IQ1_S(_GridQuantized):
    """50 bytes: d, 32 low bytes of 11-bit grid indices, 8 u16 per group of 32: four 3-bit
    index tops, a 3-bit scale (d * (2 s + 1)) and the delta's sign."""
    ggml_type = T.IQ1_S

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = read_f16(blocks, 0)
        qh = little_endian(blocks[:, 34:50], 2)  # (n, 8)
        scale = (d * (2 * ((qh >> 12) & 7) + 1).float()).view(n, 8, 1, 1)
        tops = (qh.unsqueeze(2) >> torch.tensor([0, 3, 6, 9], device=blocks.device)) & 7
        index = blocks[:, 2:34].long() | (tops.reshape(n, 32) << 8)
        grid = lookup(self.ggml_type, index).view(n, 8, 4, 8)
        negative = (qh & 0x8000).bool().view(n, 8, 1).expand(n, 8, 4)
        return (scale * ternary_grid_plus_delta(grid, negative)).reshape(n, 256)


class IQ1_M(_GridQuantized):
    """56 bytes: 32 low bytes of 11-bit grid indices, 16 bytes of two (3-bit index top,
    delta sign) nibbles, 4 u16 of 3-bit scales (one per 16 values) whose top nibbles
    together hold d."""
    ggml_type = T.IQ1_M
    needs_importance = False

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        packed = little_endian(blocks[:, 48:56], 2)  # (n, 4)
        d_bits = ((packed >> 12) << torch.tensor([0, 4, 8, 12], device=blocks.device)).sum(1)
        d_bytes = torch.stack([d_bits & 0xFF, d_bits >> 8], dim=1).to(torch.uint8)
        d = d_bytes.view(torch.float16).float().view(n, 1)
        scales = (packed.unsqueeze(2) >> torch.tensor([0, 3, 6, 9], device=blocks.device)) & 7
        scale = (d * (2 * scales.reshape(n, 16) + 1).float()).view(n, 16, 1, 1)
        qh = nibbles(blocks[:, 32:48])  # (n, 32): one per grid entry
        index = blocks[:, 0:32].long() | ((qh & 7).long() << 8)
        grid = lookup(self.ggml_type, index).view(n, 16, 2, 8)
        negative = (qh & 8).bool().view(n, 16, 2)
        return (scale * ternary_grid_plus_delta(grid, negative)).reshape(n, 256)


def trits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """TQ1_0's base-3 digits: a byte is a fixed-point fraction of its `count` trits, and
    digit k is ((b * 3^k mod 256) * 3) >> 8. uint8 (n, m) -> int64 (n, count * m), digit-major."""
    powers = torch.tensor([1, 3, 9, 27, 81][:count], device=packed.device).view(1, count, 1)
    shifted = (packed.long().unsqueeze(1) * powers) & 0xFF  # uint8 wrap-around, as ggml
    return ((shifted * 3) >> 8).flatten(1)


def ternary_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_tq*_ref's common part: float32 (n, 256) -> (d (n, 1) float32, codes
    (n, 256) of 0, 1, 2 = round(x / max|x|) + 1, halves away from zero as lroundf)."""
    d = np.abs(values).max(axis=1, keepdims=True).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        scaled = (values * inverse).astype(np.float64)  # float32 product, then exact
        rounded = np.trunc(scaled + np.copysign(0.5, scaled))
    # A subnormal max makes 1/d infinite: lroundf of inf or NaN is LONG_MIN on x86-64,
    # and ggml's int of LONG_MIN + 1 is 1, the code of 0.
    codes = np.where(np.isfinite(rounded), rounded + 1, 1).astype(np.int64)
    return d, codes


def pack_trits(codes: np.ndarray) -> np.ndarray:
    """(n, m, k) codes, the first most significant, k <= 5 -> uint8 (n, m): the base-3
    number padded to 5 digits, as a fraction of 243 rounded up to 256ths."""
    value = np.zeros(codes.shape[:2], dtype=np.int64)
    for k in range(5):
        value = value * 3 + (codes[..., k] if k < codes.shape[2] else 0)
    return ((value * 256 + 242) // 243).astype(np.uint8)


class TQ1_0(_Named):
    """54 bytes: 48 bytes of five trits each, 4 bytes of four, d (f16) last."""
    ggml_type = T.TQ1_0

    def quantize_blocks(self, values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        n = values.shape[0]
        d, codes = ternary_codes(values)
        # byte m of a part holds values m, m + stride, ... of that part (trit-major)
        parts = [(0, 160, 32), (160, 240, 16), (240, 256, 4)]
        packed = [pack_trits(codes[:, a:b].reshape(n, -1, stride).transpose(0, 2, 1))
                  for a, b, stride in parts]
        return np.concatenate([*packed, fp16_bytes(d[:, 0])], axis=1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = read_f16(blocks, 52)
        q = torch.cat([trits(blocks[:, 0:32], 5), trits(blocks[:, 32:48], 5),
                       trits(blocks[:, 48:52], 4)], dim=1)
        return d * (q - 1).float()


class TQ2_0(_Named):
    """66 bytes: 64 bytes of four 2-bit codes (value code - 1), d (f16) last."""
    ggml_type = T.TQ2_0

    def quantize_blocks(self, values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        n = values.shape[0]
        d, codes = ternary_codes(values)
        # byte 32 j + m holds values 128 j + m + 32 k in bits 2k
        codes = codes.reshape(n, 2, 4, 32)
        packed = sum(codes[:, :, k] << (2 * k) for k in range(4)).astype(np.uint8)
        return np.concatenate([packed.reshape(n, 64), fp16_bytes(d[:, 0])],
                              axis=1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = read_f16(blocks, 64)
        shifts = bit_shifts(2, 4, blocks.device).view(1, 1, 4, 1)
        codes = (blocks[:, 0:64].reshape(n, 2, 1, 32) >> shifts) & 3
        return d * (codes.reshape(n, 256).float() - 1)

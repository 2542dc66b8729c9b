"""The value grid of a GGUF block once its scales are chosen, and writing level codes into
a block: what GPTQ needs to quantize column by column into an ordinary GGUF block format.

Every format llmpress writes stores, per weight, a small code c and per (sub-)block
scale fields; with the scales fixed, the weight's value is `lo + unit * LEVELS[c]`: linear
formats have LEVELS = 0, 1, ..., n-1 (Q4_0: lo = -8d, unit = d; Q4_K: lo = -dmin*m,
unit = d*sc; ...), IQ4_NL/IQ4_XS the non-linear kvalues_iq4nl shifted to start at 0.
`grid()` reads lo and unit off the bytes by dequantizing them with all codes 0 and all
codes maximal, so only the packing of codes (the layouts of ggml-common.h) is per format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from llmpress.errors import LlmpressError
from llmpress.formats import get_format
from llmpress.formats.iq4 import IQ4_NL_VALUES
from llmpress.formats.legacy import pack_fifth_bits, pack_nibbles


def _linear(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32)


_IQ4_LEVELS = np.array(IQ4_NL_VALUES, dtype=np.float32) - IQ4_NL_VALUES[0]


def _set_nibbles(blocks, codes, start):  # (n, 32) codes -> 16 bytes at `start`
    blocks[:, start:start + 16] = pack_nibbles(codes)


def _pack_q4_0(b, c):
    _set_nibbles(b, c, 2)


def _pack_q4_1(b, c):
    _set_nibbles(b, c, 4)


def _pack_q5_0(b, c):
    b[:, 2:6] = pack_fifth_bits(c)
    _set_nibbles(b, c & 15, 6)


def _pack_q5_1(b, c):
    b[:, 4:8] = pack_fifth_bits(c)
    _set_nibbles(b, c & 15, 8)


def _pack_q8_0(b, c):  # code 0..254 is q = code - 127 (ggml's quantizers use -127..127)
    b[:, 2:34] = (c.astype(np.int16) - 127).astype(np.int8).view(np.uint8)


def _shifted_sum(parts: np.ndarray, step: int, axis: int) -> np.ndarray:
    """Sum over `axis` of part k shifted left by k*step bits (parts of disjoint bits)."""
    shifts = (np.arange(parts.shape[axis]) * step).reshape(
        [-1 if a == axis else 1 for a in range(parts.ndim)])
    return (parts.astype(np.uint32) << shifts).sum(axis=axis).astype(np.uint8)


def _pack_q2_k(b, c):  # qs: byte l of half h holds values h*128 + k*32 + l at bits 2k
    n = c.shape[0]
    b[:, 16:80] = _shifted_sum(c.reshape(n, 2, 4, 32), 2, axis=2).reshape(n, 64)


def _pack_q3_k(b, c):  # 2 low bits as Q2_K's qs; bit 2 of value g*32 + l is hmask[l] bit g
    n = c.shape[0]
    b[:, 32:96] = _shifted_sum((c & 3).reshape(n, 2, 4, 32), 2, axis=2).reshape(n, 64)
    b[:, 0:32] = _shifted_sum((c >> 2).reshape(n, 8, 32), 1, axis=1)


def _k4_nibbles(c: np.ndarray) -> np.ndarray:
    """(n, 256) -> (n, 128): 32-byte chunk j holds sub-block 2j (low) and 2j+1 (high)."""
    q = c.reshape(c.shape[0], 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(c.shape[0], 128)


def _pack_q4_k(b, c):
    b[:, 16:144] = _k4_nibbles(c)


def _pack_q5_k(b, c):  # qh[l] bit s: bit 4 of value l of sub-block s
    n = c.shape[0]
    b[:, 16:48] = _shifted_sum((c >> 4).reshape(n, 8, 32), 1, axis=1)
    b[:, 48:176] = _k4_nibbles(c & 15)


def _pack_q6_k(b, c):  # per half: ql nibbles (quarters 0|2, 1|3), qh bit pairs k
    n = c.shape[0]
    q = c.reshape(n, 2, 4, 32)
    low = q & 15
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)],
                        axis=2)  # (n, half, 64)
    b[:, 0:128] = ql.reshape(n, 128)
    b[:, 128:192] = _shifted_sum(q >> 4, 2, axis=2).reshape(n, 64)


def _pack_iq4_nl(b, c):
    _set_nibbles(b, c, 2)


def _pack_iq4_xs(b, c):
    n = c.shape[0]
    b[:, 8:136] = pack_nibbles(c.reshape(n * 8, 32)).reshape(n, 128)


@dataclass(frozen=True)
class GridLayout:
    pack: object  # (blocks uint8 (n, type_size), codes uint8 (n, block_size)) -> None, in place
    levels: np.ndarray  # LEVELS[c], float32 ascending from 0


LAYOUTS: dict[T, GridLayout] = {
    T.Q4_0: GridLayout(_pack_q4_0, _linear(16)), T.Q4_1: GridLayout(_pack_q4_1, _linear(16)),
    T.Q5_0: GridLayout(_pack_q5_0, _linear(32)), T.Q5_1: GridLayout(_pack_q5_1, _linear(32)),
    T.Q8_0: GridLayout(_pack_q8_0, _linear(255)),
    T.Q2_K: GridLayout(_pack_q2_k, _linear(4)), T.Q3_K: GridLayout(_pack_q3_k, _linear(8)),
    T.Q4_K: GridLayout(_pack_q4_k, _linear(16)), T.Q5_K: GridLayout(_pack_q5_k, _linear(32)),
    T.Q6_K: GridLayout(_pack_q6_k, _linear(64)),
    T.IQ4_NL: GridLayout(_pack_iq4_nl, _IQ4_LEVELS), T.IQ4_XS: GridLayout(_pack_iq4_xs, _IQ4_LEVELS),
}  # fmt: skip


def layout(ggml_type: T) -> GridLayout:
    if ggml_type not in LAYOUTS:
        raise LlmpressError(f"GPTQ cannot target {T(ggml_type).name}; it targets "
                            f"{', '.join(t.name for t in LAYOUTS)}")
    return LAYOUTS[ggml_type]


def with_codes(blocks: np.ndarray, codes: np.ndarray, ggml_type: T) -> np.ndarray:
    """A copy of `blocks` (n, type_size) whose level codes are `codes` (n, block_size)."""
    out = np.array(blocks, dtype=np.uint8, copy=True)
    layout(ggml_type).pack(out, np.asarray(codes, dtype=np.uint8))
    return out


def dequantize_blocks(blocks: np.ndarray, ggml_type: T) -> np.ndarray:
    fmt = get_format(ggml_type)
    raw = torch.from_numpy(np.ascontiguousarray(blocks).reshape(-1))
    return fmt.dequantize(raw, (blocks.shape[0], fmt.block_size)).numpy()


@dataclass(frozen=True)
class BlockGrid:
    """The values each weight of some blocks may take: lo + unit * levels[c]."""

    lo: np.ndarray  # float32 (n, block_size)
    unit: np.ndarray  # float32 (n, block_size), may be negative or zero
    levels: np.ndarray  # float32 (n_levels,)

    def nearest(self, values: np.ndarray, columns: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Nearest grid point for values (n, k) at block positions `columns`:
        -> (grid values float32 (n, k), codes uint8 (n, k))."""
        lo, unit = self.lo[:, columns], self.unit[:, columns]
        with np.errstate(divide="ignore", invalid="ignore"):
            position = np.where(unit != 0, (values - lo) / unit, 0.0)
        midpoints = (self.levels[1:] + self.levels[:-1]) / 2
        codes = np.searchsorted(midpoints, position).astype(np.uint8)
        return (lo + unit * self.levels[codes]).astype(np.float32), codes


def grid(blocks: np.ndarray, ggml_type: T) -> BlockGrid:
    """The grid fixed by the scale fields of `blocks` (n, type_size)."""
    fmt, grid_layout = get_format(ggml_type), layout(ggml_type)
    n_levels = grid_layout.levels.size
    zeros = np.zeros((blocks.shape[0], fmt.block_size), dtype=np.uint8)
    lo = dequantize_blocks(with_codes(blocks, zeros, ggml_type), ggml_type)
    hi = dequantize_blocks(with_codes(blocks, zeros + (n_levels - 1), ggml_type), ggml_type)
    unit = ((hi.astype(np.float64) - lo) / grid_layout.levels[-1]).astype(np.float32)
    return BlockGrid(lo, unit, grid_layout.levels)

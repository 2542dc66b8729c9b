"""The 32-value block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (ggml-common.h layouts).

Dequantizers follow ggml's dequantize_row_q* (ggml-quants.c) operation for operation, so
the float32 results are bit-identical: a product `d * q` (and `+ m`), each rounded once.

Quantizers are bit-exact with ggml_quantize_chunk: without importance weights they are
quantize_row_q*_ref; with them, quantize_row_q*_impl (make_qx_quants for Q4_0/Q5_0,
make_qkx3_quants for Q4_1/Q5_1; Q8_0 ignores weights). Every step is float32 in the C
operand order; sums that C accumulates in index order are accumulated the same way (a loop
over the 32 positions, vectorized across blocks), never numpy's pairwise sum. libggml-base
is built for baseline x86-64, so there are no fused multiply-adds to mimic.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from llmpress.formats.base import BlockFormat, bit_shifts, read_f16
from llmpress.formats.float import float32_to_fp16_bits
from llmpress.formats.ggml_ops import (
    F32,
    GROUP_MAX_EPS,
    importance_weights,
    nearest_int,
    sum_in_order,
)


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


# --- float32 primitives matching ggml -------------------------------------------------
def round_away_from_zero(values: np.ndarray) -> np.ndarray:
    """C roundf: halves go away from zero (np.rint would go to even). Compares the exact
    fraction with 0.5 (adding 0.5 first would round 0.49999997 up)."""
    magnitude = np.abs(values)
    whole = np.floor(magnitude)
    return np.copysign(whole + (magnitude - whole >= F32(0.5)), values)


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 (n,) -> (n, 2) bytes of the fp16 scale, as GGML_FP32_TO_FP16."""
    return float32_to_fp16_bits(values).view(np.uint8).reshape(-1, 2)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) values (their low 4 bits) -> (n, 16): byte j = q[j] | q[j + 16] << 4."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def pack_fifth_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) values 0..31 -> (n, 4) bytes of the little-endian u32 of their bit 4."""
    bits = (q.astype(np.uint8) >> 4) & 1
    return np.packbits(bits, axis=1, bitorder="little")


def first_abs_max(values: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each row, the first one on ties (`amax < |v|`)."""
    index = np.argmax(np.abs(values), axis=1)
    return values[np.arange(values.shape[0]), index]


def row_mean_square(blocks: np.ndarray, row_length: int) -> np.ndarray:
    """sigma2 of quantize_row_q*_impl: sum of x*x over the row in order, / n_per_row;
    returned per block (n_blocks,)."""
    rows = blocks.reshape(-1, row_length)
    # np.cumsum is a strictly sequential float32 accumulation (unlike np.sum).
    sigma2 = np.cumsum(rows * rows, axis=1, dtype=F32)[:, -1] / F32(row_length)
    return np.repeat(sigma2, row_length // blocks.shape[1])


# Bounds the (candidates, positions, blocks) search arrays to tens of MB.
_SEARCH_CHUNK_BLOCKS = 4096


def make_qx_quants(x: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(n=32, nmax, x, L, rmse_type=1, qw) for every block.

    x, weights (n, 32) -> (scale (n,) float32, L (n, 32) uint8 in 0..2*nmax-1). Tries the
    plain scale -nmax/max then 18 nudged ones, keeping one whenever it beats the running
    best by C's exact test `sumlx*sumlx > best*suml2`.
    """
    n = x.shape[0]
    scale = np.zeros(n, dtype=F32)
    levels = np.zeros((n, 32), dtype=np.uint8)
    for start in range(0, n, _SEARCH_CHUNK_BLOCKS):
        part = slice(start, start + _SEARCH_CHUNK_BLOCKS)
        scale[part], levels[part] = _make_qx_quants_chunk(x[part], weights[part], nmax)
    return scale, levels


def _make_qx_quants_chunk(x: np.ndarray, weights: np.ndarray, nmax: int):
    max_value = first_abs_max(x)
    all_zero = np.abs(max_value) < GROUP_MAX_EPS
    safe_max = np.where(all_zero, F32(1), max_value)
    # Candidate 0 is -nmax/max; then is = -9..-1, 1..9: -(nmax + 0.1f*is)/max.
    steps = [s for s in range(-9, 10) if s != 0]
    numerators = [F32(-nmax)] + [-(F32(nmax) + F32(0.1) * F32(s)) for s in steps]
    iscales = np.stack([F32(num) / safe_max for num in numerators])  # (19, n)

    xt, wt = np.ascontiguousarray(x.T), np.ascontiguousarray(weights.T)  # (32, n)
    # (32, 19, n): every position under every candidate scale, summed in position order.
    candidate_levels = np.clip(nearest_int(iscales * xt[:, None, :]).astype(F32), -nmax,
                               nmax - 1)
    lf = candidate_levels
    sumlx = sum_in_order((wt * xt)[:, None, :] * lf)
    suml2 = sum_in_order(wt[:, None, :] * lf * lf)

    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2[0] != 0, sumlx[0] / suml2[0], F32(0)).astype(F32)
        best = scale * sumlx[0]
        chosen = np.zeros(x.shape[0], dtype=np.intp)
        for c in range(1, len(numerators)):
            better = (suml2[c] > 0) & (sumlx[c] * sumlx[c] > best * suml2[c])
            scale = np.where(better, sumlx[c] / suml2[c], scale)
            best = np.where(better, scale * sumlx[c], best)
            chosen = np.where(better, c, chosen)

    picked = np.take_along_axis(candidate_levels, chosen[None, None, :], axis=1)[:, 0, :]
    levels = (picked.T.astype(np.int16) + nmax).astype(np.uint8)
    levels[all_zero] = 0
    scale[all_zero] = 0
    return scale, levels


def make_qkx3_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx3_quants(n=32, nmax, x, weights, rmin=-0.9, rdelta=0.05, nstep=36,
    use_mad=false) for every block.

    -> (scale (n,), min (n,) <= 0, L (n, 32) uint8 in 0..nmax): value ~ scale * L + min.
    Each of 37 candidate scales gets the weighted least-squares (scale, min) for its
    levels; the first one with the lowest weighted squared error wins.
    """
    n = x.shape[0]
    scale, minimum = np.zeros(n, dtype=F32), np.zeros(n, dtype=F32)
    levels = np.zeros((n, 32), dtype=np.uint8)
    for start in range(0, n, _SEARCH_CHUNK_BLOCKS):
        part = slice(start, start + _SEARCH_CHUNK_BLOCKS)
        scale[part], minimum[part], levels[part] = _make_qkx3_quants_chunk(
            x[part], weights[part], nmax
        )
    return scale, minimum, levels


def _make_qkx3_quants_chunk(x: np.ndarray, weights: np.ndarray, nmax: int):
    xt, wt = np.ascontiguousarray(x.T), np.ascontiguousarray(weights.T)  # (32, n)
    minimum = np.minimum(x.min(axis=1), F32(0))
    maximum = x.max(axis=1)
    sum_w = sum_in_order(wt, start_with_first=True)
    sum_x = sum_in_order(wt * xt, start_with_first=True)
    degenerate = maximum <= minimum
    live = ~degenerate

    def levels_for(iscale: np.ndarray, minimum: np.ndarray) -> np.ndarray:
        # (32, n) float32 of nearest_int(iscale*(x[i] - min)) clamped to 0..nmax
        levels = xt - minimum
        levels *= iscale
        levels[...] = nearest_int(levels)
        return np.clip(levels, F32(0), F32(nmax), out=levels)

    def weighted_squared_error(scale, minimum, levels) -> np.ndarray:
        diff = scale * levels
        diff += minimum
        diff -= xt
        diff *= diff
        diff *= wt
        return sum_in_order(diff)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        span = np.where(degenerate, F32(1), maximum - minimum)
        iscale = F32(nmax) / span
        scale = F32(1) / iscale
        levels = levels_for(iscale, minimum)
        best_mad = weighted_squared_error(scale, minimum, levels)
        # Candidates in order; `min` (and so max - min and x - min) is the running best,
        # as in the C loop, so each step depends on the previous ones.
        for step in range(37):
            numerator = F32(-0.9) + F32(0.05) * F32(step) + F32(nmax)
            candidate = levels_for(numerator / (maximum - minimum), minimum)
            wl = wt * candidate
            sum_l = sum_in_order(wl)
            sum_l2 = sum_in_order(wl * candidate)
            sum_xl = sum_in_order(wl * xt)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive_min = this_min > 0
            this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive_min, F32(0), this_min)
            mad = weighted_squared_error(this_scale, this_min, candidate)
            better = live & (det > 0) & (mad < best_mad)
            best_mad = np.where(better, mad, best_mad)
            scale = np.where(better, this_scale, scale)
            minimum = np.where(better, this_min, minimum)
            levels = np.where(better, candidate, levels)

    levels = levels.T.astype(np.uint8)
    levels[degenerate] = 0
    scale = np.where(degenerate, F32(0), scale).astype(F32)
    return scale, minimum.astype(F32), levels


class _LegacyQuant(BlockFormat):
    """A 32-value format whose imatrix path needs the row's mean square (sigma2).

    quantize_blocks(values, weights) treats all given blocks as ONE row; quantize() of a
    whole tensor passes the real rows through quantize_row_blocks.
    """

    uses_importance = True  # ggml's Q8_0 ignores the imatrix

    def quantize_blocks(self, values: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        return self.quantize_row_blocks(values, weights, values.size)

    def quantize_row_blocks(
        self, values: np.ndarray, weights: np.ndarray | None, row_length: int
    ) -> np.ndarray:
        values = np.ascontiguousarray(values, dtype=F32)
        if weights is None or not self.uses_importance:
            return self.quantize_reference(values)
        weights = np.ascontiguousarray(weights, dtype=F32)
        sigma2 = row_mean_square(values, row_length)
        return self.quantize_weighted(values, importance_weights(values, weights, sigma2[:, None]))

    def quantize_reference(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def quantize_weighted(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _truncate_to_int8(values: np.ndarray) -> np.ndarray:
    """C `(int8_t)` of a float in range: truncation toward zero."""
    return np.trunc(values).astype(np.int16)


def _inverse_or_zero(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f`"""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


class Q4_0(_LegacyQuant):
    name = "Q4_0"
    ggml_type = GGMLQuantizationType.Q4_0
    # a block of 32 values: d: f16, qs: 16 bytes

    def quantize_reference(self, x: np.ndarray) -> np.ndarray:
        # quantize_row_q4_0_ref: d = max/-8 (max = signed value of largest magnitude).
        d = first_abs_max(x) / F32(-8)
        inverse = _inverse_or_zero(d)
        q = np.minimum(15, _truncate_to_int8(x * inverse[:, None] + F32(8.5)))
        return np.concatenate([fp16_bytes(d), pack_nibbles(q)], axis=1)

    def quantize_weighted(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        d, levels = make_qx_quants(x, weight, nmax=8)
        return np.concatenate([fp16_bytes(d), pack_nibbles(levels)], axis=1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = read_f16(blocks, 0)
        q = low_then_high_nibbles(blocks[:, 2:]).float()
        return q.sub_(8).mul_(d)  # in place: one buffer, same roundings as (q - 8) * d


class Q4_1(_LegacyQuant):
    name = "Q4_1"
    ggml_type = GGMLQuantizationType.Q4_1
    # a block of 32 values: d: f16, m: f16, qs: 16 bytes

    def quantize_reference(self, x: np.ndarray) -> np.ndarray:
        # quantize_row_q4_1_ref: d = (max - min)/15, q = (int8_t)((x - min)/d + 0.5).
        minimum, maximum = x.min(axis=1), x.max(axis=1)
        d = (maximum - minimum) / F32(15)
        inverse = _inverse_or_zero(d)
        q = np.minimum(15, _truncate_to_int8((x - minimum[:, None]) * inverse[:, None] + F32(0.5)))
        return np.concatenate([fp16_bytes(d), fp16_bytes(minimum), pack_nibbles(q)], axis=1)

    def quantize_weighted(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        d, minimum, levels = make_qkx3_quants(x, weight, nmax=15)
        return np.concatenate([fp16_bytes(d), fp16_bytes(minimum), pack_nibbles(levels)], axis=1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, m = read_f16(blocks, 0), read_f16(blocks, 2)
        q = low_then_high_nibbles(blocks[:, 4:])
        return q.float().mul_(d).add_(m)


class Q5_0(_LegacyQuant):
    name = "Q5_0"
    ggml_type = GGMLQuantizationType.Q5_0
    # a block of 32 values: d: f16, qh: 4 bytes, qs: 16 bytes

    def quantize_reference(self, x: np.ndarray) -> np.ndarray:
        # quantize_row_q5_0_ref: d = max/-16, q = MIN(31, (int8_t)(x/d + 16.5)).
        d = first_abs_max(x) / F32(-16)
        inverse = _inverse_or_zero(d)
        q = np.minimum(31, _truncate_to_int8(x * inverse[:, None] + F32(16.5)))
        return np.concatenate([fp16_bytes(d), pack_fifth_bits(q), pack_nibbles(q)], axis=1)

    def quantize_weighted(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        d, levels = make_qx_quants(x, weight, nmax=16)
        return np.concatenate(
            [fp16_bytes(d), pack_fifth_bits(levels), pack_nibbles(levels)], axis=1
        )

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = read_f16(blocks, 0)
        q = low_then_high_nibbles(blocks[:, 6:]) | high_bits_q5(blocks[:, 2:6])
        return q.float().sub_(16).mul_(d)


class Q5_1(_LegacyQuant):
    name = "Q5_1"
    ggml_type = GGMLQuantizationType.Q5_1
    # a block of 32 values: d: f16, m: f16, qh: 4 bytes, qs: 16 bytes

    def quantize_reference(self, x: np.ndarray) -> np.ndarray:
        # quantize_row_q5_1_ref: d = (max - min)/31, q = (uint8_t)((x - min)/d + 0.5).
        minimum, maximum = x.min(axis=1), x.max(axis=1)
        d = (maximum - minimum) / F32(31)
        inverse = _inverse_or_zero(d)
        q = _truncate_to_int8((x - minimum[:, None]) * inverse[:, None] + F32(0.5))
        parts = [fp16_bytes(d), fp16_bytes(minimum), pack_fifth_bits(q), pack_nibbles(q)]
        return np.concatenate(parts, axis=1)

    def quantize_weighted(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        d, minimum, levels = make_qkx3_quants(x, weight, nmax=31)
        parts = [fp16_bytes(d), fp16_bytes(minimum), pack_fifth_bits(levels), pack_nibbles(levels)]
        return np.concatenate(parts, axis=1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, m = read_f16(blocks, 0), read_f16(blocks, 2)
        q = low_then_high_nibbles(blocks[:, 8:]) | high_bits_q5(blocks[:, 4:8])
        return q.float().mul_(d).add_(m)


class Q8_0(_LegacyQuant):
    name = "Q8_0"
    ggml_type = GGMLQuantizationType.Q8_0
    # a block of 32 values: d: f16, qs: 32 int8
    uses_importance = False

    def quantize_reference(self, x: np.ndarray) -> np.ndarray:
        # quantize_row_q8_0_ref (ggml ignores importance weights for Q8_0).
        d = np.abs(x).max(axis=1) / F32(127)
        inverse = _inverse_or_zero(d)
        q = round_away_from_zero(x * inverse[:, None]).astype(np.int8)
        return np.concatenate([fp16_bytes(d), q.view(np.uint8)], axis=1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = read_f16(blocks, 0)
        return blocks[:, 2:].view(torch.int8).float().mul_(d)

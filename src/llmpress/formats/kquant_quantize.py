"""Bit-exact numpy ports of ggml's k-quant and IQ4 quantizers (ggml/src/ggml-quants.c).

Each public function maps float32 blocks (n, block_size) plus optional per-value weights
(the imatrix importance broadcast per block) to ggml's exact block bytes (n, type_size):

    weights=None -> what ggml_quantize_chunk does without an imatrix
                    (quantize_row_q*_K_ref; for IQ4 quantize_iq4_* with weight x^2)
    weights      -> what it does with one (quantize_row_q*_K_impl, make_qkx3_quants,
                    make_qp_quants, the sigma2 weighting)

How the bits stay equal to the C code:
- every value is float32 and each expression is evaluated in the C operand order
  (`w*x[i]*l` is `(w*x)*l`); libggml-base is built for baseline x86-64, so there are
  no fused multiply-adds to mimic;
- sums over the values of a group run in index order from 0.0f (`ggml_ops.sum_in_order`),
  never numpy's pairwise sum;
- nearest_int is the 12582912 magic-number trick, reproduced on the bits;
- fp16 scales round to nearest even (np.float16 equals ggml_compute_fp32_to_fp16);
- the C casts to uint8/int8 wrap, and we wrap the same way.

The search loops run over the positions inside a group and over candidate scales; every
step is vectorized across all groups of all blocks at once ("group" = one sub-block: the
16 or 32 values that share a scale). Search arrays are laid out (position, group) so that
each step touches contiguous rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K
from gguf import GGMLQuantizationType as T

from llmpress.errors import LlmpressError
from llmpress.formats.ggml_ops import (
    F32,
    GROUP_MAX_EPS,
    importance_weights,
    nearest_int,
    sum_in_order,
)

# ggml-common.h kvalues_iq4nl: the 16 non-linear levels of IQ4_NL / IQ4_XS.
IQ4_LEVELS = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)
_IQ4_LEVELS_F32 = IQ4_LEVELS.astype(F32)

# Blocks quantized per pass: bounds the search arrays to a few MB each.
_CHUNK_VALUES = 1 << 18


# --------------------------------------------------------------------------- primitives
def _to_fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 -> (uint16 bits, the value read back as float32)."""
    half = np.asarray(v, dtype=F32).astype(np.float16)
    return half.view(np.uint16), half.astype(F32)


def _fp16_bytes(bits: np.ndarray) -> np.ndarray:
    """uint16 (n,) -> uint8 (n, 2), little-endian as stored in the block."""
    return bits.astype("<u2").view(np.uint8).reshape(-1, 2)


def _first_abs_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over axis 0: (largest |x|, the signed x where it first occurs), as `if (ax > amax)`."""
    ax = np.abs(x)
    ax = np.where(ax > 0, ax, F32(0))  # a NaN never wins `ax > amax`
    first = np.argmax(ax, axis=0)[None]
    amax = np.take_along_axis(ax, first, 0)[0]
    # C starts from max = 0 and never moves when every |x| is 0 (keeps +0, not a -0 from x).
    return amax, np.where(amax > 0, np.take_along_axis(x, first, 0)[0], F32(0))


def _max_from_zero(a: np.ndarray) -> np.ndarray:
    """Row max as `float m = 0; if (a[j] > m) m = a[j];` computes it: +0 unless some a > 0."""
    return np.where(a > 0, a, F32(0)).max(axis=1)  # NaN and -0 never win


def _groups(values: np.ndarray, size: int) -> np.ndarray:
    """(n, block) -> (size, n*block/size): position-major view of every group of `size`."""
    return np.ascontiguousarray(values.reshape(-1, size).T)


def _ungroup(levels: np.ndarray, n_blocks: int) -> np.ndarray:
    """Inverse of `_groups`: (size, G) -> (n_blocks, block)."""
    return np.ascontiguousarray(levels.T).reshape(n_blocks, -1)


# --------------------------------------------------------------------------- scale searches
def _make_qx_quants(
    x: np.ndarray, nmax: int, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants with rmse_type 1: symmetric levels 0..2*nmax-1, weight x^2 or `weights`.

    x (n, G) -> (scale (G,), levels (n, G) int32)."""
    amax, signed_max = _first_abs_max(x)
    w = x * x if weights is None else weights
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        level = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
        lf = level.astype(F32)
        return level, sum_in_order(wx * lf), sum_in_order((w * lf) * lf)

    level, sumlx, suml2 = trial(F32(-nmax) / signed_max)
    levels = level + nmax
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        level, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / signed_max)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = np.where(better, level + nmax, levels)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    zero = amax < GROUP_MAX_EPS
    return np.where(zero, F32(0), scale), np.where(zero, 0, levels)


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(do_rmse=true): weight x^2, then up to 5 passes of one-level moves.

    A pass that changes nothing leaves the state as it was, so running all 5 passes for
    every group equals ggml's early break."""
    amax, signed_max = _first_abs_max(x)
    level = np.clip(nearest_int((F32(-nmax) / signed_max) * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = level.astype(F32)
    sumlx = sum_in_order(wx * lf)
    suml2 = sum_in_order((w * lf) * lf)
    for _ in range(5):
        for i in range(x.shape[0]):
            old = level[i].astype(F32)
            slx = sumlx - wx[i] * old
            sl2 = suml2 - (w[i] * old) * old
            new = np.clip(nearest_int((x[i] * sl2) / slx), -nmax, nmax - 1)
            nf = new.astype(F32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + (w[i] * nf) * nf
            accept = (
                (sumlx - wx[i] * old > 0)
                & (new != level[i])
                & (sl2 > 0)
                & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            )
            level[i] = np.where(accept, new, level[i])
            sumlx = np.where(accept, slx, sumlx)
            suml2 = np.where(accept, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    zero = amax < GROUP_MAX_EPS
    return np.where(zero, F32(0), scale), np.where(zero, 0, level + nmax)


def _make_qkx_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants / make_qkx3_quants (identical once the weights are given):
    affine levels 0..nmax, scale and min refit by weighted least squares per candidate.

    x, w (n, G) -> (scale (G,), the_min (G,) = -min >= 0, levels (n, G) int32)."""
    lo = np.minimum.reduce(x, axis=0)
    hi = np.maximum.reduce(x, axis=0)
    sum_w = w[0].copy()
    sum_x = sum_w * x[0]
    for i in range(1, x.shape[0]):
        sum_w += w[i]
        sum_x += w[i] * x[i]
    lo = np.where(lo > 0, F32(0), lo)

    def levels_for(iscale: np.ndarray, minimum: np.ndarray) -> np.ndarray:
        return np.clip(nearest_int(iscale * (x - minimum)), 0, nmax)

    def error(scale: np.ndarray, minimum: np.ndarray, level: np.ndarray) -> np.ndarray:
        diff = (scale * level.astype(F32) + minimum) - x
        diff = np.abs(diff) if use_mad else diff * diff
        return sum_in_order(w * diff)

    iscale = F32(nmax) / (hi - lo)
    scale = F32(1) / iscale
    minimum = lo
    levels = levels_for(iscale, minimum)
    best = error(scale, minimum, levels)
    terms = np.empty((x.shape[0], 3, *x.shape[1:]), dtype=F32)
    for step in range(nstep + 1):
        # ggml moves `min` to the best fit so far, and the next candidates start from it
        level = levels_for(
            ((F32(rmin) + F32(rdelta) * F32(step)) + F32(nmax)) / (hi - minimum), minimum
        )
        lf = level.astype(F32)
        np.multiply(w, lf, out=terms[:, 0])  # w*l
        np.multiply(terms[:, 0], lf, out=terms[:, 1])  # w*l*l
        np.multiply(terms[:, 0], x, out=terms[:, 2])  # w*l*x
        sum_l, sum_l2, sum_xl = sum_in_order(terms)  # the three sums in one pass
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        current = error(this_scale, this_min, level)
        better = (det > 0) & (current < best)
        levels = np.where(better, level, levels)
        best = np.where(better, current, best)
        scale = np.where(better, this_scale, scale)
        minimum = np.where(better, this_min, minimum)
    flat = hi == lo
    return np.where(flat, F32(0), scale), np.where(flat, -lo, -minimum), np.where(flat, 0, levels)


def _make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants: quantize non-negative group scales/mins to 0..nmax, weighted.

    x, w (n, G) -> (scale (G,), levels (n, G) as the C uint8 array holds them)."""
    top = np.zeros(x.shape[1:], dtype=F32)
    for row in x:
        top = np.where(top > row, top, row)  # MAX(max, x[i])
    iscale = F32(nmax) / top
    stored = nearest_int(iscale * x) & 0xFF
    diff = x - (F32(1) / iscale) * stored.astype(F32)
    best = sum_in_order((w * diff) * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_step = (F32(0.1) * F32(step) + F32(nmax)) / top
        level = np.minimum(nmax, nearest_int(iscale_step * x))
        diff = x - (F32(1) / iscale_step) * level.astype(F32)
        mse = sum_in_order((w * diff) * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, iscale_step, iscale)
    level = np.minimum(nmax, nearest_int(iscale * x))
    wx = w * x
    lf = level.astype(F32)
    sumlx = sum_in_order(wx * lf)
    suml2 = sum_in_order((w * lf) * lf)
    stored = level & 0xFF
    for _ in range(5):
        for i in range(x.shape[0]):
            old = stored[i].astype(F32)
            slx = sumlx - wx[i] * old
            sl2 = suml2 - (w[i] * old) * old
            active = (slx > 0) & (sl2 > 0)
            new = np.minimum(nmax, nearest_int((x[i] * sl2) / slx))
            nf = new.astype(F32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + (w[i] * nf) * nf
            accept = active & (new != stored[i]) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            stored[i] = np.where(accept, new & 0xFF, stored[i])
            sumlx = np.where(accept, slx, sumlx)
            suml2 = np.where(accept, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    zero = top < GROUP_MAX_EPS
    return np.where(zero, F32(0), scale), np.where(zero, 0, stored)


# Bracketing levels of v, looked up by k = floor(clip(v, -127, 112.5)) + 127: the levels
# are integers, so level <= v exactly when level <= floor(v).
_IQ4_LOWER = np.zeros(256, dtype=np.int8)
_IQ4_LOWER[:241] = (
    np.searchsorted(IQ4_LEVELS.astype(np.int64), np.arange(-127, 114), side="right") - 1
)
_IQ4_LOWER = np.minimum(_IQ4_LOWER, 14)
_IQ4_BELOW = _IQ4_LEVELS_F32[_IQ4_LOWER]
_IQ4_ABOVE = _IQ4_LEVELS_F32[_IQ4_LOWER + 1]


def _nearest_iq4(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """best_index_int8 over kvalues_iq4nl -> (index, level): the nearest level, ties up.

    Same float32 test as the C binary search (`x - val[mu-1] < val[mu] - x`); values past
    either end land on the end levels through that same test; NaN goes to 15 as in C."""
    k = (np.clip(v, F32(-127), F32(112.5)) + F32(127)).astype(np.uint8)
    below = _IQ4_BELOW[k]
    above = _IQ4_ABOVE[k]
    take_below = v - below < above - v
    index = np.where(take_below, _IQ4_LOWER[k], _IQ4_LOWER[k] + 1)
    level = np.where(take_below, below, above)
    nan = np.isnan(v)
    if nan.any():  # only from 1/0 scales on all-but-zero data
        index, level = np.where(nan, 15, index), np.where(nan, _IQ4_LEVELS_F32[15], level)
    return index, level


def _best_index_iq4(v: np.ndarray) -> np.ndarray:
    return _nearest_iq4(v)[0]


# --------------------------------------------------------------------------- packing
def _pack_2bit(levels: np.ndarray) -> np.ndarray:
    """(n, 256) levels 0..3 -> qs (n, 64): byte l of each 128-half holds l, l+32, l+64, l+96."""
    lv = levels.reshape(-1, 2, 4, 32).astype(np.uint8)
    packed = lv[:, :, 0] | (lv[:, :, 1] << 2) | (lv[:, :, 2] << 4) | (lv[:, :, 3] << 6)
    return packed.reshape(-1, 64)


def _pack_nibbles(levels: np.ndarray, run: int) -> np.ndarray:
    """(n, k) levels 0..15 -> (n, k/2): within each 2*run values, byte l = l | (l+run) << 4."""
    lv = levels.reshape(levels.shape[0], -1, 2, run).astype(np.uint8)
    return (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(levels.shape[0], -1)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 12-byte scales: 8 six-bit scales and mins (C uint8 wrap kept)."""
    s = np.zeros((ls.shape[0], 12), dtype=np.int64)
    s[:, 0:4] = ls[:, 0:4]
    s[:, 4:8] = lm[:, 0:4]
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    s[:, 0:4] = (s[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)) & 0xFF
    s[:, 4:8] = (s[:, 4:8] | ((lm[:, 4:8] >> 4) << 6)) & 0xFF
    return (s & 0xFF).astype(np.uint8)


def _unpack_scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for all 8 groups -> (scales, mins) (n, 8) int64."""
    s = s.astype(np.int64)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _pack_scales_q3(levels: np.ndarray) -> np.ndarray:
    """Q3_K 12-byte scales from 16 six-bit values 0..63 (low nibbles, then 2-bit tops)."""
    lv = levels.astype(np.int64)
    s = np.zeros((lv.shape[0], 12), dtype=np.int64)
    s[:, 0:8] = (lv[:, 0:8] & 0xF) | ((lv[:, 8:16] & 0xF) << 4)
    tops = lv >> 4  # (n, 16); group j goes to byte 8 + j%4, bits 2*(j//4)
    for quarter in range(4):
        s[:, 8:12] |= tops[:, 4 * quarter : 4 * quarter + 4] << (2 * quarter)
    return (s & 0xFF).astype(np.uint8)


def _unpack_scales_q3(s: np.ndarray) -> np.ndarray:
    """The signed Q3_K group scales (n, 16) as dequantize_row_q3_K reads them."""
    s = s.astype(np.int64)
    low = np.concatenate([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], axis=1)
    high = np.concatenate([(s[:, 8:12] >> (2 * q)) & 3 for q in range(4)], axis=1)
    signed = (low | (high << 4)) - 32
    return ((signed + 128) & 0xFF) - 128  # int8_t


def _requantize(
    x: np.ndarray, d: np.ndarray, offset: np.ndarray | None, lo: int, hi: int, searched: np.ndarray
) -> np.ndarray:
    """The final pass of every k-quant: l = nearest_int((x + offset)/d) clamped to lo..hi,
    plus -lo; groups whose d is 0 keep the levels the search left (`if (!d) continue`).

    x (n, g, size), d/offset (n, g), searched (n, g, size) already shifted by -lo."""
    num = x if offset is None else x + offset[..., None]
    level = np.clip(nearest_int(num / d[..., None]), lo, hi) - lo
    return np.where((d != 0)[..., None], level, searched)


def _blockwise(ggml_type: T):
    """Decorator: check shapes once, then quantize bounded slices of blocks of `ggml_type`
    (its sizes from gguf's GGML_QUANT_SIZES)."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]

    def wrap(quantize: Callable[[np.ndarray, np.ndarray | None], np.ndarray]):
        @functools.wraps(quantize)
        def run(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
            values = np.asarray(values)
            if values.ndim != 2 or values.shape[1] != block_size:
                raise LlmpressError(
                    f"{quantize.__name__}: values must be (n_blocks, {block_size}), got shape "
                    f"{values.shape}; reshape the tensor into blocks first"
                )
            values = np.ascontiguousarray(values, dtype=F32)
            if weights is not None:
                weights = np.ascontiguousarray(np.broadcast_to(weights, values.shape), dtype=F32)
            out = np.empty((values.shape[0], type_size), dtype=np.uint8)
            step = max(1, _CHUNK_VALUES // block_size)
            with np.errstate(
                all="ignore"
            ):  # like the C code, we divide by zero in groups we then discard
                for start in range(0, values.shape[0], step):
                    stop = start + step
                    part_w = None if weights is None else weights[start:stop]
                    out[start:stop] = quantize(values[start:stop], part_w)
            return out

        return run

    return wrap


def _block_sum_x2(values: np.ndarray, group_size: int) -> np.ndarray:
    """Sum of x^2 over each block, in order, repeated for each group of `group_size`."""
    return np.repeat(sum_in_order((values * values).T), values.shape[1] // group_size)


# --------------------------------------------------------------------------- Q6_K
@_blockwise(T.Q6_K)
def quantize_q6_k(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q6_K: 16 groups of 16, signed 6-bit levels, int8 group scales, fp16 d.

    quantize_row_q6_K_ref / _impl: make_qx_quants(16, 32, rmse 1), with the raw
    importance (no sigma2 term) as weights when given."""
    n = values.shape[0]
    x = _groups(values, 16)
    scales, levels = _make_qx_quants(x, 32, None if weights is None else _groups(weights, 16))
    scales = scales.reshape(n, 16)
    amax, max_scale = _first_abs_max(scales.T)
    iscale = F32(-128) / max_scale
    d_bits, d = _to_fp16(F32(1) / iscale)
    q_scales = np.minimum(127, nearest_int(iscale[:, None] * scales))
    q_scales = ((q_scales + 128) & 0xFF) - 128  # int8_t
    group_d = d[:, None] * q_scales.astype(F32)
    levels = _requantize(
        values.reshape(n, 16, 16), group_d, None, -32, 31, _ungroup(levels, n).reshape(n, 16, 16)
    )

    lv = levels.reshape(n, 2, 4, 32).astype(np.uint8)  # (block, half, quarter, 32)
    ql = np.concatenate(
        [
            (lv[:, :, 0] & 0xF) | ((lv[:, :, 2] & 0xF) << 4),
            (lv[:, :, 1] & 0xF) | ((lv[:, :, 3] & 0xF) << 4),
        ],
        axis=2,
    ).reshape(n, 128)
    qh = (
        (lv[:, :, 0] >> 4)
        | ((lv[:, :, 1] >> 4) << 2)
        | ((lv[:, :, 2] >> 4) << 4)
        | ((lv[:, :, 3] >> 4) << 6)
    )
    out = np.concatenate(
        [ql, qh.reshape(n, 64), q_scales.astype(np.uint8), _fp16_bytes(d_bits)], axis=1
    )
    out[amax < GROUP_MAX_EPS] = 0  # ggml memsets an all-zero block
    return out


# --------------------------------------------------------------------------- Q4_K / Q5_K
def _affine_k4(values: np.ndarray, weights: np.ndarray | None, nmax: int) -> tuple[np.ndarray, ...]:
    """The shared part of Q4_K and Q5_K: 8 groups of 32 with a scale and a min each.

    -> (d bits, dmin bits, 12 scale bytes, levels (n, 256))."""
    n = values.shape[0]
    x = _groups(values, 32)
    if weights is None:  # quantize_row_q{4,5}_K_ref
        av_x = np.sqrt(sum_in_order(x * x) / F32(32))
        w = av_x + np.abs(x)
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, levels = _make_qkx_quants(x, w, nmax, rmin, 0.1, nstep, False)
        scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
        max_scale = _max_from_zero(scales)
        max_min = _max_from_zero(mins)
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF)
        lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF)
        d_value, dmin_value = max_scale / F32(63), max_min / F32(63)
    else:  # quantize_row_q{4,5}_K_impl
        w = importance_weights(
            x, _groups(weights, 32), F32(2) * _block_sum_x2(values, 32) / F32(QK_K)
        )
        sw = sum_in_order(w)
        scales, mins, levels = _make_qkx_quants(x, w, nmax, -0.9, 0.05, 36, False)
        sw = sw.reshape(n, 8).T
        d_value, ls = _make_qp_quants(scales.reshape(n, 8).T, 63, sw)
        dmin_value, lm = _make_qp_quants(mins.reshape(n, 8).T, 63, sw)
        ls, lm = ls.T, lm.T
        if nmax == 31:  # only the Q5_K impl clamps; Q4_K packs the uint8 as is
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
    scale_bytes = _pack_scale_min_k4(ls, lm)
    d_bits, d = _to_fp16(d_value)
    dmin_bits, dmin = _to_fp16(dmin_value)
    sc, mn = _unpack_scale_min_k4(scale_bytes)
    levels = _requantize(
        values.reshape(n, 8, 32),
        d[:, None] * sc.astype(F32),
        dmin[:, None] * mn.astype(F32),
        0,
        nmax,
        _ungroup(levels, n).reshape(n, 8, 32),
    )
    return d_bits, dmin_bits, scale_bytes, levels.reshape(n, QK_K)


@_blockwise(T.Q4_K)
def quantize_q4_k(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q4_K: 8 groups of 32, levels 0..15, 6-bit scales and mins, fp16 d and dmin."""
    d_bits, dmin_bits, scale_bytes, levels = _affine_k4(values, weights, 15)
    return np.concatenate(
        [_fp16_bytes(d_bits), _fp16_bytes(dmin_bits), scale_bytes, _pack_nibbles(levels, 32)],
        axis=1,
    )


@_blockwise(T.Q5_K)
def quantize_q5_k(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q5_K: as Q4_K with levels 0..31; bit 4 of each level goes to qh."""
    d_bits, dmin_bits, scale_bytes, levels = _affine_k4(values, weights, 31)
    n = levels.shape[0]
    lv = levels.reshape(n, 4, 2, 32).astype(np.uint8)  # (block, pair of 64, low/high 32, 32)
    qh = np.zeros((n, 32), dtype=np.uint8)
    for pair in range(4):
        qh |= ((lv[:, pair, 0] >> 4) << (2 * pair)) | ((lv[:, pair, 1] >> 4) << (2 * pair + 1))
    return np.concatenate(
        [
            _fp16_bytes(d_bits),
            _fp16_bytes(dmin_bits),
            scale_bytes,
            qh,
            _pack_nibbles(levels & 0xF, 32),
        ],
        axis=1,
    )


# --------------------------------------------------------------------------- Q3_K
@_blockwise(T.Q3_K)
def quantize_q3_k(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q3_K: 16 groups of 16, signed 3-bit levels (high bit in hmask), 6-bit scales, fp16 d.

    Without weights quantize_row_q3_K_ref (make_q3_quants); with them _impl
    (make_qx_quants weighted by qw*sqrt(sigma2 + x^2), then on the scales themselves)."""
    n = values.shape[0]
    x = _groups(values, 16)
    if weights is None:
        scales, levels = _make_q3_quants(x, 4)
        scales = scales.reshape(n, 16)
        _, max_scale = _first_abs_max(scales.T)
        nonzero = max_scale != 0
        iscale = F32(-32) / max_scale
        level = nearest_int(iscale[:, None] * scales)
        level = np.clip(((level + 128) & 0xFF) - 128, -32, 31) + 32  # int8_t, then clamp
        scale_bytes = np.where(nonzero[:, None], _pack_scales_q3(level), np.uint8(0))
        d_value = np.where(nonzero, F32(1) / iscale, F32(0))
    else:
        sum_x2 = _block_sum_x2(values, 16)
        w = importance_weights(x, _groups(weights, 16), F32(2) * sum_x2 / F32(QK_K))
        sw = sum_in_order(w)
        scales, levels = _make_qx_quants(x, 4, w)
        d_value, scale_levels = _make_qx_quants(scales.reshape(n, 16).T, 32, sw.reshape(n, 16).T)
        scale_bytes = _pack_scales_q3(scale_levels.T)
    d_bits, d = _to_fp16(d_value)
    group_d = d[:, None] * _unpack_scales_q3(scale_bytes).astype(F32)
    levels = _requantize(
        values.reshape(n, 16, 16), group_d, None, -4, 3, _ungroup(levels, n).reshape(n, 16, 16)
    )
    levels = levels.reshape(n, 8, 32)  # hmask bit b of byte m is value 32*b + m
    hmask = np.zeros((n, 32), dtype=np.uint8)
    for bit in range(8):
        hmask |= (levels[:, bit] > 3).astype(np.uint8) << bit
    qs = _pack_2bit(levels.reshape(n, QK_K) & 3)
    return np.concatenate([hmask, qs, scale_bytes, _fp16_bytes(d_bits)], axis=1)


# --------------------------------------------------------------------------- Q2_K
@_blockwise(T.Q2_K)
def quantize_q2_k(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q2_K: 16 groups of 16, levels 0..3 with a 4-bit scale and min each, fp16 d and dmin.

    Without weights quantize_row_q2_K_ref (make_qkx2_quants, weight |x|, absolute error);
    with them _impl (make_qkx3_quants weighted by qw*sqrt(sigma2 + x^2), make_qp_quants)."""
    n = values.shape[0]
    x = _groups(values, 16)
    if weights is None:
        scales, mins, levels = _make_qkx_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
        max_scale, max_min = _max_from_zero(scales), _max_from_zero(mins)
        has_scale, has_min = max_scale > 0, max_min > 0
        ls = nearest_int((F32(15) / max_scale)[:, None] * scales)
        lm = nearest_int((F32(15) / max_min)[:, None] * mins)
        ls = np.where(has_scale[:, None], ls & 0xFF, 0)
        scale_bytes = np.where(has_min[:, None], ls | ((lm << 4) & 0xFF), ls).astype(np.uint8)
        d_value = np.where(has_scale, max_scale / F32(15), F32(0))
        dmin_value = np.where(has_min, max_min / F32(15), F32(0))
    else:
        sum_x2 = _block_sum_x2(values, 16)
        w = importance_weights(x, _groups(weights, 16), sum_x2 / F32(QK_K))
        sw = sum_in_order(w)
        scales, mins, levels = _make_qkx_quants(x, w, 3, -0.9, 0.05, 36, False)
        sw = sw.reshape(n, 16).T
        d_value, ls = _make_qp_quants(scales.reshape(n, 16).T, 15, sw)
        dmin_value, lm = _make_qp_quants(mins.reshape(n, 16).T, 15, sw)
        scale_bytes = ((ls.T | (lm.T << 4)) & 0xFF).astype(np.uint8)
    d_bits, d = _to_fp16(d_value)
    dmin_bits, dmin = _to_fp16(dmin_value)
    group_d = d[:, None] * (scale_bytes & 0xF).astype(F32)
    group_m = dmin[:, None] * (scale_bytes >> 4).astype(F32)
    levels = _requantize(
        values.reshape(n, 16, 16), group_d, group_m, 0, 3, _ungroup(levels, n).reshape(n, 16, 16)
    )
    qs = _pack_2bit(levels.reshape(n, QK_K))
    return np.concatenate([scale_bytes, qs, _fp16_bytes(d_bits), _fp16_bytes(dmin_bits)], axis=1)


# --------------------------------------------------------------------------- IQ4_NL / IQ4_XS
def _iq4_group_scales(x: np.ndarray, w: np.ndarray, ntry: int = 7) -> np.ndarray:
    """The per-32 scale search of quantize_row_iq4_nl_impl (ntry = 7, as quantize_iq4_* use).

    Note ggml keeps the levels of the first guess only; callers recompute levels."""
    amax, signed_max = _first_abs_max(x)

    def trial(inv_d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = _nearest_iq4(inv_d * x)[1]
        return sum_in_order((w * q) * x), sum_in_order((w * q) * q)

    sumqx, sumq2 = trial(F32(1) / (-signed_max / _IQ4_LEVELS_F32[0]))
    d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
    best = d * sumqx
    for step in range(-ntry, ntry + 1):
        sumqx, sumq2 = trial(F32(step + int(IQ4_LEVELS[0])) / signed_max)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, sumqx / sumq2, d)
        best = np.where(better, d * sumqx, best)
    return np.where(amax < GROUP_MAX_EPS, F32(0), d)


def _iq4_weights(values: np.ndarray, weights: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """x^2 without an imatrix, else qw*sqrt(sigma2 + x^2) with sigma2 = 2*sum(x^2)/block."""
    if weights is None:
        return x * x
    sigma2 = _block_sum_x2(values, 32) * F32(2.0 / values.shape[1])
    return importance_weights(x, _groups(weights, 32), sigma2)


@_blockwise(T.IQ4_NL)
def quantize_iq4_nl(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """IQ4_NL: blocks of 32 on the kvalues_iq4nl grid with one fp16 scale (quantize_iq4_nl)."""
    x = _groups(values, 32)
    scale = _iq4_group_scales(x, _iq4_weights(values, weights, x))
    d_bits, _ = _to_fp16(scale)
    inv = np.where(scale != 0, F32(1) / scale, F32(0))  # the float32 scale, not its fp16
    levels = _best_index_iq4(inv[:, None] * values)
    return np.concatenate([_fp16_bytes(d_bits), _pack_nibbles(levels, 16)], axis=1)


@_blockwise(T.IQ4_XS)
def quantize_iq4_xs(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """IQ4_XS: 8 groups of 32 on the IQ4 grid, 6-bit signed group scales, fp16 d."""
    n = values.shape[0]
    x = _groups(values, 32)
    scales = _iq4_group_scales(x, _iq4_weights(values, weights, x)).reshape(n, 8)
    _, max_scale = _first_abs_max(scales.T)
    d = -max_scale / F32(32)
    d_bits, _ = _to_fp16(d)
    inv_d = np.where(d != 0, F32(1) / d, F32(0))
    level = np.clip(nearest_int(inv_d[:, None] * scales), -32, 31)
    group_d = d[:, None] * level.astype(F32)
    inv_group = np.where(group_d != 0, F32(1) / group_d, F32(0))
    levels = _best_index_iq4(inv_group[:, :, None] * values.reshape(n, 8, 32)).reshape(n, QK_K)
    level = level + 32
    scales_l = ((level[:, 0::2] & 0xF) | ((level[:, 1::2] & 0xF) << 4)).astype(np.uint8)
    scales_h = np.zeros(n, dtype=np.uint16)
    for group in range(8):
        scales_h |= ((level[:, group] >> 4) << (2 * group)).astype(np.uint16)
    return np.concatenate(
        [_fp16_bytes(d_bits), _fp16_bytes(scales_h), scales_l, _pack_nibbles(levels, 16)], axis=1
    )

"""The float32 primitives both ggml ports share (formats/legacy.py for Q4_0 … Q8_0,
formats/kquant_quantize.py for the k-quants and IQ4): each reproduces one idiom of
ggml-quants.c bit for bit, so every quantizer built on them rounds as the C code does."""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml-quants.c: below this a group is "all zero"


def nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (int32): add 1.5 * 2**23 in float32, read the low mantissa bits.
    That is round half to even for the |v| < 2**22 ggml asserts; beyond (an infinite scale
    on a block of subnormals) it is whatever the bits say, and we must say the same."""
    bits = (np.asarray(values, dtype=F32) + F32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def sum_in_order(terms: np.ndarray, start_with_first: bool = False) -> np.ndarray:
    """Sum over axis 0 in index order, as a C loop `s = 0.0f; s += t[i]` does.

    A loop of whole-row adds (np.sum would add pairwise). `start_with_first` mirrors
    loops that start from term 0 instead of 0.0f (they differ only in the sign of an
    all-zero sum: 0.0f + -0.0f is +0.0f).
    """
    if start_with_first:
        total, rest = terms[0].astype(F32), terms[1:]
    else:
        total, rest = np.zeros(terms.shape[1:], dtype=F32), terms
    for term in rest:  # in float32, as the C accumulator
        total += term
    return total


def importance_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """The imatrix weighting of the quantize_row_*_impl functions: qw[i] * sqrtf(sigma2 +
    x[i]*x[i]) (sigma2 broadcast against x)."""
    return qw * np.sqrt(sigma2 + x * x)

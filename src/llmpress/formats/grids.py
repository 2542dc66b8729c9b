"""gguf-py's i-quant tables (ggml's iq*_grid and ksigns_iq2xs): the one copy the project
uses. The dequantizers (iquants.py), the matmul kernels (kernels/cpu.py) and the C
quantizers (cquant.py) all read them from here, so none is stored in the repository."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants


def grid_values(ggml_type: GGMLQuantizationType) -> np.ndarray:
    """gguf-py's grid of `ggml_type` as float32 (entries, values per entry)."""
    quant = getattr(gguf_quants, ggml_type.name)
    quant.init_grid()
    return np.asarray(quant.grid, dtype=np.float32).reshape(quant.grid_shape)


def sign_patterns() -> np.ndarray:
    """ggml's ksigns_iq2xs: 128 bytes, each 7 sign bits plus an even-parity eighth."""
    return np.frombuffer(gguf_quants.IQ2_XXS.ksigns, dtype=np.uint8)

"""Block formats, one class per GGML type, bit-exact with ggml.

    get_format("q4_k").dequantize(raw_uint8, shape)      # torch, CPU or CUDA
    get_format(GGMLQuantizationType.Q8_0).quantize(w)    # numpy -> GGUF bytes (C when built)
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from llmpress.errors import LlmpressError
from llmpress.formats.base import BlockFormat
from llmpress.formats.float import BF16, F16, F32
from llmpress.formats.iq4 import IQ4_NL, IQ4_XS
from llmpress.formats.iquants import IQ1_M, IQ1_S, IQ2_S, IQ2_XS, IQ2_XXS, IQ3_S, IQ3_XXS, TQ1_0, TQ2_0
from llmpress.formats.kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from llmpress.formats.legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

FORMATS: dict[GGMLQuantizationType, BlockFormat] = {
    fmt.ggml_type: fmt
    for fmt in (
        F32(), F16(), BF16(),
        Q8_0(), Q4_0(), Q4_1(), Q5_0(), Q5_1(),
        Q2_K(), Q3_K(), Q4_K(), Q5_K(), Q6_K(),
        IQ4_NL(), IQ4_XS(),
        IQ1_S(), IQ1_M(), IQ2_XXS(), IQ2_XS(), IQ2_S(), IQ3_XXS(), IQ3_S(),
        TQ1_0(), TQ2_0(),
    )
}  # fmt: skip

_BY_NAME = {fmt.name: fmt for fmt in FORMATS.values()}


def supported_names() -> list[str]:
    return list(_BY_NAME)


def get_format(ggml_type: GGMLQuantizationType | str | int) -> BlockFormat:
    """The format for a GGML type, given as the enum, its number, or its name (any case)."""
    if isinstance(ggml_type, str):
        fmt = _BY_NAME.get(ggml_type.strip().upper())
    else:
        try:
            fmt = FORMATS.get(GGMLQuantizationType(int(ggml_type)))
        except ValueError:
            fmt = None
    if fmt is None:
        label = ggml_type.name if isinstance(ggml_type, GGMLQuantizationType) else repr(ggml_type)
        raise LlmpressError(
            f"unsupported tensor type {label}; supported types: {', '.join(supported_names())}"
        )
    return fmt


def dequantize_tensor(
    raw: torch.Tensor, ggml_type: GGMLQuantizationType | str | int, shape: tuple[int, ...]
) -> torch.Tensor:
    """uint8 bytes of a whole GGUF tensor -> float32 tensor of `shape` (row = last dim),
    on the device of `raw`."""
    return get_format(ggml_type).dequantize(raw, tuple(shape))


__all__ = ["FORMATS", "BlockFormat", "dequantize_tensor", "get_format", "supported_names"]

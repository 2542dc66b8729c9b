"""ctypes binding of the compiled CPU kernel (qmatmul.c). Absent kernel -> supports() is
False everywhere and the layers use exact dequantize + GEMM instead."""

from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache

import torch
from gguf import GGMLQuantizationType


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llmpress.kernels._qmatmul")
    if spec is None or spec.origin is None:
        return None
    lib = ctypes.CDLL(spec.origin)
    lib.llmpress_qmatmul.restype = ctypes.c_int
    lib.llmpress_qmatmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_int]
    return lib


def available() -> bool:
    return _library() is not None


def supports(ggml_type: GGMLQuantizationType) -> bool:
    lib = _library()
    return lib is not None and bool(lib.llmpress_qmatmul_supports(int(ggml_type)))


def qmatmul(rows: torch.Tensor, x: torch.Tensor, ggml_type: GGMLQuantizationType) -> torch.Tensor:
    """rows: uint8 (N, row_bytes) packed weights; x: (T, K) -> float32 (T, N)."""
    x = x.float().contiguous()
    T, K = x.shape
    N = rows.shape[0]
    y = torch.empty(T, N, dtype=torch.float32)
    status = _library().llmpress_qmatmul(int(ggml_type), rows.data_ptr(), x.data_ptr(),
                                         y.data_ptr(), N, K, T, torch.get_num_threads())
    if status:
        raise RuntimeError(f"qmatmul refused type {ggml_type.name} with rows of {K}")
    return y

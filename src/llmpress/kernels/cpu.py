"""ctypes binding of the compiled CPU kernel (qmatmul.c). Absent kernel -> supports() is
False everywhere and the layers use exact dequantize + GEMM instead."""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
from gguf import GGMLQuantizationType

MAX_WEIGHTS = 8  # weights fused into one call


@contextmanager
def one_torch_thread(device: torch.device | None = None) -> Iterator[None]:
    """Torch in one thread on the CPU, for loops of many small ops (quantizers, GPTQ's
    column loop): on a busy 2-core machine every multi-threaded op waits for all its
    threads to be scheduled. Measured there: dequantizing the default Q4_1 model 4 s
    instead of 18 s; GPTQ 20x faster."""
    if device is not None and device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llmpress.kernels._qmatmul")
    if spec is None or spec.origin is None:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:  # a broken build: the exact torch path still works
        return None
    lib.llmpress_qmatmul.restype = ctypes.c_int
    lib.llmpress_qmatmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return lib


def available() -> bool:
    return _library() is not None


def supports(ggml_type: GGMLQuantizationType) -> bool:
    lib = _library()
    return lib is not None and bool(lib.llmpress_qmatmul_supports(int(ggml_type)))


class FusedWeights:
    """The ctypes argument arrays for a fixed list of packed weights, built once."""

    def __init__(self, weights: list[tuple[torch.Tensor, GGMLQuantizationType]]):
        n = len(weights)
        assert 1 <= n <= MAX_WEIGHTS
        self.rows = [rows for rows, _ in weights]  # keeps the tensors alive
        self.count = n
        self.types = (ctypes.c_int * n)(*(int(t) for _, t in weights))
        self.pointers = (ctypes.c_void_p * n)(*(rows.data_ptr() for rows in self.rows))
        self.sizes = (ctypes.c_int64 * n)(*(rows.shape[0] for rows in self.rows))
        self.out_features = sum(rows.shape[0] for rows in self.rows)


def qmatmul(weights: FusedWeights, x: torch.Tensor) -> torch.Tensor:
    """x: (T, K) float32 -> float32 (T, sum of the weights' rows)."""
    x = x.float().contiguous()
    T, K = x.shape
    y = torch.empty(T, weights.out_features, dtype=torch.float32)
    status = _library().llmpress_qmatmul(weights.count, weights.types, weights.pointers,
                                         weights.sizes, x.data_ptr(), y.data_ptr(), K, T,
                                         torch.get_num_threads())
    if status:
        raise RuntimeError(f"qmatmul refused {T} rows of {K}")
    return y

"""ctypes binding of the C block quantizers (quantize.c), byte-identical with ggml.

ctypes releases the GIL for the call and the C code splits rows across OpenMP threads.
When the library was not built (no compiler at install), `supports()` is False and the
formats quantize with their numpy ports instead: same bytes, slower.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType

from llmpress.errors import LlmpressError
from llmpress.formats import grids

# quantize.c's status codes
_ERRORS = {
    -1: "the C quantizer has no such type",
    -2: "row length is not a multiple of the block",
    -3: "bad arguments",
    -5: "the importance matrix holds a NaN or an infinity",
    -6: "this type needs an importance matrix (imatrix)",
    -7: "its grid was not handed to the C library (cquant.set_iq_grid)",
}
_NONFINITE = -4
_DISABLE_ENV = "LLMPRESS_NUMPY_QUANTIZE"  # set to 1: quantize with the numpy ports


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llmpress.formats._quantize")
    if spec is None or spec.origin is None:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:  # a broken build: the numpy ports still work
        return None
    lib.llmpress_quantize.restype = ctypes.c_int
    lib.llmpress_quantize.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
    ]  # fmt: skip
    lib.llmpress_quantize_supports.restype = ctypes.c_int
    lib.llmpress_quantize_supports.argtypes = [ctypes.c_int]
    lib.llmpress_quantize_row_function.restype = ctypes.c_void_p
    lib.llmpress_quantize_row_function.argtypes = [ctypes.c_int]
    lib.llmpress_quantize_set_iq2_grid.restype = ctypes.c_int
    lib.llmpress_quantize_set_iq2_grid.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    _hand_over_iq3_grids(lib)
    return lib


_grid_lock = threading.Lock()  # each grid is built once, by one thread
_grids_set: set[GGMLQuantizationType] = set()


def set_iq_grid(ggml_type: GGMLQuantizationType, levels: np.ndarray) -> None:
    """Hand the C library the grid of an IQ2_*/IQ1_* type as levels 0..2, (grid size, 8),
    once: it builds the grid's neighbour lists (quantize_iq2.c) before any row is quantized."""
    with _grid_lock:
        if ggml_type in _grids_set:
            return
        levels = np.ascontiguousarray(levels, dtype=np.uint8)
        status = _library().llmpress_quantize_set_iq2_grid(
            int(ggml_type), levels.ctypes.data, levels.shape[0]
        )
        if status != 0:
            raise LlmpressError(f"the {ggml_type.name} grid was refused by the C quantizer "
                                f"(status {status})")
        _grids_set.add(ggml_type)


def _hand_over_iq3_grids(lib: ctypes.CDLL) -> None:
    """Give quantize_iq3.c gguf-py's IQ3 grids (formats/grids.py, the one copy), before
    any quantize call; it builds its search tables from them (a built grid stays)."""
    lib.llmpress_quantize_set_iq3_grid.restype = ctypes.c_int
    lib.llmpress_quantize_set_iq3_grid.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.llmpress_quantize_iq3_ready.restype = ctypes.c_int
    with _grid_lock:
        for ggml_type in (GGMLQuantizationType.IQ3_XXS, GGMLQuantizationType.IQ3_S):
            grid = np.ascontiguousarray(grids.grid_values(ggml_type), dtype=np.uint8)
            lib.llmpress_quantize_set_iq3_grid(grid.shape[0], grid.ctypes.data)


def available() -> bool:
    return _library() is not None and os.environ.get(_DISABLE_ENV, "") in ("", "0")


_NEEDS_IQ3_GRIDS = (GGMLQuantizationType.IQ3_XXS, GGMLQuantizationType.IQ3_S)


def supports(ggml_type: GGMLQuantizationType) -> bool:
    if not available() or not _library().llmpress_quantize_supports(int(ggml_type)):
        return False
    return ggml_type not in _NEEDS_IQ3_GRIDS or bool(_library().llmpress_quantize_iq3_ready())


def row_function(ggml_type: GGMLQuantizationType) -> int | None:
    """The address of the C function that quantizes one row to ggml_type, for C code in
    another library (kernels/decode.c's quantized KV cache); None without the library."""
    lib = _library()
    return None if lib is None else lib.llmpress_quantize_row_function(int(ggml_type))


def quantize_rows(
    ggml_type: GGMLQuantizationType,
    values: np.ndarray,
    importance: np.ndarray | None,
    row_bytes: int,
    threads: int = 0,
) -> np.ndarray:
    """float32 (rows, n_per_row) -> uint8 (rows, row_bytes), as ggml_quantize_chunk.

    `importance` is one weight per column (n_per_row,) or None; threads 0: OpenMP's
    default (all cores)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, n_per_row = values.shape
    importance_ptr = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (n_per_row,):
            raise LlmpressError(
                f"importance has {importance.size} values, the rows {n_per_row}"
            )
        importance_ptr = importance.ctypes.data
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    bad_row = ctypes.c_int64(-1)
    status = _library().llmpress_quantize(
        int(ggml_type), values.ctypes.data, out.ctypes.data, rows, n_per_row, importance_ptr,
        threads, ctypes.byref(bad_row),
    )  # fmt: skip
    if status == _NONFINITE:
        raise LlmpressError(f"row {bad_row.value} holds a NaN or an infinity; cannot quantize it")
    if status != 0:
        raise LlmpressError(f"quantizing to {ggml_type.name}: {_ERRORS.get(status, status)}")
    return out

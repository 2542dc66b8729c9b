"""ggml's own quantizers, called through ctypes: the reference our block formats must match.

llama-cpp-python ships ggml as shared libraries (site-packages/llama_cpp/lib/); the
quantizers live in libggml-base. `ggml_quantize_chunk` is the entry point llama.cpp's
`llama-quantize` uses, so its bytes are what a GGUF written by llama.cpp would hold.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

# ggml builds a grid type's search tables on the type's first call in a process: 15 s of
# CPU for IQ1_S (IQ1_M shares them), 7 s for IQ2_S, 3.5 s for IQ2_XS; IQ2_XXS 1.7 s, the
# IQ3 types under 0.4 s. A test that has ggml quantize these types is `slow`, so that
# the fast set never pays for the tables; IQ2_XXS stands for the IQ2 code there.
SLOW_FIRST_CALL = {"IQ1_S", "IQ1_M", "IQ2_S", "IQ2_XS"}


def _library_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise RuntimeError("llama-cpp-python is not installed: `pip install llama-cpp-python`")
    return Path(spec.origin).parent / "lib"


@functools.cache
def _ggml() -> ctypes.CDLL:
    lib_dir = _library_dir()
    candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.*"))
    if not candidates:
        raise RuntimeError(f"no libggml-base shared library under {lib_dir}")
    lib = ctypes.CDLL(str(candidates[0]))

    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix (NULL for none)
    ]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def first_call_marked(type_names) -> list:
    """pytest parameters for type_names, the SLOW_FIRST_CALL ones marked slow."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_FIRST_CALL else name
            for name in type_names]


def ggml_row_size(type_name: str, n_per_row: int) -> int:
    """Bytes ggml stores for one row of `n_per_row` values of `type_name`."""
    return int(_ggml().ggml_row_size(GGMLQuantizationType[type_name].value, n_per_row))


def ggml_requires_imatrix(type_name: str) -> bool:
    """ggml_quantize_requires_imatrix: ggml refuses to quantize the type without one."""
    return bool(_ggml().ggml_quantize_requires_imatrix(GGMLQuantizationType[type_name].value))


def ggml_quantize(
    type_name: str, values: np.ndarray, importance: np.ndarray | None = None
) -> np.ndarray:
    """Quantize float32 `values` (nrows, n_per_row) with ggml -> uint8 (nrows, row_bytes).

    `importance` is the imatrix: one float32 weight per column, (n_per_row,), as
    llama-quantize passes it. Types that need one (IQ2_*, IQ1_*) refuse None.
    """
    lib = _ggml()
    ggml_type = GGMLQuantizationType[type_name].value
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"values must be (nrows, n_per_row), got shape {values.shape}")
    nrows, n_per_row = values.shape
    if importance is None:
        if lib.ggml_quantize_requires_imatrix(ggml_type):
            raise ValueError(f"ggml refuses to quantize {type_name} without an importance matrix")
        imatrix_ptr = None
    else:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (n_per_row,):
            raise ValueError(f"importance must be ({n_per_row},), got {importance.shape}")
        imatrix_ptr = importance.ctypes.data

    row_bytes = int(lib.ggml_row_size(ggml_type, n_per_row))
    out = np.zeros((nrows, row_bytes), dtype=np.uint8)
    lib.ggml_quantize_init(ggml_type)
    written = lib.ggml_quantize_chunk(
        ggml_type, values.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, imatrix_ptr
    )
    assert written == out.nbytes, f"ggml wrote {written} bytes, expected {out.nbytes}"
    return out

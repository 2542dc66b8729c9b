"""ctypes binding of the compiled CPU kernel (qmatmul.c). Absent kernel -> supports() is
False everywhere and the layers use exact dequantize + GEMM instead.

The kernel picks its instruction set (portable C or AVX2) from the CPU at load;
LLMPRESS_KERNEL_ISA=portable|avx2 forces one (tests run every path), and kernel_info()
says which one runs."""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
from gguf import GGMLQuantizationType

from llmpress.errors import LlmpressError
from llmpress.formats import iquants

MAX_WEIGHTS = 8  # weights fused into one call
ISAS = {"auto": 0, "portable": 1, "avx2": 2}  # qmatmul.h's ISA_* numbers
ISA_ENV = "LLMPRESS_KERNEL_ISA"
# qmatmul.h's KernelError codes
ERRORS = {-1: "a weight type without a kernel", -2: "a dimension that is not positive or not "
          "a multiple of the block size", -3: "a buffer whose size does not match the shapes",
          -4: "fewer than one thread", -5: "out of memory for the kernel's scratch space",
          -6: "this CPU or build lacks the instruction set asked for",
          -7: "inconsistent head counts or head/rope dimensions",
          -8: "a position outside the KV cache",
          -9: "an attention setting out of range (query scale, soft-cap, sliding window or "
          "RoPE table)"}


def check(status: int, what: str) -> None:
    """A non-zero kernel return code as one clear error."""
    if status:
        raise LlmpressError(f"{what}: {ERRORS.get(status, f'kernel error {status}')}")


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
    if not hasattr(lib, "llmpress_set_isa"):  # a stale build from before the ISA paths
        return None
    lib.llmpress_qmatmul.restype = ctypes.c_int
    lib.llmpress_qmatmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.llmpress_row_bytes.restype = ctypes.c_int64
    lib.llmpress_row_bytes.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.llmpress_repacked_bytes.restype = ctypes.c_int64
    lib.llmpress_repacked_bytes.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.llmpress_repack.restype = ctypes.c_int
    lib.llmpress_repack.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    forced = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if forced not in ISAS:
        raise LlmpressError(f"{ISA_ENV}={forced!r}: expected one of {', '.join(ISAS)}")
    check(lib.llmpress_set_isa(ISAS[forced]), f"{ISA_ENV}={forced}")
    if hasattr(lib, "llmpress_set_iq_grids"):  # else the grid types fall back to dequantize
        _hand_over_iq_grids(lib)
    return lib


# The grids the kernel holds (qdot.h's IqGrids), in the order llmpress_set_iq_grids takes
# them, with their (entries, values per entry) shapes; IQ1_M shares IQ1_S's.
IQ_GRID_SHAPES = {GGMLQuantizationType.IQ2_XXS: (256, 8), GGMLQuantizationType.IQ2_XS: (512, 8),
                  GGMLQuantizationType.IQ2_S: (1024, 8), GGMLQuantizationType.IQ3_XXS: (256, 4),
                  GGMLQuantizationType.IQ3_S: (512, 4), GGMLQuantizationType.IQ1_S: (2048, 8)}


def _hand_over_iq_grids(lib: ctypes.CDLL) -> None:
    """Give the kernel gguf-py's i-quant grids and sign patterns (formats/iquants.py): the
    one copy of those tables, as bytes."""
    tables = []
    for ggml_type, shape in IQ_GRID_SHAPES.items():
        grid = iquants.grid_values(ggml_type)
        if ggml_type == GGMLQuantizationType.IQ1_S:
            grid = grid + 1  # ternary -1, 0, 1 stored as unsigned bytes
        assert grid.shape == shape and 0 <= grid.min() and grid.max() < 256, (ggml_type, grid.shape)
        tables.append(np.ascontiguousarray(grid, dtype=np.uint8))
    tables.append(np.ascontiguousarray(iquants.sign_patterns()))
    pointers = (ctypes.c_void_p * len(tables))(*(t.ctypes.data for t in tables))
    sizes = (ctypes.c_int64 * len(tables))(*(t.nbytes for t in tables))
    lib.llmpress_set_iq_grids.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    check(lib.llmpress_set_iq_grids(len(tables), pointers, sizes), "the i-quant grids")


def use_isa(name: str) -> None:
    """Switch the kernel to one instruction set ("auto", "portable", "avx2")."""
    if name not in ISAS:
        raise LlmpressError(f"unknown kernel instruction set {name!r}: expected one of {', '.join(ISAS)}")
    check(_library().llmpress_set_isa(ISAS[name]), f"kernel instruction set {name}")


def isas_here() -> list[str]:
    """The instruction sets this CPU and build can run."""
    lib = _library()
    return [] if lib is None else [n for n, i in ISAS.items() if i and lib.llmpress_cpu_has_isa(i)]


def kernel_info() -> dict:
    """Which kernel runs: {"isa": "avx2" | "portable" | None (not built), "available": [...]}."""
    lib = _library()
    if lib is None:
        return {"isa": None, "available": []}
    names = {i: n for n, i in ISAS.items()}
    return {"isa": names[lib.llmpress_isa()], "available": isas_here()}


def available() -> bool:
    return _library() is not None


def supports(ggml_type: GGMLQuantizationType, row_length: int | None = None) -> bool:
    """The kernel runs this type (and rows of this length: F16/BF16 rows are read in
    blocks of 32 values)."""
    lib = _library()
    if lib is None or not lib.llmpress_qmatmul_supports(int(ggml_type)):
        return False
    return row_length is None or lib.llmpress_row_bytes(int(ggml_type), row_length) > 0


REPACKED_GROUP_ROWS = 8  # qdot.h's X8_ROWS: repacked rows come in groups of 8
REPACK_CHUNK_BYTES = 16 << 20
_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages (file pages are re-read if needed)


def _hand_back_pages(t: torch.Tensor) -> None:
    """Ask the OS to reclaim the whole pages under t (best effort: older kernels refuse)."""
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def repacked(rows: torch.Tensor, ggml_type: GGMLQuantizationType, row_length: int
             ) -> tuple[torch.Tensor, int] | None:
    """These packed rows (out, row_bytes) in the kernel's faster layout, as (bytes, kernel
    type id), or None where the type or shape has none (qdot.h: Q4_K_X8). A copy: the
    file's bytes stay for the exact path, their pages handed back to the OS (a model in
    fast mode then holds each weight once)."""
    lib = _library()
    n_rows = rows.shape[0]
    size = lib.llmpress_repacked_bytes(int(ggml_type), n_rows, row_length)
    if size == 0:
        return None
    out = torch.empty(n_rows, size // n_rows, dtype=torch.uint8)
    # in chunks, each one's file pages handed back at once: the peak memory holds one
    # chunk twice, not the whole tensor (Qwen's output matrix is 233 MB)
    step = max(REPACKED_GROUP_ROWS, REPACK_CHUNK_BYTES // rows.shape[1]
               // REPACKED_GROUP_ROWS * REPACKED_GROUP_ROWS)
    for first in range(0, n_rows, step):
        source, target = rows[first:first + step], out[first:first + step]
        kernel_type = lib.llmpress_repack(int(ggml_type), source.data_ptr(), source.numel(),
                                          target.data_ptr(), target.numel(), source.shape[0],
                                          row_length, torch.get_num_threads())
        check(min(kernel_type, 0), f"repacking {ggml_type.name} rows")
        _hand_back_pages(source)
    return out, kernel_type


class FusedWeights:
    """The ctypes argument arrays for a fixed list of packed weights, built once."""

    def __init__(self, weights: list[tuple[torch.Tensor, int]]):
        n = len(weights)
        assert 1 <= n <= MAX_WEIGHTS
        self.rows = [rows for rows, _ in weights]  # keeps the tensors alive
        self.count = n
        self.types = (ctypes.c_int * n)(*(int(t) for _, t in weights))
        self.pointers = (ctypes.c_void_p * n)(*(rows.data_ptr() for rows in self.rows))
        self.sizes = (ctypes.c_int64 * n)(*(rows.shape[0] for rows in self.rows))
        self.bytes = (ctypes.c_int64 * n)(*(rows.numel() * rows.element_size() for rows in self.rows))
        self.out_features = sum(rows.shape[0] for rows in self.rows)


def qmatmul(weights: FusedWeights, x: torch.Tensor) -> torch.Tensor:
    """x: (T, K) float32 -> float32 (T, sum of the weights' rows)."""
    x = x.float().contiguous()
    T, K = x.shape
    y = torch.empty(T, weights.out_features, dtype=torch.float32)
    status = _library().llmpress_qmatmul(weights.count, weights.types, weights.pointers,
                                         weights.sizes, weights.bytes, x.data_ptr(), x.numel(),
                                         y.data_ptr(), y.numel(), K, T, torch.get_num_threads())
    check(status, f"quantized matmul of {T} rows of {K}")
    return y

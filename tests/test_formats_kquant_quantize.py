"""Our k-quant / IQ4 quantizers against ggml's own (ggml_quantize_chunk via ctypes).

Every type must give the very same bytes as ggml for every block, with and without an
importance matrix. No type needs the "≥ 99.9 % identical blocks" allowance that FMA or
summation-order differences would call for: llama-cpp-python builds libggml-base for
baseline x86-64 (no FMA), and our ports keep the C operand and summation order.
"""

from __future__ import annotations

import numpy as np
import pytest
from ggml_ref import ggml_quantize
from gguf.quants import dequantize

from llmpress.errors import LlmpressError
from llmpress.formats import kquant_quantize as kq
from llmpress.io.gguf import read_gguf_header, tensor_nbytes

TYPES = {  # name -> (our function, values per block, bytes per block)
    "Q6_K": (kq.quantize_q6_k, 256, 210),
    "Q4_K": (kq.quantize_q4_k, 256, 144),
    "Q5_K": (kq.quantize_q5_k, 256, 176),
    "Q3_K": (kq.quantize_q3_k, 256, 110),
    "Q2_K": (kq.quantize_q2_k, 256, 84),
    "IQ4_NL": (kq.quantize_iq4_nl, 32, 18),
    "IQ4_XS": (kq.quantize_iq4_xs, 256, 136),
}


def _ours(type_name: str, values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """Quantize (rows, n_per_row) as ggml_quantize does: importance per column, per block."""
    quantize, block, _ = TYPES[type_name]
    rows, n_per_row = values.shape
    weights = None
    if importance is not None:
        weights = np.broadcast_to(
            importance.reshape(1, -1, block), (rows, n_per_row // block, block)
        )
        weights = weights.reshape(-1, block)
    return quantize(values.reshape(-1, block), weights).reshape(rows, -1)


def _assert_identical(type_name: str, values: np.ndarray, importance: np.ndarray | None) -> None:
    type_size = TYPES[type_name][2]
    ours = _ours(type_name, values, importance).reshape(-1, type_size)
    ref = ggml_quantize(type_name, values, importance).reshape(-1, type_size)
    same = (ours == ref).all(axis=1)
    assert same.all(), (
        f"{type_name} imatrix={importance is not None}: {same.mean():.4%} of {same.size} blocks "
        f"identical; first differing block {int(np.argmin(same))}"
    )


def _random_tensors(rng: np.random.Generator, rows: int, cols: int) -> dict[str, np.ndarray]:
    normal = rng.standard_normal((rows, cols)).astype(np.float32)
    row_scaled = (normal * np.exp(2 * rng.standard_normal((rows, 1)))).astype(np.float32)
    outliers = rng.standard_normal((rows, cols)).astype(np.float32)
    outliers[rng.random(outliers.shape) < 0.01] *= 50
    sparse = rng.standard_normal((rows, cols)).astype(np.float32)
    sparse[rng.random(sparse.shape) < 0.5] = 0
    sparse[:2] = 0  # whole zero blocks
    sparse[2, :40] = 0  # zero groups inside a block
    skewed = rng.uniform(-1, 3, (rows, cols)).astype(np.float32) * 1e-3  # mins matter
    tiny = normal * np.float32(1e-6)  # scales near the fp16 subnormal range
    return {"normal": normal, "row_scaled": row_scaled, "outliers": outliers,
            "sparse": sparse, "skewed": skewed, "tiny": tiny}  # fmt: skip


def _importances(rng: np.random.Generator, cols: int) -> dict[str, np.ndarray | None]:
    squared = (rng.standard_normal(cols) ** 2).astype(np.float32)
    with_zeros = np.where(rng.random(cols) < 0.3, 0, rng.exponential(size=cols)).astype(np.float32)
    return {"none": None, "squared": squared, "with_zeros": with_zeros}


@pytest.mark.slow
@pytest.mark.parametrize("type_name", list(TYPES))
def test_random_tensors_match_ggml(type_name: str) -> None:
    rng = np.random.default_rng(20240601)
    importances = _importances(rng, 512)
    for values in _random_tensors(rng, 32, 512).values():
        for importance in importances.values():
            _assert_identical(type_name, values, importance)


@pytest.fixture(scope="module")
def real_tensors(default_model_path) -> dict[str, np.ndarray]:
    """float32 weights of the default model: ffn_down rows are 1536 long, the others 576.

    Bytes come from our header parser (gguf-py's GGUFReader takes seconds on the
    vocabulary); gguf-py's dequantize turns them into floats."""
    _, infos, data_start, mapped = read_gguf_header(default_model_path)
    by_name = {name: (ggml_type, dims, offset) for name, ggml_type, dims, offset in infos}

    def load(name: str) -> np.ndarray:
        ggml_type, dims, offset = by_name[name]
        n_bytes = tensor_nbytes(ggml_type, dims, name)
        raw = np.asarray(mapped[data_start + offset : data_start + offset + n_bytes])
        return dequantize(raw, ggml_type).reshape(tuple(reversed(dims))).astype(np.float32)

    attn_q = load("blk.7.attn_q.weight")  # (576, 576)
    return {
        "ffn_down": load("blk.3.ffn_down.weight")[:96],  # (96, 1536)
        "attn_q_as_256": attn_q[:192].reshape(-1, 256),  # rows of 576 do not split into 256
        "attn_q": attn_q[:64],  # for IQ4_NL, whose blocks are 32
    }


@pytest.mark.parametrize("type_name", list(TYPES))
def test_real_tensors_match_ggml(type_name: str, real_tensors: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(7)
    for values in real_tensors.values():
        if values.shape[1] % TYPES[type_name][1]:
            continue
        # an imatrix-like importance: mean squared activation per column, heavy-tailed
        importance = (
            rng.standard_normal(values.shape[1]) * np.exp(rng.standard_normal(values.shape[1]))
        ) ** 2
        for imp in (None, importance.astype(np.float32)):
            _assert_identical(type_name, values, imp)


def test_all_zero_blocks_are_zero_bytes_like_ggml() -> None:
    zeros = np.zeros((2, 256), dtype=np.float32)
    for type_name in TYPES:
        _assert_identical(type_name, zeros, None)
        _assert_identical(type_name, zeros, np.ones(256, dtype=np.float32))


def test_wrong_block_shape_is_a_clear_error() -> None:
    with pytest.raises(LlmpressError, match=r"\(n_blocks, 256\)"):
        kq.quantize_q4_k(np.zeros((3, 100), dtype=np.float32))


def test_empty_input_gives_empty_output() -> None:
    out = kq.quantize_q6_k(np.zeros((0, 256), dtype=np.float32))
    assert out.shape == (0, 210) and out.dtype == np.uint8

"""The C block quantizers (formats/quantize.c) against ggml's own and our numpy ports.

Every type, with and without an importance matrix, on random tensors with awkward values
and on real model rows: the bytes must be ggml_quantize_chunk's (libggml-base from
llama-cpp-python, tests/ggml_ref.py) and the numpy ports' (the readable reference), for any
thread count. Bad input is one clear LlmpressError, never a crash in C.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from ggml_ref import ggml_quantize

from llmpress.errors import LlmpressError
from llmpress.formats import cquant, dequantize_tensor, get_format
from llmpress.io.gguf import read_gguf_header, tensor_nbytes

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]  # fmt: skip


def awkward_tensor(rows: int = 40, row_length: int = 512, seed: int = 0) -> np.ndarray:
    """Gaussian rows over 12 decades of scale, plus rows and blocks that hit the edge
    cases: all zero, all equal, one outlier, all positive, tiny (below ggml's 1e-15 "all
    zero" threshold, and float32 subnormals), huge (x*x overflows float32), sign ties."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, row_length)).astype(np.float32)
    values *= (10.0 ** rng.uniform(-6, 6, (rows, 1))).astype(np.float32)
    values[0] = 0.0
    values[1] = -1.5
    values[2, :256] = 0.0
    values[2, 40] = 7.0
    values[3] = np.abs(values[3]) + 1.0
    values[4, :64] = 1e-17
    values[5, :32] = 1e-40  # float32 subnormal
    values[6] *= np.float32(1e20)
    values[7, :32] = np.tile([1.0, -1.0], 16)
    values[8] = np.linspace(-4, 4, row_length, dtype=np.float32)
    values[9, 100:] = 0.0
    return values


def importances(row_length: int, seed: int = 1) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    decades = rng.standard_normal(row_length) ** 2 * 10.0 ** rng.uniform(-3, 3, row_length)
    with_zeros = decades.copy()
    with_zeros[::3] = 0.0
    return {
        "none": None,
        "decades": decades.astype(np.float32),
        "with_zeros": with_zeros.astype(np.float32),
        "all_zero": np.zeros(row_length, dtype=np.float32),
    }


def assert_identical(ours: np.ndarray, reference: np.ndarray, type_size: int, what: str) -> None:
    ours, reference = ours.reshape(-1, type_size), reference.reshape(-1, type_size)
    differing = (ours != reference).any(axis=1)
    assert not differing.any(), (
        f"{what}: {differing.sum()} of {differing.size} blocks differ, first {np.argmax(differing)}"
    )


def assert_matches_ggml(type_name: str, values: np.ndarray, importance: np.ndarray | None,
                        what: str) -> None:
    """Our quantizer's bytes for `values` are ggml_quantize_chunk's, block for block."""
    fmt = get_format(type_name)
    assert_identical(fmt.quantize(values, importance), ggml_quantize(type_name, values, importance),
                     fmt.type_size, what)


def assert_thread_count_does_not_matter(type_name: str, values: np.ndarray,
                                        importance: np.ndarray | None) -> None:
    """The C library's bytes with 1, 2, 3 threads and OpenMP's default are the same."""
    fmt = get_format(type_name)
    row_bytes = fmt.row_bytes(values.shape[1])
    results = [cquant.quantize_rows(fmt.ggml_type, values, importance, row_bytes, threads=n)
               for n in (1, 2, 3, 0)]
    for other in results[1:]:
        assert np.array_equal(results[0], other)


def test_the_c_quantizers_are_built() -> None:
    """The build must not silently drop the C library (it would fall back to numpy)."""
    assert cquant.available()
    for name in TYPES:
        assert cquant.supports(get_format(name).ggml_type), name


@pytest.mark.parametrize("type_name", TYPES)
def test_awkward_tensors_match_ggml_and_the_numpy_port(type_name: str) -> None:
    fmt = get_format(type_name)
    values = awkward_tensor()
    for label, importance in importances(values.shape[1]).items():
        ours = fmt.quantize(values, importance)
        what = f"{type_name} imatrix={label}"
        assert_identical(ours, ggml_quantize(type_name, values, importance), fmt.type_size, what)
        assert_identical(ours, fmt.quantize_numpy(values, importance), fmt.type_size,
                         what + " (numpy port)")


@pytest.mark.parametrize("type_name", TYPES)
def test_row_lengths_that_leave_partial_lane_groups(type_name: str) -> None:
    """Rows of 1, 2, 3, 5, 9 blocks: the 4-lane searches get remainders and padding."""
    fmt = get_format(type_name)
    rng = np.random.default_rng(2)
    for blocks in (1, 2, 3, 5, 9):
        values = rng.standard_normal((6, blocks * fmt.block_size)).astype(np.float32)
        for importance in (None, importances(values.shape[1], seed=blocks)["decades"]):
            reference = ggml_quantize(type_name, values, importance)
            assert_identical(fmt.quantize(values, importance), reference, fmt.type_size,
                             f"{type_name} {blocks} blocks per row")


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K", "Q6_K", "IQ4_XS"])
def test_bytes_do_not_depend_on_the_thread_count(type_name: str) -> None:
    values = awkward_tensor(rows=64, seed=3)
    assert_thread_count_does_not_matter(type_name, values, importances(values.shape[1])["decades"])


@pytest.fixture(scope="module")
def real_rows(default_model_path) -> dict[str, np.ndarray]:
    """Dequantized rows of the default model: ffn_down (rows of 1536, every type) and
    attn_q (576: the 32-value types only)."""
    _, infos, data_start, mapped = read_gguf_header(default_model_path)
    by_name = {name: (ggml_type, dims, offset) for name, ggml_type, dims, offset in infos}

    def load(name: str, rows: int) -> np.ndarray:
        ggml_type, dims, offset = by_name[name]
        n_bytes = tensor_nbytes(ggml_type, dims, name)
        raw = torch.from_numpy(np.array(mapped[data_start + offset: data_start + offset + n_bytes]))
        shape = tuple(int(d) for d in reversed(dims))
        return dequantize_tensor(raw, ggml_type, shape).numpy()[:rows]

    return {"ffn_down": load("blk.5.ffn_down.weight", 128),
            "attn_q": load("blk.9.attn_q.weight", 128)}


@pytest.mark.parametrize("type_name", TYPES)
def test_real_model_rows_match_ggml(type_name: str, real_rows: dict[str, np.ndarray]) -> None:
    fmt = get_format(type_name)
    rng = np.random.default_rng(11)
    for name, values in real_rows.items():
        if values.shape[1] % fmt.block_size:
            continue
        columns = values.shape[1]
        imatrix_like = (rng.standard_normal(columns) * np.exp(rng.standard_normal(columns))) ** 2
        for importance in (None, imatrix_like.astype(np.float32)):
            reference = ggml_quantize(type_name, values, importance)
            assert_identical(fmt.quantize(values, importance), reference, fmt.type_size,
                             f"{type_name} {name} imatrix={importance is not None}")


@pytest.mark.parametrize("type_name", ["Q4_1", "Q4_K", "IQ4_NL"])
def test_numpy_fallback_gives_the_same_bytes(type_name: str, monkeypatch) -> None:
    """Without the C library (forced by the environment switch) the formats quantize with
    the numpy ports; the bytes are the same."""
    fmt = get_format(type_name)
    values = awkward_tensor(rows=12, seed=4)
    importance = importances(values.shape[1])["decades"]
    with_c = fmt.quantize(values, importance)
    monkeypatch.setenv("LLMPRESS_NUMPY_QUANTIZE", "1")
    assert not cquant.supports(fmt.ggml_type)
    assert np.array_equal(fmt.quantize(values, importance), with_c)


# --- bad input -------------------------------------------------------------------------
@pytest.mark.parametrize("numpy_path", [False, True], ids=["c", "numpy"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_is_a_clear_error(bad: float, numpy_path: bool, monkeypatch) -> None:
    if numpy_path:
        monkeypatch.setenv("LLMPRESS_NUMPY_QUANTIZE", "1")
    values = np.ones((4, 256), dtype=np.float32)
    values[2, 17] = bad
    for type_name in ("Q4_0", "Q4_K"):
        with pytest.raises(LlmpressError, match="row 2 holds a NaN or an infinity"):
            get_format(type_name).quantize(values)


def test_nan_in_a_model_names_the_tensor(f32_gguf, tmp_path) -> None:
    """quantize_model on a file with a NaN weight: one LlmpressError naming the tensor."""
    import gguf

    from llmpress.quant.quantize import QuantizeConfig, quantize_model

    reader = gguf.GGUFReader(f32_gguf)
    target = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    broken = tmp_path / "nan.gguf"
    broken.write_bytes(f32_gguf.read_bytes())
    with broken.open("r+b") as f:
        f.seek(int(target.data_offset) + 4 * 1000)
        f.write(np.float32(np.nan).tobytes())
    with pytest.raises(LlmpressError, match=r"tensor blk\.0\.attn_k\.weight: row 1 holds a NaN"):
        quantize_model(QuantizeConfig(broken, tmp_path / "out.gguf", "Q4_0"))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q6_K", "IQ4_XS"])
def test_row_length_not_a_multiple_of_the_block(type_name: str) -> None:
    fmt = get_format(type_name)
    with pytest.raises(LlmpressError, match=f"multiple of {fmt.block_size}"):
        fmt.quantize(np.ones((3, fmt.block_size + 8), dtype=np.float32))


def test_importance_of_the_wrong_length_or_not_finite() -> None:
    values = np.ones((3, 512), dtype=np.float32)
    wrong_length = r"importance has shape \(256,\), the rows need \(512,\)"
    with pytest.raises(LlmpressError, match=wrong_length):
        get_format("Q4_K").quantize(values, np.ones(256, dtype=np.float32))
    with pytest.raises(LlmpressError, match="importance matrix holds a NaN"):
        get_format("Q4_K").quantize(values, np.full(512, np.inf, dtype=np.float32))


def test_the_c_entry_point_checks_its_own_arguments() -> None:
    """Called directly with bad arguments the library returns an error status."""
    lib = cquant._library()
    values = np.ones((2, 256), dtype=np.float32)
    out = np.zeros((2, 144), dtype=np.uint8)
    bad_row = ctypes.c_int64(-1)

    def call(ggml_type, src, dst, rows, n_per_row, imatrix=None) -> int:
        return lib.llmpress_quantize(int(ggml_type), src, dst, rows, n_per_row, imatrix, 1,
                                     ctypes.byref(bad_row))

    q4_k = GGMLQuantizationType.Q4_K
    src, dst = values.ctypes.data, out.ctypes.data
    assert call(GGMLQuantizationType.F32, src, dst, 2, 256) == -1  # no such quantizer
    assert call(q4_k, src, dst, 2, 100) == -2  # not a multiple of 256
    assert call(q4_k, None, dst, 2, 256) == -3
    assert call(q4_k, src, None, 2, 256) == -3
    assert call(q4_k, src, dst, -1, 256) == -3
    assert call(q4_k, src, dst, 2, 0) == -3
    nan_weights = np.full(256, np.nan, dtype=np.float32)
    assert call(q4_k, src, dst, 2, 256, nan_weights.ctypes.data) == -5
    assert call(q4_k, src, dst, 0, 256) == 0  # no rows: nothing to do
    assert call(q4_k, src, dst, 2, 256) == 0
    assert np.array_equal(out, ggml_quantize("Q4_K", values))

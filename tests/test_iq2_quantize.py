"""The C quantizers of IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M (quantize_iq2.c) against
ggml's own (ggml_quantize_chunk in llama-cpp-python's libggml-base, tests/ggml_ref.py).

Every block must be byte-identical: random tensors with the awkward cases (zeros, constant
rows, outliers, sign ties, values below ggml's "all zero" thresholds), several row counts
and lengths, random importance matrices (with zeros, all zero), and real rows of the
default model with its real importance matrix. ggml's rule on the importance matrix holds:
IQ2_XXS, IQ2_XS and IQ1_S refuse to quantize without one, IQ2_S and IQ1_M quantize either way.

These quantizers are slow in ggml (its first call per grid builds the neighbour lists, tens
of seconds), so the tensors are small.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REFERENCE_IMATRIX
from ggml_ref import first_call_marked, ggml_requires_imatrix
from test_cquant import (  # noqa: F401 (real_rows: a fixture)
    assert_matches_ggml,
    assert_thread_count_does_not_matter,
    real_rows,
)

from llmpress.errors import LlmpressError
from llmpress.formats import cquant, get_format
from llmpress.quant.quantize import load_imatrix

TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]


def hard_tensor(rows: int, row_length: int, seed: int) -> np.ndarray:
    """Gaussian rows over 8 decades of scale; the first rows hit the edge cases. (Not
    float32 overflow: there ggml's neighbour search asserts and aborts the process.)"""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, row_length)).astype(np.float32)
    values *= (10.0 ** rng.uniform(-4, 4, (rows, 1))).astype(np.float32)
    values[0] = 0.0
    values[1] = -1.5  # constant
    values[2] = 0.0
    values[2, 40] = 7.0  # one value in a zero block
    values[3] = np.abs(values[3]) + 1.0  # all positive
    values[4, :64] = 1e-17  # below the 1e-15 "all zero" threshold
    values[5, :32] = 1e-40  # float32 subnormals
    values[6, :32] = np.tile([1.0, -1.0], 16)  # ties
    values[7] = np.linspace(-4, 4, row_length, dtype=np.float32)
    values[8, 100:] = 0.0
    values[9, rng.random(row_length) < 0.02] *= 1000  # outliers
    values[10, :48] = 1e-9  # under IQ2_S's 1e-8 and IQ1_M's 1e-7 "all zero" thresholds
    return values


def importances(row_length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    decades = rng.standard_normal(row_length) ** 2 * 10.0 ** rng.uniform(-3, 3, row_length)
    with_zeros = decades.copy()
    with_zeros[::3] = 0.0
    return {"decades": decades.astype(np.float32), "with_zeros": with_zeros.astype(np.float32),
            "all_zero": np.zeros(row_length, dtype=np.float32)}


def importance_cases(type_name: str, row_length: int, seed: int) -> dict[str, np.ndarray | None]:
    cases: dict[str, np.ndarray | None] = dict(importances(row_length, seed))
    if not ggml_requires_imatrix(type_name):
        cases["none"] = None
    return cases


def test_the_c_quantizers_are_built() -> None:
    for name in TYPES:
        assert get_format(name).writable, name
        assert cquant.supports(get_format(name).ggml_type), name


@pytest.mark.parametrize("type_name", first_call_marked(TYPES))
def test_hard_tensors_match_ggml(type_name: str) -> None:
    values = hard_tensor(rows=14, row_length=512, seed=0)
    for label, importance in importance_cases(type_name, 512, seed=1).items():
        assert_matches_ggml(type_name, values, importance, f"{type_name} imatrix={label}")


@pytest.mark.parametrize("type_name", first_call_marked(TYPES))
def test_row_counts_and_lengths_match_ggml(type_name: str) -> None:
    rng = np.random.default_rng(2)
    for rows, blocks in ((1, 1), (3, 3), (7, 2)):
        values = rng.standard_normal((rows, 256 * blocks)).astype(np.float32)
        for label, importance in importance_cases(type_name, 256 * blocks, seed=blocks).items():
            assert_matches_ggml(type_name, values, importance,
                                f"{type_name} {rows}x{256 * blocks} imatrix={label}")


@pytest.mark.parametrize("type_name", TYPES)
def test_real_model_rows_match_ggml(type_name: str, real_rows) -> None:  # noqa: F811
    """48 rows of the default model's blk.5.ffn_down (rows of 1536) with the tensor's entry
    of the model's real importance matrix (made with llama-imatrix), a random one, none."""
    values = real_rows["ffn_down"][:48]
    imatrix = load_imatrix(REFERENCE_IMATRIX).entries["blk.5.ffn_down.weight"]
    cases = {"real": imatrix, "random": importances(values.shape[1], seed=3)["decades"]}
    if not ggml_requires_imatrix(type_name):
        cases["none"] = None
    for label, importance in cases.items():
        assert_matches_ggml(type_name, values, importance, f"{type_name} ffn_down imatrix={label}")


@pytest.mark.parametrize("type_name", TYPES)
def test_bytes_do_not_depend_on_the_thread_count(type_name: str) -> None:
    values = hard_tensor(rows=24, row_length=256, seed=4)
    importance = importances(256, seed=5)["decades"]
    get_format(type_name).quantize(values[:1], importance)  # hands the grid to the C library
    assert_thread_count_does_not_matter(type_name, values, importance)


# --- the importance matrix rule and bad input ---------------------------------------------
@pytest.mark.parametrize("type_name", TYPES)
def test_the_imatrix_rule_is_ggmls(type_name: str) -> None:
    fmt = get_format(type_name)
    values = np.random.default_rng(6).standard_normal((2, 256)).astype(np.float32)
    if ggml_requires_imatrix(type_name):
        with pytest.raises(LlmpressError, match=f"{type_name} needs an importance matrix"):
            fmt.quantize(values)
    else:
        assert fmt.quantize(values).shape == (2, fmt.type_size)


def test_the_c_library_refuses_a_missing_imatrix_itself() -> None:
    """The C entry point checks too (a bad call is a status, never a crash in C)."""
    fmt = get_format("IQ2_XXS")
    values = np.ones((2, 256), dtype=np.float32)
    fmt.quantize(values, np.ones(256, dtype=np.float32))
    with pytest.raises(LlmpressError, match="needs an importance matrix"):
        cquant.quantize_rows(fmt.ggml_type, values, None, fmt.type_size)


def test_without_the_c_library_it_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("LLMPRESS_NUMPY_QUANTIZE", "1")
    values = np.ones((2, 256), dtype=np.float32)
    for type_name in TYPES:
        with pytest.raises(LlmpressError, match=f"{type_name} needs llmpress's C quantizer library"):
            get_format(type_name).quantize(values, np.ones(256, dtype=np.float32))


@pytest.mark.parametrize("type_name", ["IQ2_XXS", "IQ1_M"])
def test_bad_rows_are_clear_errors(type_name: str) -> None:
    fmt = get_format(type_name)
    importance = np.ones(512, dtype=np.float32)
    with pytest.raises(LlmpressError, match="multiple of 256"):
        fmt.quantize(np.ones((2, 320), dtype=np.float32), np.ones(320, dtype=np.float32))
    values = np.ones((3, 512), dtype=np.float32)
    values[1, 5] = np.nan
    with pytest.raises(LlmpressError, match="row 1 holds a NaN or an infinity"):
        fmt.quantize(values, importance)

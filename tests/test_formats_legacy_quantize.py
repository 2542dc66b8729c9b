"""Our numpy quantizers for F32/F16/BF16 and the 32-value types against ggml itself.

References: gguf-py's quantizers (no importance weights) and ggml_quantize_chunk from the
libggml-base that llama-cpp-python ships (with and without an imatrix). Every block must be
byte-identical: libggml-base is built without FMA, so float32 steps taken in the C order and
sums accumulated in the C order leave nothing to chance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from ggml_ref import ggml_quantize
from llmpress.formats import dequantize_tensor, get_format

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
WEIGHTED_SEARCH_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def awkward_matrix(rows: int = 48, row_length: int = 512, seed: int = 0) -> np.ndarray:
    """Gaussian rows of very different scales, plus blocks that hit the edge cases:
    all zero, constant, one outlier, all positive, tiny (below GROUP_MAX_EPS), ties."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, row_length)).astype(np.float32)
    values *= (10.0 ** rng.uniform(-4, 2, (rows, 1))).astype(np.float32)
    values[0, :32] = 0.0
    values[1, :32] = -1.5
    values[2, 32:64] = 0.0
    values[2, 40] = 7.0
    values[3, :64] = np.abs(values[3, :64]) + 1.0
    values[4, :32] = 1e-17
    values[5, :32] = np.tile([1.0, -1.0], 16)  # magnitude ties: ggml keeps the first
    values[6, :32] = np.linspace(-4, 4, 32, dtype=np.float32)  # exact .5 products
    return values


def random_importance(row_length: int, seed: int = 1) -> np.ndarray:
    """imatrix-like: positive mean squares spanning decades, with a few zero columns."""
    rng = np.random.default_rng(seed)
    importance = (rng.standard_normal(row_length) ** 2 * 10.0 ** rng.uniform(-2, 2, row_length))
    importance[::37] = 0.0
    return importance.astype(np.float32)


def assert_same_blocks(ours: np.ndarray, reference: np.ndarray, type_size: int) -> None:
    assert ours.dtype == np.uint8 and ours.size == reference.size
    differing = (ours.reshape(-1, type_size) != reference.reshape(-1, type_size)).any(axis=1)
    assert not differing.any(), f"{differing.sum()} of {differing.size} blocks differ from ggml"


@pytest.mark.parametrize("type_name", TYPES)
def test_plain_quantize_matches_gguf_py(type_name: str) -> None:
    fmt = get_format(type_name)
    values = awkward_matrix()
    reference = gguf_quants.quantize(values, GGMLQuantizationType[type_name])
    reference = np.ascontiguousarray(reference).view(np.uint8)
    assert_same_blocks(fmt.quantize(values), reference, fmt.type_size)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_matches_ggml(type_name: str, weighted: bool) -> None:
    fmt = get_format(type_name)
    values = awkward_matrix()
    importance = random_importance(values.shape[1]) if weighted else None
    reference = ggml_quantize(type_name, values, importance)
    assert_same_blocks(fmt.quantize(values, importance), reference, fmt.type_size)


@pytest.mark.parametrize("type_name", WEIGHTED_SEARCH_TYPES)
def test_quantize_blocks_alone_is_one_row(type_name: str) -> None:
    """Without row structure, quantize_blocks treats its blocks as one ggml row."""
    fmt = get_format(type_name)
    values = awkward_matrix(rows=8, row_length=256, seed=3)
    importance = random_importance(256, seed=4)
    blocks = values.reshape(-1, 32)
    weights = np.broadcast_to(importance.reshape(-1, 32), (8, 8, 32)).reshape(-1, 32)
    reference = ggml_quantize(type_name, values.reshape(1, -1), np.tile(importance, 8))
    assert_same_blocks(fmt.quantize_blocks(blocks, weights), reference, fmt.type_size)


@pytest.mark.parametrize("type_name", ["F16", "BF16"])
def test_special_floats_match_ggml(type_name: str) -> None:
    """NaN (quieted for BF16), infinities, overflow, subnormals, round-to-even ties."""
    specials = np.array(
        [np.nan, -np.nan, np.inf, -np.inf, 1e6, -7e4, 65519.0, 1e-8, -3e-39, 0.0, -0.0,
         1.00390625, 1.01171875, 3.0000002],
        dtype=np.float32,
    )  # fmt: skip
    payload_nan = np.array([0x7FA00001, 0xFFC12345], dtype=np.uint32).view(np.float32)
    values = np.concatenate([specials, payload_nan]).reshape(1, -1)
    fmt = get_format(type_name)
    assert_same_blocks(fmt.quantize(values), ggml_quantize(type_name, values), fmt.type_size)


@pytest.fixture(scope="module")
def model_weights(default_model_path) -> list[np.ndarray]:
    """256 rows of the first Q4_1 matrix and of the Q8_0 token embedding of the default
    model, dequantized (real weight statistics, outliers included)."""
    reader = GGUFReader(default_model_path)
    picked: dict[GGMLQuantizationType, np.ndarray] = {}
    for tensor in reader.tensors:
        ggml_type = GGMLQuantizationType(tensor.tensor_type)
        if ggml_type in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0):
            if ggml_type not in picked:
                row_length = int(tensor.shape[0])  # GGUF lists the row (innermost) dim first
                row_bytes = get_format(ggml_type).row_bytes(row_length)
                rows = np.asarray(tensor.data).view(np.uint8).reshape(-1, row_bytes)
                raw = torch.from_numpy(rows[:256].reshape(-1).copy())
                picked[ggml_type] = dequantize_tensor(raw, ggml_type, (256, row_length)).numpy()
    assert len(picked) == 2
    return list(picked.values())


@pytest.mark.parametrize("type_name", TYPES)
def test_real_model_weights_match_ggml(type_name: str, model_weights: list[np.ndarray]) -> None:
    fmt = get_format(type_name)
    for weight in model_weights:
        importance = random_importance(weight.shape[1], seed=5)
        for imatrix in (None, importance):
            reference = ggml_quantize(type_name, weight, imatrix)
            assert_same_blocks(fmt.quantize(weight, imatrix), reference, fmt.type_size)


@pytest.mark.parametrize("type_name", WEIGHTED_SEARCH_TYPES)
def test_imatrix_lowers_weighted_error(type_name: str) -> None:
    """The point of the imatrix path: less importance-weighted error than plain rounding."""
    fmt = get_format(type_name)
    values = np.random.default_rng(6).standard_normal((32, 512)).astype(np.float32)
    importance = random_importance(512, seed=7)

    def weighted_error(raw: np.ndarray) -> float:
        restored = dequantize_tensor(torch.from_numpy(raw.reshape(-1)), type_name, values.shape)
        return float((importance * (restored.numpy() - values) ** 2).sum())

    assert weighted_error(fmt.quantize(values, importance)) < weighted_error(fmt.quantize(values))


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_kquant_and_iq4_classes_reach_their_search_functions(type_name: str) -> None:
    """The k-quant/IQ4 classes hand blocks to kquant_quantize; the bytes are ggml's."""
    fmt = get_format(type_name)
    values = awkward_matrix(rows=8, row_length=512, seed=8)
    for importance in (None, random_importance(512, seed=9)):
        reference = ggml_quantize(type_name, values, importance)
        assert_same_blocks(fmt.quantize(values, importance), reference, fmt.type_size)

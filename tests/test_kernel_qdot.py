"""The integer matmul kernels (kernels/qdot_*.c) for every weight type and every
instruction set this CPU runs (forced one at a time, as LLMPRESS_KERNEL_ISA does).

Two references, both independent of the C code:
- the same 8-bit activation rounding written here in numpy (symmetric blocks of 256 for
  k-quants, 32 for the legacy types), times the exactly dequantized weights in float64:
  the kernel must agree to float32 rounding, which checks its integer arithmetic;
- exact mode (dequantize + float GEMM): the kernel must stay within the activation
  rounding's noise of it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from ggml_ref import ggml_quantize, ggml_requires_imatrix
from llmpress.errors import LlmpressError
from llmpress.formats import get_format
from llmpress.io.gguf import load_gguf
from llmpress.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C kernel was not built")

LOW_BIT = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0"]
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "IQ4_NL", "IQ4_XS", *LOW_BIT]
K_QUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", *LOW_BIT}  # activation blocks of 256


@pytest.fixture(params=["portable", "avx2"])
def isa(request):
    if request.param not in cpu.isas_here():
        pytest.skip(f"this CPU has no {request.param}")
    cpu.use_isa(request.param)
    yield request.param
    cpu.use_isa("auto")


def pack(ggml_type, weights: np.ndarray) -> torch.Tensor:
    """Weights in ggml_type's blocks: our quantizer, or ggml's for the types llmpress only
    reads; with an importance matrix where ggml needs one (IQ2_XXS, ...)."""
    fmt = get_format(ggml_type)
    importance = np.random.default_rng(3).uniform(0.1, 2.0, weights.shape[1]).astype(np.float32)
    if not fmt.writable:
        return torch.from_numpy(ggml_quantize(ggml_type.name, weights, importance).reshape(-1))
    if not ggml_requires_imatrix(ggml_type.name):
        importance = None
    return torch.from_numpy(fmt.quantize(weights, importance).reshape(-1))


def rounding_steps(x: np.ndarray, block: int) -> np.ndarray:
    """Each activation's code step d = max|x| / 127 of its block."""
    blocks = np.abs(x.reshape(-1, block)).astype(np.float64)
    return np.repeat(blocks.max(axis=1) / 127, block).reshape(x.shape)


def quantized_activations(x: np.ndarray, block: int) -> np.ndarray:
    """x rounded as the kernel rounds it: per block, d = max|x| / 127, code = round(x / d)
    (halves away from zero), back to floats as d * code."""
    blocks = x.reshape(-1, block).astype(np.float32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inverse = np.where(d > 0, np.float32(127) / np.abs(blocks).max(axis=1, keepdims=True), 0)
    scaled = (blocks * inverse).astype(np.float32)
    codes = np.trunc(scaled + np.where(scaled >= 0, 0.5, -0.5).astype(np.float32))
    return (codes * d).reshape(x.shape).astype(np.float64)


def run_kernel(packed: torch.Tensor, ggml_type, n_rows: int, x: np.ndarray,
               repack: bool = False) -> np.ndarray:
    rows = packed.view(n_rows, -1)
    weight = (rows, int(ggml_type))
    if repack:  # the kernel's own layout (qdot.h: Q4_K_X8)
        weight = cpu.repacked(rows, ggml_type, x.shape[1])
        assert weight is not None, f"{ggml_type.name} has no repacked layout"
    weights = cpu.FusedWeights([weight])
    return cpu.qmatmul(weights, torch.from_numpy(x.astype(np.float32))).double().numpy()


def check_against_references(packed, ggml_type, shape, x, repack=False):
    n, k = shape
    dense = get_format(ggml_type).dequantize(packed, shape).double().numpy()
    block = 256 if ggml_type.name in K_QUANTS else 32
    expected = quantized_activations(x, block) @ dense.T
    exact = x.astype(np.float64) @ dense.T
    got = run_kernel(packed, ggml_type, n, x, repack)
    scale = np.abs(exact).max()
    assert np.abs(got - expected).max() <= 2e-5 * scale, np.abs(got - expected).max() / scale
    # activation rounding moves each x by at most half its block's code step
    bound = np.abs(dense) @ (rounding_steps(x, block) / 2).T  # (n, T)
    assert np.all(np.abs(got - exact) <= bound.T + 2e-5 * scale)
    assert np.abs(got - exact).max() > 0  # the rounding is real: this is not exact mode
    return got


@pytest.mark.parametrize("type_name", TYPES)
def test_random_blocks(isa, type_name):
    rng = np.random.default_rng(0)
    ggml_type = GGMLQuantizationType[type_name]
    shape = (37, 512)  # 37 rows: not a multiple of the thread count
    weights = rng.standard_normal(shape).astype(np.float32)
    packed = pack(ggml_type, weights)
    for n_rows in (1, 3, 20):  # decode and a few prompt rows
        x = rng.standard_normal((n_rows, shape[1])).astype(np.float32) * rng.uniform(0.1, 10)
        x[0, :7] = 0  # an all-zero start must not divide by zero
        check_against_references(packed, ggml_type, shape, x)


REPACKED = ["Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]  # types with a repacked layout (groups of 8 rows)


@pytest.mark.parametrize("type_name", REPACKED)
def test_repacked_layout(isa, type_name):
    """The repacked layout gives the file layout's sums: both references, any number of
    activation rows, and the same results as the file layout to float rounding."""
    rng = np.random.default_rng(4)
    ggml_type = GGMLQuantizationType[type_name]
    shape = (40, 768)  # five groups of 8 rows
    weights = rng.standard_normal(shape).astype(np.float32)
    packed = pack(ggml_type, weights)
    for n_rows in (1, 3, 4, 9):
        x = rng.standard_normal((n_rows, shape[1])).astype(np.float32) * 3
        got = check_against_references(packed, ggml_type, shape, x, repack=True)
        file_layout = run_kernel(packed, ggml_type, shape[0], x)
        np.testing.assert_allclose(got, file_layout, rtol=1e-5, atol=1e-5 * np.abs(got).max())
    # a row count that is not whole groups keeps the file layout
    assert cpu.repacked(packed.view(40, -1)[:12], ggml_type, shape[1]) is None


@pytest.mark.parametrize("type_name", TYPES)
def test_isas_agree(type_name):
    """Every instruction set computes the same integer sums: results equal to float
    rounding of the final additions."""
    isas = cpu.isas_here()
    rng = np.random.default_rng(1)
    ggml_type = GGMLQuantizationType[type_name]
    weights = rng.standard_normal((16, 1024)).astype(np.float32)
    packed = pack(ggml_type, weights)
    x = rng.standard_normal((2, 1024)).astype(np.float32)
    results = []
    for name in isas:
        cpu.use_isa(name)
        results.append(run_kernel(packed, ggml_type, 16, x))
    cpu.use_isa("auto")
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-5, atol=1e-5 * np.abs(results[0]).max())


def test_real_model_rows(isa, default_model_path):
    """Rows of every matmul type in the default model (legacy types and the k-quant
    ffn_down), with activations shaped like the real ones (a few large outliers)."""
    src = load_gguf(default_model_path)
    seen = {}
    for name, ref in src.tensors.items():
        if len(ref.shape) == 2 and cpu.supports(ref.ggml_type) and ref.ggml_type not in seen:
            seen[ref.ggml_type] = ref
    assert {t.name for t in seen} >= {"Q4_1", "Q6_K"} or len(seen) >= 2, seen
    rng = np.random.default_rng(2)
    for ggml_type, ref in seen.items():
        rows = ref.read_bytes().view(ref.shape[0], -1)[:64].reshape(-1)
        shape = (64, ref.shape[1])
        x = rng.standard_normal((2, shape[1])).astype(np.float32)
        x[:, rng.integers(0, shape[1], 4)] *= 30  # outlier channels, as in real activations
        check_against_references(rows, ggml_type, shape, x)


def test_forcing_an_unknown_isa_is_a_clear_error():
    with pytest.raises(LlmpressError, match="unknown kernel instruction set"):
        cpu.use_isa("sse9")


def test_kernel_info_names_the_path():
    info = cpu.kernel_info()
    assert info["isa"] in info["available"] and "portable" in info["available"]


@pytest.mark.parametrize("type_name", ["F16", "BF16"])
def test_float_weights(isa, type_name):
    """F16 and BF16 weights take the activations as floats, unrounded: the kernel equals
    the float64 product with the dequantized weights to float32 summation rounding, for
    one row and for prompt-sized groups."""
    rng = np.random.default_rng(5)
    ggml_type = GGMLQuantizationType[type_name]
    shape = (37, 544)  # rows of 17 blocks of 32 values
    packed = pack(ggml_type, rng.standard_normal(shape).astype(np.float32))
    dense = get_format(ggml_type).dequantize(packed, shape).double().numpy()
    for n_rows in (1, 3, 9):
        x = rng.standard_normal((n_rows, shape[1])).astype(np.float32) * 3
        got = run_kernel(packed, ggml_type, shape[0], x)
        exact = x.astype(np.float64) @ dense.T
        assert np.abs(got - exact).max() <= 1e-6 * (np.abs(x) @ np.abs(dense).T).max()
    # rows that are not whole blocks of 32 stay with exact mode's GEMM
    assert cpu.supports(ggml_type, 544) and not cpu.supports(ggml_type, 40)

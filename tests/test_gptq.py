"""GPTQ on tiny random layers: lower output error than round-to-nearest on the same grid,
results that lie on that grid, GGUF block targets whose bytes gguf-py decodes to our
weights, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from llmpress.errors import LlmpressError
from llmpress.formats import get_format
from llmpress.quant import gguf_grid
from llmpress.quant.gptq import (
    GPTQConfig,
    IntGrid,
    IntGridTarget,
    gptq_gguf,
    gptq_quantize,
    inverse_cholesky,
    output_error,
    rtn_quantize,
)


def random_layer(out_features=48, in_features=256, tokens=1024, seed=0):
    """A weight and calibration inputs with correlated, unevenly scaled channels (what
    makes GPTQ's error propagation pay: real activations look like this)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(in_features) + 0.5 * torch.randn(in_features, in_features, generator=g) \
        / in_features**0.5
    channel_scale = torch.rand(in_features, generator=g) * 3 + 0.2
    x = (torch.randn(tokens, in_features, generator=g) @ mixing) * channel_scale
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    return w, x


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def relative_output_error(w, w_hat, x) -> float:
    """‖WX − ŴX‖² / ‖WX‖², straight from the inputs."""
    return float(((x @ (w - w_hat).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


GRIDS = [IntGrid(4, 128), IntGrid(4, 32, symmetric=True), IntGrid(3, 64), IntGrid(2, 32),
         IntGrid(8, 128, symmetric=True), IntGrid(4, -1)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.bits}b-g{g.group_size}-"
                         f"{'sym' if g.symmetric else 'zp'}")
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_the_same_grid(grid, act_order):
    w, x = random_layer()
    target = IntGridTarget(grid, w.shape[1])
    result = gptq_quantize(w, hessian(x), target, GPTQConfig(act_order=act_order))
    rtn = rtn_quantize(w, target)
    gptq_error = relative_output_error(w, result.weight, x)
    assert gptq_error < 0.95 * relative_output_error(w, rtn.weight, x)
    assert result.error == pytest.approx(gptq_error, rel=1e-4)  # the H-based figure


@pytest.mark.parametrize("act_order", [False, True])
def test_result_lies_on_its_grid(act_order):
    w, x = random_layer(in_features=192)
    grid = IntGrid(3, 64)
    result = gptq_quantize(w, hessian(x), IntGridTarget(grid, 192), GPTQConfig(act_order=act_order))
    assert result.codes.max() <= grid.max_code
    assert result.group_index.tolist() == [i // 64 for i in range(192)]
    scales = torch.stack([p.scale for p in result.group_params], dim=1)  # (out, groups)
    zeros = torch.stack([p.zero for p in result.group_params], dim=1)
    assert torch.equal(scales, scales.half().float())  # what a checkpoint stores
    g = result.group_index
    expected = scales[:, g] * (result.codes.float() - zeros[:, g])
    assert torch.equal(result.weight, expected)
    if act_order:  # columns by decreasing diag(H)
        diag = hessian(x).diagonal()
        assert torch.all(diag[result.order][:-1] >= diag[result.order][1:])


def test_symmetric_grid_has_the_midpoint_zero():
    w, x = random_layer(in_features=64)
    result = gptq_quantize(w, hessian(x), IntGridTarget(IntGrid(4, 32, symmetric=True), 64))
    assert all(torch.all(p.zero == 8) for p in result.group_params)


def test_dead_inputs_are_rounded_not_lost():
    """Columns whose input is always zero (diag H = 0) are rounded; nothing is NaN."""
    w, x = random_layer(in_features=64)
    x[:, :5] = 0
    result = gptq_quantize(w, hessian(x), IntGridTarget(IntGrid(4, 32), 64))
    assert torch.isfinite(result.weight).all()
    rtn = rtn_quantize(w, IntGridTarget(IntGrid(4, 32), 64))
    assert result.weight[:, :5].abs().sum() > 0
    assert torch.allclose(result.weight[:, :5], rtn.weight[:, :5], atol=0.02)


def test_shrink_moves_gptq_toward_rounding():
    """H + shrink * diag(H): no shrink is GPTQ, a huge one leaves nothing to compensate
    and gives round-to-nearest on the same groups; in between the calibration error lies
    between the two."""
    w, x = random_layer(in_features=128)
    target = IntGridTarget(IntGrid(4, 32), 128)
    rtn = rtn_quantize(w, target, hessian(x))
    errors = [gptq_quantize(w, hessian(x), target, GPTQConfig(shrink=s)).error
              for s in (0.0, 1.0)]
    assert errors[0] < errors[1] < rtn.error
    huge = gptq_quantize(w, hessian(x), target, GPTQConfig(shrink=1e7))
    assert (huge.codes == rtn.codes).float().mean() > 0.999
    with pytest.raises(LlmpressError, match="shrink"):
        GPTQConfig(shrink=-1)


def test_output_error_matches_the_definition():
    w, x = random_layer(in_features=64)
    w_hat = w + 0.01 * torch.randn_like(w)
    assert output_error(w, w_hat, hessian(x)) == pytest.approx(
        relative_output_error(w, w_hat, x), rel=1e-5)


def test_cholesky_fallback_damps_more_with_a_warning():
    """An indefinite Hessian (a negative eigenvalue of 5% of the mean diagonal) fails with
    the default 1% damping; GPTQ warns and retries with 10%."""
    w, x = random_layer(in_features=64)
    h = hessian(x)
    h = h - 0.05 * h.diagonal().mean() * torch.eye(64)
    eigenvalues = torch.linalg.eigvalsh(h.double())
    assert eigenvalues.min() < 0
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        result = gptq_quantize(w, h, IntGridTarget(IntGrid(4, 32), 64))
    assert torch.isfinite(result.weight).all()
    with pytest.raises(LlmpressError, match="singular"):
        inverse_cholesky(-torch.eye(8) * 1e3 - torch.ones(8, 8), 0.01)


# --- GGUF block formats -------------------------------------------------------------------
GGUF_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
              T.IQ4_NL, T.IQ4_XS]


@pytest.mark.parametrize("ggml_type", GGUF_TYPES, ids=lambda t: t.name)
def test_grid_packing_reproduces_ggml_blocks(ggml_type):
    """Reading the grid off quantized blocks and writing their own codes back gives the
    same bytes: the per-format code layouts are right."""
    fmt = get_format(ggml_type)
    rng = np.random.default_rng(3)
    values = rng.standard_normal((6, 512)).astype(np.float32)
    blocks = fmt.quantize(values, rng.random(512).astype(np.float32) + 0.1)
    blocks = blocks.reshape(-1, fmt.type_size)
    decoded = gguf_quants.dequantize(blocks, ggml_type).reshape(-1, fmt.block_size)
    snapped, codes = gguf_grid.grid(blocks, ggml_type).nearest(decoded)
    np.testing.assert_array_equal(snapped, decoded)
    np.testing.assert_array_equal(gguf_grid.with_codes(blocks, codes, ggml_type), blocks)


@pytest.mark.parametrize("ggml_type", GGUF_TYPES, ids=lambda t: t.name)
def test_gptq_into_gguf_beats_llama_quantize_with_imatrix(ggml_type):
    """GPTQ-into-GGUF: the bytes are an ordinary GGUF tensor (gguf-py decodes them to our
    weight) with lower output error than the ggml quantizer's bytes for the same imatrix
    (our quantizer is bit-exact with llama-quantize's)."""
    w, x = random_layer(out_features=32, in_features=256, tokens=512)
    h = hessian(x)
    imatrix = (x * x).mean(dim=0).numpy()
    data, result = gptq_gguf(w, h, ggml_type)
    fmt = get_format(ggml_type)
    assert data.shape == (32, fmt.row_bytes(256)) and data.dtype == np.uint8
    decoded = torch.from_numpy(gguf_quants.dequantize(data, ggml_type).reshape(w.shape))
    assert torch.equal(decoded, result.weight)
    llama_quantized = fmt.dequantize(torch.from_numpy(fmt.quantize(w.numpy(), imatrix).reshape(-1)),
                                     tuple(w.shape))
    assert relative_output_error(w, decoded, x) < 0.9 * relative_output_error(w, llama_quantized, x)


def test_gptq_into_gguf_with_act_order_uses_static_scales():
    w, x = random_layer(out_features=16, in_features=256)
    _, result = gptq_gguf(w, hessian(x), T.Q4_K, config=GPTQConfig(act_order=True))
    llama = get_format(T.Q4_K)
    rtn = llama.dequantize(torch.from_numpy(llama.quantize(w.numpy(), (x * x).mean(0).numpy())
                                            .reshape(-1)), tuple(w.shape))
    assert relative_output_error(w, result.weight, x) < relative_output_error(w, rtn, x)


# --- bad input ----------------------------------------------------------------------------
def test_bad_input_is_refused_in_one_line():
    w, x = random_layer(in_features=64)
    with pytest.raises(LlmpressError, match="5 bits"):
        IntGrid(5, 128)
    with pytest.raises(LlmpressError, match="group size"):
        IntGrid(4, 0)
    with pytest.raises(LlmpressError, match="damping"):
        GPTQConfig(damp=0)
    with pytest.raises(LlmpressError, match=r"must be \(64, 64\)"):
        gptq_quantize(w, hessian(x)[:32, :32], IntGridTarget(IntGrid(4, 32), 64))
    with pytest.raises(LlmpressError, match="2-D"):
        gptq_quantize(w[0], hessian(x), IntGridTarget(IntGrid(4, 32), 64))
    with pytest.raises(LlmpressError, match="block size 256"):
        gptq_gguf(w, hessian(x), T.Q4_K)
    with pytest.raises(LlmpressError, match="cannot target"):
        gptq_gguf(w, hessian(x), T.F16)
    bad = hessian(x)
    bad[0, 0] = float("nan")
    with pytest.raises(LlmpressError, match="non-finite"):
        gptq_quantize(w, bad, IntGridTarget(IntGrid(4, 32), 64))

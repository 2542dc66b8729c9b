"""The C entry points refuse inconsistent descriptions with an error code (turned into one
LlmpressError line) instead of reading or writing outside their buffers."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ggml_ref import ggml_quantize
from gguf import GGMLQuantizationType
from tiny import quantized, save_tiny_hf_model

from llmpress.errors import LlmpressError
from llmpress.formats import get_format
from llmpress.io.hf import load_hf_dir
from llmpress.kernels import cpu
from llmpress.kernels.linear import kernel_weights
from llmpress.models.kv_cache import KV_TYPES
from llmpress.models.llama import LlamaModel

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C kernel was not built")


def packed_weights(ggml_type, n: int, k: int) -> torch.Tensor:
    values = torch.randn(n, k, generator=torch.Generator().manual_seed(0)).numpy()
    return torch.from_numpy(get_format(ggml_type).quantize(values)).view(n, -1)


def call_qmatmul(rows, ggml_type, x, n_threads=1, n_rows=None, k=None):
    """llmpress_qmatmul with every argument under the test's control."""
    weights = cpu.FusedWeights([(rows, ggml_type)])
    if n_rows is not None:
        weights.sizes[0] = n_rows
    T, K = x.shape
    y = torch.empty(T, weights.sizes[0])
    return cpu._library().llmpress_qmatmul(1, weights.types, weights.pointers, weights.sizes,
                                           weights.bytes, x.data_ptr(), x.numel(), y.data_ptr(),
                                           y.numel(), K if k is None else k, T, n_threads)


def test_qmatmul_accepts_a_consistent_call():
    rows = packed_weights(GGMLQuantizationType.Q4_K, 8, 256)
    assert call_qmatmul(rows, GGMLQuantizationType.Q4_K, torch.randn(2, 256)) == 0


@pytest.mark.parametrize("case, code", [
    ("unsupported type", -1), ("K not a multiple of the block", -2), ("no rows", -2),
    ("more rows than bytes", -3), ("weights too short", -3), ("x shorter than K * T", -3),
    ("no threads", -4)])
def test_qmatmul_refuses(case, code):
    t = GGMLQuantizationType.Q4_K
    rows, x = packed_weights(t, 8, 256), torch.randn(2, 256)
    kwargs = {}
    if case == "unsupported type":
        rows, t = packed_weights(GGMLQuantizationType.F32, 8, 256), GGMLQuantizationType.F32
    elif case == "K not a multiple of the block":
        rows, t, x = packed_weights(GGMLQuantizationType.Q4_0, 8, 96), GGMLQuantizationType.Q4_0, torch.randn(2, 96)
        kwargs["k"] = 80
    elif case == "no rows":
        kwargs["n_rows"] = 0
    elif case == "more rows than bytes":
        kwargs["n_rows"] = 9
    elif case == "weights too short":
        rows = rows[:, :-1].contiguous()
    elif case == "x shorter than K * T":
        kwargs["k"] = 512
    elif case == "no threads":
        kwargs["n_threads"] = 0
    assert call_qmatmul(rows, t, x, **kwargs) == code
    with pytest.raises(LlmpressError, match=cpu.ERRORS[code]):
        cpu.check(code, "matmul")


@pytest.mark.parametrize("type_name", ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
                                       "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0"])
def test_qmatmul_refuses_low_bit_types_on_rows_of_part_blocks(type_name):
    """The IQ/TQ kernels read 256-value blocks: K = 128 is refused, not read past."""
    t = GGMLQuantizationType[type_name]
    assert cpu.supports(t)
    rows = torch.zeros(8, get_format(t).type_size, dtype=torch.uint8)
    assert call_qmatmul(rows, t, torch.randn(2, 128)) == -2


@pytest.mark.parametrize("case", ["too few tables", "a missing table", "a short table"])
def test_iq_grids_refuse_wrong_tables(case):
    """The grids are handed over once at load; a wrong description changes nothing."""
    sizes = [2048, 4096, 8192, 1024, 2048, 16384, 128]
    tables = [np.zeros(n, np.uint8) for n in sizes]
    pointers = (ctypes.c_void_p * 7)(*(t.ctypes.data for t in tables))
    lengths = (ctypes.c_int64 * 7)(*sizes)
    count = 6 if case == "too few tables" else 7
    if case == "a missing table":
        pointers[3] = None
    elif case == "a short table":
        lengths[5] = 16383
    assert cpu._library().llmpress_set_iq_grids(count, pointers, lengths) == -3
    # the tables given at load still hold: the kernel still matches dequantize + matmul
    t = GGMLQuantizationType.IQ2_XXS
    weights = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    rows = torch.from_numpy(ggml_quantize("IQ2_XXS", weights, np.ones(256, np.float32)))
    x = torch.randn(1, 256)
    expected = x @ get_format(t).dequantize(rows.reshape(-1), (4, 256)).T
    got = cpu.qmatmul(cpu.FusedWeights([(rows, t)]), x)
    assert torch.allclose(got, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    src = quantized(load_hf_dir(save_tiny_hf_model(tmp_path_factory.mktemp("llama"), "llama")),
                    GGMLQuantizationType.Q8_0)
    return LlamaModel(src, "fast")


def decode_status(model, cache, pos=None, n_threads=1, x=None, n_tokens=1, angle_floats=None,
                  seq=0, n_rotations=1):
    decoder = model.decoder
    views = decoder._views(cache)
    x = torch.zeros(model.cfg.dim * n_tokens) if x is None else x
    angles = torch.zeros(model.cfg.rope_dim // 2 * n_tokens)
    first = cache.length if pos is None else pos
    rows_seq = torch.full((max(n_tokens, 1),), seq, dtype=torch.int64)
    rows_pos = torch.arange(first, first + max(n_tokens, 1), dtype=torch.int64)
    return cpu._library().llmpress_forward(
        ctypes.byref(decoder.shape), decoder.layers, len(decoder.layers), views, 1,
        x.data_ptr(), x.numel(), n_tokens, rows_seq.data_ptr(), rows_pos.data_ptr(),
        angles.data_ptr(), angles.data_ptr(), n_rotations,
        angles.numel() if angle_floats is None else angle_floats, n_threads)


@pytest.mark.parametrize("case, code", [
    ("consistent", 0), ("no KV heads", -7), ("heads not a multiple of KV heads", -7),
    ("rope wider than a head", -7), ("odd rope", -7), ("position past the cache", -8),
    ("negative position", -8), ("tokens past the cache", -8), ("no tokens", -3),
    ("angles for fewer tokens", -3), ("no threads", -4), ("weights too short", -3),
    ("cache smaller than said", -3), ("layers' caches of different lengths", -3),
    ("a row of a sequence not given", -3), ("x not dim long", -3), ("zero dim", -2),
    # the attention settings Gemma's layers add
    ("negative window", -9), ("a RoPE table not given", -9), ("negative RoPE table", -9),
    ("no RoPE tables", -3), ("angles for fewer tables", -3), ("negative query scale", -9),
    ("NaN query scale", -9), ("infinite soft-cap", -9), ("negative soft-cap", -9),
    ("gate activation neither SiLU nor GELU", -9),
    ("a consistent q4_0 cache", 0), ("keys said q8_0 in an f32 buffer", -3),
    ("values said q4_0 in an f32 buffer", -3), ("q8_0 values in a q4_0 buffer", -3),
    ("an unknown cache type", -1), ("q8_0 keys without the quantizer", -1),
    ("q4_0 values without their quantizer", -1), ("a rotation not a power of two", -2),
    ("a rotation wider than a head", -2), ("a rotated f32 cache", -2)])
def test_decode_refuses(model, case, code):
    quantized_cache = case in ("a consistent q4_0 cache", "q8_0 values in a q4_0 buffer",
                               "a rotation not a power of two", "a rotation wider than a head")
    model.kv_dtypes = (KV_TYPES["q4_0"],) * 2 if quantized_cache else (KV_TYPES["f32"],) * 2
    cache = model.new_cache(8)
    model.kv_dtypes = (KV_TYPES["f32"],) * 2
    shape, layer = model.decoder.shape, model.decoder.layers[0]
    view = model.decoder._views(cache)[1]
    saved = (shape.dim, shape.rope_dim, shape.query_scale, shape.softcap, shape.gelu, layer.n_kv,
             layer.n_heads, layer.weight_bytes[0], layer.window, layer.rotation,
             view.key_bytes, view.value_bytes, view.max_tokens, shape.key_type, shape.value_type,
             shape.quantize_q8_0, shape.quantize_q4_0, shape.key_rotation, shape.value_rotation)
    if quantized_cache:  # the C description of the cache's types, as forward sets it
        shape.key_type = shape.value_type = int(GGMLQuantizationType.Q4_0)
        shape.key_rotation = shape.value_rotation = 64
    kwargs = {}
    if case == "no KV heads":
        layer.n_kv = 0
    elif case == "heads not a multiple of KV heads":
        layer.n_heads = layer.n_kv * 2 + 1
    elif case == "rope wider than a head":
        shape.rope_dim = shape.head_dim + 2
    elif case == "odd rope":
        shape.rope_dim -= 1
    elif case == "position past the cache":
        kwargs["pos"] = 8
    elif case == "negative position":
        kwargs["pos"] = -1
    elif case == "tokens past the cache":
        kwargs.update(pos=5, n_tokens=4)
    elif case == "no tokens":
        kwargs.update(n_tokens=0, x=torch.zeros(model.cfg.dim))
    elif case == "angles for fewer tokens":
        kwargs.update(n_tokens=2, angle_floats=model.cfg.rope_dim // 2)
    elif case == "no threads":
        kwargs["n_threads"] = 0
    elif case == "weights too short":
        layer.weight_bytes[0] -= 1
    elif case == "cache smaller than said":
        view.key_bytes += 1
    elif case == "layers' caches of different lengths":  # each consistent on its own
        view.max_tokens, view.key_bytes, view.value_bytes = (4, view.key_bytes // 2,
                                                             view.value_bytes // 2)
    elif case == "a row of a sequence not given":
        kwargs["seq"] = 1
    elif case == "x not dim long":
        kwargs["x"] = torch.zeros(model.cfg.dim - 1)
    elif case == "zero dim":
        shape.dim = 0
    elif case == "negative window":
        layer.window = -1
    elif case == "a RoPE table not given":  # the call passes one
        layer.rotation = 1
    elif case == "negative RoPE table":
        layer.rotation = -1
    elif case == "no RoPE tables":
        kwargs.update(n_rotations=0, angle_floats=0)
    elif case == "angles for fewer tables":  # two tables named, one table's angles given
        kwargs["n_rotations"] = 2
    elif case == "negative query scale":
        shape.query_scale = -0.5
    elif case == "NaN query scale":
        shape.query_scale = float("nan")
    elif case == "infinite soft-cap":
        shape.softcap = float("inf")
    elif case == "negative soft-cap":
        shape.softcap = -1.0
    elif case == "gate activation neither SiLU nor GELU":
        shape.gelu = 2
    elif case == "keys said q8_0 in an f32 buffer":
        shape.key_type = int(GGMLQuantizationType.Q8_0)
    elif case == "values said q4_0 in an f32 buffer":
        shape.value_type = int(GGMLQuantizationType.Q4_0)
    elif case == "q8_0 values in a q4_0 buffer":
        shape.value_type = int(GGMLQuantizationType.Q8_0)
    elif case == "an unknown cache type":
        shape.value_type = int(GGMLQuantizationType.Q5_0)
    elif case == "q8_0 keys without the quantizer":
        shape.key_type, shape.quantize_q8_0 = int(GGMLQuantizationType.Q8_0), None
        view.key_bytes = view.key_bytes // (4 * 32) * 34  # the size a q8_0 cache has
    elif case == "q4_0 values without their quantizer":
        shape.value_type, shape.quantize_q4_0 = int(GGMLQuantizationType.Q4_0), None
        view.value_bytes = view.value_bytes // (4 * 32) * 18
    elif case == "a rotation not a power of two":
        shape.key_rotation = 48
    elif case == "a rotation wider than a head":
        shape.value_rotation = 2 * shape.head_dim
    elif case == "a rotated f32 cache":
        shape.key_rotation = 64
    try:
        assert decode_status(model, cache, **kwargs) == code
    finally:
        (shape.dim, shape.rope_dim, shape.query_scale, shape.softcap, shape.gelu, layer.n_kv,
         layer.n_heads, layer.weight_bytes[0], layer.window, layer.rotation,
         view.key_bytes, view.value_bytes, view.max_tokens, shape.key_type, shape.value_type,
         shape.quantize_q8_0, shape.quantize_q4_0, shape.key_rotation, shape.value_rotation) = saved


def test_a_refused_step_raises_llmpress_error(model):
    cache = model.new_cache(4)
    model.decoder.layers[0].n_kv = 0
    try:
        with pytest.raises(LlmpressError, match="fused decoder layers: inconsistent head counts"):
            model.decoder.forward(torch.zeros(1, model.cfg.dim), [(cache, 1)],
                                  [torch.ones(1, model.cfg.rope_dim // 2, dtype=torch.complex64)])
    finally:
        model.decoder.layers[0].n_kv = model.cfg.layers[0].n_kv_heads


@pytest.mark.parametrize("case, code", [("a type without one", -1), ("rows not whole groups", -1),
                                        ("short source", -3), ("short destination", -3),
                                        ("no threads", -4)])
def test_repack_refuses(case, code):
    t, n, k = GGMLQuantizationType.Q4_K, 16, 256
    rows = packed_weights(t, n, k)
    size = cpu._library().llmpress_repacked_bytes(int(t), n, k)
    assert size > 0
    out = torch.empty(size, dtype=torch.uint8)
    src_bytes, dst_bytes, threads = rows.numel(), out.numel(), 1
    if case == "a type without one":
        t = GGMLQuantizationType.Q2_K
    elif case == "rows not whole groups":
        n = 12
    elif case == "short source":
        src_bytes -= 1
    elif case == "short destination":
        dst_bytes -= 1
    elif case == "no threads":
        threads = 0
    assert cpu._library().llmpress_repack(int(t), rows.data_ptr(), src_bytes, out.data_ptr(),
                                          dst_bytes, n, k, threads) == code


def test_repacked_rows_must_start_on_a_group():
    """A fused call whose repacked weight would start mid-group is refused, and the
    Python side never builds one: it keeps the file layout there."""
    t = GGMLQuantizationType.Q4_K
    first, second = packed_weights(t, 4, 256), packed_weights(t, 8, 256)
    repacked = cpu.repacked(second, t, 256)
    assert repacked is not None
    weights = cpu.FusedWeights([(first, int(t)), repacked])
    y = torch.empty(1, 12)
    x = torch.randn(1, 256)
    assert cpu._library().llmpress_qmatmul(
        2, weights.types, weights.pointers, weights.sizes, weights.bytes, x.data_ptr(),
        x.numel(), y.data_ptr(), y.numel(), 256, 1, 1) == -2
    linears = [SimpleNamespace(rows=rows, ggml_type=t, out_features=rows.shape[0],
                               repacked=cpu.repacked(rows, t, 256)) for rows in (first, second)]
    assert [kind for _, kind in kernel_weights(linears)] == [int(t), int(t)]
    assert [kind for _, kind in kernel_weights(linears[::-1])] == [repacked[1], int(t)]

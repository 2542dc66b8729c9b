"""Quantizing to IQ3_XXS, IQ3_S, TQ1_0 and TQ2_0 (formats/quantize_iq3.c, the ternary numpy
ports in formats/iquants.py) against ggml's own quantizer.

References, all independent of our code:
- ggml_quantize_chunk (libggml-base from llama-cpp-python, tests/ggml_ref.py), byte for
  byte, with and without an importance matrix, on random tensors with awkward values and
  on real rows of the default model;
- ggml's dequantize_row_* on our bytes, against our dequantizer, bit for bit;
- the tensors of files llama.cpp's llama_model_quantize writes (imatrix included);
- llama.cpp loading and running a file `llmpress quantize` wrote in these types.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from ggml_ref import _ggml, ggml_quantize
from test_cquant import (  # noqa: F401 (real_rows: a fixture)
    assert_identical,
    assert_thread_count_does_not_matter,
    awkward_tensor,
    importances,
    real_rows,
)
from iquant_files import random_importance
from test_iquants import (  # noqa: F401 (token_ids: a fixture)
    llama_cpp_logits,
    mean_kld,
    our_logits,
    token_ids,
    top1_agreement,
)

from llmpress.errors import LlmpressError
from llmpress.formats import cquant, get_format
from llmpress.kernels import cpu

T = GGMLQuantizationType
TYPES = ["IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0"]
TERNARY = ["TQ1_0", "TQ2_0"]
OVERFLOW_ROW = 6  # awkward_tensor's row whose squares overflow: ggml's IQ3 search aborts


def awkward_iq3_tensor(seed: int = 0) -> np.ndarray:
    """awkward_tensor (less the row ggml cannot quantize to IQ3) plus rows that hit this
    file's own edge cases: all-zero groups of 32 between non-zero ones (IQ3_S shifts the
    later groups' bytes), tiny groups (under IQ3_XXS's 1e-8 threshold), a constant block,
    lone outliers, a block of subnormals (1/max overflows in the ternary types), values
    exactly halfway between ternary levels."""
    base = np.delete(awkward_tensor(rows=40, seed=seed), OVERFLOW_ROW, axis=0)
    rng = np.random.default_rng(seed + 100)
    extra = rng.standard_normal((8, base.shape[1])).astype(np.float32)
    extra[0, 32:64] = 0.0
    extra[0, 128:192] = 0.0
    extra[1, ::64] = 0.0
    extra[1, :32] = 0.0
    extra[2, 64:96] = 1e-9
    extra[2, 300:332] = 0.0
    extra[3, :256] = 0.25
    extra[4, 17] = 1e4
    extra[4, 300] = -3e3
    extra[5, :256] = 1e-40
    extra[5, 3] = -2e-40
    extra[6, :256] = np.tile(np.float32([1.0, 0.5, -0.5, -1.0, 1.5, 0.0, -1.5, 0.25]), 32)
    extra[6, 256:] = 1.0
    extra[7, ::2] = 0.0
    return np.concatenate([base, extra])


@pytest.mark.parametrize("type_name", TYPES)
def test_awkward_tensors_match_ggml(type_name: str) -> None:
    fmt = get_format(type_name)
    values = awkward_iq3_tensor()
    for label, importance in importances(values.shape[1]).items():
        reference = ggml_quantize(type_name, values, importance)
        what = f"{type_name} imatrix={label}"
        assert_identical(fmt.quantize(values, importance), reference, fmt.type_size, what)
        if type_name in TERNARY:
            assert_identical(fmt.quantize_numpy(values, importance), reference, fmt.type_size,
                             what + " (numpy port)")


@pytest.mark.parametrize("type_name", TYPES)
def test_row_counts_and_lengths_match_ggml(type_name: str) -> None:
    fmt = get_format(type_name)
    rng = np.random.default_rng(5)
    for rows, blocks in ((1, 1), (3, 2), (7, 3), (16, 8), (2, 11)):
        values = (rng.standard_normal((rows, 256 * blocks)) *
                  np.exp(rng.standard_normal((rows, 1)))).astype(np.float32)
        for importance in (None, importances(values.shape[1], seed=blocks)["decades"]):
            assert_identical(fmt.quantize(values, importance),
                             ggml_quantize(type_name, values, importance), fmt.type_size,
                             f"{type_name} {rows} rows of {blocks} blocks")


@pytest.mark.parametrize("type_name", TYPES)
def test_real_model_rows_match_ggml(type_name: str, real_rows) -> None:  # noqa: F811
    fmt = get_format(type_name)
    values = real_rows["ffn_down"]  # rows of 1536 = 6 blocks of 256
    rng = np.random.default_rng(12)
    imatrix_like = ((rng.standard_normal(values.shape[1]) *
                     np.exp(rng.standard_normal(values.shape[1]))) ** 2).astype(np.float32)
    for importance in (None, imatrix_like):
        assert_identical(fmt.quantize(values, importance),
                         ggml_quantize(type_name, values, importance), fmt.type_size,
                         f"{type_name} ffn_down imatrix={importance is not None}")


@pytest.mark.parametrize("type_name", ["IQ3_XXS", "IQ3_S"])
def test_bytes_do_not_depend_on_the_thread_count(type_name: str) -> None:
    values = awkward_iq3_tensor(seed=3)
    assert_thread_count_does_not_matter(type_name, values, importances(values.shape[1])["decades"])


@pytest.mark.parametrize("type_name", ["IQ3_XXS", "IQ3_S"])
def test_values_whose_squares_overflow_do_not_crash(type_name: str) -> None:
    """ggml aborts the process on such a row (no grid neighbour is nearer than FLT_MAX);
    ours writes one and leaves the other rows as ggml writes them."""
    values = awkward_tensor(rows=12)
    fmt = get_format(type_name)
    ours = fmt.quantize(values)
    others = np.delete(np.arange(len(values)), OVERFLOW_ROW)
    assert_identical(ours[others], ggml_quantize(type_name, values[others]), fmt.type_size,
                     f"{type_name}, the rows beside the overflowing one")


def ggml_dequantize(type_name: str, raw: np.ndarray, n_values: int) -> np.ndarray:
    """ggml's dequantize_row_<type> on the bytes `raw` -> float32 (n_values,)."""
    function = getattr(_ggml(), f"dequantize_row_{type_name.lower()}")
    function.restype = None
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty(n_values, dtype=np.float32)
    function(raw.ctypes.data, out.ctypes.data, n_values)
    return out


@pytest.mark.parametrize("type_name", TYPES)
def test_round_trip_dequantizes_like_ggml(type_name: str) -> None:
    fmt = get_format(type_name)
    values = awkward_iq3_tensor(seed=7)
    raw = fmt.quantize(values, importances(values.shape[1])["with_zeros"])
    ours = fmt.dequantize(torch.from_numpy(raw.reshape(-1)), values.shape).numpy()
    theirs = ggml_dequantize(type_name, raw, values.size).reshape(values.shape)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    # and it is a fair quantization: 3 bits on Gaussian rows, exact on ternary ones
    rng = np.random.default_rng(8)
    if type_name in TERNARY:
        sample = (rng.integers(-1, 2, (16, 1024)) * 0.375).astype(np.float32)
    else:
        sample = rng.standard_normal((16, 1024)).astype(np.float32)
    back = fmt.dequantize(torch.from_numpy(fmt.quantize(sample).reshape(-1)), sample.shape)
    relative_error = np.linalg.norm(back.numpy() - sample) / np.linalg.norm(sample)
    assert relative_error < (1e-7 if type_name in TERNARY else 0.25), relative_error


def test_without_the_c_library(monkeypatch) -> None:
    """IQ3 has no numpy port: a clear error. The ternary types fall back to theirs."""
    values = awkward_iq3_tensor(seed=9)[:10]
    with_c = {name: get_format(name).quantize(values) for name in TERNARY}
    monkeypatch.setenv("LLMPRESS_NUMPY_QUANTIZE", "1")
    for name in ("IQ3_XXS", "IQ3_S"):
        assert not cquant.supports(T[name])
        with pytest.raises(LlmpressError, match=f"quantizing to {name} needs llmpress's C"):
            get_format(name).quantize(values)
    for name in TERNARY:
        assert np.array_equal(get_format(name).quantize(values), with_c[name])


def test_the_grids_are_handed_to_the_c_library() -> None:
    lib = cquant._library()
    assert lib.llmpress_quantize_iq3_ready() == 1
    for name in TYPES:
        assert cquant.supports(T[name]), name
    bad_grid = np.zeros((256, 4), dtype=np.uint8)  # one level: refused, the built grid kept
    assert lib.llmpress_quantize_set_iq3_grid(300, bad_grid.ctypes.data) == -3
    assert lib.llmpress_quantize_set_iq3_grid(256, None) == -3


# --- files ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("type_name", TYPES)
def test_llama_cpp_files_hold_our_bytes(quantized_file, tiny_f32, type_name):
    """Every tensor of type_name in the file llama.cpp's quantizer writes (its own mix, its
    own imatrix handling) is what our quantizer writes from the F32 source."""
    path = quantized_file(type_name)
    source = {t.name: t for t in GGUFReader(tiny_f32).tensors}
    importance = random_importance(tiny_f32)
    checked = 0
    for t in GGUFReader(path).tensors:
        if T(t.tensor_type).name != type_name:
            continue
        fmt = get_format(type_name)
        values = np.asarray(source[t.name].data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        theirs = np.asarray(t.data).view(np.uint8).reshape(values.shape[0], -1)
        assert_identical(fmt.quantize(values, importance.get(t.name)), theirs, fmt.type_size,
                         t.name)
        checked += 1
    assert checked >= 8, checked


# IQ3_XXS needs an imatrix in a file, as in llama-quantize (tensor_requires_imatrix)
@pytest.mark.slow
@pytest.mark.parametrize("type_name", [t for t in TYPES if t != "IQ3_XXS"])
def test_llama_cpp_runs_the_file_llmpress_writes(tiny_f32, token_ids, tmp_path,
                                                  type_name):
    """`llmpress quantize --tensor-type` puts every layer matrix in type_name: the bytes are
    ggml's, llama.cpp loads the file, and its logits agree with ours on it."""
    from llmpress.quant.quantize import QuantizeConfig, quantize_model

    out = tmp_path / f"{type_name}.gguf"
    quantize_model(QuantizeConfig(tiny_f32, out, "Q8_0",
                                  tensor_types=((r"blk\..*_(q|k|v|output|gate|up|down)\.weight",
                                                 type_name),)))
    source = {t.name: t for t in GGUFReader(tiny_f32).tensors}
    written = [t for t in GGUFReader(out).tensors if T(t.tensor_type).name == type_name]
    assert len(written) == 14, [t.name for t in written]
    for t in written:
        values = np.asarray(source[t.name].data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        theirs = ggml_quantize(type_name, values)
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(theirs.shape), theirs)
    theirs = llama_cpp_logits(out, token_ids)
    exact = our_logits(out, token_ids, "exact")
    kld_exact = mean_kld(exact, theirs)  # llama.cpp rounds activations to 8 bits, exact not
    print(f"\n{type_name}: llmpress-written file, llama.cpp vs our exact mode KLD "
          f"{kld_exact:.3g} (top-1 {top1_agreement(exact, theirs):.3f})")
    assert kld_exact < 0.01
    if cpu.supports(T[type_name]):  # fast mode rounds activations as llama.cpp does
        fast = our_logits(out, token_ids, "fast")
        print(f"  vs our fast mode KLD {mean_kld(fast, theirs):.3g} "
              f"(top-1 {top1_agreement(fast, theirs):.3f})")
        assert mean_kld(fast, theirs) < 0.25 * kld_exact and top1_agreement(fast, theirs) >= 0.98


def test_an_iq3_xxs_file_without_an_imatrix_is_refused(tiny_f32, tmp_path):
    """llama-quantize refuses IQ3_XXS tensors without an importance matrix; so do we, in
    one line naming the tensor, before anything is written."""
    from llmpress.quant.quantize import QuantizeConfig, quantize_model

    out = tmp_path / "IQ3_XXS.gguf"
    with pytest.raises(LlmpressError, match=r"blk\.0\..*IQ3_XXS needs an importance matrix"):
        quantize_model(QuantizeConfig(tiny_f32, out, "Q8_0",
                                      tensor_types=((r"blk\..*_down\.weight", "IQ3_XXS"),)))
    assert not out.exists()

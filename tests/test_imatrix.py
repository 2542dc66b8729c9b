"""The importance matrix: llama.cpp's imatrix GGUF in and out, collection through our
runtime, and agreement with a real llama-imatrix file (tests/data/reference)."""

from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest
import torch
from conftest import REFERENCE_IMATRIX
from ggml_ref import _library_dir
from test_calib import random_tokens, tiny_llama

from llmpress.calib.data import default_calibration_text
from llmpress.errors import LlmpressError
from llmpress.formats import get_format
from llmpress.io.loader import load_source, load_tokenizer
from llmpress.io.source import ModelSource
from llmpress.models.llama import LlamaModel
from llmpress.quant.imatrix import (
    Imatrix,
    calibration_chunks,
    collect_imatrix,
    read_imatrix,
    token_chunks,
    write_imatrix,
)


# --- the file format -------------------------------------------------------------------
def test_reference_file_round_trips_byte_for_byte(tmp_path):
    """Read llama-imatrix's file and write it again: the same bytes (keys, key order,
    tensor names, 1-D shapes, alignment), so our writer writes what llama.cpp writes."""
    imatrix = read_imatrix(REFERENCE_IMATRIX)
    assert len(imatrix.sums) == 210 and imatrix.chunk_count == 100
    assert imatrix.chunk_size == 512 and imatrix.datasets == ["pydoc.txt"]
    out = write_imatrix(imatrix, tmp_path / "copy.gguf")
    assert out.read_bytes() == REFERENCE_IMATRIX.read_bytes()


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _ggml_gguf_read(path) -> tuple[dict, dict]:
    """ggml's own GGUF parser (gguf_init_from_file in libggml-base, the one
    common_imatrix_load uses): -> ({key: (type, value)}, {tensor: (type, float32 data)})."""
    lib = ctypes.CDLL(str(min(_library_dir().glob("libggml-base.so*"))))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
    for fn, res, args in (
        ("gguf_get_n_kv", ctypes.c_int64, [ctypes.c_void_p]),
        ("gguf_get_key", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_kv_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_arr_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_arr_n", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_arr_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]),
        ("gguf_get_val_u32", ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_val_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_n_tensors", ctypes.c_int64, [ctypes.c_void_p]),
        ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_tensor_offset", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_data_offset", ctypes.c_size_t, [ctypes.c_void_p]),
        ("gguf_free", None, [ctypes.c_void_p]),
    ):
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = args
    ctx = lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(True, None))
    assert ctx, f"ggml cannot parse {path}"
    try:
        keys = {}
        for i in range(lib.gguf_get_n_kv(ctx)):
            key, kind = lib.gguf_get_key(ctx, i).decode(), lib.gguf_get_kv_type(ctx, i)
            if kind == 9:  # GGUF_TYPE_ARRAY (of strings here)
                item = lib.gguf_get_arr_type(ctx, i)
                value = [lib.gguf_get_arr_str(ctx, i, j).decode()
                         for j in range(lib.gguf_get_arr_n(ctx, i))]
                keys[key] = ((kind, item), value)
            elif kind == 8:  # GGUF_TYPE_STRING
                keys[key] = (kind, lib.gguf_get_val_str(ctx, i).decode())
            else:
                keys[key] = (kind, lib.gguf_get_val_u32(ctx, i))
        blob = path.read_bytes()
        base = lib.gguf_get_data_offset(ctx)
        tensors = {}
        for i in range(lib.gguf_get_n_tensors(ctx)):
            start = base + lib.gguf_get_tensor_offset(ctx, i)
            data = np.frombuffer(blob[start:start + lib.gguf_get_tensor_size(ctx, i)], np.float32)
            tensors[lib.gguf_get_tensor_name(ctx, i).decode()] = (
                lib.gguf_get_tensor_type(ctx, i), data)
        return keys, tensors
    finally:
        lib.gguf_free(ctx)


def test_ggml_parses_our_file_with_the_reference_structure(tmp_path):
    """ggml's parser reads our file with the same keys, key types, tensor names and types
    as llama-imatrix's, and the values we wrote."""
    imatrix = Imatrix(chunk_count=3, chunk_size=64, datasets=["notes.txt"])
    rng = np.random.default_rng(0)
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.1.attn_q.weight"):
        imatrix.add(name, rng.random(96 if "down" in name else 64) * 50, 192)
    path = write_imatrix(imatrix, tmp_path / "ours.gguf")
    ours_keys, ours_tensors = _ggml_gguf_read(path)
    ref_keys, ref_tensors = _ggml_gguf_read(REFERENCE_IMATRIX)
    assert {k: kind for k, (kind, _) in ours_keys.items()} == \
        {k: kind for k, (kind, _) in ref_keys.items()}
    assert ours_keys["general.type"][1] == "imatrix"
    assert ours_keys["imatrix.datasets"][1] == ["notes.txt"]
    assert ours_keys["imatrix.chunk_count"][1] == 3 and ours_keys["imatrix.chunk_size"][1] == 64
    # llama-imatrix's order: weight names sorted, each as in_sum2 then counts
    assert list(ours_tensors) == [n + suffix for n in sorted(imatrix.sums)
                                  for suffix in (".in_sum2", ".counts")]
    assert list(ref_tensors)[:4] == ["blk.0.attn_k.weight.in_sum2", "blk.0.attn_k.weight.counts",
                                     "blk.0.attn_output.weight.in_sum2",
                                     "blk.0.attn_output.weight.counts"]
    assert {t for t, _ in ours_tensors.values()} == {t for t, _ in ref_tensors.values()} == {0}
    for name, sums in imatrix.sums.items():
        np.testing.assert_array_equal(ours_tensors[name + ".in_sum2"][1], sums.astype(np.float32))
        np.testing.assert_array_equal(ours_tensors[name + ".counts"][1], [192.0])
    assert set(read_imatrix(path).sums) == set(imatrix.sums)


def test_importance_is_sums_over_count_like_llama_quantize():
    imatrix = read_imatrix(REFERENCE_IMATRIX)
    name = "blk.3.ffn_down.weight"
    expected = imatrix.sums[name].astype(np.float32) / np.float32(51200)
    np.testing.assert_array_equal(imatrix.importance(name), expected)
    assert imatrix.importance("output.weight") is None


def test_legacy_dat_format_reads(tmp_path):
    """The old .dat layout (n, [len, name, ncall, nval, values]..., chunks): values are
    mean squares times ncall, so importance() gives the mean squares back."""
    means = np.array([0.5, 2.0, 4.0], dtype=np.float32)
    name = b"blk.0.attn_q.weight"
    blob = (np.int32(1).tobytes() + np.int32(len(name)).tobytes() + name
            + np.int32(10).tobytes() + np.int32(3).tobytes() + (means * 10).tobytes()
            + np.int32(7).tobytes())
    (tmp_path / "old.dat").write_bytes(blob)
    imatrix = read_imatrix(tmp_path / "old.dat")
    np.testing.assert_allclose(imatrix.importance("blk.0.attn_q.weight"), means)
    assert imatrix.chunk_count == 7


@pytest.mark.parametrize("blob", [b"", b"GGUF\x03\x00", b"\x05\x00\x00\x00junk"])
def test_bad_imatrix_files_fail_in_one_line(tmp_path, blob):
    (tmp_path / "bad.gguf").write_bytes(blob)
    with pytest.raises(LlmpressError):
        read_imatrix(tmp_path / "bad.gguf")
    with pytest.raises(LlmpressError, match="no such"):
        read_imatrix(tmp_path / "missing.gguf")


def test_empty_imatrix_and_missing_directory_are_refused(tmp_path):
    with pytest.raises(LlmpressError, match="nothing"):
        write_imatrix(Imatrix(), tmp_path / "x.gguf")
    imatrix = Imatrix()
    imatrix.add("blk.0.attn_q.weight", np.ones(4), 16)
    with pytest.raises(LlmpressError, match="does not exist"):
        write_imatrix(imatrix, tmp_path / "no" / "x.gguf")


# --- chunks and collection -------------------------------------------------------------
def test_token_chunks_like_llama_imatrix():
    tokens = list(range(100, 200))
    chunks = token_chunks(tokens, 32, None, bos_id=1)
    assert chunks.shape == (3, 32)  # 100 // 32 whole chunks, the remainder dropped
    assert chunks[:, 0].tolist() == [1, 1, 1]  # the first token of each becomes BOS
    assert chunks[1, 1:].tolist() == tokens[33:64]
    assert token_chunks(tokens, 32, 2, None)[1].tolist() == tokens[32:64]
    with pytest.raises(LlmpressError, match="at least 128"):
        token_chunks(tokens, 64, None, None)
    with pytest.raises(LlmpressError, match="too small"):
        token_chunks(tokens, 8, None, None)


@pytest.mark.slow
def test_layer_by_layer_collection_equals_hooks_on_a_full_forward():
    """collect_imatrix (the calibration runner, layer by layer) against hooks on every
    Linear during ordinary full-model forward passes of the same sequences."""
    source = tiny_llama(n_layers=2, quant_type="Q8_0")
    chunks = random_tokens(3, 20)
    collected = collect_imatrix(LlamaModel(source, mode="exact"), chunks, batch_size=2)

    model = LlamaModel(source, mode="exact")
    sums: dict[str, torch.Tensor] = {}
    linears = [m for m in model.modules() if getattr(m, "name", "").startswith("blk.")]
    handles = [lin.register_forward_pre_hook(
        lambda mod, args: sums.__setitem__(
            mod.name, sums.get(mod.name, 0) + args[0].reshape(-1, mod.in_features)
            .double().square().sum(0))) for lin in linears]
    for chunk in chunks:
        model(chunk[None], model.new_cache(chunks.shape[1]))
    for h in handles:
        h.remove()
    assert set(collected.sums) == set(sums) and len(sums) == 14
    for name, expected in sums.items():
        np.testing.assert_allclose(collected.sums[name], expected.numpy(), rtol=1e-5)
        assert collected.counts[name] == 60
    assert collected.chunk_count == 3 and collected.chunk_size == 20


# --- the real model against llama-imatrix ----------------------------------------------
def first_layers(source: ModelSource, n: int) -> ModelSource:
    """The model cut after n decoder layers (the layers before it are all the imatrix of
    those layers depends on)."""
    keep = {k: v for k, v in source.tensors.items()
            if not (m := re.match(r"blk\.(\d+)\.", k)) or int(m.group(1)) < n}
    metadata = {**source.metadata, f"{source.architecture}.block_count": n}
    return ModelSource(source.path, metadata, keep, source.file_bytes)


@pytest.fixture(scope="module")
def layer0_imatrix(default_model_path) -> Imatrix:
    """Layer 0 of the default model on the reference's text and settings (pydoc text,
    -c 512 --chunks 100): 51,200 tokens."""
    source = load_source(default_model_path)
    chunks = calibration_chunks(load_tokenizer(source), default_calibration_text(), 512, 100)
    assert chunks.shape == (100, 512)
    return collect_imatrix(LlamaModel(first_layers(source, 1), mode="exact"), chunks,
                           datasets=["pydoc.txt"])


def test_real_model_layer0_matches_llama_imatrix(layer0_imatrix):
    """llama-imatrix ran the F32 model (reference README); we run the Q4_1 file in exact
    mode, whose weights are that F32 exactly. Measured: per-column relative difference at
    most 4.4e-4 (mean 1e-5 to 9e-5 per tensor) — float32 summation order over 51,200
    rows (llama.cpp adds x*x one row at a time in float)."""
    reference = read_imatrix(REFERENCE_IMATRIX)
    assert len(layer0_imatrix.sums) == 7
    for name, sums in layer0_imatrix.sums.items():
        assert layer0_imatrix.counts[name] == reference.counts[name] == 51200
        relative = np.abs(sums - reference.sums[name]) / np.abs(reference.sums[name])
        assert relative.max() < 2e-3, name
        assert relative.mean() < 3e-4, name


def test_llama_model_quantize_uses_our_imatrix(layer0_imatrix, default_model_path, tmp_path):
    """Our file, parsed by ggml, fed to llama.cpp's quantizer (llama_model_quantize, the
    code behind llama-quantize): its Q4_0 bytes of blk.0.attn_q equal our Q4_0 quantizer's
    with our importance (which differ from the bytes without an imatrix)."""
    import llama_cpp
    from gguf import GGUFReader

    path = write_imatrix(layer0_imatrix, tmp_path / "ours.gguf")
    _, tensors = _ggml_gguf_read(path)
    names = sorted(n[: -len(".in_sum2")] for n in tensors if n.endswith(".in_sum2"))
    means = [tensors[n + ".in_sum2"][1] / tensors[n + ".counts"][1][0] for n in names]
    entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for entry, name, mean in zip(entries, names, means):
        entry.name, entry.size = name.encode(), mean.size
        entry.data = mean.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = 2, True, 2  # Q4_0
    params.imatrix = entries
    out = tmp_path / "q4_0.gguf"
    assert llama_cpp.llama_model_quantize(str(default_model_path).encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0
    (tensor,) = [t for t in GGUFReader(out).tensors if t.name == "blk.0.attn_q.weight"]
    theirs = np.array(tensor.data).reshape(-1)

    ref = load_source(default_model_path).tensors["blk.0.attn_q.weight"]
    weights = get_format(ref.ggml_type).dequantize(ref.read_bytes(), ref.shape).numpy()
    q4_0 = get_format("Q4_0")
    ours = q4_0.quantize(weights, layer0_imatrix.importance("blk.0.attn_q.weight")).reshape(-1)
    assert np.array_equal(theirs, ours)
    assert not np.array_equal(ours, q4_0.quantize(weights).reshape(-1))

"""The quantize pipeline on the real default model, against llama.cpp (the acceptance test).

References, all independent of our code:
- tests/data/reference/smollm2-135m-llamacpp-tensors.json: per-tensor type and SHA-256 of
  what llama-quantize wrote for every type, without (`TYPE.no`) and with (`TYPE.yes`) the
  imatrix, plus file sizes, and the `F32` original the model dequantizes to;
- llama-cpp-python's `llama_model_quantize` (the code behind llama-quantize), run here on
  the same F32 file: whole output files must be byte-identical to ours;
- llama.cpp loading and running a file we wrote.

CI time: the F32 original and two full files (Q4_0, and Q8_0 with the imatrix) are made
whole; for every reference label the types of all tensors and the file size are checked
(no weights needed), and the data hashes on a few tensors per type (`_sample`; set
LLMPRESS_CHECK_ALL_TENSORS=1 to hash all 211 quantized tensors of all 32 labels: all
matched when this test was written).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from conftest import REFERENCE_IMATRIX, TENSOR_HASHES

from llmpress.errors import LlmpressError
from llmpress.io.gguf import load_gguf
from llmpress.io.gguf_write import GGUFStreamWriter, TensorSlot, plan_gguf, write_gguf
from llmpress.quant.mix import FILE_TYPES, file_type
from llmpress.quant.quantize import (
    QuantizeConfig,
    _importance_for,
    dequantize_ref,
    load_imatrix,
    plan_quantization,
    quantize_model,
    quantize_tensor,
)

# tests/data/README.md: llama-quantize was given the imatrix by its bare file name, which it
# writes to quantize.imatrix.file (it changes the file size)
IMATRIX_LABEL = REFERENCE_IMATRIX.name

REFERENCE_LABELS = json.loads(TENSOR_HASHES.read_text())
LABELS = [label for label in REFERENCE_LABELS if label != "F32"]

def sha256(data) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(data)).cast("B")).hexdigest()


# --- the GGUF writer -------------------------------------------------------------------
def _small_metadata() -> dict:
    return {
        "general.architecture": "llama", "general.name": "tiny", "llama.block_count": 2,
        "llama.rope.freq_base": 10000.0, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.tokens": ["a", "b", "é"], "tokenizer.ggml.token_type": [1, 1, 3],
        "tokenizer.ggml.scores": [0.0, -1.5, -2.25], "general.sampling.top_k": 40,
    }  # fmt: skip


def _small_tensors() -> list[tuple[TensorSlot, np.ndarray]]:
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    return [
        (TensorSlot("blk.0.attn_norm.weight", T.F32, (64,)), rng.standard_normal(64).astype(np.float32)),
        (TensorSlot("blk.0.attn_q.weight", T.Q8_0, (8, 64)), quantize_tensor(weight, T.Q8_0)),
        (TensorSlot("token_embd.weight", T.F16, (3, 64)), rng.standard_normal((3, 64)).astype(np.float16)),
    ]  # fmt: skip


def test_written_gguf_reads_back_with_gguf_py(tmp_path):
    out = tmp_path / "tiny.gguf"
    pairs = _small_tensors()
    layout = write_gguf(out, _small_metadata(), pairs)
    assert out.stat().st_size == layout.file_bytes
    reader = GGUFReader(out)
    fields = reader.fields
    expected_types = {  # what gguf-py's GGUFWriter.add_* uses for these keys
        "llama.block_count": [GGUFValueType.UINT32], "llama.rope.freq_base": [GGUFValueType.FLOAT32],
        "tokenizer.ggml.add_bos_token": [GGUFValueType.BOOL],
        "tokenizer.ggml.tokens": [GGUFValueType.ARRAY, GGUFValueType.STRING],
        "tokenizer.ggml.token_type": [GGUFValueType.ARRAY, GGUFValueType.INT32],
        "tokenizer.ggml.scores": [GGUFValueType.ARRAY, GGUFValueType.FLOAT32],
        "general.sampling.top_k": [GGUFValueType.INT32],
    }  # fmt: skip
    for key, types in expected_types.items():
        assert fields[key].types == types, key
    for key, value in _small_metadata().items():
        assert fields[key].contents() == value, key
    for (slot, data), tensor in zip(pairs, reader.tensors):
        assert tensor.name == slot.name and tensor.tensor_type == slot.ggml_type
        assert tensor.data_offset % 32 == 0
        assert bytes(np.asarray(tensor.data).view(np.uint8)) == bytes(data.view(np.uint8))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_failed_write_leaves_no_output_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"the previous file")
    pairs = _small_tensors()
    layout = plan_gguf(_small_metadata(), [slot for slot, _ in pairs])
    with pytest.raises(RuntimeError, match="quantizer crashed"), \
            GGUFStreamWriter(out, layout) as writer:
        writer.write_tensor(pairs[0][0].name, pairs[0][1])
        raise RuntimeError("quantizer crashed")
    with pytest.raises(LlmpressError, match="never came"), \
            GGUFStreamWriter(out, layout) as writer:
        writer.write_tensor(pairs[0][0].name, pairs[0][1])
    with pytest.raises(LlmpressError, match="bytes given"), \
            GGUFStreamWriter(out, layout) as writer:
        writer.write_tensor(pairs[0][0].name, pairs[0][1][:10])
    assert out.read_bytes() == b"the previous file"
    assert _leftovers(tmp_path) == ["model.gguf"]


def test_writer_refuses_to_overwrite_its_input(tmp_path):
    source = tmp_path / "in.gguf"
    write_gguf(source, _small_metadata(), _small_tensors())
    before = source.read_bytes()
    link = tmp_path / "link.gguf"
    link.symlink_to(source)
    for target in (source, link):
        with pytest.raises(LlmpressError, match="would overwrite the input"):
            write_gguf(target, _small_metadata(), _small_tensors(), protect=[source])
    assert source.read_bytes() == before
    with pytest.raises(LlmpressError, match="does not exist"):
        write_gguf(tmp_path / "no" / "x.gguf", _small_metadata(), _small_tensors())


def test_cli_quantizes_and_reports(tmp_path, capsys):
    from llmpress.cli import main

    source, out = tmp_path / "tiny-f32.gguf", tmp_path / "tiny-q8.gguf"
    write_gguf(source, _small_metadata(), _small_tensors())
    assert main(["quantize", str(source), str(out), "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert "blk.0.attn_q.weight" in printed and "bits per weight" in printed
    written = load_gguf(out)
    assert written.metadata["general.file_type"] == 7
    assert {n: t.ggml_type.name for n, t in written.tensors.items()} == {
        "blk.0.attn_norm.weight": "F32", "blk.0.attn_q.weight": "Q8_0",
        "token_embd.weight": "Q8_0"}
    assert main(["quantize", str(source), str(tmp_path / "x.gguf"), "Q9"]) == 1
    assert main(["quantize", str(source), str(source), "Q8_0"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and errors[0].startswith("error: unknown quantization type 'Q9'")
    assert "would overwrite the input" in errors[1]


@pytest.mark.slow
def test_hugging_face_directory_quantizes_like_its_gguf_view(tmp_path):
    """IN may be a Hugging Face directory: F16 weights copied unchanged give the same
    logits as running the directory itself; Q8_0 gives the bytes of quantizing its view."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmpress.io.hf import load_hf_dir
    from llmpress.models.llama import LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False)
    hf_dir = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(hf_dir)
    report = quantize_model(QuantizeConfig(hf_dir, tmp_path / "tiny-f16.gguf", "F16"))
    assert {t.type for t in report.tensors} == {"F16", "F32"}
    ids = torch.tensor([[1, 5, 9, 200, 3, 77]])

    def logits(source):
        model = LlamaModel(source, mode="exact", device="cpu")
        return model(ids, model.new_cache(8))[0]

    assert torch.equal(logits(load_gguf(tmp_path / "tiny-f16.gguf")), logits(load_hf_dir(hf_dir)))
    quantize_model(QuantizeConfig(hf_dir, tmp_path / "tiny-q8.gguf", "Q8_0"))
    written, view = load_gguf(tmp_path / "tiny-q8.gguf"), load_hf_dir(hf_dir)
    for name, ref in written.tensors.items():
        if ref.ggml_type.name == "Q8_0":
            expected = quantize_tensor(dequantize_ref(view.tensors[name]), ref.ggml_type)
            assert bytes(ref.read_bytes().numpy()) == expected.tobytes(), name


# --- the default model's F32 original ---------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def f32_path(default_model_path, workdir) -> Path:
    """reference/README.md's "Original": the Q4_1 file dequantized to F32, by our quantize."""
    out = workdir / "smollm2-f32.gguf"
    quantize_model(QuantizeConfig(default_model_path, out, "F32", allow_requantize=True,
                                  error_rows=0))
    return out


@pytest.fixture(scope="module")
def f32_source(f32_path):
    return load_gguf(f32_path)


@pytest.fixture(scope="module")
def imatrix():
    return load_imatrix(REFERENCE_IMATRIX)


def test_f32_original_is_llama_quantizes(f32_source, f32_path):
    reference = REFERENCE_LABELS["F32"]
    assert f32_path.stat().st_size == reference["file_bytes"]
    assert len(f32_source.tensors) == len(reference["tensors"])
    for name, (type_name, digest) in reference["tensors"].items():
        ref = f32_source.tensors[name]
        assert ref.ggml_type.name == type_name, name
        assert sha256(ref.read_bytes().numpy()) == digest, name


def test_requantizing_needs_allow_requantize(default_model_path, workdir):
    out = workdir / "refused.gguf"
    with pytest.raises(LlmpressError, match="already quantized .*--allow-requantize"):
        quantize_model(QuantizeConfig(default_model_path, out, "Q4_0"))
    assert not out.exists()


def test_bad_requests_are_refused_before_any_work(f32_path, workdir):
    with pytest.raises(LlmpressError, match="valid types: F32, F16"):
        QuantizeConfig(f32_path, workdir / "x.gguf", "Q4_X")
    with pytest.raises(LlmpressError, match="would overwrite the input"):
        QuantizeConfig(f32_path, f32_path, "Q4_0")
    with pytest.raises(LlmpressError, match="no such importance matrix"):
        QuantizeConfig(f32_path, workdir / "x.gguf", "Q4_0", imatrix=workdir / "none.gguf")
    # an explicit embedding type is taken as given (llama_tensor_get_type): 576 fits no Q4_K
    with pytest.raises(LlmpressError, match="rows of 576 values do not fit Q4_K"):
        quantize_model(QuantizeConfig(f32_path, workdir / "x.gguf", "Q4_0",
                                      embedding_type="q4_k"))
    assert not (workdir / "x.gguf").exists()


def test_very_low_bit_types_without_an_imatrix_are_refused_in_one_line(f32_path, workdir,
                                                                       capsys):
    """llama-quantize refuses IQ1/IQ2 (and IQ3_XXS) tensors without an imatrix: so do we,
    before any work."""
    from llmpress.cli import main

    out = workdir / "iq2.gguf"
    assert main(["quantize", str(f32_path), str(out), "IQ2_XS", "--summary"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "needs an importance matrix; pass --imatrix" in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("type_name", FILE_TYPES)
def test_every_file_type_plans_or_says_why_not(f32_source, imatrix, type_name):
    """Every llama-quantize ftype makes a plan, or one LlmpressError when this build cannot
    write one of its formats yet (the IQ1-3 / TQ quantizers live in their own modules)."""
    config = QuantizeConfig(f32_source, "unused.gguf", type_name)
    try:
        plan = plan_quantization(f32_source, config, imatrix)
    except LlmpressError as exc:
        assert "llmpress cannot write type" in str(exc)
        return
    assert plan.metadata["general.file_type"].value == file_type(type_name).number


# --- whole files against llama_model_quantize, same run ---------------------------------
def llama_quantize(source: Path, out: Path, type_name: str, imatrix_path: Path | None = None,
                   imatrix_label: str | None = None) -> None:
    """llama-quantize through llama-cpp-python: the imatrix data and the quantize.imatrix.*
    keys are passed the way tools/quantize/quantize.cpp passes them."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = file_type(type_name).number
    keep_alive = []
    if imatrix_path is not None:
        im = load_imatrix(imatrix_path)
        entries = (llama_cpp.llama_model_imatrix_data * (len(im.entries) + 1))()
        for i, (name, values) in enumerate(im.entries.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep_alive.append(values)
            entries[i].name = name.encode()
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        params.imatrix = entries
        keys = [("quantize.imatrix.file", imatrix_label or str(imatrix_path)),
                ("quantize.imatrix.dataset", im.datasets[0]),
                ("quantize.imatrix.entries_count", len(im.entries)),
                ("quantize.imatrix.chunks_count", im.chunk_count)]
        overrides = (llama_cpp.llama_model_kv_override * (len(keys) + 1))()
        for i, (key, value) in enumerate(keys):
            overrides[i].key = key.encode()
            if isinstance(value, str):
                overrides[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                overrides[i].value.val_str = value.encode()[:127]
            else:
                overrides[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                overrides[i].value.val_i64 = value
        overrides[len(keys)].key = b""
        params.kv_overrides = overrides
        keep_alive += [entries, overrides]
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0


FULL_FILES = {"Q4_0.no": ("Q4_0", False), "Q8_0.yes": ("Q8_0", True)}


@pytest.fixture(scope="module")
def full_files(f32_path, workdir) -> dict[str, tuple[Path, Path, object]]:
    """label -> (our file, llama-quantize's file, our report), same input, same run."""
    made = {}
    cwd = os.getcwd()
    os.chdir(REFERENCE_IMATRIX.parent)  # so both write the imatrix's bare name, like the reference
    try:
        for label, (type_name, with_imatrix) in FULL_FILES.items():
            ours, theirs = workdir / f"ours-{label}.gguf", workdir / f"llama-{label}.gguf"
            imatrix_arg = IMATRIX_LABEL if with_imatrix else None
            report = quantize_model(QuantizeConfig(f32_path, ours, type_name, imatrix=imatrix_arg))
            llama_quantize(f32_path, theirs, type_name, Path(imatrix_arg) if imatrix_arg else None)
            made[label] = (ours, theirs, report)
    finally:
        os.chdir(cwd)
    return made


@pytest.mark.parametrize("label", FULL_FILES)
def test_whole_file_is_byte_identical_to_llama_quantize(full_files, label):
    ours, theirs, report = full_files[label]
    reference = REFERENCE_LABELS[label]
    assert ours.stat().st_size == theirs.stat().st_size == reference["file_bytes"]
    assert ours.read_bytes() == theirs.read_bytes()
    written = load_gguf(ours)
    for name, (type_name, digest) in reference["tensors"].items():
        assert written.tensors[name].ggml_type.name == type_name
        assert sha256(written.tensors[name].read_bytes().numpy()) == digest, name
    assert report.file_bytes == reference["file_bytes"]
    assert {t.name: t.type for t in report.tensors} == {
        n: t for n, (t, _) in reference["tensors"].items()}


# --- every reference label: all types and sizes, data on a sample ------------------------
def _sample(choices) -> list:
    """Per target type, the smallest tensor of the first and of the last layer using it;
    every tensor with LLMPRESS_CHECK_ALL_TENSORS=1 (about 10 minutes on 2 cores)."""
    if os.environ.get("LLMPRESS_CHECK_ALL_TENSORS") == "1":
        return [c for c in choices if c.target_type != c.source_type]
    by_type = defaultdict(list)
    for c in choices:
        if c.target_type != c.source_type:
            by_type[c.target_type].append(c)
    picked = []
    for items in by_type.values():
        layers = sorted({c.name.split(".")[1] for c in items if c.name.startswith("blk.")},
                        key=int)
        for layer in {layers[0], layers[-1]} if layers else set():
            in_layer = [c for c in items if c.name.startswith(f"blk.{layer}.")]
            picked.append(min(in_layer, key=lambda c: (np.prod(c.shape), c.name)))
    return picked


@pytest.fixture(scope="module")
def quantized_hashes():
    return {}  # (name, type, with imatrix) -> sha256, shared by the labels


@pytest.mark.parametrize("label", LABELS)
def test_reference_label(label, f32_source, imatrix, quantized_hashes):
    type_name, _, yes = label.partition(".")
    reference = REFERENCE_LABELS[label]
    used_imatrix = imatrix if yes == "yes" else None
    if used_imatrix is not None:
        used_imatrix = dataclasses.replace(imatrix, label=IMATRIX_LABEL)
    plan = plan_quantization(f32_source, QuantizeConfig(f32_source, "unused.gguf", type_name),
                             used_imatrix)
    assert {c.name: c.target_type.name for c in plan.choices} == {
        n: t for n, (t, _) in reference["tensors"].items()}
    assert plan.layout.file_bytes == reference["file_bytes"]
    mismatched = []
    for choice in _sample(plan.choices):
        importance = _importance_for(choice, used_imatrix)
        key = (choice.name, choice.target_type, importance is not None)
        if key not in quantized_hashes:
            values = dequantize_ref(f32_source.tensors[choice.name])
            quantized_hashes[key] = sha256(quantize_tensor(values, choice.target_type, importance))
        if quantized_hashes[key] != reference["tensors"][choice.name][1]:
            mismatched.append(f"{choice.name} ({choice.target_type.name})")
    assert not mismatched, f"{label}: data differs from llama-quantize's for {mismatched}"


# --- our file in llama.cpp and in our runtime --------------------------------------------
def test_our_file_runs_in_llama_cpp_and_agrees_with_our_runtime(full_files, wikitext_bytes):
    import torch

    from llmpress.api import LanguageModel
    from llmpress.io.loader import load_source

    path = full_files["Q4_0.no"][0]
    # one thread each: on the shared 2-core machine both ran 3x faster than with two
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = LanguageModel(load_source(path), mode="exact", ctx=2100, device="cpu")
        text = wikitext_bytes[:20000].decode("utf-8", errors="ignore")
        ids = ours.encode(text)[:2048]
        assert len(ids) == 2048
        our_top1 = ours.logits(ids).argmax(-1).numpy()
    finally:
        torch.set_num_threads(threads)
    del ours
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2100, n_batch=512, n_threads=1,
                          n_threads_batch=1, logits_all=True, verbose=False)
    llm.eval(ids)
    llama_top1 = np.asarray(llm.scores[: len(ids)]).argmax(-1)
    agreement = float((our_top1 == llama_top1).mean())
    # llama.cpp rounds activations to 8 bits: ~96-97% on this model (reference/README.md);
    # measured 97.2% over these 2,048 tokens
    assert agreement >= 0.95, f"top-1 agreement {agreement:.3f}"


@pytest.mark.parametrize("type_name", ["IQ3_M", "IQ2_M"])
def test_i_quant_preset_file_is_byte_identical_to_llama_quantize(f32_path, workdir, type_name):
    """A very-low-bit preset end to end: llama-quantize's type mix (with its imatrix rules),
    the grid quantizers and the writer, against llama-quantize's own file from the same
    input in the same run. (The default model's 576-wide rows send most tensors to the
    fallback types; its ffn_down rows take the grid types.)"""
    ours, theirs = workdir / f"ours-{type_name}.gguf", workdir / f"llama-{type_name}.gguf"
    cwd = os.getcwd()
    os.chdir(REFERENCE_IMATRIX.parent)  # both write the imatrix's bare name
    try:
        quantize_model(QuantizeConfig(f32_path, ours, type_name, imatrix=IMATRIX_LABEL))
        llama_quantize(f32_path, theirs, type_name, Path(IMATRIX_LABEL))
    finally:
        os.chdir(cwd)
    assert ours.read_bytes() == theirs.read_bytes()
    written = {ref.ggml_type.name for ref in load_gguf(ours).tensors.values()}
    assert written & {"IQ3_XXS", "IQ3_S", "IQ2_S", "IQ2_XS"}, written

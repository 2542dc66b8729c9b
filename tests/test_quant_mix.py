"""Type mixes (quant/mix.py) against llama.cpp's own type selection.

Three independent references:
- llama.cpp's type-selection code itself (llama_quant_compute_types, the function its
  test-quant-type-selection uses), called through ctypes from llama-cpp-python's libllama
  on mock models: GQA, 70B, mixture of experts, Falcon's fused QKV, rows that fit no
  256-block, overrides and --pure;
- llama-quantize's --dry-run (llama_model_quantize with dry_run) on the same mock models
  written as GGUF files whose tensor data is a hole (sparse files: no byte is stored),
  with an (empty) imatrix and without: the imatrix-dependent rules and the "requires an
  importance matrix" guard, which the ctypes entry point above cannot reach;
- the per-tensor types llama-quantize wrote for the default model, every type, with and
  without the imatrix (tests/data/reference/smollm2-135m-llamacpp-tensors.json).
No weights are read: the mix needs names, shapes and metadata only.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from llama_cpp import llama_cpp as llama_c

from conftest import TENSOR_HASHES

from llmpress.errors import LlmpressError
from llmpress.io.gguf import load_gguf
from llmpress.quant.mix import (
    FILE_TYPES,
    MixOptions,
    ModelFacts,
    TensorInfo,
    allows_quantization,
    choose_types,
    file_type,
    model_facts,
    requires_imatrix,
    tensors_of,
)



# --- llama.cpp's type selection through ctypes ------------------------------------------
class _ModelDesc(ctypes.Structure):  # llama-ext.h: llama_quant_model_desc
    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (name, ctypes.c_uint32) for name in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv",
                                             "n_expert", "n_embd_head_k", "n_embd_head_v")]


class _GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p),
                ("no_alloc", ctypes.c_bool)]


def _function(lib, name: str, restype, argtypes):
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


class LlamaTypeSelection:
    """The llama-ext.h staging API (C++ symbols, hence the mangled names)."""

    def __init__(self):
        lib = llama_c._lib
        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        ggml = ctypes.CDLL(str(min(lib_dir.glob("libggml-base.so*"))))
        vp = ctypes.c_void_p
        self.model_from_metadata = _function(
            lib, "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc", vp,
            [ctypes.POINTER(_ModelDesc)])
        self.init = _function(
            lib, "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params", vp,
            [vp, ctypes.POINTER(llama_c.llama_model_quantize_params)])
        self.free = _function(lib, "_Z16llama_quant_freeP19quantize_state_impl", None, [vp])
        self.allows = _function(
            lib, "_Z38llama_quant_tensor_allows_quantizationPK19quantize_state_implPK11ggml_tensor",
            ctypes.c_bool, [vp, vp])
        self.compute = _function(
            lib, "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
            None, [vp, ctypes.c_int, ctypes.POINTER(vp), ctypes.POINTER(ctypes.c_int),
                   ctypes.c_size_t])
        self.model_free = _function(lib, "llama_model_free", None, [vp])
        self.ggml_init = _function(ggml, "ggml_init", vp, [_GgmlInitParams])
        self.ggml_free = _function(ggml, "ggml_free", None, [vp])
        self.new_tensor = _function(ggml, "ggml_new_tensor_4d", vp, [vp, ctypes.c_int] + [ctypes.c_int64] * 4)
        self.set_name = _function(ggml, "ggml_set_name", vp, [vp, ctypes.c_char_p])
        self.overhead = _function(ggml, "ggml_tensor_overhead", ctypes.c_size_t, [])

    def types(self, model: MockModel, ftype: int, tensor_types=(), output_type=None,
              embedding_type=None, pure=False) -> dict[str, str]:
        """name -> type name llama.cpp picks, for the tensors it allows to be quantized."""
        desc = _ModelDesc(model.architecture.encode(), model.n_embd, model.n_ff, model.n_layers,
                          model.n_heads, model.n_kv_heads, model.n_experts, 64, 64)
        handle = self.model_from_metadata(ctypes.byref(desc))
        params = llama_c.llama_model_quantize_default_params()
        params.pure = pure
        if output_type is not None:
            params.output_tensor_type = T[output_type.upper()].value
        if embedding_type is not None:
            params.token_embedding_type = T[embedding_type.upper()].value
        overrides = (llama_c.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, type_name) in enumerate(tensor_types):
            overrides[i].pattern, overrides[i].type = pattern.encode(), T[type_name.upper()].value
        overrides[len(tensor_types)].pattern = None
        if tensor_types:
            params.tt_overrides = overrides
        state = self.init(handle, ctypes.byref(params))
        ctx = self.ggml_init(_GgmlInitParams(len(model.tensors) * self.overhead() + 4096, None, True))
        try:
            chosen = []
            for name, shape in model.tensors:
                ne = list(reversed(shape)) + [1] * (4 - len(shape))
                tensor = self.new_tensor(ctx, T.F32.value, *ne)
                self.set_name(tensor, name.encode())
                if self.allows(state, tensor):
                    chosen.append((name, tensor))
            # the order of llama_model_loader's weights_map, as test-quant-type-selection sorts
            chosen.sort(key=lambda nt: (_layer(nt[0]), nt[0].encode()))
            handles = (ctypes.c_void_p * len(chosen))(*[t for _, t in chosen])
            result = (ctypes.c_int * len(chosen))()
            self.compute(state, ftype, handles, result, len(chosen))
            return {name: T(result[i]).name for i, (name, _) in enumerate(chosen)}
        finally:
            self.ggml_free(ctx)
            self.free(state)
            self.model_free(handle)


def _layer(name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


@pytest.fixture(scope="module")
def llama_selection() -> LlamaTypeSelection:
    return LlamaTypeSelection()


# --- mock models -----------------------------------------------------------------------
@dataclass(frozen=True)
class MockModel:
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    n_embd: int
    n_ff: int
    n_vocab: int
    n_experts: int = 0
    tied: bool = True
    fused_qkv: bool = False

    @property
    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, torch-order shape) like convert_hf_to_gguf would write."""
        head_dim = self.n_embd // self.n_heads
        kv = head_dim * self.n_kv_heads
        out = [("token_embd.weight", (self.n_vocab, self.n_embd)),
               ("output_norm.weight", (self.n_embd,))]
        if not self.tied:
            out.append(("output.weight", (self.n_vocab, self.n_embd)))
        for i in range(self.n_layers):
            p = f"blk.{i}."
            out += [(p + "attn_norm.weight", (self.n_embd,)), (p + "ffn_norm.weight", (self.n_embd,)),
                    (p + "attn_output.weight", (self.n_embd, self.n_embd))]
            if self.fused_qkv:
                out.append((p + "attn_qkv.weight", (self.n_embd + 2 * kv, self.n_embd)))
            else:
                out += [(p + "attn_q.weight", (self.n_embd, self.n_embd)),
                        (p + "attn_k.weight", (kv, self.n_embd)), (p + "attn_v.weight", (kv, self.n_embd))]
            if self.n_experts:
                e = self.n_experts
                out += [(p + "ffn_gate_inp.weight", (e, self.n_embd)),
                        (p + "ffn_gate_exps.weight", (e, self.n_ff, self.n_embd)),
                        (p + "ffn_up_exps.weight", (e, self.n_ff, self.n_embd)),
                        (p + "ffn_down_exps.weight", (e, self.n_embd, self.n_ff))]
            else:
                out += [(p + "ffn_gate.weight", (self.n_ff, self.n_embd)),
                        (p + "ffn_up.weight", (self.n_ff, self.n_embd)),
                        (p + "ffn_down.weight", (self.n_embd, self.n_ff))]
        return out

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts(self.architecture, self.n_layers, self.n_heads, self.n_kv_heads,
                          self.n_experts)

    def ours(self, options: MixOptions) -> dict[str, str]:
        """Our types for the tensors that may change type (what llama.cpp reports)."""
        infos = [TensorInfo(n, s, T.F32) for n, s in self.tensors]
        return {c.name: c.target_type.name for c in choose_types(infos, self.facts, options)
                if allows_quantization(c.name, c.shape, self.architecture)}


MODELS = {
    # Llama-3-70B-like: GQA 8, 80 layers (LLM_TYPE_70B), separate output matrix
    "llama-70b": MockModel("llama", 80, 64, 8, 8192, 28672, 128256, tied=False),
    # the default model's shapes: rows of 576 fit no 256-block
    "smollm2-135m": MockModel("llama", 30, 9, 3, 576, 1536, 49152),
    # Qwen2-7B-like: GQA 7, tied
    "qwen2-7b": MockModel("qwen2", 28, 28, 4, 3584, 18944, 152064),
    # Mixtral-like: 8 experts (3-D expert tensors, router kept F32)
    "mixtral": MockModel("llama", 32, 32, 8, 4096, 14336, 32000, n_experts=8, tied=False),
    # Falcon-7B-like: fused QKV, one KV head, rows of 4544
    "falcon-7b": MockModel("falcon", 32, 71, 1, 4544, 18176, 65024, tied=False, fused_qkv=True),
    # rows of 80: no 32-block fits either, so llama.cpp falls back to F16
    "tiny-odd": MockModel("llama", 4, 5, 5, 80, 200, 1000),
}  # fmt: skip


def _ftype_number(name: str) -> int:
    if name == "F32":
        return llama_c.LLAMA_FTYPE_ALL_F32
    return getattr(llama_c, f"LLAMA_FTYPE_MOSTLY_{name}")


def _types_in_llama_format(types: dict[str, str]) -> dict[str, str]:
    return {k: v.upper() for k, v in types.items()}


def _llama(selection, model, ftype_name, **kw) -> dict[str, str]:
    return _types_in_llama_format(selection.types(model, _ftype_number(ftype_name), **kw))


# --- llama-quantize --dry-run on sparse mock files ---------------------------------------
def write_sparse_gguf(model: MockModel, path: Path) -> Path:
    """The mock model as a GGUF file llama.cpp's loader accepts: hyperparameters, tensor
    infos, and F32 data that is a hole in a sparse file (the dry run reads no weight)."""
    arch = model.architecture
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (("context_length", 4096), ("embedding_length", model.n_embd),
                       ("block_count", model.n_layers), ("feed_forward_length", model.n_ff),
                       ("attention.head_count", model.n_heads),
                       ("attention.head_count_kv", model.n_kv_heads)):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32(f"{arch}.attention.layer_norm_epsilon", 1e-5)
    if model.n_experts:
        writer.add_uint32(f"{arch}.expert_count", model.n_experts)
        writer.add_uint32(f"{arch}.expert_used_count", 2)
    data_bytes = 0
    for name, shape in model.tensors:
        n_bytes = 4 * int(np.prod(shape))
        writer.add_tensor_info(name, shape, np.dtype(np.float32), n_bytes, raw_dtype=T.F32)
        data_bytes += -(-n_bytes // 32) * 32
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    data_start = -(-os.path.getsize(path) // 32) * 32
    with open(path, "r+b") as f:
        f.truncate(data_start + data_bytes)
    return path


# "[  12/ 272]  blk.0.attn_q.weight - [  576,   576,  1,  1], type =  f32, size = ... MiB"
# then " -> ... MiB (iq4_nl)" when the type changes
_DRY_RUN_LINE = re.compile(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =\s*[\d.]+ MiB"
                           r"(?: ->\s*[\d.]+ MiB \((\w+)\))?")


class LlamaDryRun:
    """llama_model_quantize(dry_run) with llama.cpp's log captured."""

    def __init__(self):
        self._log: list[str] = []

        @llama_c.llama_log_callback
        def collect(level, text, user_data):
            self._log.append(text.decode("utf-8", "replace"))
        self._collect = collect  # kept alive while llama.cpp holds it

    def run(self, path: Path, ftype: int, imatrix: bool) -> tuple[dict[str, str], bool]:
        """(name -> type for every tensor, whether llama.cpp says an imatrix is required)."""
        params = llama_c.llama_model_quantize_default_params()
        params.ftype, params.dry_run = ftype, True
        if imatrix:  # an empty imatrix still sets has_imatrix: only the rules differ
            params.imatrix = (llama_c.llama_model_imatrix_data * 1)()
        self._log.clear()
        llama_c.llama_log_set(self._collect, None)
        try:
            rc = llama_c.llama_model_quantize(str(path).encode(), b"unused.gguf",
                                              ctypes.byref(params))
        finally:
            from llama_cpp._logger import llama_log_callback
            llama_c.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
        text = "".join(self._log)
        assert rc == 0, text[-2000:]
        types = {m.group(1): (m.group(3) or m.group(2)).upper()
                 for m in _DRY_RUN_LINE.finditer(text)}
        return types, "will require an imatrix" in text


@pytest.fixture(scope="module")
def dry_run() -> LlamaDryRun:
    return LlamaDryRun()


@pytest.fixture(scope="module")
def sparse_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sparse-models")
    return {name: write_sparse_gguf(m, folder / f"{name}.gguf") for name, m in MODELS.items()}


# --- tests -----------------------------------------------------------------------------
def test_ftype_numbers_are_llama_cpps():
    for name, ft in FILE_TYPES.items():
        assert ft.number == _ftype_number(name), name


@pytest.mark.parametrize("model_name", MODELS)
def test_every_file_type_matches_llama_cpp_type_selection(llama_selection, model_name):
    model = MODELS[model_name]
    for ftype in FILE_TYPES:
        expected = _llama(llama_selection, model, ftype)
        ours = model.ours(MixOptions(ftype))
        assert ours == expected, f"{model_name} {ftype}: " + ", ".join(
            f"{k}: ours {ours.get(k)} llama {v}" for k, v in expected.items() if ours.get(k) != v)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("imatrix", [True, False], ids=["imatrix", "no-imatrix"])
def test_every_file_type_matches_llama_quantize_dry_run(dry_run, sparse_models, model_name,
                                                         imatrix):
    """llama-quantize itself, with and without an imatrix: every tensor's type, and the
    refusal of IQ1/IQ2/IQ3_XXS tensors without an imatrix."""
    model = MODELS[model_name]
    infos = [TensorInfo(n, s, T.F32) for n, s in model.tensors]
    for ftype in FILE_TYPES:
        expected, llama_requires = dry_run.run(sparse_models[model_name], _ftype_number(ftype),
                                               imatrix)
        choices = choose_types(infos, model.facts, MixOptions(ftype, has_imatrix=imatrix))
        ours = {c.name: c.target_type.name for c in choices}
        assert len(expected) == len(infos)
        assert ours == expected, f"{model_name} {ftype}: " + ", ".join(
            f"{k}: ours {ours.get(k)} llama {v}" for k, v in expected.items() if ours.get(k) != v)
        if not imatrix:
            ours_requires = any(requires_imatrix(c, model.architecture) for c in choices)
            assert ours_requires == llama_requires, f"{model_name} {ftype}"


def test_imatrix_rules_are_exercised(dry_run, sparse_models):
    """The cases above do differ with and without an imatrix (IQ3_XXS on the default
    model's shapes: attn_v IQ3_S -> IQ3_XXS, ffn_down Q4_K/Q3_K -> IQ3_XXS)."""
    path, number = sparse_models["smollm2-135m"], _ftype_number("IQ3_XXS")
    with_imatrix, _ = dry_run.run(path, number, True)
    without, _ = dry_run.run(path, number, False)
    assert with_imatrix["blk.5.ffn_down.weight"] == "IQ3_XXS"
    assert without["blk.5.ffn_down.weight"] == "Q3_K"
    assert without["blk.0.ffn_down.weight"] == "Q4_K"


OVERRIDES = [
    {"tensor_types": (("attn_v", "q8_0"), ("blk\\.1\\.", "q2_k"), ("ffn_down", "q4_k"))},
    {"output_type": "q4_k"},  # on a tied model it also sets token_embd (no fallback)
    {"embedding_type": "q3_k", "output_type": "q5_k"},
    {"pure": True},
    {"pure": True, "tensor_types": (("attn_q", "iq4_xs"),)},
]


@pytest.mark.parametrize("model_name", ["llama-70b", "smollm2-135m", "qwen2-7b"])
@pytest.mark.parametrize("overrides", OVERRIDES, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q2_K", "IQ4_XS", "Q6_K", "Q8_0"])
def test_overrides_match_llama_cpp(llama_selection, model_name, overrides, ftype):
    model = MODELS[model_name]
    expected = _llama(llama_selection, model, ftype, **overrides)
    ours = model.ours(MixOptions(ftype, **overrides))
    assert ours == expected


@pytest.fixture(scope="module")
def default_model(default_model_path):
    return load_gguf(default_model_path)


def test_default_model_mixes_match_llama_quantize_output(default_model):
    """Every tensor's type in every reference file, imatrix-dependent rules included."""
    reference = json.loads(TENSOR_HASHES.read_text())
    facts, infos = model_facts(default_model.metadata), tensors_of(default_model.tensors.values())
    assert facts == ModelFacts("llama", 30, 9, 3, 0)
    for label, entry in reference.items():
        ftype, _, imatrix = label.partition(".")
        choices = choose_types(infos, facts, MixOptions(ftype, has_imatrix=imatrix == "yes"))
        ours = {c.name: c.target_type.name for c in choices}
        expected = {name: tensor_type for name, (tensor_type, _) in entry["tensors"].items()}
        assert ours == expected, label


def test_output_order_is_llama_quantizes(default_model):
    """Non-layer tensors first, then by layer number, names sorted inside a layer."""
    choices = choose_types(tensors_of(default_model.tensors.values()),
                           model_facts(default_model.metadata), MixOptions("Q4_0"))
    names = [c.name for c in choices]
    assert names[:2] == ["output_norm.weight", "token_embd.weight"]
    assert names[2:11] == [f"blk.0.{n}.weight" for n in (
        "attn_k", "attn_norm", "attn_output", "attn_q", "attn_v", "ffn_down", "ffn_gate",
        "ffn_norm", "ffn_up")]
    assert names[-9].startswith("blk.29.") and names[11].startswith("blk.1.")


def test_choices_do_not_depend_on_input_order(default_model):
    infos = tensors_of(default_model.tensors.values())
    facts = model_facts(default_model.metadata)
    forward = choose_types(infos, facts, MixOptions("Q4_K_M"))
    backward = choose_types(list(reversed(infos)), facts, MixOptions("Q4_K_M"))
    assert forward == backward


def test_fallback_is_reported(default_model):
    choices = choose_types(tensors_of(default_model.tensors.values()),
                           model_facts(default_model.metadata), MixOptions("Q4_K_M"))
    fell_back = {c.name for c in choices if c.fell_back}
    # 576-wide rows fall back, 1536-wide ffn_down does not (reference/README.md: 180 of 272
    # tensors); the tied token embedding goes straight to Q8_0 by the output rule
    assert "blk.0.attn_q.weight" in fell_back and "blk.0.ffn_down.weight" not in fell_back
    assert len(fell_back) == 180 and "token_embd.weight" not in fell_back


def test_bad_names_give_one_clear_error():
    with pytest.raises(LlmpressError, match=r"unknown quantization type 'Q4_X'; valid types: F32.*Q4_K_M"):
        file_type("Q4_X")
    with pytest.raises(LlmpressError, match=r"q9: unknown tensor type; valid tensor types:"):
        MixOptions("Q4_0", tensor_types=(("attn_v", "q9"),))
    with pytest.raises(LlmpressError, match=r"bad regular expression"):
        MixOptions("Q4_0", tensor_types=(("attn_v(", "q8_0"),))
    with pytest.raises(LlmpressError, match=r"--output-type MXFP4: unknown tensor type"):
        MixOptions("Q4_0", output_type="MXFP4")
    assert file_type("q4_k") == FILE_TYPES["Q4_K_M"]  # llama-quantize's alias


def test_metadata_without_block_count_is_refused():
    with pytest.raises(LlmpressError, match="no llama.block_count"):
        model_facts({"general.architecture": "llama"})

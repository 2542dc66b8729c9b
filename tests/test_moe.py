"""Tiny random mixtures of experts built in transformers: Mixtral (GGUF "llama" with
experts, top-k renormalized), Qwen2-MoE (a shared expert with a sigmoid gate, top-k not
renormalized), Qwen3-MoE (q/k norms per head, top-k renormalized) and OLMoE (q/k norms over
all heads, top-k not renormalized).

Each is converted by our own HF loader (io/hf.py stacks the experts into 3-D tensors) and
run by models/llama.py + models/moe.py, against transformers on the directory; then
written as GGUF by `llmpress quantize` (F32, Q8_0, Q4_K_M, experts quantized as 3-D
tensors) and run by llama.cpp (llama-cpp-python) on that file. Every expert is routed to
in these tests, so each expert's weights decide some of the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from test_hf_to_gguf import BYTE_LEVEL_CASES, MODEL_VOCAB, write_byte_level_tokenizer
from tiny import greedy

from llmpress.api import load
from llmpress.cli import main
from llmpress.errors import LlmpressError
from llmpress.io.gguf import load_gguf
from llmpress.io.hf import load_hf_dir
from llmpress.io.source import ModelSource
from llmpress.models.config import config_from_source
from llmpress.models.llama import LlamaModel
from llmpress.plan.estimate import mix_types, spec_from_config, spec_from_gguf, weights
from llmpress.quant.quantize import QuantizeConfig, quantize_model

transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

SEQ, PROMPT, GREEDY_STEPS, N_EXPERTS = 48, 10, 64, 8
# widths of 256: the K-quants' block, so Q4_K_M quantizes the experts to K types
COMMON = dict(vocab_size=MODEL_VOCAB, hidden_size=256, intermediate_size=256,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
CASES = {  # name -> (config class, model class, GGUF architecture, settings)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "llama",
                dict(num_local_experts=N_EXPERTS, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "qwen2moe",
                  dict(num_experts=N_EXPERTS, num_experts_per_tok=3, moe_intermediate_size=256,
                       shared_expert_intermediate_size=512, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3moe",
                  dict(num_experts=N_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=256,
                       head_dim=64, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", "olmoe",
              dict(num_experts=N_EXPERTS, num_experts_per_tok=2, norm_topk_prob=False,
                   num_key_value_heads=4)),  # llama.cpp's OLMoE: no grouped-query attention
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models


@pytest.fixture(scope="module")
def corpus(wikitext_bytes) -> list[str]:
    return wikitext_bytes[:40_000].decode("utf-8").splitlines()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, corpus):
    """case -> (transformers model, its saved directory with a trained tokenizer)."""
    made = {}

    def make(case: str):
        if case not in made:
            config_cls, model_cls, _, settings = CASES[case]
            config = getattr(transformers, config_cls)(**(COMMON | settings))
            config._attn_implementation = "eager"
            torch.manual_seed(0)
            model = getattr(transformers, model_cls)(config).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.06)
            directory = tmp_path_factory.mktemp(case)
            model.save_pretrained(directory)
            write_byte_level_tokenizer(directory, BYTE_LEVEL_CASES["qwen2"], corpus)
            made[case] = (model, directory)
        return made[case]
    return make


@pytest.fixture(scope="module")
def converted(tiny):
    """(case, file type) -> the GGUF `llmpress quantize DIR OUT TYPE` writes."""
    made = {}

    def make(case: str, file_type: str):
        if (case, file_type) not in made:
            directory = tiny(case)[1]
            out = directory.parent / f"{case}-{file_type}.gguf"
            quantize_model(QuantizeConfig(directory, out, file_type, error_rows=0))
            made[case, file_type] = out
        return made[case, file_type]
    return make


def prompt_ids(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, MODEL_VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def experts_called(model: LlamaModel) -> list[set[int]]:
    """Per block, the experts that forward passes call: filled in by hooks."""
    called: list[set[int]] = [set() for _ in model.blocks]
    for layer, block in enumerate(model.blocks):
        for e, expert in enumerate(block.ffn.experts):
            expert.register_forward_hook(lambda *_, s=called[layer], e=e: s.add(e))
    return called


def llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, n_threads_batch=1,
                          logits_all=True, type_k=0, type_v=0, verbose=False)  # F32 KV cache
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_moe_matches_transformers(case, tiny):
    hf, directory = tiny(case)
    ours = LlamaModel(load_hf_dir(directory), mode="exact")
    assert ours.cfg.architecture == CASES[case][2]
    assert ours.cfg.n_experts == N_EXPERTS
    called = experts_called(ours)
    ids = prompt_ids(SEQ)
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits[0]
    logits = ours(ids, ours.new_cache(SEQ))[0]
    diff, scale = (logits - ref).abs().max().item(), ref.abs().max().item()
    print(f"\n{case}: max |diff| {diff:.3g} (logit scale {scale:.3g})")
    assert diff <= 1e-4 * scale
    assert all(len(experts) == N_EXPERTS for experts in called)  # every expert matters

    prompt = ids[:, :PROMPT]
    with torch.no_grad():
        hf_tokens = hf.generate(prompt, max_new_tokens=GREEDY_STEPS, min_new_tokens=GREEDY_STEPS,
                                do_sample=False)[0, PROMPT:].tolist()
    _, our_tokens = greedy(ours, prompt, GREEDY_STEPS)  # one token a step, the KV cache
    assert our_tokens == hf_tokens


@pytest.mark.parametrize("case", list(CASES))
def test_converted_f32_gguf_matches_llama_cpp(case, tiny, converted):
    """Our converter's F32 file: llama.cpp computes our runtime's logits on the directory
    to float32 rounding, and our runtime reads the file back to the same numbers."""
    directory = tiny(case)[1]
    path = converted(case, "F32")
    source = load_gguf(path)
    assert source.tensors["blk.0.ffn_up_exps.weight"].shape[0] == N_EXPERTS
    ids = prompt_ids(SEQ, seed=3)[0].tolist()
    on_dir = LlamaModel(load_hf_dir(directory), mode="exact")
    on_file = LlamaModel(source, mode="exact")
    ours = on_dir(torch.tensor([ids]), on_dir.new_cache(SEQ))[0]
    scale = ours.abs().max().item()
    theirs = llama_cpp_logits(path, ids)
    print(f"\n{case} F32: llama.cpp vs ours max |diff| {(theirs - ours).abs().max():.3g} "
          f"(scale {scale:.3g})")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(on_file(torch.tensor([ids]), on_file.new_cache(SEQ))[0], ours,
                               rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("case", list(CASES))
def test_quantized_experts_match_llama_cpp(case, file_type, converted):
    """Experts quantized as 3-D tensors: our exact mode on the file against llama.cpp on
    the same file (which also rounds the activations to 8 bits for its dot products, the
    part of the difference that remains), and fast mode (the packed kernels on each
    expert's slice, one token at a time) against exact mode."""
    path = converted(case, file_type)
    source = load_gguf(path)
    experts = source.tensors["blk.0.ffn_down_exps.weight"]
    assert len(experts.shape) == 3 and experts.ggml_type.name not in ("F32", "F16")
    ids = prompt_ids(SEQ, seed=4)[0].tolist()
    exact = LlamaModel(source, mode="exact")
    ours = exact(torch.tensor([ids]), exact.new_cache(SEQ))[0]
    theirs = llama_cpp_logits(path, ids)
    scale = ours.abs().max().item()
    diff = (theirs - ours).abs().max().item()
    top1 = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(f"\n{case} {file_type} (experts {experts.ggml_type.name}): llama.cpp vs ours max "
          f"|diff| {diff:.3g} (scale {scale:.3g}), top-1 {top1:.0%}")
    assert diff <= 0.03 * scale and top1 >= 0.9  # measured: <= 0.017, >= 98%

    # fast mode rounds the activations to 8 bits as llama.cpp does: the same bound
    fast = LlamaModel(source, mode="fast")
    assert fast.blocks[0].ffn.experts[0].gate_up.kernel is not None
    fast_logits = fast(torch.tensor([ids]), fast.new_cache(SEQ))[0]
    fast_diff = (fast_logits - ours).abs().max().item()
    fast_top1 = (fast_logits.argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(f"fast vs exact max |diff| {fast_diff:.3g}, top-1 {fast_top1:.0%}")
    assert fast_diff <= 0.03 * scale and fast_top1 >= 0.9


def test_info_and_planner_count_experts(tiny, converted, capsys):
    """Total parameters as transformers counts them; active parameters with only the
    routed experts' share of the expert weights, in `llmpress info` and in the planner
    (from the GGUF and from config.json alike), and the weight bytes a token reads."""
    case = "mixtral"
    hf, directory = tiny(case)
    path = converted(case, "Q8_0")
    used = CASES[case][3]["num_experts_per_tok"]
    expert_params = sum(p.numel() for name, p in hf.named_parameters()
                        if ".experts." in name)
    total = sum(p.numel() for p in hf.parameters())
    active = total - expert_params + expert_params * used // N_EXPERTS

    info = load(path, mode="exact").info()
    assert (info.parameters, info.active_parameters) == (total, active)
    assert (info.experts, info.experts_used) == (N_EXPERTS, used)
    assert main(["info", str(path)]) == 0
    assert f"{used} / {N_EXPERTS}" in capsys.readouterr().out
    assert main(["fit", str(path), "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)["model"]
    assert (fit["parameters"], fit["active_parameters"]) == (total, active)

    spec = spec_from_gguf(path)
    planned = spec_from_config(json.loads((directory / "config.json").read_text()), directory,
                               case)
    for s in (spec, planned):
        assert (s.parameters, s.active_parameters) == (total, active)
    w = weights(spec, mix_types(spec, "Q8_0"))
    expert_bytes = sum(r.n_bytes for r in load_gguf(path).tensors.values()
                       if r.name.endswith("_exps.weight"))
    unused = expert_bytes * (N_EXPERTS - used) // N_EXPERTS
    assert math.isclose(w.unused_expert_bytes, unused, rel_tol=1e-3)
    assert w.read_per_token == w.data_bytes - w.token_embd_bytes - w.unused_expert_bytes


# --- what is refused ----------------------------------------------------------------------
def with_metadata(source: ModelSource, **changes) -> ModelSource:
    metadata = {k: v for k, v in source.metadata.items() if k not in changes}
    metadata.update({k: v for k, v in changes.items() if v is not None})
    return dataclasses.replace(source, metadata=metadata)


@pytest.mark.parametrize(("case", "key", "value", "message"), [
    ("mixtral", "llama.expert_count", 6,
     r"tensor blk\.0\.ffn_gate_inp\.weight has shape \[8, 256\], but the model implies \[6, "),
    ("mixtral", "llama.expert_used_count", 9, r"expert_used_count is 9; it must be from 1 to"),
    ("mixtral", "llama.expert_used_count", 0, r"expert_used_count is 0; it must be from 1 to"),
    ("mixtral", "llama.expert_count", 1 << 20, r"expert_count must be an integer from 0 to 512"),
    ("mixtral", "llama.expert_count", None, r"tensor blk\.0\.ffn_up\.weight is missing"),
    ("qwen2_moe", "qwen2moe.expert_count", None, r"qwen2moe is a mixture of experts"),
])
def test_bad_expert_metadata_is_one_clear_error(case, key, value, message, converted):
    source = with_metadata(load_gguf(converted(case, "F32")), **{key: value})
    with pytest.raises(LlmpressError, match=message):
        config_from_source(source)


def test_bad_hf_experts_are_one_clear_error(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    directory = tiny("qwen2_moe")[1]
    for name in ("config.json", "model.safetensors"):
        shutil.copy(directory / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"norm_topk_prob": True}))
    with pytest.raises(LlmpressError, match="norm_topk_prob True differs from what qwen2moe"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_experts_per_tok": 9}))
    with pytest.raises(LlmpressError, match="has 8 experts and 9 per token"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    original = load_file(tmp_path / "model.safetensors")
    up = "model.layers.1.mlp.experts.{}.up_proj.weight"
    for change, message in (
            ({up.format(5): None}, r"experts\.5\.up_proj\.weight is missing \(1 of 8 experts"),
            ({up.format(8): original[up.format(0)].clone()}, "belongs to expert 8, but config.json "
                                                     "has 8 experts"),
            ({up.format(3): original[up.format(3)].half()}, "experts of blk.1.ffn_up_exps.weight "
                                                            "mix dtypes F16, F32")):
        weights_ = {k: v for k, v in (original | change).items() if v is not None}
        save_file(weights_, tmp_path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(LlmpressError, match=message):
            load_hf_dir(tmp_path)


def test_calibration_and_pruning_refuse_experts(converted, tmp_path, capsys):
    """Not covered yet (statistics per expert): one error line, no traceback, no output."""
    path = converted("qwen2_moe", "F32")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    for args in (["imatrix", str(path), "--text", str(text), "-o", str(tmp_path / "im.gguf")],
                 ["prune", str(path), "-o", str(tmp_path / "p.gguf"), "--method", "magnitude",
                  "--sparsity", "0.5"]):
        assert main(args) != 0
        err = capsys.readouterr().err
        assert "does not cover mixtures of experts yet" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.gguf"))


LLAMA_FTYPES = {"Q8_0": 7, "Q4_K_M": 15, "Q3_K_M": 12, "IQ4_XS": 30}  # llama_ftype numbers


def slow_iq4(file_type: str):
    """IQ4_XS experts take the numpy IQ4 search seconds per case: in the full run only (the
    fast set keeps IQ4_XS bytes through test_phi3's dense tensors)."""
    return pytest.param(file_type, marks=pytest.mark.slow) if file_type == "IQ4_XS" else file_type


def tensors_by_name(path) -> dict[str, tuple[str, bytes]]:
    from gguf import GGUFReader
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes())
            for t in GGUFReader(path).tensors}


def llama_quantize(source, out, file_type: str):
    """llama.cpp's quantizer (llama_model_quantize, the code behind llama-quantize)."""
    import ctypes
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = LLAMA_FTYPES[file_type], 1
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0


def quantize_both(source, tmp_path, file_type: str) -> dict[str, tuple[str, bytes]]:
    """llama-quantize and `llmpress quantize` on the same F32 file: the same tensor names,
    and for each the same type and bytes. -> llama-quantize's tensors."""
    llama_quantize(source, tmp_path / "theirs.gguf", file_type)
    quantize_model(QuantizeConfig(source, tmp_path / "ours.gguf", file_type, error_rows=0))
    theirs = tensors_by_name(tmp_path / "theirs.gguf")
    ours = tensors_by_name(tmp_path / "ours.gguf")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name] == theirs[name], name
    return theirs


@pytest.mark.parametrize("file_type", [slow_iq4(t) for t in LLAMA_FTYPES])
@pytest.mark.parametrize("case", list(CASES))
def test_quantized_experts_are_llama_quantizes_bytes(case, file_type, converted, tmp_path):
    """`llmpress quantize` of our F32 file writes, tensor by tensor, the types and bytes
    llama-quantize writes from the same file: its MoE rules (8 experts: attn_v and
    attn_k to 8 bits...) and the 3-D expert tensors quantized expert by expert."""
    theirs = quantize_both(converted(case, "F32"), tmp_path, file_type)
    assert theirs["blk.0.ffn_down_exps.weight"][0] not in ("F32", "F16")


def write_expert_imatrix(source, path) -> dict[str, np.ndarray]:
    """A random importance matrix for every matrix of `source` but the embedding, as
    llama-imatrix's GGUF stores it: per weight the squared-activation sums of each expert
    (one for a dense weight) and the rows each expert was routed. -> name -> the means
    llama-quantize divides out of it (float32, n_expert * row_length)."""
    import gguf
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch="")
    writer.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes none
    writer.add_string("general.type", "imatrix")
    means = {}
    for ref in load_gguf(source).tensors.values():
        if len(ref.shape) < 2 or ref.name == "token_embd.weight":
            continue
        n_expert = ref.shape[0] if len(ref.shape) == 3 else 1
        counts = rng.integers(1, 200, n_expert).astype(np.float32)
        sums = (rng.gamma(1.0, 1.0, (n_expert, ref.shape[-1])) * counts[:, None]
                ).astype(np.float32)
        writer.add_tensor(ref.name + ".in_sum2", sums)
        writer.add_tensor(ref.name + ".counts", counts[:, None])
        means[ref.name] = (sums / counts[:, None]).astype(np.float32).ravel()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return means


@pytest.mark.parametrize("file_type", ["Q4_K_M", slow_iq4("IQ4_XS")])
@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
def test_experts_quantized_with_an_imatrix_are_llama_quantizes_bytes(case, file_type,
                                                                     converted, tmp_path):
    """With an importance matrix of one row of statistics per expert, too: each expert's
    slice is quantized with its own importance, as llama-quantize does (which gets the
    same means through llama_model_imatrix_data)."""
    import ctypes
    source = converted(case, "F32")
    means = write_expert_imatrix(source, tmp_path / "imatrix.gguf")
    entries = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
    for entry, (name, values) in zip(entries, means.items()):
        entry.name, entry.size = name.encode(), values.size
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.imatrix = LLAMA_FTYPES[file_type], 1, entries
    assert llama_cpp.llama_model_quantize(str(source).encode(),
                                          str(tmp_path / "theirs.gguf").encode(),
                                          ctypes.byref(params)) == 0
    quantize_model(QuantizeConfig(source, tmp_path / "ours.gguf", file_type, error_rows=0,
                                  imatrix=tmp_path / "imatrix.gguf"))
    theirs = tensors_by_name(tmp_path / "theirs.gguf")
    ours = tensors_by_name(tmp_path / "ours.gguf")
    for name in theirs:
        assert ours[name] == theirs[name], name
    without = tensors_by_name(converted(case, file_type))  # the importance changed the bytes
    assert without["blk.0.ffn_up_exps.weight"] != ours["blk.0.ffn_up_exps.weight"]

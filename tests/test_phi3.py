"""Tiny random Phi-3 models built in transformers (Phi3ForCausalLM): one with plain RoPE,
one with LongRoPE on 3/4 of each head (Phi-3.5 / Phi-4-mini style), converted by our own
HF loader (io/hf.py: fused qkv and gate/up kept fused, the rope_factors_* tensors and the
attention factor as convert_hf_to_gguf writes them) and run by models/phi3.py, against
transformers on the directory, then written as GGUF by `llmpress quantize` and run by
llama.cpp (llama-cpp-python) on that file.

The training context (original_max_position_embeddings) is 256: windows of 48 tokens use
the short factors, a window of 300 tokens the long ones, in all three runtimes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from test_hf_to_gguf import BYTE_LEVEL_CASES, MODEL_VOCAB, write_byte_level_tokenizer
from test_moe import LLAMA_FTYPES, quantize_both
from tiny import greedy

from llmpress.errors import LlmpressError
from llmpress.io.gguf import load_gguf
from llmpress.io.hf import load_hf_dir
from llmpress.io.source import TensorRef
from llmpress.models.config import config_from_source
from llmpress.models.family import build_model
from llmpress.models.phi3 import Phi3Model
from llmpress.quant.quantize import QuantizeConfig, quantize_model

transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

SEQ, LONG_SEQ, PROMPT, GREEDY_STEPS, TRAINING_CONTEXT = 48, 300, 10, 64, 256
HEAD_DIM, ROTATED = 64, 48  # partial_rotary_factor 0.75
COMMON = dict(vocab_size=MODEL_VOCAB, hidden_size=256, intermediate_size=256,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=1024, original_max_position_embeddings=TRAINING_CONTEXT,
              rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
CASES = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "longrope": dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                     short_factor=[1.0 + 0.05 * i for i in range(ROTATED // 2)],
                     long_factor=[2.0 + 0.5 * i for i in range(ROTATED // 2)]),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, wikitext_bytes):
    """case -> (transformers model, its saved directory with a trained tokenizer). (The
    directory's name becomes general.name; llama.cpp gives a model named "phi3" Phi-3's
    own special tokens, which a trained tokenizer lacks: hence "p3".)"""
    made = {}
    corpus = wikitext_bytes[:40_000].decode("utf-8").splitlines()

    def make(case: str):
        if case not in made:
            config = transformers.Phi3Config(**COMMON, rope_parameters=dict(CASES[case]))
            config._attn_implementation = "eager"
            torch.manual_seed(0)
            model = transformers.Phi3ForCausalLM(config).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.06)
            directory = tmp_path_factory.mktemp(f"p3-{case}")
            model.save_pretrained(directory)
            write_byte_level_tokenizer(directory, BYTE_LEVEL_CASES["qwen2"], corpus)
            made[case] = (model, directory)
        return made[case]
    return make


def ids_of(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, MODEL_VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def llama_cpp_logits(path, ids: list[int], n_ctx: int) -> torch.Tensor:
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1,
                          n_threads_batch=1, logits_all=True, type_k=0, type_v=0,
                          verbose=False)  # F32 KV cache
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, model.new_cache(ids.shape[1]))[0]


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_phi3_matches_transformers(case, tiny):
    hf, directory = tiny(case)
    source = load_hf_dir(directory)
    ours = build_model(source, mode="exact")
    assert isinstance(ours, Phi3Model) and ours.cfg.rope_dim == (
        ROTATED if case == "longrope" else HEAD_DIM)
    for n, seed in ((SEQ, 2), (LONG_SEQ, 3)):  # short factors, then long ones
        ids = ids_of(n, seed)
        with torch.no_grad():
            ref = hf(input_ids=ids, use_cache=False).logits[0]
        diff, scale = (logits(ours, ids) - ref).abs().max().item(), ref.abs().max().item()
        print(f"\n{case}, {n} tokens: max |diff| {diff:.3g} (logit scale {scale:.3g})")
        assert diff <= 1e-4 * scale

    prompt = ids_of(SEQ, 2)[:, :PROMPT]
    with torch.no_grad():
        hf_tokens = hf.generate(prompt, max_new_tokens=GREEDY_STEPS, min_new_tokens=GREEDY_STEPS,
                                do_sample=False)[0, PROMPT:].tolist()
    _, our_tokens = greedy(ours, prompt, GREEDY_STEPS)  # one token a step, the KV cache
    assert our_tokens == hf_tokens


@pytest.mark.parametrize("file_type", ["F32", "Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("case", list(CASES))
def test_converted_phi3_gguf_matches_llama_cpp(case, file_type, tiny, tmp_path):
    """llama.cpp on our converter's file: on F32, our runtime's logits on the directory to
    float32 rounding (short and long RoPE factors); on the quantized files, our exact mode
    on the same file up to llama.cpp's 8-bit activations; fast mode (the fused decode
    step where every type has a kernel) against exact mode."""
    directory = tiny(case)[1]
    path = tmp_path / f"p3-{case}-{file_type}.gguf"
    quantize_model(QuantizeConfig(directory, path, file_type, error_rows=0))
    source = load_gguf(path)
    assert "blk.0.attn_qkv.weight" in source.tensors  # kept fused, as llama.cpp reads it
    assert ("rope_factors_long.weight" in source.tensors) == (case == "longrope")
    exact = Phi3Model(source, mode="exact")
    reference = Phi3Model(load_hf_dir(directory), mode="exact") if file_type == "F32" else exact
    for n, seed in ((SEQ, 4), (LONG_SEQ, 5)):
        ids = ids_of(n, seed)
        ours = logits(reference, ids)
        theirs = llama_cpp_logits(path, ids[0].tolist(), n_ctx=512 if n > SEQ else 128)
        scale = ours.abs().max().item()
        diff = (theirs - ours).abs().max().item()
        top1 = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
        print(f"\n{case} {file_type}, {n} tokens: llama.cpp vs ours max |diff| {diff:.3g} "
              f"(scale {scale:.3g}), top-1 {top1:.0%}")
        if file_type == "F32":
            assert diff <= 1e-5 * scale
        else:
            # measured: <= 0.015 of the scale; top-1 >= 92% (random models: close logits)
            assert diff <= 0.03 * scale and top1 >= 0.85

    fast = Phi3Model(source, mode="fast")
    if file_type == "Q8_0":  # every type has a kernel: one C call per pass, row slices
        assert fast.decoder is not None  # and LongRoPE's scaled cos/sin included
    # fast mode rounds activations to 8 bits as llama.cpp does: the same bound as above
    ids = ids_of(SEQ, 4)
    fast_logits, exact_logits = logits(fast, ids), logits(exact, ids)
    scale = exact_logits.abs().max().item()
    diff = (fast_logits - exact_logits).abs().max().item()
    top1 = (fast_logits.argmax(-1) == exact_logits.argmax(-1)).float().mean().item()
    print(f"fast vs exact max |diff| {diff:.3g} (scale {scale:.3g}), top-1 {top1:.0%}")
    assert diff <= 0.03 * scale and top1 >= 0.85


@pytest.mark.parametrize("file_type", list(LLAMA_FTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_quantized_phi3_is_llama_quantizes_bytes(case, file_type, tiny, tmp_path):
    """`llmpress quantize` of our F32 file writes, tensor by tensor, the types and bytes
    llama-quantize writes from the same file (fused attn_qkv and ffn_up included)."""
    source = tmp_path / "f32.gguf"
    quantize_model(QuantizeConfig(tiny(case)[1], source, "F32", error_rows=0))
    quantize_both(source, tmp_path, file_type)


# --- what is refused ----------------------------------------------------------------------
def test_fused_qkv_without_whole_heads_is_one_clear_error(tiny, tmp_path):
    path = tmp_path / "p3.gguf"
    quantize_model(QuantizeConfig(tiny("default")[1], path, "F32", error_rows=0))
    source = load_gguf(path)
    qkv = source.tensors["blk.1.attn_qkv.weight"]
    rows = qkv.shape[0] - HEAD_DIM  # a key/value head short of its value rows
    cut = TensorRef(qkv.name, qkv.ggml_type, (rows, qkv.shape[1]), rows * qkv.shape[1] * 4,
                    qkv.read_bytes)
    bad = dataclasses.replace(source, tensors=source.tensors | {qkv.name: cut})
    with pytest.raises(LlmpressError, match=r"layer 1: kv = \(qkv - q\) / 2 = 96 .* is not a "
                                            r"positive multiple of head_dim 64"):
        config_from_source(bad, ("phi3",))


def test_bad_longrope_config_is_one_clear_error(tiny, tmp_path):
    directory = tiny("longrope")[1]
    for name in ("config.json", "model.safetensors"):
        shutil.copy(directory / name, tmp_path / name)
    config = json.loads((directory / "config.json").read_text())
    config["rope_parameters"]["long_factor"] = [1.0, 2.0]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlmpressError, match=r"rope_parameters\.long_factor must list 24 numbers"):
        load_hf_dir(tmp_path)

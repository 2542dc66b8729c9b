"""Hugging Face directories -> llmpress: logits and greedy tokens equal transformers'.

Tiny random models (hidden 64, 4 heads / 2 KV heads, vocab 300) are built here with
transformers, saved with save_pretrained and loaded back through llmpress.io.hf. The
reference is transformers itself in float32 with eager attention; the name map is checked
against gguf-py's own TensorNameMap.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from llmpress.errors import LlmpressError
from llmpress.io import names
from llmpress.io.hf import load_hf_dir, permute_qk, unpermute_qk
from llmpress.io.source import ModelSource, TensorRef
from llmpress.models.llama import LlamaModel

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, PREFILL, GREEDY_STEPS = 300, 48, 10, 64


@dataclass(frozen=True)
class Case:
    model_type: str
    config: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32  # dtype of the saved checkpoint
    shard: str | None = None  # save_pretrained max_shard_size: several files + index


BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "bos_token_id": None,
        "eos_token_id": None, "pad_token_id": None, "initializer_range": 0.1}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
CASES = {
    "llama": Case("llama"),
    "llama-tied": Case("llama", {"tie_word_embeddings": True}),
    "llama3-rope": Case("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama-linear-rope": Case("llama", {"rope_parameters": {"rope_type": "linear",
                                                            "rope_theta": 10000.0,
                                                            "factor": 4.0}}),
    "llama-bf16-sharded": Case("llama", {}, torch.bfloat16, shard="40KB"),
    "mistral": Case("mistral", {"head_dim": 16}),
    "qwen2": Case("qwen2", {"tie_word_embeddings": True}),
    "qwen3": Case("qwen3", {"head_dim": 32}),  # head_dim != hidden / heads
}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
           "mistral": ("MistralConfig", "MistralForCausalLM"),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """transformers initializes norms to 1 and biases to 0; make every weight matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)


def build_hf_model(case: Case, directory: Path, seed: int = 0):
    """-> (transformers model in float32 with the saved checkpoint's exact values, dir)."""
    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[case.model_type])
    config = config_cls(**{**BASE, **case.config})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize(model, seed)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    save_kw = {"max_shard_size": case.shard} if case.shard else {}
    if case.dtype == torch.float32:
        model.save_pretrained(directory, **save_kw)
        return model, directory
    # The reference keeps float32 buffers (RoPE inv_freq) and the checkpoint's rounded weights.
    copy.deepcopy(model).to(case.dtype).save_pretrained(directory, **save_kw)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(case.dtype).float())
    return model, directory


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build_hf_model(CASES[name], tmp_path_factory.mktemp(name))
        return built[name]
    return get


def random_tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits[0].float()


def our_logits(model: LlamaModel, ids: torch.Tensor, pieces: list[int] | None = None):
    """Logits of every position; `pieces` feeds the sequence through the cache in chunks."""
    cache = model.new_cache(ids.shape[1])
    pieces = pieces or [ids.shape[1]]
    out, start = [], 0
    for n in pieces:
        out.append(model(ids[:, start:start + n], cache)[0])
        start += n
    return torch.cat(out)


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    # float32 parity: differences come only from summation order (~1e-6 of the scale)
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4 * scale, f"max |ours - transformers| = {diff:.3g} (scale {scale:.3g})"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


# --- logits --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(hf_models, case):
    hf, path = hf_models(case)
    ours = LlamaModel(load_hf_dir(path), mode="exact")
    ids = random_tokens(SEQ)
    ref = hf_logits(hf, ids)
    assert_logits_close(our_logits(ours, ids), ref)
    # the same through the KV cache: a prefill, then one token at a time
    pieces = [PREFILL] + [1] * (SEQ - PREFILL)
    assert_logits_close(our_logits(ours, ids, pieces), ref)


@pytest.mark.parametrize("case", ["llama", "llama3-rope", "qwen2", "qwen3"])
def test_greedy_tokens_match_transformers(hf_models, case):
    hf, path = hf_models(case)
    ours = LlamaModel(load_hf_dir(path), mode="exact")
    prompt = random_tokens(PREFILL, seed=2)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=GREEDY_STEPS, do_sample=False,
                          attention_mask=torch.ones_like(prompt))[0, PREFILL:].tolist()
    cache = ours.new_cache(PREFILL + GREEDY_STEPS)
    logits = ours(prompt, cache, last_only=True)
    tokens = []
    for _ in range(GREEDY_STEPS):
        tokens.append(int(logits[0, -1].argmax()))
        logits = ours(torch.tensor([[tokens[-1]]]), cache)
    assert len(ref) == GREEDY_STEPS
    assert tokens == ref


def test_llama3_rope_factors_reproduce_transformers_frequencies(hf_models):
    hf, path = hf_models("llama3-rope")
    src = load_hf_dir(path)
    factors = src.tensors["rope_freqs.weight"].read_bytes().view(torch.float32)
    hd, theta = 16, LLAMA3_ROPE["rope_theta"]
    plain = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    reference = hf.model.rotary_emb.inv_freq.float()
    torch.testing.assert_close(plain / factors, reference, rtol=1e-6, atol=0)
    assert (factors > 1).any() and (factors == 1).any()  # the test spans all three bands


def test_linear_rope_scaling_becomes_metadata(hf_models):
    src = load_hf_dir(hf_models("llama-linear-rope")[1])
    assert src.metadata["llama.rope.scaling.type"] == "linear"
    assert src.metadata["llama.rope.scaling.factor"] == 4.0


# --- conversion details ------------------------------------------------------------------
def test_tensor_names_agree_with_gguf_py():
    """Every entry of our map is what gguf-py's TensorNameMap says for the HF name."""
    arch_enum = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
                 "qwen3": gguf.MODEL_ARCH.QWEN3}
    hf_names = [f"{p}.{kind}" for p in names.HF_TO_GGUF_GLOBAL for kind in ("weight", "bias")]
    hf_names += [f"model.layers.7.{p}.{kind}" for p in names.HF_TO_GGUF_BLOCK
                 for kind in ("weight", "bias")]
    for arch, enum in arch_enum.items():
        reference = gguf.get_tensor_name_map(enum, 8)
        for hf_name in hf_names:
            expected = reference.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if expected is None:  # a tensor this architecture does not have
                continue
            assert names.gguf_tensor_name(hf_name) == expected, (arch, hf_name)
            assert names.hf_tensor_name(expected) == hf_name
    assert names.gguf_tensor_name("model.layers.0.mlp.weird.weight") is None


def test_metadata_keys_are_gguf_keys(hf_models):
    known = {getattr(group, k).replace("{arch}", "llama") for group in
             (gguf.Keys.General, gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope)
             for k in dir(group) if k.isupper()}
    src = load_hf_dir(hf_models("llama3-rope")[1])
    assert set(src.metadata) <= known, set(src.metadata) - known
    assert src.metadata["llama.rope.freq_base"] == LLAMA3_ROPE["rope_theta"]


def test_qk_permutation_is_convert_hf_to_gguf_layout():
    """Head h's rows [a0..a{d/2-1}, b0..] become [a0, b0, a1, b1, ...]; inverse restores."""
    heads, hd = 3, 8
    w = torch.arange(heads * hd * 5, dtype=torch.float32).view(heads * hd, 5)
    permuted = permute_qk(w, heads)
    for h in range(heads):
        rows = w[h * hd:(h + 1) * hd]
        interleaved = torch.stack((rows[: hd // 2], rows[hd // 2:]), dim=1).reshape(hd, 5)
        assert torch.equal(permuted[h * hd:(h + 1) * hd], interleaved)
    assert torch.equal(unpermute_qk(permuted, heads), w)
    bias = torch.arange(heads * hd, dtype=torch.float32)
    assert torch.equal(unpermute_qk(permute_qk(bias, heads), heads), bias)


def test_lazy_and_typed(hf_models):
    """BF16 stays BF16 (2 bytes a value) and nothing is read before read_bytes()."""
    src = load_hf_dir(hf_models("llama-bf16-sharded")[1])
    assert (src.path / "model.safetensors.index.json").is_file()
    q = src.tensors["blk.1.attn_q.weight"]
    assert q.ggml_type == gguf.GGMLQuantizationType.BF16
    assert q.n_bytes == 64 * 64 * 2 == q.read_bytes().numel()
    assert "output.weight" in src.tensors and "rope_freqs.weight" not in src.tensors
    tied = load_hf_dir(hf_models("qwen2")[1])
    assert "output.weight" not in tied.tensors and "blk.0.attn_q.bias" in tied.tensors


# --- per-layer widths (pruned heads and FFN channels) --------------------------------------
def source_from_tensors(metadata: dict, tensors: dict[str, torch.Tensor]) -> ModelSource:
    """An in-memory GGUF-style source: every tensor stored as F32."""
    refs = {}
    for name, t in tensors.items():
        data = t.detach().float().contiguous()
        refs[name] = TensorRef(name, gguf.GGMLQuantizationType.F32, tuple(data.shape),
                               data.numel() * 4,
                               lambda d=data: d.view(-1).view(torch.uint8))
    return ModelSource(Path("<memory>"), dict(metadata), refs, 0)


def dense_tensors(src: ModelSource) -> dict[str, torch.Tensor]:
    from llmpress.formats import get_format
    return {n: get_format(r.ggml_type).dequantize(r.read_bytes(), r.shape).clone()
            for n, r in src.tensors.items()}


def test_per_layer_widths_equal_masked_model(hf_models):
    """Pruning half the FFN channels of layer 0, one query head per KV group in layer 1 and
    a whole KV group in layer 2 gives the same logits as zeroing them in the full model."""
    hf, path = hf_models("llama")
    full = load_hf_dir(path)
    hd, n_heads = 16, 4
    weights = dense_tensors(full)
    keep_ch = torch.randperm(128, generator=torch.Generator().manual_seed(3))[:64].sort().values
    drop_ch = torch.tensor(sorted(set(range(128)) - set(keep_ch.tolist())))
    keep_heads = {1: [0, 2], 2: [0, 1]}  # layer -> kept query heads
    keep_kv = {1: [0, 1], 2: [0]}

    def rows(heads: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])

    masked = {n: t.clone() for n, t in weights.items()}
    masked["blk.0.ffn_down.weight"][:, drop_ch] = 0
    for layer, kept in keep_heads.items():
        dropped = [h for h in range(n_heads) if h not in kept]
        masked[f"blk.{layer}.attn_output.weight"][:, rows(dropped)] = 0

    pruned = dict(weights)
    pruned["blk.0.ffn_gate.weight"] = weights["blk.0.ffn_gate.weight"][keep_ch]
    pruned["blk.0.ffn_up.weight"] = weights["blk.0.ffn_up.weight"][keep_ch]
    pruned["blk.0.ffn_down.weight"] = weights["blk.0.ffn_down.weight"][:, keep_ch]
    for layer, kept in keep_heads.items():
        p = f"blk.{layer}."
        pruned[p + "attn_q.weight"] = weights[p + "attn_q.weight"][rows(kept)]
        pruned[p + "attn_output.weight"] = weights[p + "attn_output.weight"][:, rows(kept)]
        for kv in ("attn_k.weight", "attn_v.weight"):
            pruned[p + kv] = weights[p + kv][rows(keep_kv[layer])]
    meta = dict(full.metadata)
    meta["llama.attention.head_count"] = [4, 2, 2]  # per-layer arrays, as GGUF allows
    meta["llama.attention.head_count_kv"] = [2, 2, 1]
    meta["llama.feed_forward_length"] = [64, 128, 128]

    pruned_model = LlamaModel(source_from_tensors(meta, pruned), mode="exact")
    assert [(lc.n_heads, lc.n_kv_heads, lc.ffn_dim) for lc in pruned_model.cfg.layers] == \
        [(4, 2, 64), (2, 2, 128), (2, 1, 128)]
    masked_model = LlamaModel(source_from_tensors(full.metadata, masked), mode="exact")
    ids = random_tokens(SEQ, seed=4)
    reference = our_logits(masked_model, ids)
    assert_logits_close(our_logits(pruned_model, ids), reference)
    assert_logits_close(our_logits(pruned_model, ids, [PREFILL] + [1] * (SEQ - PREFILL)),
                        reference)
    # and the masked model is what transformers computes with the same weights zeroed
    with torch.no_grad():
        hf_masked = transformers.LlamaForCausalLM(hf.config).eval()
        hf_masked.load_state_dict(hf.state_dict())
        layers = hf_masked.model.layers
        layers[0].mlp.down_proj.weight[:, drop_ch] = 0
        for layer, kept in keep_heads.items():
            dropped = [h for h in range(n_heads) if h not in kept]
            layers[layer].self_attn.o_proj.weight[:, rows(dropped)] = 0
    assert_logits_close(reference, hf_logits(hf_masked, ids))
    assert not torch.allclose(reference, hf_logits(hf, ids), atol=1e-3)  # pruning did something


# --- text in, text out (llmpress.load on a directory with a tokenizer) ---------------------
def write_byte_level_tokenizer(directory: Path) -> None:
    """A byte-level BPE with 256 byte tokens + 44 merges = VOCAB ids, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = "the quick brown fox jumps over the lazy dog; hello world, hello there. "
    tok.train_from_iterator([text * 20, " ".join(str(i * 7919) for i in range(3000))], trainer)
    assert tok.get_vocab_size() == VOCAB
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}))


def test_load_directory_and_generate_like_transformers(hf_models):
    import llmpress
    hf, path = hf_models("qwen3")
    write_byte_level_tokenizer(path)
    lm = llmpress.load(path, mode="exact", device="cpu")
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    prompt = "the lazy dog says hello"
    ids = hf_tok(prompt)["input_ids"]
    assert lm.encode(prompt) == ids
    torch.testing.assert_close(lm.logits(ids), hf_logits(hf, torch.tensor([ids])),
                               rtol=0, atol=1e-4 * hf_logits(hf, torch.tensor([ids])).abs().max())
    out = lm.generate(prompt, max_tokens=GREEDY_STEPS, temperature=0)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=GREEDY_STEPS, do_sample=False,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert out.token_ids == ref[0, len(ids):].tolist()
    assert out.text == hf_tok.decode(out.token_ids)


# --- bad input: one clear line -------------------------------------------------------------
def _copy_model(src_dir: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src_dir.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _edit_weights(directory: Path, edit) -> None:
    weights = load_file(directory / "model.safetensors")
    edit(weights)
    save_file(weights, directory / "model.safetensors")


@pytest.mark.parametrize("breakage, message", [
    ("no_config", "no config.json"),
    ("bad_json", "not valid JSON"),
    ("model_type", "model_type 'gpt2' is not supported"),
    ("missing_key", "lacks hidden_size"),
    ("missing_tensor", "model.layers.1.mlp.up_proj.weight is missing"),
    ("missing_lm_head", "lm_head.weight is missing"),
    ("shape", "has shape [128, 63], but config.json implies [128, 64]"),
    ("dtype", "has dtype F64"),
    ("unknown_tensor", "model.layers.0.mlp.extra.weight has no GGUF equivalent"),
    ("extra_layer", "belongs to layer 3"),
    ("no_weights", "no *.safetensors files"),
    ("rope", "RoPE scaling 'yarn' is not supported"),
    ("corrupt", "not a readable safetensors file"),
    ("theta", "rope_theta must be a positive number, not 'big'"),
    ("index", "model.layers.0.mlp.gate.weight in model.safetensors, which does not hold it"),
])
def test_bad_directories_raise_one_line(hf_models, tmp_path, breakage, message):
    d = _copy_model(hf_models("llama")[1], tmp_path / "model")
    name = "model.layers.1.mlp.up_proj.weight"
    if breakage == "no_config":
        (d / "config.json").unlink()
    elif breakage == "bad_json":
        (d / "config.json").write_text("{not json")
    elif breakage == "model_type":
        _edit_config(d, model_type="gpt2")
    elif breakage == "missing_key":
        config = json.loads((d / "config.json").read_text())
        del config["hidden_size"]
        (d / "config.json").write_text(json.dumps(config))
    elif breakage == "missing_tensor":
        _edit_weights(d, lambda w: w.pop(name))
    elif breakage == "missing_lm_head":
        _edit_weights(d, lambda w: w.pop("lm_head.weight"))
    elif breakage == "shape":
        _edit_weights(d, lambda w: w.update({name: w[name][:, :63].contiguous()}))
    elif breakage == "dtype":
        _edit_weights(d, lambda w: w.update({name: w[name].double()}))
    elif breakage == "unknown_tensor":
        _edit_weights(d, lambda w: w.update({"model.layers.0.mlp.extra.weight": w[name].clone()}))
    elif breakage == "extra_layer":
        _edit_weights(d, lambda w: w.update({"model.layers.3.mlp.up_proj.weight": w[name].clone()}))
    elif breakage == "no_weights":
        (d / "model.safetensors").unlink()
    elif breakage == "rope":
        _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    elif breakage == "theta":
        _edit_config(d, rope_parameters={"rope_type": "default", "rope_theta": "big"})
    elif breakage == "corrupt":
        (d / "model.safetensors").write_bytes(b"\xff" * 64)
    elif breakage == "index":
        weight_map = dict.fromkeys(load_file(d / "model.safetensors"), "model.safetensors")
        weight_map["model.layers.0.mlp.gate.weight"] = "model.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(LlmpressError) as info:
        load_hf_dir(d)
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_not_a_directory_is_refused(tmp_path):
    with pytest.raises(LlmpressError, match="not a directory"):
        load_hf_dir(tmp_path / "absent")


def test_config_defaults_for_older_checkpoints(hf_models, tmp_path):
    """transformers 4.x omitted keys equal to the class defaults (num_key_value_heads,
    head_dim, rope_theta, rms_norm_eps, tie_word_embeddings); they are filled in."""
    d = _copy_model(hf_models("llama")[1], tmp_path / "model")
    config = json.loads((d / "config.json").read_text())
    for key in ("head_dim", "rope_parameters", "tie_word_embeddings"):
        config.pop(key, None)
    config["rope_theta"] = 10000.0  # 4.x spelling
    (d / "config.json").write_text(json.dumps(config))
    meta = load_hf_dir(d).metadata
    assert meta["llama.attention.key_length"] == 16
    assert meta["llama.rope.freq_base"] == 10000.0
    assert math.isclose(meta["llama.attention.layer_norm_rms_epsilon"], 1e-5)

"""Hugging Face model directories (config.json + *.safetensors) as a ModelSource.

The directory is converted on the fly into what convert_hf_to_gguf.py would write: GGUF
tensor names and metadata keys (llmpress.io.names), q/k rows permuted for llama.cpp's
RoPE layout, llama3 RoPE scaling turned into a `rope_freqs.weight` tensor (Phi-3's
LongRoPE into `rope_factors_long/short.weight`), each mixture-of-experts layer's experts
stacked into 3-D `ffn_*_exps` tensors, and the tokenizer's tokenizer.* keys
(llmpress.io.hf_vocab). Of the weights nothing is read up
front but the safetensors headers: each tensor's bytes are read (and permuted)
when its read_bytes() is called. F32/F16/BF16 stay in their own type.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType
from safetensors import SafetensorError, safe_open

from llmpress.errors import LlmpressError
from llmpress.io import names
from llmpress.io.files import read_json_file
from llmpress.io.hf_vocab import tokenizer_metadata
from llmpress.io.source import ModelSource, TensorRef
from llmpress.io.tokenizer import engine_errors

# safetensors dtype -> (GGML type, torch dtype). Other dtypes (F64, int, FP8) are refused.
SAFETENSORS_TYPES = {
    "F32": (GGMLQuantizationType.F32, torch.float32),
    "F16": (GGMLQuantizationType.F16, torch.float16),
    "BF16": (GGMLQuantizationType.BF16, torch.bfloat16),
}

# Block tensors every layer must have, and those the runtime takes when all layers have them.
REQUIRED_BLOCK_TENSORS = frozenset({
    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
    "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
    "ffn_down.weight",
})
DENSE_FFN_TENSORS = frozenset({"ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"})
EXPERT_TENSORS = frozenset({"ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight",
                            "ffn_down_exps.weight"})
SHARED_EXPERT_TENSORS = frozenset({"ffn_gate_inp_shexp.weight", "ffn_gate_shexp.weight",
                                   "ffn_up_shexp.weight", "ffn_down_shexp.weight"})
PHI3_BLOCK_TENSORS = frozenset({"attn_norm.weight", "attn_qkv.weight", "attn_output.weight",
                                "ffn_norm.weight", "ffn_up.weight", "ffn_down.weight"})
SQUEEZED = ("ffn_gate_inp_shexp.weight",)  # (1, dim) in HF checkpoints, (dim,) in GGUF
OPTIONAL_BLOCK_TENSORS = frozenset({
    "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_q_norm.weight", "attn_k_norm.weight",
})


# --- config.json -> GGUF metadata --------------------------------------------------------
def read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not path.is_dir():
        raise LlmpressError(f"{path}: not a directory")
    if not config_path.is_file():
        raise LlmpressError(f"{path}: no config.json; a Hugging Face model directory needs "
                            "config.json next to its *.safetensors files")
    config = read_json_file(config_path)
    if not isinstance(config, dict):
        raise LlmpressError(f"{config_path}: expected a JSON object")
    return config


def hyperparameters(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """config.json with defaults filled in and types checked; keys stay HF's."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in names.HF_MODEL_TYPE_TO_ARCH:
        supported = ", ".join(names.HF_MODEL_TYPE_TO_ARCH)
        raise LlmpressError(f"{where}: model_type {model_type!r} is not supported "
                            f"(supported: {supported})")
    missing = [k for k in names.HF_REQUIRED_CONFIG_KEYS if config.get(k) is None]
    if missing:
        raise LlmpressError(f"{where}: config.json lacks {', '.join(missing)}")
    hp = dict(names.HF_CONFIG_DEFAULTS[model_type])
    hp.update({k: v for k, v in config.items() if v is not None})
    _check_positive_ints(hp, names.HF_REQUIRED_CONFIG_KEYS, where)  # before any arithmetic
    hp.setdefault("num_key_value_heads", hp["num_attention_heads"])
    hp.setdefault("head_dim", hp["hidden_size"] // hp["num_attention_heads"])
    _check_positive_ints(hp, ("num_key_value_heads", "head_dim", "max_position_embeddings"),
                         where)
    if hp["num_attention_heads"] % hp["num_key_value_heads"]:
        raise LlmpressError(f"{where}: num_attention_heads {hp['num_attention_heads']} is not "
                            f"a multiple of num_key_value_heads {hp['num_key_value_heads']}")
    arch = names.HF_MODEL_TYPE_TO_ARCH[model_type]
    act = hp.get("hidden_activation") or hp.get("hidden_act", "silu")
    if act != (wanted := names.HF_ACTIVATION.get(arch, "silu")):
        raise LlmpressError(f"{where}: hidden_act {act!r} is not supported (only {wanted})")
    if arch in names.NORM_PLUS_ONE_ARCHS:
        gemma_hyperparameters(hp, where)
    if model_type in names.HF_MOE_MODEL_TYPES:
        moe_hyperparameters(hp, arch, where)
    rope = rope_parameters(hp)
    hp["rope_dim"] = hp["head_dim"]
    if arch == "phi3":
        phi3_rope(hp, rope, where)
    hp["rope_theta"] = positive_number(rope.get("rope_theta", hp["rope_theta"]), "rope_theta",
                                       where)
    hp["rms_norm_eps"] = positive_number(hp["rms_norm_eps"], "rms_norm_eps", where)
    for key in ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"):
        if key in rope:
            rope[key] = positive_number(rope[key], f"rope_parameters.{key}", where)
    hp["rope"] = rope
    return hp


def gemma_hyperparameters(hp: dict[str, Any], where: Path) -> None:
    """Gemma's keys checked and normalized in place: one RoPE base per layer type, the
    query scale the GGUF implies (llama.cpp: 1/sqrt(head_dim)), the local layers."""
    rope = hp.get("rope_parameters")
    if isinstance(rope, dict) and "full_attention" in rope:  # transformers 5: per layer type
        local = rope.get("sliding_attention") or {}
        if str(local.get("rope_type", "default")) != "default":
            raise LlmpressError(f"{where}: RoPE scaling on the sliding-window layers is not "
                                "supported")
        hp["rope_local_base_freq"] = local.get("rope_theta", hp.get("rope_local_base_freq"))
        hp["rope_parameters"] = rope["full_attention"]
    if hp.get("rope_local_base_freq") is not None:
        hp["rope_local_base_freq"] = positive_number(hp["rope_local_base_freq"],
                                                     "rope_local_base_freq", where)
    types = hp.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != hp["num_hidden_layers"]
                              or set(types) - {"sliding_attention", "full_attention"}):
        raise LlmpressError(f"{where}: config.json layer_types must list sliding_attention "
                            "or full_attention for each layer")


def moe_hyperparameters(hp: dict[str, Any], arch: str, where: Path) -> None:
    """A mixture of experts' keys checked, in place: the expert count as num_experts, the
    routing llama.cpp hard-codes for the architecture, every layer sparse."""
    if hp.get("num_experts") is None:
        hp["num_experts"] = hp.get("num_local_experts")
    wanted = ["num_experts", "num_experts_per_tok"]
    if hp["model_type"] in ("qwen2_moe", "qwen3_moe"):  # the others: intermediate_size
        wanted.append("moe_intermediate_size")
    if hp["model_type"] == "qwen2_moe":
        wanted.append("shared_expert_intermediate_size")
    for key in wanted:
        if hp.get(key) is None:
            raise LlmpressError(f"{where}: config.json lacks {key}")
    _check_positive_ints(hp, wanted, where)
    n, used = hp["num_experts"], hp["num_experts_per_tok"]
    if n > names.MAX_EXPERTS or used > n:
        raise LlmpressError(f"{where}: config.json has {n} experts and {used} per token; at "
                            f"most {names.MAX_EXPERTS} experts, and at most all per token")
    normalizes = names.MOE_NORMALIZES_TOP_K[arch]
    if bool(hp.get("norm_topk_prob", normalizes)) != normalizes:
        raise LlmpressError(f"{where}: config.json norm_topk_prob {hp['norm_topk_prob']} "
                            f"differs from what {arch} files compute in llama.cpp ({normalizes})")
    if hp["model_type"] == "olmoe" and (hp.get("clip_qkv") is not None or
                                        hp["num_key_value_heads"] != hp["num_attention_heads"]):
        # llama.cpp's olmoe graph clips nothing, and its k norm is as wide as q
        raise LlmpressError(f"{where}: OLMoE with clip_qkv or grouped-query attention "
                            "(num_key_value_heads < num_attention_heads) is not supported")
    if hp.get("decoder_sparse_step", 1) != 1 or hp.get("mlp_only_layers"):
        raise LlmpressError(f"{where}: dense layers among the expert layers "
                            "(decoder_sparse_step, mlp_only_layers) are not supported")


def phi3_rope(hp: dict[str, Any], rope: dict[str, Any], where: Path) -> None:
    """Phi-3's RoPE checked, in place, as convert_hf_to_gguf's Phi3MiniModel reads it: the
    rotated share of each head, the training context, LongRoPE's factors and attention
    factor (from max / original context, whatever config.json's `factor` says)."""
    share = rope.get("partial_rotary_factor", hp.get("partial_rotary_factor", 1.0))
    share = positive_number(share, "partial_rotary_factor", where)
    hp["rope_dim"] = int(share * hp["hidden_size"]) // hp["num_attention_heads"]
    if hp["rope_dim"] % 2 or not 0 < hp["rope_dim"] <= hp["head_dim"]:
        raise LlmpressError(f"{where}: partial_rotary_factor {share} rotates {hp['rope_dim']} "
                            f"dimensions of {hp['head_dim']}; needs an even number, at least 2")
    original = rope.get("original_max_position_embeddings",
                        hp["original_max_position_embeddings"])
    hp["original_max_position_embeddings"] = original
    _check_positive_ints(hp, ("original_max_position_embeddings",), where)
    if rope["rope_type"] != "longrope":
        return
    for key in ("short_factor", "long_factor"):
        factors = rope.get(key)
        if not isinstance(factors, list) or len(factors) != hp["rope_dim"] // 2:
            raise LlmpressError(f"{where}: config.json rope_parameters.{key} must list "
                                f"{hp['rope_dim'] // 2} numbers (one per rotated pair)")
        rope[key] = [positive_number(f, f"rope_parameters.{key}", where) for f in factors]
    scale = hp["max_position_embeddings"] / original
    hp["rope_attn_factor"] = (math.sqrt(1 + math.log(scale) / math.log(original))
                              if scale > 1 else 1.0)


def _check_positive_ints(hp: dict[str, Any], keys, where: Path) -> None:
    for key in keys:
        if not isinstance(hp[key], int) or isinstance(hp[key], bool) or hp[key] <= 0:
            raise LlmpressError(f"{where}: config.json {key} must be a positive integer, "
                                f"not {hp[key]!r}")


def positive_number(value: Any, key: str, where: Path) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
            or not math.isfinite(value)):
        raise LlmpressError(f"{where}: config.json {key} must be a positive number, "
                            f"not {value!r}")
    return float(value)


def rope_parameters(hp: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from transformers 5 `rope_parameters` or 4.x `rope_scaling`."""
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        return {"rope_type": "default"}
    rope = dict(rope)
    rope["rope_type"] = str(rope.get("rope_type", rope.get("type", "default"))).lower()
    return rope


def gguf_metadata(hp: dict[str, Any], arch: str, name: str, where: Path) -> dict[str, Any]:
    """The GGUF keys convert_hf_to_gguf writes for this architecture (tokenizer aside)."""
    meta: dict[str, Any] = {"general.architecture": arch, "general.name": name}
    for hf_key, gguf_key in names.HF_CONFIG_TO_GGUF.items():
        meta[f"{arch}.{gguf_key}"] = hp[hf_key]
    meta[f"{arch}.attention.value_length"] = hp["head_dim"]
    meta[f"{arch}.rope.dimension_count"] = hp.get("rope_dim", hp["head_dim"])
    rope_type = hp["rope"]["rope_type"]
    if arch == "phi3":
        meta[f"{arch}.rope.scaling.original_context_length"] = (
            hp["original_max_position_embeddings"])
        if rope_type == "longrope":  # its factors are the rope_factors_* tensors
            meta[f"{arch}.rope.scaling.attn_factor"] = hp["rope_attn_factor"]
    if rope_type == "linear":
        if "factor" not in hp["rope"]:
            raise LlmpressError(f"{where}: linear RoPE scaling without a factor in config.json")
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = hp["rope"]["factor"]
    elif rope_type == "llama3":
        if arch != "llama":
            raise LlmpressError(f"{where}: llama3 RoPE scaling on a {arch} model is not supported")
    elif rope_type != "default" and not (rope_type == "longrope" and arch == "phi3"):
        raise LlmpressError(f"{where}: RoPE scaling {rope_type!r} is not supported "
                            "(default, linear, llama3 and Phi-3's longrope are)")
    for hf_key, gguf_key in names.HF_MOE_CONFIG_TO_GGUF.items():
        if hp["model_type"] in names.HF_MOE_MODEL_TYPES and hp.get(hf_key) is not None:
            meta[f"{arch}.{gguf_key}"] = hp[hf_key]
    if arch in names.NORM_PLUS_ONE_ARCHS:
        for hf_key, gguf_key in names.HF_GEMMA_CONFIG_TO_GGUF.items():
            if hp.get(hf_key) is not None:
                meta[f"{arch}.{gguf_key}"] = hp[hf_key]
        if hp.get("rope_local_base_freq") is not None:
            meta[f"{arch}.rope.freq_base_swa"] = hp["rope_local_base_freq"]
        if hp.get("layer_types") is not None:  # llama.cpp reads per-layer flags, true = local
            meta[f"{arch}.attention.sliding_window_pattern"] = [
                t == "sliding_attention" for t in hp["layer_types"]]
    return meta


def llama3_rope_factors(hp: dict[str, Any]) -> torch.Tensor:
    """Per-frequency divisors for llama3 RoPE scaling, float32 (head_dim/2,).

    As convert_hf_to_gguf's LlamaModel.generate_extra_tensors: high frequencies keep 1,
    low ones get `factor`, and the band between blends smoothly; ggml_rope_ext divides each
    frequency by its factor.
    """
    rope, dim = hp["rope"], hp["head_dim"]
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (hp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen > old_context / low, torch.full_like(freqs, factor), blended)
    return torch.where(wavelen < old_context / high, torch.ones_like(freqs), factors)


# --- q/k layout --------------------------------------------------------------------------
def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (x[i], x[i+d/2]) rotary pairs -> llama.cpp (x[2i], x[2i+1]) pairs, per head.

    convert_hf_to_gguf's LlamaModel.permute: rows of each head go from [half A, half B] to
    interleaved A0 B0 A1 B1 ... Works for weights (rows, in) and biases (rows,).
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_qk (GGUF llama layout -> HF layout)."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


# --- safetensors files -------------------------------------------------------------------
def safetensors_files(path: Path) -> tuple[dict[str, Path], dict[Path, Any]]:
    """(HF tensor name -> the file holding it, file -> open safe_open handle).

    The index decides where there is one; otherwise every *.safetensors file is listed.
    Each handle memory-maps its file once; the closures of read_bytes() keep it open.
    """
    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = read_json_file(index_path)["weight_map"]
            located = {str(name): path / str(file) for name, file in weight_map.items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise LlmpressError(f"{index_path}: not a valid safetensors index ({exc})") from None
        for file in set(located.values()):
            if not file.is_file():
                raise LlmpressError(f"{index_path}: lists {file.name}, which is missing "
                                    "(incomplete download?)")
        handles = {file: _open(file) for file in sorted(set(located.values()))}
        stored = {file: set(handle.keys()) for file, handle in handles.items()}
        for name, file in located.items():
            if name not in stored[file]:
                raise LlmpressError(f"{index_path}: lists tensor {name} in {file.name}, "
                                    "which does not hold it")
        return located, handles
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = " (PyTorch .bin checkpoints are not supported)" if any(path.glob("*.bin")) else ""
        raise LlmpressError(f"{path}: no *.safetensors files{hint}")
    handles = {file: _open(file) for file in files}
    located = {}
    for file, handle in handles.items():
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            if name in located:
                raise LlmpressError(f"{path}: tensor {name} is in both {located[name].name} "
                                    f"and {file.name}")
            located[name] = file
    return located, handles


def _open(file: Path) -> Any:
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise LlmpressError(f"{file}: not a readable safetensors file ({exc})") from None


def tensor_reader(handle: Any, hf_name: str, permute_heads: int | None,
                  plus_one: bool = False) -> Callable[[], torch.Tensor]:
    def read_bytes() -> torch.Tensor:
        tensor = handle.get_tensor(hf_name)
        if permute_heads:
            tensor = permute_qk(tensor, permute_heads)
        if plus_one:  # Gemma's (1 + w) norm, in float32 as the converter writes norms
            tensor = tensor.float() + 1
        return tensor.contiguous().view(torch.uint8).reshape(-1)
    return read_bytes


def _dequantizing_reader(quantized: Any, handles, located, prefix: str, shape, heads: int | None,
                        where: Path) -> Callable[[], torch.Tensor]:
    def read_bytes() -> torch.Tensor:
        weight = quantized.read(handles, located, prefix, shape, where).dequantize()
        if heads:
            weight = permute_qk(weight, heads)
        return weight.contiguous().view(torch.uint8).reshape(-1)
    return read_bytes


def stacked_experts(gguf_name: str, parts: dict[int, tuple[Any, str, str]],
                    shape: tuple[int, ...], where: Path) -> TensorRef:
    """The experts' 2-D tensors as the 3-D tensor convert_hf_to_gguf writes: expert e is
    slice e. Every expert must be there, all in one dtype."""
    n_experts = shape[0]
    if missing := sorted(set(range(n_experts)) - set(parts)):
        _, hf_name, _ = next(iter(parts.values()))
        example = re.sub(r"\.experts\.\d+\.", f".experts.{missing[0]}.", hf_name)
        raise LlmpressError(f"{where}: tensor {example} is missing ({len(missing)} of "
                            f"{n_experts} experts' tensors; incomplete checkpoint?)")
    dtypes = {dtype for _, _, dtype in parts.values()}
    if len(dtypes) > 1:
        raise LlmpressError(f"{where}: the experts of {gguf_name} mix dtypes "
                            f"{', '.join(sorted(dtypes))}")
    ggml_type, torch_dtype = SAFETENSORS_TYPES[dtypes.pop()]

    def read_bytes() -> torch.Tensor:
        stacked = torch.stack([handle.get_tensor(hf_name)
                               for handle, hf_name, _ in (parts[e] for e in range(n_experts))])
        return stacked.view(torch.uint8).reshape(-1)
    return TensorRef(name=gguf_name, ggml_type=ggml_type, shape=shape,
                     n_bytes=math.prod(shape) * torch_dtype.itemsize, read_bytes=read_bytes)


# --- the expected tensors ----------------------------------------------------------------
def expected_shapes(hp: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor the runtime takes (block tensors as "blk.*.x") -> the torch-order shape
    config.json implies, as the GGUF file holds it."""
    dim, hd, vocab, ffn = hp["hidden_size"], hp["head_dim"], hp["vocab_size"], \
        hp["intermediate_size"]
    q_rows, kv_rows = hp["num_attention_heads"] * hd, hp["num_key_value_heads"] * hd
    block = {
        "attn_norm.weight": (dim,), "ffn_norm.weight": (dim,),
        "attn_q.weight": (q_rows, dim), "attn_q.bias": (q_rows,),
        "attn_k.weight": (kv_rows, dim), "attn_k.bias": (kv_rows,),
        "attn_v.weight": (kv_rows, dim), "attn_v.bias": (kv_rows,),
        "attn_output.weight": (dim, q_rows),
        "attn_q_norm.weight": (hd,), "attn_k_norm.weight": (hd,),
        "post_attention_norm.weight": (dim,), "post_ffw_norm.weight": (dim,),  # Gemma
        "ffn_gate.weight": (ffn, dim), "ffn_up.weight": (ffn, dim), "ffn_down.weight": (dim, ffn),
    }
    block["attn_qkv.weight"] = (q_rows + 2 * kv_rows, dim)  # Phi-3: q, k, v fused
    if hp["model_type"] == "olmoe":  # q/k norms over all heads, not per head
        block["attn_q_norm.weight"], block["attn_k_norm.weight"] = (q_rows,), (kv_rows,)
    if hp["model_type"] == "phi3":  # gate and up fused: gate rows, then up rows
        block["ffn_up.weight"] = (2 * ffn, dim)
    if hp["model_type"] in names.HF_MOE_MODEL_TYPES:  # experts: (n, rows, row_length)
        n, expert_ffn = hp["num_experts"], hp.get("moe_intermediate_size", ffn)
        shared = hp.get("shared_expert_intermediate_size", ffn)
        block |= {"ffn_gate_inp.weight": (n, dim), "ffn_gate_exps.weight": (n, expert_ffn, dim),
                  "ffn_up_exps.weight": (n, expert_ffn, dim),
                  "ffn_down_exps.weight": (n, dim, expert_ffn),
                  "ffn_gate_inp_shexp.weight": (dim,),  # (1, dim) in HF: SQUEEZED
                  "ffn_gate_shexp.weight": (shared, dim), "ffn_up_shexp.weight": (shared, dim),
                  "ffn_down_shexp.weight": (dim, shared)}
    shapes = {f"blk.*.{k}": v for k, v in block.items()}
    shapes.update({"token_embd.weight": (vocab, dim), "output.weight": (vocab, dim),
                   "output_norm.weight": (dim,)})
    return shapes


def generic_name(gguf_name: str) -> tuple[str, int | None]:
    """"blk.3.ffn_up.weight" -> ("blk.*.ffn_up.weight", 3); globals -> (name, None)."""
    if gguf_name.startswith("blk."):
        _, block, rest = gguf_name.split(".", 2)
        return f"blk.*.{rest}", int(block)
    return gguf_name, None


def required_block_tensors(hp: dict[str, Any]) -> frozenset[str]:
    if hp["model_type"] == "phi3":
        return PHI3_BLOCK_TENSORS
    if hp["model_type"] == "qwen2_moe":
        return REQUIRED_BLOCK_TENSORS - DENSE_FFN_TENSORS | EXPERT_TENSORS | SHARED_EXPERT_TENSORS
    if hp["model_type"] in names.HF_MOE_MODEL_TYPES:
        return REQUIRED_BLOCK_TENSORS - DENSE_FFN_TENSORS | EXPERT_TENSORS
    return REQUIRED_BLOCK_TENSORS


def check_complete(tensors: dict[str, TensorRef], hp: dict[str, Any], where: Path) -> None:
    """Every layer has the same tensors (the required ones at least); globals are there."""
    arch, model_type = names.HF_MODEL_TYPE_TO_ARCH[hp["model_type"]], hp["model_type"]
    required = required_block_tensors(hp)
    if hp["num_hidden_layers"] * len(required) > len(tensors):
        raise LlmpressError(f"{where}: config.json num_hidden_layers is "
                            f"{hp['num_hidden_layers']}, but the checkpoint holds only "
                            f"{len(tensors)} tensors")
    per_layer: list[set[str]] = [set() for _ in range(hp["num_hidden_layers"])]
    for name in tensors:
        generic, block = generic_name(name)
        if block is not None:
            per_layer[block].add(generic)
    wanted = set().union(*per_layer) | {f"blk.*.{n}" for n in required}
    for i, have in enumerate(per_layer):
        if missing := sorted(wanted - have):
            hf = [names.hf_tensor_name(m.replace("*", str(i), 1), arch, model_type)
                  for m in missing]
            raise LlmpressError(f"{where}: tensor {', '.join(hf)} is missing "
                                "(incomplete checkpoint?)")
    for name in ("token_embd.weight", "output_norm.weight"):
        if name not in tensors:
            raise LlmpressError(f"{where}: tensor {names.hf_tensor_name(name, arch)} is missing")
    if not hp["tie_word_embeddings"] and "output.weight" not in tensors:
        raise LlmpressError(f"{where}: tensor lm_head.weight is missing and config.json "
                            "does not tie it to the embeddings")


# --- the loader --------------------------------------------------------------------------
def load_hf_dir(path: str | Path, quantized: Any = None) -> ModelSource:
    """A Hugging Face model directory (io.names.HF_MODEL_TYPE_TO_ARCH: the Llama family,
    its mixtures of experts, Gemma 2/3, Phi-3) as a lazy ModelSource: the one HF reader.

    Float weights by default. `quantized` (io.gptq_checkpoint.QuantizedLinears, which
    io.loader.load_source passes for a GPTQ/AWQ/compressed-tensors directory) reads the
    Linears stored as integers: float32 tensors dequantized on read; everything else,
    tokenizer keys included, is read as from a float directory."""
    path = Path(path)
    config = read_config(path)
    if quantized is None and (config.get("quantization_config")
                              or (path / "quantize_config.json").is_file()):
        raise LlmpressError(f"{path}: an integer-quantized checkpoint (GPTQ, AWQ or "
                            "compressed-tensors); float weights are needed here")
    hp = hyperparameters(config, path)
    arch = names.HF_MODEL_TYPE_TO_ARCH[hp["model_type"]]
    if arch in names.NORM_PLUS_ONE_ARCHS and hp["query_pre_attn_scalar"] != hp["head_dim"]:
        # the planner still sizes such models; only converting their weights is refused
        raise LlmpressError(f"{path}: query_pre_attn_scalar {hp['query_pre_attn_scalar']} "
                            f"differs from head_dim {hp['head_dim']}, which a GGUF file cannot "
                            "express")
    metadata = gguf_metadata(hp, arch, path.resolve().name, path)
    shapes = expected_shapes(hp)
    # convert_hf_to_gguf permutes q with the query head count and k with the KV head count.
    permute_heads = ({"attn_q": hp["num_attention_heads"], "attn_k": hp["num_key_value_heads"]}
                     if arch in names.PERMUTED_QK_ARCHS else {})

    located, handles = safetensors_files(path)
    # HF prefixes ("model.layers.0.mlp.up_proj.") of the Linears stored as integers
    packed = ({name[: -len(quantized.marker)] for name in located
               if name.endswith("." + quantized.marker)} if quantized is not None else set())
    tensors: dict[str, TensorRef] = {}
    experts: dict[str, dict[int, tuple[Any, str, str]]] = {}  # 3-D name -> e -> (handle, ...)
    for hf_name, file in located.items():
        prefix, _, leaf = hf_name.rpartition(".")
        if hf_name.endswith(names.HF_IGNORED_SUFFIXES) or (prefix + "." in packed
                                                            and leaf != "bias"):
            continue  # a quantized Linear's codes, scales, zeros: read as one below
        gguf_name = names.gguf_tensor_name(hf_name, arch, hp["model_type"])
        if prefix + "." in packed and (gguf_name is None or generic_name(gguf_name)[0]
                                       not in shapes):
            # AutoGPTQ stores a bias for every quantized Linear, zeros where there is none
            if not handles[file].get_tensor(hf_name).any():
                continue
        if gguf_name is None:
            raise LlmpressError(f"{file}: tensor {hf_name} has no GGUF equivalent for "
                                f"{hp['model_type']} models")
        if gguf_name == "output.weight" and hp["tie_word_embeddings"]:
            continue  # tied: the runtime reuses token_embd, as llama.cpp does
        generic, block = generic_name(gguf_name)
        if generic not in shapes:
            raise LlmpressError(f"{file}: tensor {hf_name} is not supported by the llmpress "
                                "runtime (biases on o_proj or the MLP?)")
        if block is not None and block >= hp["num_hidden_layers"]:
            raise LlmpressError(f"{file}: tensor {hf_name} belongs to layer {block}, but "
                                f"config.json has {hp['num_hidden_layers']} layers")
        info = handles[file].get_slice(hf_name)
        dtype_name, shape = info.get_dtype(), tuple(info.get_shape())
        if dtype_name not in SAFETENSORS_TYPES:
            raise LlmpressError(f"{file}: tensor {hf_name} has dtype {dtype_name}; "
                                "only F32, F16 and BF16 are supported")
        expert = names.expert_index(hf_name)
        wanted = shapes[generic]
        if expert is not None:  # one expert's matrix of the 3-D tensor
            wanted = wanted[1:]
        elif generic.endswith(SQUEEZED):
            wanted = (1, *wanted)
        if shape != wanted:
            raise LlmpressError(f"{file}: tensor {hf_name} has shape {list(shape)}, but "
                                f"config.json implies {list(wanted)}")
        if expert is not None:  # one slice of a 3-D tensor, stacked below
            if expert >= hp["num_experts"]:
                raise LlmpressError(f"{file}: tensor {hf_name} belongs to expert {expert}, "
                                    f"but config.json has {hp['num_experts']} experts")
            experts.setdefault(gguf_name, {})[expert] = (handles[file], hf_name, dtype_name)
            continue
        if generic.endswith(SQUEEZED):
            shape = shape[1:]  # (1, dim) -> (dim,), as convert_hf_to_gguf writes it
        ggml_type, torch_dtype = SAFETENSORS_TYPES[dtype_name]
        heads = permute_heads.get(generic.split(".")[2]) if block is not None else None
        plus_one = arch in names.NORM_PLUS_ONE_ARCHS and gguf_name.endswith("norm.weight")
        if plus_one:
            ggml_type, torch_dtype = SAFETENSORS_TYPES["F32"]
        tensors[gguf_name] = TensorRef(
            name=gguf_name, ggml_type=ggml_type, shape=shape,
            n_bytes=math.prod(shape) * torch_dtype.itemsize,
            read_bytes=tensor_reader(handles[file], hf_name, heads, plus_one))
    for gguf_name, parts in experts.items():
        tensors[gguf_name] = stacked_experts(gguf_name, parts, shapes[generic_name(gguf_name)[0]],
                                             path)
    for prefix in sorted(packed):
        gguf_name = names.gguf_tensor_name(prefix + "weight", arch, hp["model_type"])
        generic, block = generic_name(gguf_name) if gguf_name else (None, None)
        if generic not in shapes or names.expert_index(prefix + "weight") is not None:
            raise LlmpressError(f"{path}: quantized tensor {prefix}{quantized.marker} is not "
                                "a Linear llmpress runs")
        if gguf_name == "output.weight" and hp["tie_word_embeddings"]:
            continue
        shape = shapes[generic]
        # every quantized Linear's tensors are checked now: bad files fail at load, in one line
        quantized.read(handles, located, prefix, shape, path, shapes_only=True)
        heads = permute_heads.get(generic.split(".")[2]) if block is not None else None
        tensors[gguf_name] = TensorRef(
            gguf_name, GGMLQuantizationType.F32, shape, math.prod(shape) * 4,
            _dequantizing_reader(quantized, handles, located, prefix, shape, heads, path))
    check_complete(tensors, hp, path)
    # tokenizer.* keys as convert_hf_to_gguf writes them, so a converted file loads in
    # llama.cpp (the runtime itself tokenizes with tokenizer.json: Tokenizer.from_hf_dir).
    # Only now: vocab_size sizes its lists, and the embedding's shape has vouched for it.
    with engine_errors(path):
        metadata |= tokenizer_metadata(path, arch, hp["vocab_size"])

    extra = {}  # the float32 RoPE factor tensors convert_hf_to_gguf adds
    if hp["rope"]["rope_type"] == "llama3":
        extra["rope_freqs.weight"] = llama3_rope_factors(hp)  # (head_dim/2,)
    elif hp["rope"]["rope_type"] == "longrope":  # Phi-3: (rope_dim/2,) each
        extra["rope_factors_long.weight"] = torch.tensor(hp["rope"]["long_factor"])
        extra["rope_factors_short.weight"] = torch.tensor(hp["rope"]["short_factor"])
    for name, factors in extra.items():
        factors = factors.float().contiguous()
        tensors[name] = TensorRef(
            name=name, ggml_type=GGMLQuantizationType.F32, shape=tuple(factors.shape),
            n_bytes=factors.numel() * 4, read_bytes=lambda f=factors: f.view(torch.uint8))
    file_bytes = sum(file.stat().st_size for file in handles)
    return ModelSource(path=path, metadata=metadata, tensors=tensors, file_bytes=file_bytes)

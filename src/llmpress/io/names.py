"""Name maps between Hugging Face checkpoints and GGUF, as data.

The same tables serve both directions: loading an HF directory (HF -> GGUF names, the
vocabulary the runtime speaks) and writing one (GGUF -> HF). They follow what llama.cpp's
convert_hf_to_gguf.py writes for the Llama family (gguf-py's tensor_mapping.py and
constants.py hold the full lists).
"""

from __future__ import annotations

import re

# HF `model_type` in config.json -> GGUF `general.architecture`. Mistral checkpoints are
# Llama-shaped and llama.cpp writes them as "llama" (convert_hf_to_gguf's MistralModel).
HF_MODEL_TYPE_TO_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",  # Gemma3ForCausalLM: the text model of Gemma 3
    "mixtral": "llama",  # a Llama with experts (expert_count > 0)
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "phi3": "phi3",
    "olmoe": "olmoe",
}

# Architectures whose q/k rows convert_hf_to_gguf permutes (LlamaModel.permute): HF
# checkpoints rotate (x[i], x[i + d/2]) while llama.cpp's "norm" RoPE rotates (x[2i], x[2i+1]).
PERMUTED_QK_ARCHS = frozenset({"llama"})

# Whole-model tensors: HF prefix -> GGUF prefix (".weight"/".bias" carry over unchanged).
HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}

# Per-block tensors, relative to "model.layers.{i}." -> relative to "blk.{i}.".
HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",  # Qwen3
    "self_attn.k_norm": "attn_k_norm",  # Qwen3
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

# HF tensors that carry no weights llama.cpp needs (old checkpoints saved RoPE buffers).
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Gemma normalizes before and after attention and the FFN: its post_attention_layernorm
# is the attention's post-norm, and the FFN's pre-norm has a name of its own.
GEMMA_BLOCK = HF_TO_GGUF_BLOCK | {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# Mixtures of experts: the router and, per expert e, "experts.e.<part>" -> one slice of a
# 3-D GGUF tensor (written here with "*" for e; io/hf.py stacks the experts in order).
MIXTRAL_BLOCK = HF_TO_GGUF_BLOCK | {
    "block_sparse_moe.gate": "ffn_gate_inp",
    "block_sparse_moe.experts.*.w1": "ffn_gate_exps",
    "block_sparse_moe.experts.*.w3": "ffn_up_exps",
    "block_sparse_moe.experts.*.w2": "ffn_down_exps",
}
QWEN_MOE_BLOCK = HF_TO_GGUF_BLOCK | {
    "mlp.gate": "ffn_gate_inp",
    "mlp.experts.*.gate_proj": "ffn_gate_exps",
    "mlp.experts.*.up_proj": "ffn_up_exps",
    "mlp.experts.*.down_proj": "ffn_down_exps",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",  # Qwen2-MoE's shared expert
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",  # (1, dim) in HF, (dim,) in GGUF
}
# Phi-3 fuses q/k/v and gate/up into one matrix each; GGUF keeps them fused
PHI3_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_up_proj": "ffn_up",  # gate rows, then up rows
    "mlp.down_proj": "ffn_down",
}
# GGUF architecture -> its block map, where it is not HF_TO_GGUF_BLOCK. (Mixtral's GGUF
# architecture is "llama": its HF model_type picks MIXTRAL_BLOCK, see block_map.)
HF_TO_GGUF_BLOCK_BY_ARCH = {"gemma2": GEMMA_BLOCK, "gemma3": GEMMA_BLOCK,
                            "qwen2moe": QWEN_MOE_BLOCK, "qwen3moe": QWEN_MOE_BLOCK,
                            "olmoe": QWEN_MOE_BLOCK, "phi3": PHI3_BLOCK}
HF_TO_GGUF_BLOCK_BY_MODEL_TYPE = {"mixtral": MIXTRAL_BLOCK}

# Architectures whose RMSNorm multiplies by (1 + w): convert_hf_to_gguf writes w + 1 into
# every *norm.weight (Gemma's converters), so the GGUF holds plain RMSNorm weights.
NORM_PLUS_ONE_ARCHS = frozenset({"gemma2", "gemma3"})

# HF `hidden_act` / `hidden_activation` each architecture's FFN computes.
HF_ACTIVATION = {"gemma2": "gelu_pytorch_tanh", "gemma3": "gelu_pytorch_tanh"}  # others: silu

GGUF_TO_HF_GLOBAL = {v: k for k, v in HF_TO_GGUF_GLOBAL.items()}
GGUF_TO_HF_BLOCK = {v: k for k, v in HF_TO_GGUF_BLOCK.items()}

# HF config.json key -> GGUF metadata key, without the "{arch}." prefix.
HF_CONFIG_TO_GGUF = {
    "vocab_size": "vocab_size",
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "head_dim": "attention.key_length",
}
# Gemma's extra keys (written where config.json sets them)
HF_GEMMA_CONFIG_TO_GGUF = {
    "sliding_window": "attention.sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
}
GGUF_TO_HF_CONFIG = {v: k for k, v in HF_CONFIG_TO_GGUF.items()}
# Whether each MoE architecture renormalizes the router's top-k weights to sum to 1, as
# llama.cpp's graphs hard-code it (src/models/llama.cpp, qwen2moe.cpp, qwen3moe.cpp); an HF
# config.json whose norm_topk_prob says otherwise has no GGUF equivalent.
MOE_NORMALIZES_TOP_K = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}
MAX_EXPERTS = 512  # llama.cpp's LLAMA_MAX_EXPERTS
# HF model types that are mixtures of experts
HF_MOE_MODEL_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"})
# Their keys (written where config.json sets them). The expert count is num_local_experts
# or num_experts, depending on the model and the transformers version that saved it; the
# loader keeps it as num_experts.
HF_MOE_CONFIG_TO_GGUF = {
    "num_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
    "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
}

# config.json keys a loader cannot do without; the others have the defaults below.
HF_REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers",
                           "intermediate_size", "num_attention_heads")

# Defaults of the transformers config classes for keys an older config.json may omit
# (transformers 4.x wrote only the keys that differ from these). num_key_value_heads and
# head_dim default to values derived from other keys, filled in by the loader.
HF_CONFIG_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
              "tie_word_embeddings": False},
    "mistral": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "max_position_embeddings": 4096 * 32, "tie_word_embeddings": False},
    "qwen2": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768,
              "tie_word_embeddings": False},
    "qwen3": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768,
              "tie_word_embeddings": False, "head_dim": 128},
    "gemma2": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 8192,
               "tie_word_embeddings": True, "head_dim": 256, "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0},
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1_000_000.0,
                "max_position_embeddings": 4096 * 32, "tie_word_embeddings": False},
    "qwen2_moe": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768,
                  "tie_word_embeddings": False, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632,
                  "norm_topk_prob": False, "decoder_sparse_step": 1},
    "qwen3_moe": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768,
                  "tie_word_embeddings": False, "head_dim": 128, "moe_intermediate_size": 768,
                  "norm_topk_prob": False, "decoder_sparse_step": 1},
    "olmoe": {"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
              "tie_word_embeddings": False, "norm_topk_prob": False},
    "phi3": {"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
             "original_max_position_embeddings": 4096, "tie_word_embeddings": False},
    "gemma3_text": {"rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
                    "rope_local_base_freq": 10_000.0, "max_position_embeddings": 131_072,
                    "tie_word_embeddings": True, "head_dim": 256, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096},
}

_HF_BLOCK_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_GGUF_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)")
_GLOBAL_NAME = re.compile(r"(.+)\.(weight|bias)")


def block_map(arch: str, model_type: str | None = None) -> dict[str, str]:
    """The HF -> GGUF block name map of an architecture (or HF model_type, where two
    model types share a GGUF architecture)."""
    return (HF_TO_GGUF_BLOCK_BY_MODEL_TYPE.get(model_type)
            or HF_TO_GGUF_BLOCK_BY_ARCH.get(arch, HF_TO_GGUF_BLOCK))


def expert_index(hf_name: str) -> int | None:
    """"model.layers.0.mlp.experts.5.up_proj.weight" -> 5; None for other tensors."""
    m = _HF_EXPERT.search(hf_name)
    return int(m.group(1)) if m else None


def gguf_tensor_name(hf_name: str, arch: str = "llama", model_type: str | None = None
                     ) -> str | None:
    """"model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight"; None if unknown. An
    expert's tensor maps to the 3-D tensor of all experts: "...experts.5.up_proj.weight"
    -> "blk.3.ffn_up_exps.weight" (expert_index tells which slice)."""
    if m := _HF_BLOCK_NAME.fullmatch(hf_name):
        block, part, kind = m.groups()
        part = _HF_EXPERT.sub(".experts.*.", f"{part}.")[:-1]
        table = block_map(arch, model_type)
        return f"blk.{block}.{table[part]}.{kind}" if part in table else None
    if m := _GLOBAL_NAME.fullmatch(hf_name):
        part, kind = m.groups()
        return f"{HF_TO_GGUF_GLOBAL[part]}.{kind}" if part in HF_TO_GGUF_GLOBAL else None
    return None


def hf_tensor_name(gguf_name: str, arch: str = "llama", model_type: str | None = None
                   ) -> str | None:
    """"blk.3.ffn_up.weight" -> "model.layers.3.mlp.up_proj.weight"; None if unknown.
    (Experts' tensors come out as "...experts.*.up_proj.weight".)"""
    if m := _GGUF_BLOCK_NAME.fullmatch(gguf_name):
        block, part, kind = m.groups()
        table = block_map(arch, model_type)
        hf = {v: k for k, v in table.items()}.get(part)
        return f"model.layers.{block}.{hf}.{kind}" if hf else None
    if m := _GLOBAL_NAME.fullmatch(gguf_name):
        part, kind = m.groups()
        return f"{GGUF_TO_HF_GLOBAL[part]}.{kind}" if part in GGUF_TO_HF_GLOBAL else None
    return None

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
# GGUF architecture -> its block map, where it is not HF_TO_GGUF_BLOCK
HF_TO_GGUF_BLOCK_BY_ARCH = {"gemma2": GEMMA_BLOCK, "gemma3": GEMMA_BLOCK}

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
    "gemma3_text": {"rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
                    "rope_local_base_freq": 10_000.0, "max_position_embeddings": 131_072,
                    "tie_word_embeddings": True, "head_dim": 256, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096},
}

_HF_BLOCK_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_GGUF_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)")
_GLOBAL_NAME = re.compile(r"(.+)\.(weight|bias)")


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str | None:
    """"model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight"; None if unknown."""
    if m := _HF_BLOCK_NAME.fullmatch(hf_name):
        block, part, kind = m.groups()
        table = HF_TO_GGUF_BLOCK_BY_ARCH.get(arch, HF_TO_GGUF_BLOCK)
        return f"blk.{block}.{table[part]}.{kind}" if part in table else None
    if m := _GLOBAL_NAME.fullmatch(hf_name):
        part, kind = m.groups()
        return f"{HF_TO_GGUF_GLOBAL[part]}.{kind}" if part in HF_TO_GGUF_GLOBAL else None
    return None


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """"blk.3.ffn_up.weight" -> "model.layers.3.mlp.up_proj.weight"; None if unknown."""
    if m := _GGUF_BLOCK_NAME.fullmatch(gguf_name):
        block, part, kind = m.groups()
        table = HF_TO_GGUF_BLOCK_BY_ARCH.get(arch, HF_TO_GGUF_BLOCK)
        hf = {v: k for k, v in table.items()}.get(part)
        return f"model.layers.{block}.{hf}.{kind}" if hf else None
    if m := _GLOBAL_NAME.fullmatch(gguf_name):
        part, kind = m.groups()
        return f"{GGUF_TO_HF_GLOBAL[part]}.{kind}" if part in GGUF_TO_HF_GLOBAL else None
    return None

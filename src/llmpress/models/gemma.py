"""The Gemma family: Gemma 2 and Gemma 3 text models, as llama.cpp computes them
(src/models/gemma2.cpp, gemma3.cpp) and transformers' Gemma2/Gemma3 text models do.

Gemma's block is the Llama block (models/llama.py) with these changes:
- token embeddings scaled by sqrt(dim); the output head is the embedding (tied);
- RMSNorm before *and after* attention and the FFN (four norms a block). Gemma's norm
  multiplies by (1 + w); convert_hf_to_gguf already adds the 1 to every `*norm.weight`
  it writes, so the file's norm weights are plain RMSNorm weights here;
- Gemma 3: RMSNorm per head on q and k before RoPE (as Qwen3);
- GeGLU FFN: gelu (tanh approximation) instead of SiLU on the gate;
- sliding-window ("local") layers interleaved with global ones: a local layer's query
  sees only the last `sliding_window` positions and rotates with its own RoPE base;
- soft-capping `cap * tanh(x / cap)` of the attention scores (Gemma 2) and of the final
  logits, where the file asks for it.
GemmaModel shares LlamaModel's forward passes (models/llama.py DecoderModel): in fast mode
the fused C decoder layers (kernels/decode.c) run every block, their Gemma pieces (the
post-norms, GeGLU, window, local RoPE table, query scale, score soft-cap) named in the
layer and shape descriptions; the embedding scale and the final soft-cap stay here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.io.source import ModelSource
from llmpress.kernels.decode import LayerDescription, ShapeDescription
from llmpress.kernels.linear import FusedLinear, QuantEmbedding, QuantLinear, dense_tensor
from llmpress.models.config import GEMMA_ARCHITECTURES, LayerConfig, LlamaConfig, config_from_source
from llmpress.models.llama import (KV_F32, DecoderModel, FeedForward, KVCache, KVDtypes,
                                   RotaryEmbedding, rms_norm)


@dataclass(frozen=True)
class ArchDefaults:
    """What llama.cpp assumes when a Gemma file leaves a key out."""
    sliding_window: int  # 0: no sliding-window layers
    pattern: int  # every pattern-th layer is global, the others local
    local_rope_base: float | None  # None: the global base
    attn_softcap: float  # 0: none
    final_softcap: float
    big_model_layers: int  # the 27B model: query scale from dim / heads, not head_dim


ARCH_DEFAULTS = {
    "gemma2": ArchDefaults(4096, 2, None, 50.0, 30.0, 46),
    "gemma3": ArchDefaults(0, 6, 10000.0, 0.0, 0.0, 62),
}


@dataclass(frozen=True)
class GemmaConfig(LlamaConfig):
    sliding_window: int  # positions a local layer's query sees, itself included
    local_layers: tuple[bool, ...]  # per block: sliding-window attention
    local_rope_base: float
    query_scale: float  # multiplies q before q.k (Gemma's query_pre_attn_scalar ** -0.5)
    attn_softcap: float  # 0: none
    final_softcap: float  # 0: none


def gemma_config(src: ModelSource) -> GemmaConfig:
    base = config_from_source(src, GEMMA_ARCHITECTURES)
    defaults = ARCH_DEFAULTS[base.architecture]
    window = int(src.arch_key("attention.sliding_window", defaults.sliding_window) or 0)
    pattern = src.arch_key("attention.sliding_window_pattern", defaults.pattern)
    if isinstance(pattern, list):  # one flag per layer, true = local
        local = [bool(flag) for flag in pattern][: base.n_layers]
    else:  # llama.cpp's set_swa_pattern: layer i is local unless i % n == n - 1
        n = int(pattern)
        local = [n == 0 or i % n < n - 1 for i in range(base.n_layers)]
    local = tuple(flag and window > 0 for flag in local)
    heads = base.layers[0].n_heads
    query_dim = (base.dim // heads if base.n_layers == defaults.big_model_layers
                 else base.head_dim)
    return GemmaConfig(
        **{f.name: getattr(base, f.name) for f in fields(LlamaConfig)},
        sliding_window=window,
        local_layers=local,
        local_rope_base=float(src.arch_key("rope.freq_base_swa", defaults.local_rope_base
                                           or base.rope_base)),
        query_scale=1.0 / math.sqrt(query_dim),
        attn_softcap=float(src.arch_key("attn_logit_softcapping", defaults.attn_softcap) or 0),
        final_softcap=float(src.arch_key("final_logit_softcapping", defaults.final_softcap) or 0),
    )


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap if cap else x


def attention_mask(start: int, end: int, first_key: int, window: int, device) -> torch.Tensor:
    """(T, S) True where query start + t may see key first_key + s: causal, and within
    the last `window` positions when window > 0 (llama.cpp masks p1 - p0 >= n_swa)."""
    q = torch.arange(start, end, device=device)[:, None]
    k = torch.arange(first_key, end, device=device)[None, :]
    allowed = k <= q
    return allowed & (q - k < window) if window else allowed


class GemmaAttention(nn.Module):
    biases = None  # no q/k/v biases in Gemma

    def __init__(self, src: ModelSource, cfg: GemmaConfig, lc: LayerConfig, local: bool,
                 mode, device):
        super().__init__()
        p = f"blk.{lc.index}."
        self.n_heads, self.n_kv, self.head_dim = lc.n_heads, lc.n_kv_heads, cfg.head_dim
        self.qkv = FusedLinear([QuantLinear(src.tensors[p + n + ".weight"], mode, device)
                                for n in ("attn_q", "attn_k", "attn_v")])
        self.wo = QuantLinear(src.tensors[p + "attn_output.weight"], mode, device)
        norm = lambda name: dense_tensor(src.tensors[p + name + ".weight"], device)  # noqa: E731
        self.q_norm = norm("attn_q_norm") if cfg.qk_norm else None
        self.k_norm = norm("attn_k_norm") if cfg.qk_norm else None
        self.window = cfg.sliding_window if local else 0
        self.scale, self.softcap, self.eps = cfg.query_scale, cfg.attn_softcap, cfg.norm_eps

    def forward(self, x, rope: RotaryEmbedding, rotation, cache_k, cache_v, start: int):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, self.n_kv, self.head_dim)  # (B, T, KV, hd)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:  # Gemma 3: RMSNorm per head before RoPE
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        q, k = rope.apply(q, rotation), rope.apply(k, rotation)
        end = start + T
        cache_k.write(start, k.transpose(1, 2))
        cache_v.write(start, v.transpose(1, 2))
        # a local layer's earliest visible key is window - 1 before the first query
        first = max(0, start - self.window + 1) if self.window else 0
        keys = cache_k.read(first, end).to(q.dtype)  # (B, KV, S, hd)
        values = cache_v.read(first, end).to(q.dtype)
        mask = attention_mask(start, end, first, self.window, x.device)  # (T, S)
        out = self._attend(cache_k.query(q).transpose(1, 2), keys, values, mask)  # (B, H, T, hd)
        out = cache_v.rotate(out)  # back from the values' stored basis
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _attend(self, q, keys, values, mask):
        if not self.softcap:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                  scale=self.scale,
                                                  enable_gqa=self.n_heads != self.n_kv)
        # Gemma 2: the scores are soft-capped before the softmax, which SDPA cannot do
        group = self.n_heads // self.n_kv
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = soft_cap(q @ keys.transpose(-1, -2) * self.scale, self.softcap)  # (B, H, T, S)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1) @ values


class GeGLU(FeedForward):
    """The gated FFN with gelu (tanh approximation) on the gate."""

    def forward(self, x):
        gate, up = self.gate_up(x)
        return self.down(F.gelu(gate, approximate="tanh") * up)


class GemmaBlock(nn.Module):
    def __init__(self, src: ModelSource, cfg: GemmaConfig, lc: LayerConfig, local: bool,
                 mode, device):
        super().__init__()
        p = f"blk.{lc.index}."
        norm = lambda name: dense_tensor(src.tensors[p + name + ".weight"], device)  # noqa: E731
        self.attn_norm, self.attn_post_norm = norm("attn_norm"), norm("post_attention_norm")
        self.ffn_norm, self.ffn_post_norm = norm("ffn_norm"), norm("post_ffw_norm")
        self.attn = GemmaAttention(src, cfg, lc, local, mode, device)
        self.ffn = GeGLU(src, lc, mode, device)
        self.rotation = int(local)  # GemmaModel.ropes: global, local
        self.eps = cfg.norm_eps

    def forward(self, x, rope, rotation, cache_k, cache_v, start):
        attn = self.attn(rms_norm(x, self.attn_norm, self.eps), rope, rotation,
                         cache_k, cache_v, start)
        x = x + rms_norm(attn, self.attn_post_norm, self.eps)
        ffn = self.ffn(rms_norm(x, self.ffn_norm, self.eps))
        return x + rms_norm(ffn, self.ffn_post_norm, self.eps)


class GemmaModel(DecoderModel):
    """forward(tokens (B, T), cache) -> logits (B, T', vocab), as LlamaModel."""

    def __init__(self, src: ModelSource, mode: str = "fast", device: str | torch.device = "cpu",
                 kv_dtypes: KVDtypes = KV_F32):
        super().__init__()
        self.cfg = cfg = gemma_config(src)
        self.device = torch.device(device)
        self.embed = QuantEmbedding(src.tensors["token_embd.weight"], self.device)
        self.embed_scale = math.sqrt(cfg.dim)
        self.blocks = nn.ModuleList(GemmaBlock(src, cfg, lc, local, mode, self.device)
                                    for lc, local in zip(cfg.layers, cfg.local_layers))
        self.norm = dense_tensor(src.tensors["output_norm.weight"], self.device)
        head = src.tensors["token_embd.weight" if cfg.tied_output else "output.weight"]
        self.output = QuantLinear(head, mode, self.device)
        # global layers use the file's RoPE base and scaling; local ones their own base
        self.ropes = [RotaryEmbedding(cfg, None, self.device),
                      RotaryEmbedding(replace(cfg, rope_base=cfg.local_rope_base, rope_scale=1.0),
                                      None, self.device)]
        self.kv_dtypes = kv_dtypes  # (k, v) of the caches new_cache makes
        self.use_fused_decoder(mode)

    def shape_description(self) -> ShapeDescription:
        return replace(super().shape_description(), query_scale=self.cfg.query_scale,
                       softcap=self.cfg.attn_softcap, gelu=True)

    def layer_descriptions(self) -> list[LayerDescription]:
        return [replace(layer, attn_post_norm=block.attn_post_norm,
                        ffn_post_norm=block.ffn_post_norm, window=block.attn.window)
                for layer, block in zip(super().layer_descriptions(), self.blocks)]

    def ropes_for(self, cache: KVCache) -> list[RotaryEmbedding]:
        return self.ropes

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens) * self.embed_scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return soft_cap(self.output(x), self.cfg.final_softcap)

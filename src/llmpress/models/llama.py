"""The Llama family in one file: Llama 2/3, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k
norm), SmolLM/SmolLM2, TinyLlama; and its mixtures of experts, Mixtral, Qwen2-MoE,
Qwen3-MoE and OLMoE (q/k norm over all heads), whose FFN is models/moe.py's. Tensor names
are GGUF's; weights stay packed in their block format and each Linear multiplies them with
its own kernel (llmpress.kernels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.io.source import ModelSource
from llmpress.kernels.decode import FusedDecoder, LayerDescription, ShapeDescription, can_decode
from llmpress.kernels.linear import FusedLinear, QuantEmbedding, QuantLinear, dense_tensor
from llmpress.models.config import LayerConfig, LlamaConfig, config_from_source
from llmpress.models.kv_cache import KV_F32, KVCache, KVDtypes
from llmpress.models.moe import GatedFFN, MoeFeedForward


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


class RotaryEmbedding:
    """cos/sin tables for positions; optional per-frequency factors (llama3 rope_freqs)."""

    def __init__(self, cfg: LlamaConfig, freq_factors: torch.Tensor | None, device):
        half = cfg.rope_dim // 2
        exponents = torch.arange(0, half, dtype=torch.float64, device=device) * 2 / cfg.rope_dim
        inv_freq = 1.0 / (cfg.rope_base ** exponents)
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.to(device, torch.float64)
        self.inv_freq = (inv_freq / cfg.rope_scale).float()
        self.style, self.rope_dim = cfg.rope_style, cfg.rope_dim
        self.magnitude = cfg.rope_attn_factor  # 1 but for LongRoPE (Phi-3)

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """Complex numbers m * e^(i * pos * freq), m the attention factor (usually 1):
        (T, rope_dim/2)."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return torch.polar(torch.full_like(angles, self.magnitude), angles)

    def apply(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H, hd). Rotates the first rope_dim dims of each head as complex pairs."""
        rot, rest = x[..., : self.rope_dim], x[..., self.rope_dim:]
        if self.style == "norm":  # pairs (2i, 2i+1) are (real, imaginary)
            pairs = torch.view_as_complex(rot.float().reshape(*rot.shape[:-1], -1, 2))
            rotated = torch.view_as_real(pairs * rotation[:, None, :]).flatten(-2)
        else:  # neox: pairs (i, i + d/2)
            a, b = rot.chunk(2, dim=-1)
            cos, sin = rotation.real[:, None, :], rotation.imag[:, None, :]
            rotated = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


class Attention(nn.Module):
    def __init__(self, src: ModelSource, cfg: LlamaConfig, lc: LayerConfig, mode, device):
        super().__init__()
        p = f"blk.{lc.index}."
        self.n_heads, self.n_kv, self.head_dim = lc.n_heads, lc.n_kv_heads, cfg.head_dim
        self.qkv = FusedLinear([QuantLinear(src.tensors[p + n + ".weight"], mode, device)
                                for n in ("attn_q", "attn_k", "attn_v")])
        self.wo = QuantLinear(src.tensors[p + "attn_output.weight"], mode, device)
        self.biases = [dense_tensor(src.tensors[p + n + ".bias"], device)
                       for n in ("attn_q", "attn_k", "attn_v")] if cfg.qkv_bias else None
        self.q_norm = dense_tensor(src.tensors[p + "attn_q_norm.weight"], device) if cfg.qk_norm else None
        self.k_norm = dense_tensor(src.tensors[p + "attn_k_norm.weight"], device) if cfg.qk_norm else None
        self.eps = cfg.norm_eps

    def forward(self, x, rope: RotaryEmbedding, rotation, cache_k, cache_v, start: int):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, self.biases)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, self.n_kv, self.head_dim)  # (B, T, KV, hd)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:  # RMSNorm before RoPE: per head (Qwen3), or over all
            # heads at once (OLMoE: a weight as wide as q), which view(B, T, -1) gives
            per_head = self.q_norm.numel() == self.head_dim
            q, k = (q, k) if per_head else (q.view(B, T, -1), k.view(B, T, -1))
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
            q, k = q.view(B, T, self.n_heads, -1), k.view(B, T, self.n_kv, -1)
        q, k = rope.apply(q, rotation), rope.apply(k, rotation)
        end = start + T
        cache_k.write(start, k.transpose(1, 2))
        cache_v.write(start, v.transpose(1, 2))
        keys = cache_k.read(0, end).to(q.dtype)  # (B, KV, S, hd)
        values = cache_v.read(0, end).to(q.dtype)
        q = cache_k.query(q).transpose(1, 2)  # (B, H, T, hd)
        scale = 1.0 / math.sqrt(self.head_dim)
        if T == 1:  # decode: three small ops beat SDPA's parallel kernel for one query
            group = self.n_heads // self.n_kv
            qg = q.reshape(B, self.n_kv, group, self.head_dim)  # (B, KV, G, hd)
            probs = torch.softmax(qg @ keys.transpose(-1, -2) * scale, dim=-1)  # (B, KV, G, S)
            out = (probs @ values).reshape(B, self.n_heads, 1, self.head_dim)
        else:  # causal; with earlier tokens cached, query t sees keys up to start + t
            mask = None
            if start:
                qpos = torch.arange(start, end, device=x.device)[:, None]
                mask = torch.arange(end, device=x.device)[None, :] <= qpos  # (T, S)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                 is_causal=mask is None, scale=scale,
                                                 enable_gqa=self.n_heads != self.n_kv)
        out = cache_v.rotate(out)  # back from the values' stored basis
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(GatedFFN):
    def __init__(self, src: ModelSource, lc: LayerConfig, mode, device):
        p = f"blk.{lc.index}."
        super().__init__(*(src.tensors[p + n + ".weight"] for n in ("ffn_gate", "ffn_up",
                                                                     "ffn_down")), mode, device)


class Block(nn.Module):
    rotation = 0  # which of the model's RoPE tables (DecoderModel.ropes_for) it rotates by

    def __init__(self, src: ModelSource, cfg: LlamaConfig, lc: LayerConfig, mode, device):
        super().__init__()
        p = f"blk.{lc.index}."
        self.attn_norm = dense_tensor(src.tensors[p + "attn_norm.weight"], device)
        self.ffn_norm = dense_tensor(src.tensors[p + "ffn_norm.weight"], device)
        self.attn = Attention(src, cfg, lc, mode, device)
        self.ffn = (MoeFeedForward(src, cfg, lc.index, mode, device) if cfg.n_experts
                    else FeedForward(src, lc, mode, device))
        self.eps = cfg.norm_eps

    def forward(self, x, rope, rotation, cache_k, cache_v, start):
        x = x + self.attn(rms_norm(x, self.attn_norm, self.eps), rope, rotation,
                          cache_k, cache_v, start)
        return x + self.ffn(rms_norm(x, self.ffn_norm, self.eps))


class DecoderModel(nn.Module):
    """forward(tokens (B, T), cache) -> logits (B, T', vocab) and advances the cache.

    What the families here share (LlamaModel, GemmaModel): the forward passes, through the
    fused C decoder layers (kernels/decode.py) where they cover the model, else block by
    block. A family's __init__ sets cfg, device, embed, blocks, norm, output and kv_dtypes,
    then calls use_fused_decoder; it names its RoPE tables (ropes_for, each block's
    `rotation` picks one) and may add to the layer and shape descriptions, the embedding
    (embed_tokens) and the head (logits).
    """

    def use_fused_decoder(self, mode: str) -> None:
        """Fast mode on the CPU: one C call per forward pass when every type has a kernel
        (the C path has no expert routing: a mixture of experts runs block by block)."""
        self.decoder = None
        if mode == "fast" and self.device.type == "cpu" and not self.cfg.n_experts:
            layers = self.layer_descriptions()
            if can_decode(layers):
                self.decoder = FusedDecoder(self.shape_description(), layers)

    def new_cache(self, max_tokens: int, batch: int = 1) -> KVCache:
        return KVCache(self.cfg, max_tokens, batch, self.kv_dtypes, self.device)

    def shape_description(self) -> ShapeDescription:
        cfg = self.cfg
        return ShapeDescription(cfg.dim, cfg.head_dim, cfg.rope_dim, cfg.rope_style == "neox",
                                cfg.norm_eps)

    def layer_descriptions(self) -> list[LayerDescription]:
        """Each block as the fused decoder takes it (plain tensors, no modules)."""
        return [LayerDescription(
            lc.n_heads, lc.n_kv_heads, lc.ffn_dim, block.attn_norm, block.ffn_norm,
            [*block.attn.qkv.linears, block.attn.wo, *block.ffn.gate_up.linears, block.ffn.down],
            block.attn.q_norm, block.attn.k_norm, tuple(block.attn.biases or (None, None, None)),
            rotation=block.rotation)
            for block, lc in zip(self.blocks, self.cfg.layers)]

    def ropes_for(self, cache: KVCache) -> list[RotaryEmbedding]:
        """The RoPE tables for a cache, indexed by the blocks' `rotation`."""
        raise NotImplementedError

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head on final normalized hidden states."""
        return self.output(x)

    def _rotations(self, segments: list[tuple[int, KVCache]]) -> list[torch.Tensor]:
        """Per RoPE table, the angles of n rows from `start` of each (start, cache), in row
        order: [(rows, rope_dim/2)]."""
        per_segment = [[rope.rotation(torch.arange(start, start + n, device=self.device))
                        for rope in self.ropes_for(cache)] for start, n, cache in segments]
        return [torch.cat(tables) for tables in zip(*per_segment)]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False,
                hidden: bool = False):
        """hidden: return the final normalized hidden states (B, T', dim), the embeddings,
        instead of the logits."""
        B, T = tokens.shape
        start = cache.first_free(T)
        x = self.embed_tokens(tokens.to(self.device))  # (B, T, dim)
        rotations = self._rotations([(start, T, cache)])
        if self.decoder is not None and B == 1 and self.decoder.handles(cache.dtypes):
            x = self.decoder.forward(x[0], [(cache, T)], rotations).view(1, T, -1)
        else:
            ropes = self.ropes_for(cache)
            for block, ck, cv in zip(self.blocks, cache.keys, cache.values):
                x = block(x, ropes[block.rotation], rotations[block.rotation], ck, cv, start)
        cache.length = start + T
        if last_only:
            x = x[:, -1:]
        x = rms_norm(x, self.norm, self.cfg.norm_eps)
        return x if hidden else self.logits(x)  # (B, T', vocab)

    @torch.inference_mode()
    def forward_batch(self, segments: list[tuple[list[int], KVCache]],
                      all_rows: list[bool] | None = None) -> list[torch.Tensor]:
        """Append each sequence's new tokens to its own cache -> per sequence, the logits
        (rows, vocab) of its last token, or of every token where all_rows says so. The
        fused C path runs all the rows in one pass, reading the weights once; each row's
        result is the same bits as in a pass of its own."""
        all_rows = all_rows or [False] * len(segments)
        if self.decoder is None or not all(self.decoder.handles(c.dtypes) for _, c in segments):
            return forward_each(self, segments, all_rows)
        ids = torch.tensor([[t for tokens, _ in segments for t in tokens]], device=self.device)
        starts = [cache.first_free(len(tokens)) for tokens, cache in segments]
        rotations = self._rotations([(start, len(tokens), cache)
                                     for (tokens, cache), start in zip(segments, starts)])
        x = self.decoder.forward(self.embed_tokens(ids)[0],
                                 [(cache, len(tokens)) for tokens, cache in segments], rotations)
        rows, end = [], 0
        for (tokens, cache), start, every in zip(segments, starts, all_rows):
            cache.length = start + len(tokens)
            end += len(tokens)
            rows.append(range(end - len(tokens) if every else end - 1, end))
        x = rms_norm(x[[i for r in rows for i in r]], self.norm, self.cfg.norm_eps)
        logits = self.logits(x)
        return list(logits.split([len(r) for r in rows]))


class LlamaModel(DecoderModel):
    """forward(tokens (B, T), cache) -> logits (B, T', vocab) and advances the cache.

    `mode` picks the matmul path of every Linear: "exact" dequantizes weights exactly and
    multiplies in float32; "fast" uses the packed kernels where one exists for the type.
    """

    def __init__(self, src: ModelSource, mode: str = "fast", device: str | torch.device = "cpu",
                 cfg: LlamaConfig | None = None, kv_dtypes: KVDtypes = KV_F32):
        super().__init__()
        self.cfg = cfg or config_from_source(src)  # cfg: a family built on this one (Phi-3)
        self.device = torch.device(device)
        cfg = self.cfg
        self.embed = QuantEmbedding(src.tensors["token_embd.weight"], self.device)
        self.blocks = nn.ModuleList(Block(src, cfg, lc, mode, self.device) for lc in cfg.layers)
        self.norm = dense_tensor(src.tensors["output_norm.weight"], self.device)
        head = src.tensors["token_embd.weight" if cfg.tied_output else "output.weight"]
        self.output = QuantLinear(head, mode, self.device)
        self.use_fused_decoder(mode)
        freqs = src.tensors.get("rope_freqs.weight")
        self.rope = RotaryEmbedding(cfg, dense_tensor(freqs, self.device) if freqs else None,
                                    self.device)
        self.kv_dtypes = kv_dtypes  # (k, v) of the caches new_cache makes

    def ropes_for(self, cache: KVCache) -> list[RotaryEmbedding]:
        return [self.rope]


def forward_each(model, segments: list[tuple[list[int], KVCache]],
                 all_rows: list[bool]) -> list[torch.Tensor]:
    """forward_batch for a model without a batched path: one pass per sequence."""
    return [model(torch.tensor([tokens], device=model.device), cache, last_only=not every)[0]
            for (tokens, cache), every in zip(segments, all_rows)]

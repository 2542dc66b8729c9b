"""Phi-3 (and Phi-3.5 / Phi-4-mini text models), as llama.cpp computes them
(src/models/phi3.cpp) and transformers' Phi3ForCausalLM does.

Phi-3's block is the Llama block (models/llama.py) with its weights fused and its RoPE
extended:
- `attn_qkv` holds the q, k and v rows in one matrix, and `ffn_up` the gate rows then the
  up rows; both are split here into row slices of the packed bytes (nothing is copied),
  named as the Llama block's tensors, so LlamaModel runs them (the fused C decode step
  included);
- RoPE rotates the first `rope.dimension_count` dimensions of each head, NeoX style;
- LongRoPE: per-frequency divisors `rope_factors_short` / `rope_factors_long`, the long
  ones when the context is longer than the training context
  (`rope.scaling.original_context_length`), as llama.cpp picks them by n_ctx; and cos/sin
  scaled by `rope.scaling.attn_factor`.
llama.cpp disables Phi-3's sliding window (phi3.cpp); so does this file.
"""

from __future__ import annotations

import torch

from llmpress.io.source import ModelSource, TensorRef
from llmpress.kernels.linear import dense_tensor
from llmpress.models.config import PHI3_ARCHITECTURES, LlamaConfig, config_from_source
from llmpress.models.llama import KV_F32, KVCache, KVDtypes, LlamaModel, RotaryEmbedding


def row_slices(ref: TensorRef, names: tuple[str, ...], rows: tuple[int, ...]) -> list[TensorRef]:
    """A 2-D tensor cut into consecutive row blocks of `rows` rows each, one TensorRef per
    block, each a view of the tensor's bytes."""
    whole = ref.read_bytes()  # read once: a Hugging Face source reads the file here
    row_bytes = ref.n_bytes // ref.shape[0]
    slices, start = [], 0
    for name, n in zip(names, rows):
        size = n * row_bytes
        slices.append(TensorRef(name, ref.ggml_type, (n, ref.shape[1]), size,
                                lambda s=start, e=start + size: whole[s:e]))
        start += size
    return slices


def unfused(src: ModelSource, cfg: LlamaConfig) -> ModelSource:
    """src with attn_qkv split into attn_q/attn_k/attn_v and ffn_up into ffn_gate/ffn_up."""
    tensors = dict(src.tensors)
    for lc in cfg.layers:
        p = f"blk.{lc.index}."
        q, kv = lc.n_heads * cfg.head_dim, lc.n_kv_heads * cfg.head_dim
        qkv = tensors.pop(p + "attn_qkv.weight")
        parts = row_slices(qkv, tuple(p + n + ".weight" for n in ("attn_q", "attn_k", "attn_v")),
                           (q, kv, kv))
        parts += row_slices(tensors.pop(p + "ffn_up.weight"),
                            (p + "ffn_gate.weight", p + "ffn_up.weight"), (lc.ffn_dim, lc.ffn_dim))
        tensors.update((t.name, t) for t in parts)
    return ModelSource(src.path, src.metadata, tensors, src.file_bytes)


class Phi3Model(LlamaModel):
    """forward(tokens (B, T), cache) -> logits (B, T', vocab), as LlamaModel."""

    def __init__(self, src: ModelSource, mode: str = "fast", device: str | torch.device = "cpu",
                 kv_dtypes: KVDtypes = KV_F32):
        cfg = config_from_source(src, PHI3_ARCHITECTURES)  # validates the fused tensors
        super().__init__(unfused(src, cfg), mode, device, cfg=cfg, kv_dtypes=kv_dtypes)
        self.training_context = int(src.arch_key("rope.scaling.original_context_length",
                                                  cfg.context_length))

        def rope(kind: str) -> RotaryEmbedding:
            factors = src.tensors.get(f"rope_factors_{kind}.weight")
            return RotaryEmbedding(cfg, dense_tensor(factors, self.device) if factors else None,
                                   self.device)
        self.ropes = {False: rope("short"), True: rope("long")}  # by: context > training
        self.rope = self.ropes[False]

    def ropes_for(self, cache: KVCache) -> list[RotaryEmbedding]:
        return [self.ropes[cache.max_tokens > self.training_context]]

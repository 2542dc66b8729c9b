"""The feed-forward layers of the Llama family: the gated (SwiGLU) FFN, and the mixture of
experts of Mixtral (GGUF "llama" with experts), Qwen2-MoE, Qwen3-MoE and OLMoE, as
llama.cpp's build_moe_ffn computes them (src/llama-graph.cpp) and transformers' sparse MoE blocks do:

- a router (`ffn_gate_inp`, one row per expert) scores each token; softmax over all
  experts, then the top `expert_used_count` are picked;
- Mixtral and Qwen3-MoE renormalize the picked weights to sum to 1, Qwen2-MoE and OLMoE
  do not (names.MOE_NORMALIZES_TOP_K);
- each picked expert is a gated FFN whose weights are one slice of the 3-D tensors
  `ffn_{gate,up,down}_exps` (n_experts, rows, row_length); the output is the weighted sum;
- Qwen2-MoE adds a shared expert (`ffn_*_shexp`) that every token goes through, scaled by
  sigmoid(`ffn_gate_inp_shexp` . x).

The expert tensors stay packed: each expert is a QuantLinear over its own slice of the
file's bytes, so a token reads only the rows of the experts it is routed to, and fast
mode multiplies them with the packed kernels (kernels/linear.py) like any other weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.io.source import ModelSource, TensorRef
from llmpress.kernels.linear import FusedLinear, QuantLinear, dense_tensor


def is_expert_stack(name: str, shape: tuple[int, ...]) -> bool:
    """A 3-D tensor of one matrix per expert (ffn_gate_exps, ffn_up_exps, ffn_down_exps)."""
    return name.endswith("_exps.weight") and len(shape) == 3


def active_share(name: str, shape: tuple[int, ...], n_used: int) -> float:
    """The share of a tensor one token reads: n_used of an expert stack's slices, else all."""
    return min(n_used, shape[0]) / shape[0] if is_expert_stack(name, shape) else 1.0


def active_parameters(shapes: Iterable[tuple[str, tuple[int, ...]]], n_used: int) -> int:
    """Parameters one token computes with: every tensor, but of each expert stack only the
    n_used experts the router picks (a dense model: all parameters)."""
    return sum(math.prod(shape) // shape[0] * min(n_used, shape[0])
               if is_expert_stack(name, shape) else math.prod(shape)
               for name, shape in shapes)


class GatedFFN(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up read x in one fused call."""

    def __init__(self, gate: TensorRef, up: TensorRef, down: TensorRef, mode, device):
        super().__init__()
        self.gate_up = FusedLinear([QuantLinear(gate, mode, device),
                                    QuantLinear(up, mode, device)])
        self.down = QuantLinear(down, mode, device)

    def forward(self, x):
        gate, up = self.gate_up(x)
        return self.down(F.silu(gate) * up)


def expert_slices(ref: TensorRef) -> list[TensorRef]:
    """A 3-D expert tensor (n_experts, rows, row_length) as one 2-D TensorRef per expert,
    each a view of the tensor's bytes (the file's pages for a GGUF: nothing is copied)."""
    n_experts, rows, row_length = ref.shape
    whole = ref.read_bytes()  # read once: a Hugging Face source stacks its experts here
    size = ref.n_bytes // n_experts
    return [TensorRef(f"{ref.name}[{e}]", ref.ggml_type, (rows, row_length), size,
                      lambda s=e * size: whole[s:s + size])
            for e in range(n_experts)]


def route(router_logits: torch.Tensor, top_k: int, normalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, n_experts) scores -> (weights, experts), each (tokens, top_k): softmax over
    all experts, the top_k largest, renormalized to sum to 1 where the architecture does."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:  # llama.cpp clamps the sum to F16's smallest normal number
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
    return weights, experts


class MoeFeedForward(nn.Module):
    def __init__(self, src: ModelSource, cfg, index: int, mode, device):
        super().__init__()
        p = f"blk.{index}."
        self.router = QuantLinear(src.tensors[p + "ffn_gate_inp.weight"], mode, device)
        stacks = (expert_slices(src.tensors[p + f"ffn_{n}_exps.weight"])
                  for n in ("gate", "up", "down"))
        self.experts = nn.ModuleList(GatedFFN(gate, up, down, mode, device)
                                     for gate, up, down in zip(*stacks))
        self.top_k, self.normalize = cfg.n_experts_used, cfg.normalize_top_k
        self.shared = self.shared_gate = None
        if p + "ffn_up_shexp.weight" in src.tensors:  # Qwen2-MoE
            self.shared = GatedFFN(*(src.tensors[p + f"ffn_{n}_shexp.weight"]
                                     for n in ("gate", "up", "down")), mode, device)
            # (dim,) in GGUF; a Hugging Face checkpoint's (1, dim) reads the same
            self.shared_gate = dense_tensor(src.tensors[p + "ffn_gate_inp_shexp.weight"],
                                            device).reshape(-1)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])  # (N, dim)
        weights, experts = route(self.router(flat), self.top_k, self.normalize)  # (N, k)
        out = torch.zeros_like(flat)
        for e in experts.unique().tolist():  # only the experts some token was routed to
            token, slot = (experts == e).nonzero(as_tuple=True)
            out.index_add_(0, token, self.experts[e](flat[token]) * weights[token, slot, None])
        if self.shared is not None:
            out += self.shared(flat) * torch.sigmoid(flat @ self.shared_gate)[:, None]
        return out.view(x.shape)

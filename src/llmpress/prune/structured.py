"""Structured pruning: whole decoder layers, attention head groups and FFN channels go, and
what remains is a smaller dense model (fewer rows and columns, renumbered blk.N).

Scores (pure functions of hidden states or statistics from the calibration runner):
- block influence of a layer, 1 − E[cos(x_in, x_out)] over tokens (ShortGPT, Men et al.
  2024, eq. 2): a layer that barely turns the residual stream matters little;
- angular distance between the states n layers apart, E[arccos(cos(x_l, x_{l+n}))]/π
  (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers", eq. 7):
  the contiguous block of n layers whose input and output are closest goes;
- the output contribution of an FFN channel c, ‖W_down[:, c]‖₂·‖X_c‖₂ — exactly the
  Frobenius norm, over the calibration tokens, of what the channel adds to the residual
  stream (Wanda's |W|·‖x‖ summed in quadrature over the column; FLAP-like, activation
  aware);
- the same for an attention head group (a KV head with the query heads that read it, kept
  whole so grouped-query attention stays regular): sqrt(tr(W_o,g G_g W_o,gᵀ)) with G_g the
  Gram matrix of the group's slice of the attn_output input.

Width pruning is uniform across layers by default: llama.cpp's llama graph takes one head
count and one FFN size for every layer (hparams.n_head() / n_ff() in
src/models/llama.cpp's tensor shapes), so only uniform files load there. Per-layer widths
are written as GGUF arrays (llama-model.cpp reads them with get_key_or_arr) and run in
llmpress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from llmpress.errors import LlmpressError
from llmpress.io.source import TensorRef

KV_ROW_TENSORS = ("attn_k", "attn_v")  # rows grouped per KV head


# --- layer scores -------------------------------------------------------------------------------
def cosine_per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., dim) x2 -> (...) cosine similarity in float64."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """ShortGPT's BI: 1 − mean cosine similarity of a layer's input and output states."""
    return float(1 - cosine_per_token(x_in, x_out).mean())


def angular_distance(x_a: torch.Tensor, x_b: torch.Tensor) -> float:
    """Gromov et al.'s mean arccos(cos)/π between two sets of states, in [0, 1]."""
    return float(torch.arccos(cosine_per_token(x_a, x_b).clamp(-1, 1)).mean() / math.pi)


def layers_to_remove(n_layers: int, count: int) -> None:
    if not 0 < count < n_layers:
        raise LlmpressError(f"cannot remove {count} of {n_layers} layers: remove at least 1 and "
                            f"keep at least 1 (use --layers 1..{n_layers - 1} or a smaller "
                            "--ratio)")


def lowest_influence_layers(influence: list[float], count: int) -> list[int]:
    """ShortGPT: the `count` layers of lowest block influence, in ascending index order."""
    layers_to_remove(len(influence), count)
    return sorted(torch.tensor(influence).argsort()[:count].tolist())


def closest_block(states: list[torch.Tensor], count: int) -> tuple[list[int], list[float]]:
    """Gromov et al.: states[l] are the inputs of layer l (states[L] the last output);
    returns the contiguous layers l*..l*+count-1 minimizing the angular distance between
    states[l] and states[l+count], and the distance for every start l."""
    n_layers = len(states) - 1
    layers_to_remove(n_layers, count)
    distances = [angular_distance(states[l], states[l + count])
                 for l in range(n_layers - count + 1)]
    start = int(torch.tensor(distances).argmin())
    return list(range(start, start + count)), distances


def sample_tokens(hidden: torch.Tensor, max_tokens: int, seed: int = 0) -> torch.Tensor:
    """A fixed random subset of (N, T, dim) states as (≤max_tokens, dim): layer scores need
    every layer boundary, and keeping all states of all boundaries would cost a model's
    worth of memory."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    if flat.shape[0] <= max_tokens:
        return flat.clone()
    picks = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed))
    return flat[picks[:max_tokens].sort().values].clone()


# --- width scores ------------------------------------------------------------------------------
def channel_contribution(w_down: torch.Tensor, input_sum_sq: torch.Tensor) -> torch.Tensor:
    """(ffn,) ‖W_down[:, c]‖₂ · ‖X_c‖₂ for FFN channel c (sum_sq = Σ_tokens x_c²)."""
    return w_down.double().norm(dim=0) * input_sum_sq.double().clamp_min(0).sqrt()


def group_contribution(w_out: torch.Tensor, xtx: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(n_kv,) Frobenius norm of each head group's share of attn_output's output:
    sqrt(tr(W_g G_g W_gᵀ)) with W_g, G_g the group's input columns."""
    dim, width = w_out.shape
    per = width // n_groups
    w = w_out.double().reshape(dim, n_groups, per).permute(1, 0, 2)  # (groups, dim, per)
    g = xtx.double().reshape(n_groups, per, n_groups, per)
    g = g[torch.arange(n_groups), :, torch.arange(n_groups), :]  # (groups, per, per) blocks
    energy = torch.einsum("gdi,gij,gdj->g", w, g, w)
    return energy.clamp_min(0).sqrt()


def keep_top(scores: torch.Tensor, n_keep: int) -> list[int]:
    """Indices of the n_keep highest scores, ascending."""
    return sorted(torch.topk(scores, n_keep).indices.tolist())


def aligned_keep(width: int, ratio: float, align: int) -> int:
    """Channels kept when removing `ratio` of `width`, rounded to a multiple of `align`
    (block formats need whole blocks per row) and at least `align`."""
    kept = round(width * (1 - ratio) / align) * align
    return max(align, min(width, kept))


@dataclass(frozen=True)
class WidthPlan:
    """Per layer position: the kept KV-head groups and kept FFN channels."""

    groups: tuple[tuple[int, ...], ...]
    channels: tuple[tuple[int, ...], ...]


def plan_width(group_scores: list[torch.Tensor], channel_scores: list[torch.Tensor],
               ratio: float, uniform: bool, align: int, layer_params: tuple[int, int, int]
               ) -> WidthPlan:
    """Choose what to keep so that about `ratio` of the decoder layers' parameters go.

    Attention loses floor(ratio · groups) whole head groups per layer (it never shrinks by
    more than the ratio; groups are coarse), the FFN loses channels to make up the rest of
    the parameter budget. layer_params = (params per head group, params per FFN channel,
    params per layer). Uniform: the same counts in every layer, each layer keeping its own
    best units. Per layer: one global ranking of scores normalized by the layer's mean
    score, with the layers' kept counts rounded to `align`.
    """
    if not 0 < ratio < 1:
        raise LlmpressError(f"--ratio {ratio} must lie strictly between 0 and 1")
    per_group, per_channel, per_layer = layer_params
    n_groups, ffn = group_scores[0].numel(), channel_scores[0].numel()
    drop_groups = min(int(ratio * n_groups), n_groups - 1)
    budget = ratio * per_layer - drop_groups * per_group  # parameters still to remove
    ffn_ratio = min(max(budget / (per_channel * ffn), 0.0), 1 - align / ffn)
    if uniform:
        keep_ffn = aligned_keep(ffn, ffn_ratio, align)
        groups = [keep_top(s, n_groups - drop_groups) for s in group_scores]
        channels = [keep_top(s, keep_ffn) for s in channel_scores]
        return WidthPlan(tuple(map(tuple, groups)), tuple(map(tuple, channels)))
    groups = _global_keep(group_scores, drop_groups * len(group_scores), step=1)
    channels = _global_keep(channel_scores,
                            sum(s.numel() for s in channel_scores)
                            - aligned_keep(ffn, ffn_ratio, align) * len(channel_scores),
                            step=align)
    return WidthPlan(tuple(map(tuple, groups)), tuple(map(tuple, channels)))


def _global_keep(scores: list[torch.Tensor], n_drop: int, step: int) -> list[list[int]]:
    """Drop the n_drop lowest of all layers' scores (each divided by its layer's mean);
    every layer keeps a multiple of `step` units, at least one step."""
    normalized = torch.cat([s / s.mean().clamp_min(1e-30) for s in scores])
    sizes = [s.numel() for s in scores]
    dropped = torch.zeros(normalized.numel(), dtype=torch.bool)
    if n_drop > 0:
        dropped[torch.topk(normalized, n_drop, largest=False).indices] = True
    kept_lists, start = [], 0
    for s, size in zip(scores, sizes):
        n_keep = int((~dropped[start:start + size]).sum())
        n_keep = max(step, min(size, round(n_keep / step) * step))
        kept_lists.append(keep_top(s, n_keep))
        start += size
    return kept_lists


# --- editing the tensors -----------------------------------------------------------------------
Tensors = dict[str, "torch.Tensor | TensorRef"]


def layer_tensor_names(tensors: Mapping[str, Any], gguf_index: int) -> list[str]:
    prefix = f"blk.{gguf_index}."
    return [name for name in tensors if name.startswith(prefix)]


def remove_layers(tensors: Mapping[str, Any], metadata: Mapping[str, Any], n_layers: int,
                  remove: list[int]) -> tuple[Tensors, dict[str, Any]]:
    """Drop layers `remove` (file indices blk.N); the rest are renumbered 0.. in order.
    Tensor values are passed through untouched (refs or tensors); per-layer metadata
    arrays lose the removed entries and block_count is updated."""
    gone = set(remove)
    kept = [i for i in range(n_layers) if i not in gone]
    if not kept or len(gone) != len(remove) or not gone <= set(range(n_layers)):
        layers_to_remove(n_layers, len(remove))
    renumber = {old: new for new, old in enumerate(kept)}
    out: Tensors = {}
    for name, value in tensors.items():
        if name.startswith("blk."):
            index, rest = name[4:].split(".", 1)
            if int(index) in gone:
                continue
            name = f"blk.{renumber[int(index)]}.{rest}"
            if isinstance(value, TensorRef):
                value = _renamed(value, name)
        out[name] = value
    arch = metadata["general.architecture"]
    meta = {}
    for key, value in metadata.items():
        if key.startswith(arch + ".") and isinstance(value, list) and len(value) == n_layers:
            value = [value[i] for i in kept]
        meta[key] = value
    meta[f"{arch}.block_count"] = len(kept)
    return out, meta


def _renamed(ref: TensorRef, name: str) -> TensorRef:
    return TensorRef(name, ref.ggml_type, ref.shape, ref.n_bytes, ref.read_bytes)


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a (heads * head_dim, ...) projection."""
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def slice_layer(weights: Mapping[str, torch.Tensor], n_heads: int, n_kv: int, head_dim: int,
                keep_groups: list[int], keep_channels: list[int]) -> dict[str, torch.Tensor]:
    """One layer's float tensors (short names: attn_q.weight, attn_q.bias, ffn_up.weight,
    ...) with only the kept head groups and FFN channels. Query head h reads KV head
    h // (n_heads / n_kv) (ggml_mul_mat's broadcast; torch's repeat_interleave)."""
    per = n_heads // n_kv
    q_heads = [g * per + j for g in keep_groups for j in range(per)]
    q_rows, kv_rows = head_rows(q_heads, head_dim), head_rows(keep_groups, head_dim)
    channels = torch.tensor(keep_channels)
    out = {}
    for name, t in weights.items():
        base = name.split(".")[0]
        if base == "attn_q":
            t = t[q_rows]
        elif base in KV_ROW_TENSORS:
            t = t[kv_rows]
        elif base == "attn_output" and name.endswith(".weight"):
            t = t[:, q_rows]
        elif base in ("ffn_gate", "ffn_up"):
            t = t[channels]
        elif base == "ffn_down" and name.endswith(".weight"):
            t = t[:, channels]
        out[name] = t.contiguous()
    return out


def width_metadata(metadata: Mapping[str, Any], heads: list[int], kv_heads: list[int],
                   ffn: list[int], head_dim: int) -> dict[str, Any]:
    """Head counts and FFN sizes: scalars when equal in every layer, else per-layer arrays;
    the head size is written explicitly (it no longer equals embedding / heads)."""
    arch = metadata["general.architecture"]
    meta = dict(metadata)

    def one_or_all(values: list[int]):
        return values[0] if len(set(values)) == 1 else list(values)

    meta[f"{arch}.attention.head_count"] = one_or_all(heads)
    meta[f"{arch}.attention.head_count_kv"] = one_or_all(kv_heads)
    meta[f"{arch}.feed_forward_length"] = one_or_all(ffn)
    meta[f"{arch}.attention.key_length"] = head_dim
    meta[f"{arch}.attention.value_length"] = head_dim
    meta.setdefault(f"{arch}.rope.dimension_count", head_dim)
    return meta

"""AWQ: activation-aware per-input-channel scales (Lin et al., "AWQ: Activation-aware
Weight Quantization for LLM Compression and Acceleration", MLSys 2024, section 3.2).

A Linear computes W x = (W diag(s)) (diag(s)⁻¹ x): scaling weight column j up by s_j and
its input down by s_j changes nothing, but quantizing W diag(s) protects the columns
whose inputs are large. AWQ searches s = mean|x|^α over α in [0, 1) on calibration
activations, keeping the α whose quantized layer reproduces the outputs best (α = 0 is
plain rounding, so the search never does worse on its own data). The 1/s is folded into
whatever produces x, so the model is unchanged before quantization:

    q, k, v and gate, up   read an RMSNorm's output: its weight is divided by s;
    o (attn_output)        reads the attention-weighted v: v's rows are divided by s
                           (with grouped-query attention, the query heads that share a
                           KV head share its scales);
    down                   reads silu(gate) * up: up's rows are divided by s.

Everything here is a pure function of tensors; quant.calibrated runs it layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmpress.errors import LlmpressError

DEFAULT_GRID = 20  # α = 0, 0.05, ..., 0.95 (the AWQ reference's n_grid)


# --- statistics: Gram matrix and mean |x| in one pass ----------------------------------------
@dataclass(frozen=True)
class ActivationStats:
    xtx: torch.Tensor  # (in, in) float32: sum of x xᵀ
    abs_sum: torch.Tensor  # (in,) float64: sum of |x|
    count: int

    def hessian(self) -> torch.Tensor:
        """2 XᵀX / n (GPTQ's H)."""
        return self.xtx * (2.0 / max(self.count, 1))

    def abs_mean(self) -> torch.Tensor:
        """mean |x_j| over tokens (AWQ's activation scale), float32 (in,)."""
        return (self.abs_sum / max(self.count, 1)).float()


def init_activation_stats(in_features: int, device: torch.device | str = "cpu"
                          ) -> ActivationStats:
    return ActivationStats(torch.zeros(in_features, in_features, device=device),
                           torch.zeros(in_features, dtype=torch.float64, device=device), 0)


def accumulate_activation_stats(stats: ActivationStats, x: torch.Tensor) -> ActivationStats:
    """x: (tokens, in)."""
    x = x.float()
    return ActivationStats(torch.addmm(stats.xtx, x.T, x),
                           stats.abs_sum + x.abs().sum(dim=0).double(), stats.count + x.shape[0])


def scaled_hessian(hessian: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """H of the inputs x / s: diag(1/s) H diag(1/s)."""
    inv = 1.0 / scales
    return hessian * inv[:, None] * inv[None, :]


# --- the search -----------------------------------------------------------------------------
def scales_for(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^α, normalized so max(s) * min(s) = 1 (the AWQ reference's
    `scales / (scales.max() * scales.min()).sqrt()`)."""
    s = abs_mean.float().clamp_min(1e-4).pow(alpha).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


@dataclass(frozen=True)
class AwqSearch:
    scales: torch.Tensor  # (in,) the chosen s (all ones when α = 0 wins)
    alpha: float
    losses: tuple[float, ...]  # output error per α tried, in grid order
    alphas: tuple[float, ...]


Quantizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def output_loss(weights: list[torch.Tensor], new_weights: list[torch.Tensor],
                hessian: torch.Tensor) -> float:
    """Σ ‖(W - Ŵ)X‖² / n through H = 2XᵀX/n (up to the constant 2): the summed output
    error of the Linears that read the same input."""
    total = 0.0
    for w, w_hat in zip(weights, new_weights):
        d = (w - w_hat).double()
        total += float(((d @ hessian.double()) * d).sum())
    return total


def search_scales(weights: list[torch.Tensor], hessian: torch.Tensor, abs_mean: torch.Tensor,
                  quantize: Quantizer | list[Quantizer], n_grid: int = DEFAULT_GRID
                  ) -> AwqSearch:
    """The α in {0, 1/n_grid, ...} whose scales s minimize the output error of
    Q(W diag(s)) diag(s)⁻¹ over all `weights` (out_i, in) sharing one input.
    quantize(W_scaled, s) returns the quantized W_scaled, dequantized (it gets s so it
    can adjust per-column importance to the scaled inputs); one per weight, or one for all."""
    quantizers = quantize if isinstance(quantize, list) else [quantize] * len(weights)
    n = abs_mean.shape[0]
    if any(w.dim() != 2 or w.shape[1] != n for w in weights) or hessian.shape != (n, n):
        raise LlmpressError(f"AWQ: weights, Hessian and activation scales disagree on the "
                            f"input size ({[tuple(w.shape) for w in weights]}, "
                            f"{tuple(hessian.shape)}, {n})")
    if n_grid < 1:
        raise LlmpressError(f"AWQ grid size {n_grid} must be at least 1")
    alphas = tuple(i / n_grid for i in range(n_grid))
    losses = []
    best = (float("inf"), 0.0, torch.ones_like(abs_mean))
    for alpha in alphas:
        s = scales_for(abs_mean, alpha) if alpha else torch.ones_like(abs_mean)
        new = [q(w * s, s) / s for w, q in zip(weights, quantizers)]
        loss = output_loss(weights, new, hessian)
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    return AwqSearch(best[2], best[1], tuple(losses), alphas)


def kv_tied_abs_mean(abs_mean: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """o's input channels (n_heads*hd) come from v's (n_kv*hd): query heads sharing a KV
    head must share scales, so average their activation scales per KV head and give
    every query head its KV head's. -> (n_heads*hd,)"""
    head_dim = abs_mean.shape[0] // n_heads
    group = n_heads // n_kv_heads
    per_kv = abs_mean.view(n_kv_heads, group, head_dim).mean(dim=1)  # (n_kv, hd)
    return per_kv.repeat_interleave(group, dim=0).reshape(-1)


def kv_scales(o_scales: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """v's row scales from tied o scales (n_heads*hd,) -> (n_kv*hd,)."""
    head_dim = o_scales.shape[0] // n_heads
    group = n_heads // n_kv_heads
    return o_scales.view(n_kv_heads, group, head_dim)[:, 0].reshape(-1)


# --- folding ---------------------------------------------------------------------------------
def fold_into_norm(norm_weight: torch.Tensor, weights: list[torch.Tensor],
                   scales: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """RMSNorm(x) * g feeding Linears W: g / s and W diag(s) compute the same."""
    return norm_weight / scales, [w * scales for w in weights]


def fold_into_linear(producer: torch.Tensor, producer_bias: torch.Tensor | None,
                     consumer: torch.Tensor, producer_scales: torch.Tensor,
                     consumer_scales: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A Linear whose output channels feed `consumer`'s inputs (through attention
    weights or an elementwise product, both linear in them): producer rows / s,
    consumer columns * s. Returns (producer, producer_bias, consumer)."""
    bias = None if producer_bias is None else producer_bias / producer_scales
    return producer / producer_scales[:, None], bias, consumer * consumer_scales

"""Unstructured and N:M pruning of one weight matrix, as pure functions.

Each pruner takes a float32 weight W (out, in) and, where it needs them, statistics of the
Linear's inputs (llmpress.calib.runner.Gram: XᵀX over the calibration tokens), and returns
`Pruned(weight, mask, error)`: the new weight, the boolean mask of weights kept, and the
relative output error ‖(W − W')X‖² / ‖WX‖² on the calibration data (from XᵀX; without
statistics, the relative weight error ‖W − W'‖² / ‖W‖²).

- magnitude: drop the smallest |W_ij| of each row.
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): drop the
  smallest |W_ij|·‖X_j‖₂ of each output row; no weight update.
- SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with weight reconstruction from
  the inverse Hessian H⁻¹ = (2XᵀX/n + λI)⁻¹ through its Cholesky factor, 128-column blocks,
  adaptive mask selection per block by w²/[H⁻¹]²_jj, λ = 1% of the mean diagonal (section 3
  and Algorithm 1 of the paper).

Sparsity is the fraction of weights set to zero. A pattern N:M keeps N nonzeros in every M
consecutive weights of a row (2:4 is what sparse tensor cores run); the other weights of
the group go. OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity") gives layers with
more outlier activations a lower sparsity, keeping the mean.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from llmpress.errors import LlmpressError

METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSEGPT_BLOCK = 128  # columns per lazy-update block (SparseGPT section 3.3)
SPARSEGPT_DAMP = 0.01  # λ as a fraction of the mean Hessian diagonal
OWL_THRESHOLD = 5.0  # OWL's M: an outlier scores above M times the layer's mean
OWL_LAMBDA = 0.08  # OWL's λ: layer sparsities stay within target ± λ


@dataclass(frozen=True)
class Pattern:
    """N:M — keep `keep` of every `group` consecutive weights in a row."""

    keep: int
    group: int

    def __str__(self) -> str:
        return f"{self.keep}:{self.group}"

    @property
    def sparsity(self) -> float:
        return 1 - self.keep / self.group


@dataclass(frozen=True)
class Pruned:
    weight: torch.Tensor  # (out, in) float32, zeros where mask is False
    mask: torch.Tensor  # (out, in) bool: True = kept
    error: float  # relative output error on the calibration data (see module docstring)


# --- validation ---------------------------------------------------------------------------
def parse_pattern(text: str) -> Pattern:
    """"2:4" -> Pattern(2, 4). N and M positive with N < M."""
    try:
        keep, group = (int(part) for part in text.split(":"))
    except ValueError:
        raise LlmpressError(f"pattern {text!r} is not N:M (e.g. 2:4 or 4:8)") from None
    if not 0 < keep < group:
        raise LlmpressError(f"pattern {text}: need 0 < N < M (e.g. 2:4 keeps 2 of every 4)")
    return Pattern(keep, group)


def check_sparsity(sparsity: float) -> float:
    if not 0.0 < float(sparsity) < 1.0:
        raise LlmpressError(f"sparsity {sparsity} must lie strictly between 0 and 1 "
                            "(0.5 removes half the weights)")
    return float(sparsity)


def check_pattern_fits(pattern: Pattern, row_length: int, name: str = "weight") -> None:
    if row_length % pattern.group:
        raise LlmpressError(f"{name}: rows of {row_length} values do not divide into groups "
                            f"of {pattern.group} for the {pattern} pattern; choose another M")


# --- masks from scores ------------------------------------------------------------------------
def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask dropping exactly round(sparsity * in) lowest scores of every row."""
    n_drop = round(sparsity * scores.shape[1])
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_drop:
        drop = torch.topk(scores, n_drop, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask


def nm_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep mask with the `keep` highest scores of every `group` consecutive columns."""
    rows, cols = scores.shape
    check_pattern_fits(pattern, cols)
    groups = scores.reshape(rows, cols // pattern.group, pattern.group)
    kept = torch.topk(groups, pattern.keep, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, kept, True)
    return mask.reshape(rows, cols)


def mask_from_scores(scores: torch.Tensor, sparsity: float,
                     pattern: Pattern | None) -> torch.Tensor:
    return nm_mask(scores, pattern) if pattern is not None else row_mask(scores, sparsity)


# --- error -----------------------------------------------------------------------------------
def relative_error(weight: torch.Tensor, new_weight: torch.Tensor,
                   xtx: torch.Tensor | None = None) -> float:
    """‖(W − W')X‖² / ‖WX‖² = tr(ΔW XᵀX ΔWᵀ) / tr(W XᵀX Wᵀ); without XᵀX, ‖ΔW‖² / ‖W‖²."""
    delta = (weight - new_weight).float()
    if xtx is None:
        return float((delta * delta).sum() / (weight.float() ** 2).sum().clamp_min(1e-30))
    # float32 matmuls (a float64 GEMM is several times slower); the sums in float64
    g = xtx.float()
    num = ((delta @ g) * delta).double().sum()
    den = ((weight.float() @ g) * weight.float()).double().sum()
    return float(num / den.clamp_min(1e-30))


# --- the three pruners -------------------------------------------------------------------------
def prune_magnitude(weight: torch.Tensor, sparsity: float, pattern: Pattern | None = None,
                    xtx: torch.Tensor | None = None) -> Pruned:
    mask = mask_from_scores(weight.abs(), sparsity, pattern)
    new = weight * mask
    return Pruned(new, mask, relative_error(weight, new, xtx))


def wanda_scores(weight: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂ (Wanda eq. 1)."""
    return weight.abs() * column_norms.to(weight)[None, :]


def prune_wanda(weight: torch.Tensor, column_norms: torch.Tensor, sparsity: float,
                pattern: Pattern | None = None, xtx: torch.Tensor | None = None) -> Pruned:
    """column_norms: ‖X_j‖₂ per input column (Moments.column_norms, or sqrt of diag XᵀX)."""
    mask = mask_from_scores(wanda_scores(weight, column_norms), sparsity, pattern)
    new = weight * mask
    return Pruned(new, mask, relative_error(weight, new, xtx))


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = SPARSEGPT_DAMP,
                           name: str = "weight") -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so H⁻¹ = UᵀU), λ = damp · mean(diag H).

    If H + λI is not positive definite (too few calibration tokens, duplicated inputs), λ
    grows tenfold until it is, with a warning — the fallback of GPTQ/SparseGPT's users.
    """
    h = hessian.double()
    mean_diag = h.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
        damp = max(damp * 10, SPARSEGPT_DAMP)
        warnings.warn(f"{name}: Hessian not positive definite; damping raised to {damp:g} "
                      "of its mean diagonal (more calibration text helps)", stacklevel=2)
    raise LlmpressError(f"{name}: the calibration Hessian stays singular even with heavy "
                        "damping; use more calibration text or --method wanda")


def prune_sparsegpt(weight: torch.Tensor, xtx: torch.Tensor, count: int, sparsity: float,
                    pattern: Pattern | None = None, block: int = SPARSEGPT_BLOCK,
                    damp: float = SPARSEGPT_DAMP, name: str = "weight") -> Pruned:
    """SparseGPT (Algorithm 1) on W (out, in) with XᵀX (in, in) over `count` tokens.

    Columns are processed left to right in blocks of `block`: a block's mask is chosen
    adaptively from w²/[H⁻¹]²_jj (exactly round(sparsity · block size) weights of the block
    go, or per N:M group), each pruned column's error is spread onto the columns to its
    right through the Cholesky rows of H⁻¹, and the block's accumulated error updates the
    rest of the matrix at once. The loop runs once per column (the method is sequential
    in the columns); every step is vectorized over the rows.
    """
    if pattern is not None:
        check_pattern_fits(pattern, weight.shape[1], name)
        block = max(pattern.group, block // pattern.group * pattern.group)
    w = weight.clone().float()
    hessian = xtx.double() * (2.0 / max(count, 1))
    dead = hessian.diagonal() == 0  # inputs that were always zero: nothing to preserve
    hessian[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_hessian_factor(hessian, damp, name).float()  # (in, in), upper triangular
    rows, cols = w.shape
    prune = torch.zeros_like(w, dtype=torch.bool)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        # the block transposed, (columns, rows): each step reads and updates whole
        # contiguous rows of it
        wt = w[:, b0:b1].T.contiguous()
        h1 = hinv[b0:b1, b0:b1]
        d1 = h1.diagonal()
        errt = torch.zeros_like(wt)
        prune1 = torch.zeros_like(wt, dtype=torch.bool)
        scale = torch.zeros_like(wt)  # pruned / [H⁻¹]_jj: a column's error is w * scale
        if pattern is None:  # adaptive mask for the whole block at once
            saliency = (wt * wt) / (d1 * d1)[:, None]
            n_drop = round(sparsity * saliency.numel())
            if n_drop:
                drop = torch.topk(saliency.reshape(-1), n_drop, largest=False).indices
                prune1.view(-1)[drop] = True
            scale = prune1 / d1[:, None]
        for j in range(b1 - b0):
            if pattern is not None and j % pattern.group == 0:  # choose each group's mask
                g = slice(j, j + pattern.group)
                saliency = (wt[g] ** 2) / (d1[g] ** 2)[:, None]
                drop = torch.topk(saliency, pattern.group - pattern.keep, dim=0,
                                  largest=False).indices
                prune1[g].scatter_(0, drop, True)
                scale[g] = prune1[g] / d1[g, None]
            e = wt[j] * scale[j]  # (rows,): the pruned weights' error, 0 where kept
            wt[j:].addr_(h1[j, j:], e, alpha=-1)  # spread it right; wt[j] becomes the kept
            errt[j] = e
        w[:, b0:b1] = wt.T
        w[:, b1:] -= errt.T @ hinv[b0:b1, b1:]
        prune[:, b0:b1] = prune1.T
    mask = ~prune
    new = w * mask  # exact zeros (the update leaves pruned entries at ~0, not exactly)
    return Pruned(new, mask, relative_error(weight, new, xtx))


def prune_weight(method: str, weight: torch.Tensor, sparsity: float,
                 pattern: Pattern | None = None, xtx: torch.Tensor | None = None,
                 count: int = 0, name: str = "weight", damp: float = SPARSEGPT_DAMP) -> Pruned:
    """Dispatch to one pruner; Wanda's norms come from the diagonal of XᵀX."""
    if method == "magnitude":
        return prune_magnitude(weight, sparsity, pattern, xtx)
    if xtx is None:
        raise LlmpressError(f"{method} needs calibration statistics")
    if method == "wanda":
        return prune_wanda(weight, xtx.diagonal().clamp_min(0).sqrt(), sparsity, pattern, xtx)
    if method == "sparsegpt":
        return prune_sparsegpt(weight, xtx, count, sparsity, pattern, damp=damp, name=name)
    raise LlmpressError(f"unknown pruning method {method!r} (use {', '.join(METHODS)})")


# --- OWL: per-layer sparsity from outlier ratios ------------------------------------------------
def outlier_ratio(scores: list[torch.Tensor], threshold: float = OWL_THRESHOLD) -> float:
    """Fraction of a layer's Wanda scores above `threshold` × their mean (OWL's LOD)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())


def owl_sparsities(ratios: list[float], target: float, lam: float = OWL_LAMBDA) -> list[float]:
    """Layer sparsities in [target − λ, target + λ] with mean `target`: the layer with the
    most outliers gets the lowest sparsity (OWL section 4, linear in the outlier ratio)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1 - target)
    return [min(max(1 - float(d), 0.0), 0.999) for d in density]

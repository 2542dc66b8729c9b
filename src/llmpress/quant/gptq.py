"""GPTQ on one Linear and its Hessian (Frantar et al., "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023, Algorithm 1).

    H = 2 XᵀX / n over calibration inputs X (tokens, in)        calib.runner's Gram
    result = gptq_quantize(W, H, IntGridTarget(IntGrid(4, 128)), GPTQConfig())
    data, result = gptq_gguf(W, H, GGMLQuantizationType.Q4_K)     bytes of a GGUF tensor

Columns are quantized one at a time; each one's rounding error, divided by the matching
diagonal entry of the upper Cholesky factor of H⁻¹, is pushed onto the columns not yet
quantized (the optimal update of OBQ, section 3), lazily in blocks of 128 columns (the
"lazy batch updates" of section 4). H is damped by 1% of its mean diagonal; when the
Cholesky factorization still fails the damping grows tenfold, with a warning.

GPTQConfig.shrink adds shrink * diag(H) to H first: the input correlations the error
compensation relies on are shrunk toward zero (a shrinkage estimate of the covariance).
The published algorithm (shrink 0) fits the calibration text's correlations closely;
on other text that can do worse than plain rounding (see quant.calibrated).

Targets say what a column may become. Each fits parameters to a group of columns (a
group's scale and zero; a GGUF block's scales, chosen by our ggml-exact quantizers with
diag(H) as the importance) and rounds a column to the nearest point of that group's
grid. Without act-order a group's parameters are fitted when the first of its columns
comes up, from the weights as the earlier errors left them (GPTQ's reference code);
with act-order (columns by decreasing diag(H)) they are fitted up front from the
original weights ("static groups"), so every column keeps its natural group and the
result stores in the usual formats.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from gguf import GGMLQuantizationType

from llmpress.errors import LlmpressError
from llmpress.formats import get_format
from llmpress.kernels.cpu import one_torch_thread
from llmpress.quant import gguf_grid

SUPPORTED_BITS = (2, 3, 4, 8)
MAX_DAMP_RETRIES = 4
FP16_TINY = 2.0**-24  # smallest positive float16: a stored scale never rounds to zero


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # λ = damp * mean(diag H), added to the diagonal
    block_size: int = 128  # columns per lazy batch update
    act_order: bool = False  # quantize columns by decreasing diag(H), with static groups
    # H + shrink * diag(H): shrinks the input correlations toward zero (a shrinkage
    # estimate of the covariance), so that the error compensation fits the calibration
    # text less and other text better; 0 is GPTQ as published, large values approach
    # rounding to nearest.
    shrink: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.damp <= 1:
            raise LlmpressError(f"GPTQ damping {self.damp} must be in (0, 1] (default 0.01)")
        if self.shrink < 0:
            raise LlmpressError(f"GPTQ shrink {self.shrink} must not be negative")
        if self.block_size < 1:
            raise LlmpressError(f"GPTQ block size {self.block_size} must be positive (default 128)")


@dataclass(frozen=True)
class IntGrid:
    """The classic GPTQ grid: `bits`-bit integers per group of `group_size` input columns
    (-1: one group per row), value = scale * (q - zero); symmetric grids fix zero at
    2^(bits-1)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise LlmpressError(f"GPTQ cannot quantize to {self.bits} bits; supported: "
                                f"{', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size != -1 and self.group_size < 1:
            raise LlmpressError(f"group size {self.group_size} must be positive, or -1 for "
                                "one group per row")

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1


class Target(Protocol):
    group_size: int

    def fit(self, columns: torch.Tensor, group: int) -> Any:
        """Parameters for group `group` from its columns (out, group_size)."""

    def nearest(self, values: torch.Tensor, params: Any, position: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid values, uint8 codes) for columns (out, k) at group positions position..+k."""


@dataclass(frozen=True)
class IntGroupParams:
    scale: torch.Tensor  # (out,) float32, a float16 value
    zero: torch.Tensor  # (out,) float32, an integer in 0..max_code


class IntGridTarget:
    """IntGrid's min/max fit (GPTQ's Quantizer.find_params), scales rounded to float16 as
    checkpoints store them, so the result is exactly what a checkpoint reader dequantizes."""

    def __init__(self, grid: IntGrid, in_features: int):
        self.grid = grid
        self.group_size = in_features if grid.group_size == -1 else grid.group_size

    def fit(self, columns: torch.Tensor, group: int) -> IntGroupParams:
        zero_t = torch.zeros((), device=columns.device)
        low = torch.minimum(columns.min(dim=1).values, zero_t)
        high = torch.maximum(columns.max(dim=1).values, zero_t)
        if self.grid.symmetric:
            high = torch.maximum(low.abs(), high)
            low = torch.where(low < 0, -high, low)
        empty = (low == 0) & (high == 0)
        low, high = torch.where(empty, -1.0, low), torch.where(empty, 1.0, high)
        scale = ((high - low) / self.grid.max_code).half().float().clamp_min(FP16_TINY)
        if self.grid.symmetric:
            zero = torch.full_like(scale, float((self.grid.max_code + 1) // 2))
        else:
            zero = torch.round(-low / scale).clamp(0, self.grid.max_code)
        return IntGroupParams(scale, zero)

    def nearest(self, values, params: IntGroupParams, position: int):
        scale, zero = params.scale[:, None], params.zero[:, None]
        codes = torch.clamp(torch.round(values / scale) + zero, 0, self.grid.max_code)
        return scale * (codes - zero), codes.to(torch.uint8)


@dataclass(frozen=True)
class GGUFBlockParams:
    blocks: np.ndarray  # uint8 (out, type_size): the block scales (codes filled in later)
    lo: torch.Tensor  # (out, block_size): value of code 0 at each position
    unit: torch.Tensor  # (out, block_size): value step per level unit (may be <= 0)


class GGUFTarget:
    """One GGUF block column at a time: scales from our ggml-exact quantizer (the same
    search llama-quantize runs, with `importance` as its imatrix), then GPTQ's rounding
    onto those scales' grid."""

    def __init__(self, ggml_type: GGMLQuantizationType, importance: np.ndarray | None,
                 row_mean_square: np.ndarray, device: torch.device):
        self.ggml_type = GGMLQuantizationType(ggml_type)
        levels = gguf_grid.layout(self.ggml_type).levels  # refuses formats without a grid
        self.format = get_format(self.ggml_type)
        self.group_size = self.format.block_size
        self.importance = None if importance is None else np.asarray(importance, np.float32)
        self.row_mean_square = row_mean_square  # (out,): sigma2 of the legacy *_impl paths
        self.levels = torch.from_numpy(levels).to(device)
        self.linear = bool(np.array_equal(levels, np.arange(levels.size)))

    def fit(self, columns: torch.Tensor, group: int) -> GGUFBlockParams:
        x = np.ascontiguousarray(columns.detach().cpu().numpy(), dtype=np.float32)
        width = self.group_size
        weights = None if self.importance is None else \
            self.importance[group * width:(group + 1) * width]
        blocks = _quantize_block_column(self.format, x, weights, self.row_mean_square)
        grid = gguf_grid.grid(blocks, self.ggml_type)
        return GGUFBlockParams(blocks, torch.from_numpy(grid.lo).to(columns.device),
                               torch.from_numpy(grid.unit).to(columns.device))

    def nearest(self, values, params: GGUFBlockParams, position: int):
        k = values.shape[1]
        lo = params.lo[:, position:position + k]
        unit = params.unit[:, position:position + k]
        safe_unit = torch.where(unit != 0, unit, torch.ones_like(unit))
        steps = torch.where(unit != 0, (values - lo) / safe_unit, torch.zeros_like(values))
        if self.linear:
            codes = steps.round_().clamp_(0, self.levels.numel() - 1).to(torch.uint8)
            return lo + unit * codes.float(), codes
        codes = (steps.unsqueeze(-1) - self.levels).abs_().argmin(dim=-1)  # 16 IQ4 levels
        return lo + unit * self.levels[codes], codes.to(torch.uint8)


def _quantize_block_column(fmt, x: np.ndarray, weights: np.ndarray | None,
                           row_mean_square: np.ndarray) -> np.ndarray:
    """One block per row of x (out, block_size), as ggml quantizes that block inside its
    row: the legacy types' imatrix path weighs by the whole row's mean square (sigma2 of
    quantize_row_q4_0_impl and friends), the others use block statistics only."""
    from llmpress.formats.ggml_ops import importance_weights
    from llmpress.formats.legacy import _LegacyQuant

    if isinstance(fmt, _LegacyQuant):
        if weights is None or not fmt.uses_importance:
            return fmt.quantize_reference(x)
        full = np.broadcast_to(weights, x.shape)
        return fmt.quantize_weighted(x, importance_weights(x, full, row_mean_square[:, None]))
    return fmt.quantize(x, weights).reshape(x.shape[0], fmt.type_size)


# --- the algorithm ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GPTQResult:
    weight: torch.Tensor  # (out, in) float32: the quantized weight, dequantized
    codes: torch.Tensor  # uint8 (out, in): each weight's level code
    group_params: list  # the target's parameters per group
    group_index: torch.Tensor  # int64 (in,): each column's group (GPTQ's g_idx)
    order: torch.Tensor  # int64 (in,): the order the columns were quantized in
    error: float  # relative output error ‖(W - Ŵ)X‖² / ‖WX‖²


def output_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W - Ŵ)X‖² / ‖WX‖² computed through H ∝ XᵀX: tr(D H Dᵀ) / tr(W H Wᵀ) (float32
    products, float64 sums: a figure to report, not to optimize on)."""
    h = hessian.float()
    weight = weight.float()
    diff = weight - new_weight.float()
    signal = float(((weight @ h) * weight).sum(dtype=torch.float64))
    noise = float(((diff @ h) * diff).sum(dtype=torch.float64))
    return noise / signal if signal > 0 else noise


def inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so U[i, i:] are the OBQ update rows),
    λ = damp * mean(diag H); λ grows tenfold while the factorization fails."""
    h = hessian.double()
    mean_diag = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        lam = damp * (10**attempt) * (mean_diag if mean_diag > 0 else 1.0)
        lower, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                if attempt:
                    warnings.warn(f"GPTQ: the Hessian was not positive definite; damped with "
                                  f"{damp * 10**attempt:g} of its mean diagonal instead of "
                                  f"{damp:g}", RuntimeWarning, stacklevel=3)
                return upper
    raise LlmpressError("GPTQ: the Hessian stays singular even with heavy damping "
                        "(calibration inputs all zero or not finite?)")


def _check_shapes(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise LlmpressError(f"GPTQ needs a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    n = weight.shape[1]
    if tuple(hessian.shape) != (n, n):
        raise LlmpressError(f"GPTQ: the Hessian is {tuple(hessian.shape)}, the weight has {n} "
                            f"input columns, so it must be ({n}, {n})")
    if not torch.isfinite(hessian).all():
        raise LlmpressError("GPTQ: the Hessian has non-finite values")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, target: Target,
                  config: GPTQConfig = GPTQConfig()) -> GPTQResult:
    """GPTQ of `weight` (out, in) given H (in, in) onto `target`'s grid."""
    with one_torch_thread(weight.device):
        return _gptq(weight, hessian, target, config, measure=True)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, target: Target,
          config: GPTQConfig, measure: bool) -> GPTQResult:
    _check_shapes(weight, hessian)
    out_features, n = weight.shape
    device = weight.device
    group_size = target.group_size
    n_groups = math.ceil(n / group_size)
    original = weight.detach().float()
    work = original.clone()
    h = hessian.detach().to(device, torch.float64).clone()
    dead = h.diagonal() == 0  # inputs never seen: no information, just round them
    h[dead, dead] = 1.0
    if config.shrink:
        h += torch.diag(config.shrink * h.diagonal())

    params: list = [None] * n_groups
    static = config.act_order or group_size >= n
    if static:  # GPTQ's static_groups: fitted on the original weights, natural groups
        for g in range(n_groups):
            params[g] = target.fit(work[:, g * group_size:(g + 1) * group_size], g)
    order = (torch.argsort(h.diagonal(), descending=True, stable=True) if config.act_order
             else torch.arange(n, device=device))
    work, h = work[:, order], h[order][:, order]
    upper = inverse_cholesky(h, config.damp).float()
    block = config.block_size if static else math.ceil(config.block_size / group_size) * group_size

    quantized = torch.zeros_like(work)
    codes = torch.zeros(out_features, n, dtype=torch.uint8, device=device)
    order_list = order.tolist()
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = work[:, i1:i2].clone()
        errors = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = order_list[i1 + i]
            g, position = divmod(column, group_size)
            if params[g] is None:  # lazy: natural order, so the group is w1[:, i:i+size]
                params[g] = target.fit(w1[:, i:i + group_size], g)
            q, c = target.nearest(w1[:, i:i + 1], params[g], position)
            quantized[:, i1 + i], codes[:, i1 + i] = q[:, 0], c[:, 0]
            err = (w1[:, i] - q[:, 0]) / u1[i, i]
            w1[:, i:] -= torch.outer(err, u1[i, i:])
            errors[:, i] = err
        work[:, i2:] -= errors @ upper[i1:i2, i2:]

    inverse = torch.argsort(order)
    quantized, codes = quantized[:, inverse], codes[:, inverse]
    group_index = torch.arange(n, device=device) // group_size
    error = output_error(original, quantized, hessian.to(device)) if measure else float("nan")
    return GPTQResult(quantized, codes, params, group_index, order, error)


def rtn_quantize(weight: torch.Tensor, target: Target,
                 hessian: torch.Tensor | None = None) -> GPTQResult:
    """Round to nearest on the same target (groups fitted on the original weights, no
    error propagation): the baseline GPTQ is measured against."""
    n = weight.shape[1]
    original = weight.detach().float()
    size = target.group_size
    params, values, codes = [], [], []
    for g in range(math.ceil(n / size)):
        columns = original[:, g * size:(g + 1) * size]
        params.append(target.fit(columns, g))
        v, c = target.nearest(columns, params[-1], 0)
        values.append(v)
        codes.append(c)
    quantized = torch.cat(values, dim=1)
    error = output_error(original, quantized, hessian) if hessian is not None else float("nan")
    order = torch.arange(n, device=weight.device)
    return GPTQResult(quantized, torch.cat(codes, dim=1), params, order // size, order, error)


# --- GGUF ---------------------------------------------------------------------------------
def gguf_target(weight: torch.Tensor, ggml_type: GGMLQuantizationType,
                importance: np.ndarray | None) -> GGUFTarget:
    fmt = get_format(ggml_type)
    if weight.shape[1] % fmt.block_size:
        raise LlmpressError(f"GPTQ to {fmt.name}: rows of {weight.shape[1]} values are not a "
                            f"multiple of its block size {fmt.block_size}")
    w = weight.detach().float().cpu().numpy()
    # ggml's sigma2: the row's sum of squares in float32, over the row length
    row_mean_square = ((w * w).sum(axis=1, dtype=np.float32) / np.float32(w.shape[1]))
    return GGUFTarget(ggml_type, importance, row_mean_square, weight.device)


def gguf_bytes(result: GPTQResult, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """The GGUF tensor data of a GGUF-target result: uint8 (out, row_bytes)."""
    codes = result.codes.cpu().numpy()
    size = get_format(ggml_type).block_size
    blocks = [gguf_grid.with_codes(p.blocks, codes[:, g * size:(g + 1) * size], ggml_type)
              for g, p in enumerate(result.group_params)]
    return np.stack(blocks, axis=1).reshape(codes.shape[0], -1)


def gptq_gguf(weight: torch.Tensor, hessian: torch.Tensor, ggml_type: GGMLQuantizationType,
              importance: np.ndarray | None = None, config: GPTQConfig = GPTQConfig()
              ) -> tuple[np.ndarray, GPTQResult]:
    """GPTQ into a GGUF block format: -> (tensor bytes uint8 (out, row_bytes), result).
    `importance` weighs the scale searches like llama-quantize's imatrix (default:
    diag(H), which is 2x the imatrix of the same inputs: the same weighting)."""
    _check_shapes(weight, hessian)
    if importance is None:
        importance = hessian.diagonal().float().cpu().numpy()
    elif np.asarray(importance).shape != (weight.shape[1],):
        raise LlmpressError(f"importance has shape {np.asarray(importance).shape}, the weight "
                            f"{weight.shape[1]} input columns")
    target = gguf_target(weight, ggml_type, importance)
    with one_torch_thread(weight.device):
        result = _gptq(weight, hessian, target, config, measure=False)
    data = gguf_bytes(result, ggml_type)
    # the truth is what the bytes decode to (the grid points are equal up to rounding)
    decoded = gguf_grid.dequantize_blocks(data.reshape(-1, target.format.type_size), ggml_type)
    new_weight = torch.from_numpy(decoded.reshape(weight.shape)).to(weight.device)
    result = GPTQResult(new_weight, result.codes, result.group_params, result.group_index,
                        result.order, output_error(weight.float(), new_weight, hessian))
    return data, result

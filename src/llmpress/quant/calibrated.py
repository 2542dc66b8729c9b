"""Calibration-aware quantization of a whole model into a GGUF type mix: GPTQ, AWQ, or
AWQ then GPTQ, layer by layer (calib.runner: memory is one layer plus the activations).

    report = calibrated_quantize(QuantizeConfig("in.gguf", "out.gguf", "Q4_K_M",
                                                imatrix="imatrix.gguf"),
                                 CalibrationConfig(method="gptq", tokens=32768))

The types come from the same plan as `llmpress quantize` (quant.quantize: llama-quantize's
mix rules), so the file has exactly the tensor types and size of the plain one; only the
values inside the blocks differ. For each decoder layer the runner feeds the calibration
sequences (through the already quantized layers before it, the sequential scheme of
GPTQ), we collect each Linear's input Gram matrix (H = 2XᵀX/n) and mean |x|, then:

    awq   search per-channel scales for {q,k,v}, {gate,up}, o (from v) and down (from up)
          and fold them (quant.awq); the norms, v and up change in the output file too;
    gptq  GPTQ into the tensor's GGUF type (quant.gptq.gptq_gguf), block scales chosen
          by our ggml-exact quantizers with the imatrix (or diag(H)) as importance, and
          H shrunk toward its diagonal (DEFAULT_SHRINK) so it generalizes past the
          calibration text;
    else  the ggml quantizer with the same importance (what llama-quantize writes).

Every Linear reports its output error ‖(W − Ŵ)X‖²/‖WX‖² on the calibration inputs for
plain rounding with the same importance ("rtn") and for the method. Tensors outside the
decoder layers (token embedding, output) are quantized as `llmpress quantize` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from llmpress.errors import LlmpressError
from llmpress.formats import get_format
from llmpress.quant import awq
from llmpress.quant.gptq import GPTQConfig, gptq_gguf, output_error
from llmpress.quant.mix import FLOAT_TYPES

METHODS = ("rtn", "gptq", "awq", "awq+gptq")
# GPTQ's H + SHRINK * diag(H) for whole models. On the default model, GPTQ as published
# (shrink 0) calibrated on the pydoc text cut the calibration-set output error of every
# Linear by 60% yet raised WikiText KLD (Q4_0: 0.237 against rounding's 0.169): the
# compensation fits the calibration text's input correlations. Shrinking them by half
# (shrink 1): Q4_0 0.133, Q4_K_M 0.0249, Q3_K_M 0.0670 against rounding's 0.169, 0.0318,
# 0.0845 (40 windows; benchmarks/bench_gptq.py).
DEFAULT_SHRINK = 1.0
# Linears reading the same input as another one (and so sharing its statistics).
SHARED_INPUTS = {"attn_k": "attn_q", "attn_v": "attn_q", "ffn_up": "ffn_gate"}
INPUT_GROUPS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"),
                ("ffn_down",))


@dataclass(frozen=True)
class CalibrationConfig:
    method: str = "gptq"
    text: str | Path | None = None  # calibration text file; None: the built-in text
    tokens: int = 32768  # calibration tokens (whole sequences of seq_len)
    seq_len: int = 512
    gptq: GPTQConfig = field(default_factory=lambda: GPTQConfig(shrink=DEFAULT_SHRINK))
    awq_grid: int = awq.DEFAULT_GRID
    batch_size: int = 4  # sequences per forward pass
    device: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LlmpressError(f"unknown method {self.method!r}; choose one of "
                                f"{', '.join(METHODS)}")
        if self.seq_len < 2 or self.tokens < self.seq_len:
            raise LlmpressError(f"--calib-tokens {self.tokens} must be at least one sequence "
                                f"of {self.seq_len} tokens")

    @property
    def n_sequences(self) -> int:
        return max(1, self.tokens // self.seq_len)

    @property
    def uses_awq(self) -> bool:
        return self.method in ("awq", "awq+gptq")

    @property
    def uses_gptq(self) -> bool:
        return self.method in ("gptq", "awq+gptq")


@dataclass(frozen=True)
class LinearError:
    name: str  # GGUF tensor name
    type: str
    rtn_error: float  # plain rounding with the same importance
    error: float  # this method's
    awq_alpha: float | None = None


@dataclass(frozen=True)
class CalibratedReport:
    method: str
    quantize: object  # quant.quantize.QuantizeReport of the written file
    linears: tuple[LinearError, ...]
    calib_tokens: int
    seconds: float


# --- one layer --------------------------------------------------------------------------
def _dequantize(data: np.ndarray, ggml_type: T, shape: tuple[int, ...]) -> torch.Tensor:
    fmt = get_format(ggml_type)
    return fmt.dequantize(torch.from_numpy(np.ascontiguousarray(data).reshape(-1)), shape)


def round_to_nearest(weight: torch.Tensor, ggml_type: T, importance: np.ndarray | None
                     ) -> tuple[np.ndarray, torch.Tensor]:
    """The ggml quantizer (llama-quantize's bytes): -> (bytes (out, row_bytes), weight)."""
    fmt = get_format(ggml_type)
    data = fmt.quantize(weight.detach().float().cpu().numpy(), importance)
    return data, _dequantize(data, ggml_type, tuple(weight.shape)).to(weight.device)


@dataclass
class LayerPlan:
    """The quantization of one decoder layer, filled in by quantize_layer."""

    types: dict[str, T]  # short name -> target type
    importance: dict[str, np.ndarray | None]  # short name -> imatrix entry (None: diag H)
    data: dict[str, np.ndarray] = field(default_factory=dict)  # tensor bytes to write
    errors: list[LinearError] = field(default_factory=list)


def _awq_quantizer(ggml_type: T, importance: np.ndarray | None) -> awq.Quantizer:
    """Q(W diag(s)) for the AWQ search: the ggml quantizer, its importance moved to the
    scaled inputs x / s (mean square / s²)."""
    def quantize(scaled: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        weights = None if importance is None else importance / (s.double().cpu().numpy() ** 2)
        return round_to_nearest(scaled, ggml_type, None if weights is None
                                else weights.astype(np.float32))[1]
    return quantize


def quantize_layer(step, plan: LayerPlan, config: CalibrationConfig, n_heads: int,
                   n_kv_heads: int) -> dict[str, torch.Tensor]:
    """AWQ and/or GPTQ for the Linears of one runner step; sets the layer's weights to the
    quantized ones (unfolded, so the runner's model computes what the file will) and
    fills plan.data / plan.errors. Returns the AWQ scales of the norms folded
    ({"attn_norm": s, "ffn_norm": s}, empty without AWQ), plus v's and up's row scales."""
    observed = [group[0] for group in INPUT_GROUPS]
    stats = step.collect(observed, awq.init_activation_stats, awq.accumulate_activation_stats)
    source = {n: SHARED_INPUTS.get(n, n) for name_group in INPUT_GROUPS for n in name_group}
    original = {n: step.weight(n).clone() for n in source}
    hessians = {n: stats[source[n]].hessian() for n in source}
    weights = dict(original)  # the weights to quantize (AWQ-scaled when AWQ runs)
    col_scale = {n: torch.ones(w.shape[1], device=w.device) for n, w in weights.items()}
    row_scale = {n: torch.ones(w.shape[0], device=w.device) for n, w in weights.items()}
    alphas: dict[str, float] = {}
    folds: dict[str, torch.Tensor] = {}

    def imp(n):  # importance of the unscaled inputs: imatrix entry, or diag(H)/2 = E[x²]
        given = plan.importance.get(n)
        return given if given is not None else (hessians[n].diagonal() / 2).cpu().numpy()

    quantizable = {n for n in source if plan.types[n] not in FLOAT_TYPES}
    if config.uses_awq:
        def search(names, abs_mean):
            names = [n for n in names if n in quantizable]
            if not names:
                return None
            result = awq.search_scales([weights[n] for n in names], hessians[names[0]], abs_mean,
                                       [_awq_quantizer(plan.types[n], imp(n)) for n in names],
                                       config.awq_grid)
            for n in names:
                alphas[n] = result.alpha
            return result.scales

        for norm, names in (("attn_norm", ("attn_q", "attn_k", "attn_v")),
                            ("ffn_norm", ("ffn_gate", "ffn_up"))):
            s = search(names, stats[names[0]].abs_mean())
            if s is not None:
                folds[norm] = s
                for n in names:  # all readers of the norm take the scales, quantized or not
                    weights[n] = weights[n] * s
                    col_scale[n] = col_scale[n] * s
        tied = awq.kv_tied_abs_mean(stats["attn_output"].abs_mean(), n_heads, n_kv_heads)
        for producer, consumer, abs_mean in (("attn_v", "attn_output", tied),
                                             ("ffn_up", "ffn_down", stats["ffn_down"].abs_mean())):
            s = search([consumer], abs_mean)
            if s is None:
                continue
            s_rows = awq.kv_scales(s, n_heads, n_kv_heads) if producer == "attn_v" else s
            folds[producer] = s_rows
            weights[producer] = weights[producer] / s_rows[:, None]
            row_scale[producer] = row_scale[producer] * s_rows
            weights[consumer] = weights[consumer] * s
            col_scale[consumer] = col_scale[consumer] * s

    def scaled_importance(n) -> np.ndarray:
        return (imp(n) / (col_scale[n].double().cpu().numpy() ** 2)).astype(np.float32)

    new_weights: dict[str, torch.Tensor] = {}
    if config.uses_gptq:  # Linears with one input and one type: one GPTQ run, rows stacked
        for group in INPUT_GROUPS:
            by_type: dict[T, list[str]] = {}
            for n in group:
                if n in quantizable:
                    by_type.setdefault(plan.types[n], []).append(n)
            for ggml_type, names in by_type.items():
                lead = names[0]
                stacked = torch.cat([weights[n] for n in names])
                data, result = gptq_gguf(stacked, awq.scaled_hessian(hessians[lead], col_scale[lead]),
                                         ggml_type, scaled_importance(lead), config.gptq)
                sizes = [weights[n].shape[0] for n in names]
                for n, d, w in zip(names, np.split(data, np.cumsum(sizes)[:-1]),
                                   result.weight.split(sizes)):
                    plan.data[n], new_weights[n] = d, w

    for n in source:
        ggml_type = plan.types[n]
        if n not in quantizable:
            new = weights[n]
            plan.data[n] = get_format(ggml_type).quantize(new.float().cpu().numpy())
        elif n in new_weights:
            new = new_weights[n]
        else:
            plan.data[n], new = round_to_nearest(weights[n], ggml_type, scaled_importance(n))
        effective = new * row_scale[n][:, None] / col_scale[n][None, :]
        if n in quantizable:
            _, rtn = round_to_nearest(original[n], ggml_type, imp(n))
            plan.errors.append(LinearError(
                f"blk.{step.gguf_index}.{n}.weight", ggml_type.name,
                output_error(original[n], rtn, hessians[n]),
                output_error(original[n], effective, hessians[n]), alphas.get(n)))
        step.set_weight(n, effective)
    return folds


# --- the whole model --------------------------------------------------------------------
def _float_bytes(values: torch.Tensor, ggml_type: T) -> np.ndarray:
    return get_format(ggml_type).quantize(values.detach().float().cpu().numpy().reshape(1, -1))


def calibrated_quantize(config, calib: CalibrationConfig,
                        layer_progress: Callable[[int, int], None] | None = None,
                        tensor_progress: Callable | None = None,
                        calibration: torch.Tensor | None = None) -> CalibratedReport:
    """Quantize config.input (quant.quantize.QuantizeConfig) with calib.method and write
    config.output. `calibration`: token sequences (N, T) to use instead of calib.text.
    With method "rtn" this is quantize_model itself."""
    from llmpress.calib.data import calibration_tokens, read_calibration_text
    from llmpress.calib.runner import run_layers
    from llmpress.io.loader import load_source, load_tokenizer
    from llmpress.kernels.device import default_device
    from llmpress.models.llama import LlamaModel
    from llmpress.quant.quantize import (
        _importance_for,
        load_imatrix,
        plan_file_type,
        plan_quantization,
        quantize_model,
    )
    from llmpress.quant.write import write_gguf

    started = time.perf_counter()
    if calib.method == "rtn":
        report = quantize_model(config, tensor_progress)
        return CalibratedReport("rtn", report, (), 0, time.perf_counter() - started)

    source = load_source(config.input)
    imatrix = load_imatrix(config.imatrix) if config.imatrix is not None else None
    plan = plan_quantization(source, config, imatrix)
    types = {c.name: c.target_type for c in plan.choices}
    model = LlamaModel(source, mode="exact", device=calib.device or default_device())
    tokens = calibration
    if tokens is None:
        tokens = calibration_tokens(load_tokenizer(source), read_calibration_text(calib.text),
                                    calib.n_sequences, calib.seq_len)

    overrides: dict[str, np.ndarray] = {}
    errors: list[LinearError] = []

    def per_layer(step) -> None:
        prefix = f"blk.{step.gguf_index}."
        layer_plan = LayerPlan(
            types={n: types[prefix + n + ".weight"] for n in step.linears},
            importance={n: (imatrix.entries.get(prefix + n + ".weight") if imatrix else None)
                        for n in step.linears})
        lc = model.cfg.layers[step.index]
        folds = quantize_layer(step, layer_plan, calib, lc.n_heads, lc.n_kv_heads)
        for n, data in layer_plan.data.items():
            overrides[prefix + n + ".weight"] = data
        errors.extend(layer_plan.errors)
        block = step.block
        for norm in ("attn_norm", "ffn_norm"):  # folded AWQ scales: g / s
            if norm in folds:
                name = prefix + norm + ".weight"
                overrides[name] = _float_bytes(getattr(block, norm) / folds[norm], types[name])
        if "attn_v" in folds and block.attn.biases is not None:
            name = prefix + "attn_v.bias"
            overrides[name] = _float_bytes(block.attn.biases[2] / folds["attn_v"], types[name])

    run_layers(model, tokens, per_layer, batch_size=calib.batch_size, progress=layer_progress)

    tensors = write_gguf(config.output, source, plan.choices, plan.metadata,
                         replacements=overrides, layout=plan.layout, parts=plan.parts,
                         progress=tensor_progress,
                         importance=lambda choice: _importance_for(choice, imatrix))
    report = plan.report(tensors, config.output, plan_file_type(config), imatrix, started)
    return CalibratedReport(calib.method, report, tuple(errors), int(tokens.numel()),
                            time.perf_counter() - started)


# --- GPTQ into a Hugging Face checkpoint (integer grid) ------------------------------------
@dataclass(frozen=True)
class CheckpointReport:
    output: str
    format: str
    linears: tuple[LinearError, ...]
    calib_tokens: int
    seconds: float


def gptq_checkpoint(source_dir: str | Path, out_dir: str | Path, grid, fmt: str = "gptq",
                    calib: CalibrationConfig | None = None,
                    calibration: torch.Tensor | None = None,
                    layer_progress: Callable[[int, int], None] | None = None
                    ) -> CheckpointReport:
    """GPTQ of every decoder Linear of a float Hugging Face directory onto `grid`
    (quant.gptq.IntGrid), written as a GPTQ or compressed-tensors pack-quantized
    directory (io.gptq_checkpoint); embeddings, norms and lm_head stay as they are."""
    from llmpress.calib.data import calibration_tokens, read_calibration_text
    from llmpress.calib.runner import run_layers
    from llmpress.io import gptq_checkpoint as ckpt
    from llmpress.io.hf import load_hf_dir, unpermute_qk
    from llmpress.io.loader import load_tokenizer
    from llmpress.kernels.device import default_device
    from llmpress.models.llama import LlamaModel
    from llmpress.io.names import PERMUTED_QK_ARCHS, hf_tensor_name
    from llmpress.quant.gptq import IntGridTarget, gptq_quantize, rtn_quantize

    started = time.perf_counter()
    calib = calib or CalibrationConfig(method="gptq")
    if fmt not in ("gptq", "compressed-tensors"):
        raise LlmpressError(f"unknown checkpoint format {fmt!r} (gptq or compressed-tensors)")
    if grid.bits not in ckpt.PACKABLE_BITS:
        raise LlmpressError(f"{grid.bits}-bit checkpoints cannot be written (bits "
                            f"{', '.join(map(str, ckpt.PACKABLE_BITS))} can)")
    if Path(out_dir).exists():
        raise LlmpressError(f"{out_dir} exists; choose a new directory for the checkpoint")
    source = load_hf_dir(source_dir)
    model = LlamaModel(source, mode="exact", device=calib.device or default_device())
    tokens = calibration
    if tokens is None:
        tokens = calibration_tokens(load_tokenizer(source), read_calibration_text(calib.text),
                                    calib.n_sequences, calib.seq_len)
    permuted = source.architecture in PERMUTED_QK_ARCHS
    linears: dict[str, ckpt.IntLinear] = {}
    errors: list[LinearError] = []

    def per_layer(step) -> None:
        observed = [group[0] for group in INPUT_GROUPS]
        stats = step.collect(observed, awq.init_activation_stats,
                             awq.accumulate_activation_stats)
        lc = model.cfg.layers[step.index]
        for group in INPUT_GROUPS:
            hessian = stats[group[0]].hessian()
            weights = [step.weight(n) for n in group]
            target = IntGridTarget(grid, weights[0].shape[1])
            result = gptq_quantize(torch.cat(weights), hessian, target, calib.gptq)
            sizes = [w.shape[0] for w in weights]
            stacked = ckpt.int_linear_from_gptq(result, grid.bits)
            start = 0
            for n, w, rows in zip(group, weights, sizes):
                part = ckpt.IntLinear(stacked.codes[start:start + rows],
                                      stacked.scales[start:start + rows],
                                      stacked.zeros[start:start + rows],
                                      stacked.group_index, grid.bits)
                start += rows
                name = f"blk.{step.gguf_index}.{n}.weight"
                new = part.dequantize()
                rtn = rtn_quantize(w, target).weight
                errors.append(LinearError(name, f"int{grid.bits}", output_error(w, rtn, hessian),
                                          output_error(w, new, hessian)))
                step.set_weight(n, new)
                heads = {"attn_q": lc.n_heads, "attn_k": lc.n_kv_heads}.get(n)
                if permuted and heads:  # back to the checkpoint's row order
                    part = part.permute_rows(lambda t, h=heads: unpermute_qk(t, h))
                linears[hf_tensor_name(name)[: -len(".weight")]] = part

    run_layers(model, tokens, per_layer, batch_size=calib.batch_size, progress=layer_progress)
    if fmt == "gptq":
        config = ckpt.gptq_config(grid.bits, grid.group_size, grid.symmetric,
                                  calib.gptq.act_order, calib.gptq.damp)
    else:
        config = ckpt.compressed_tensors_config(grid.bits, grid.group_size, grid.symmetric,
                                                ["lm_head"])
    ckpt.write_quantized_dir(source_dir, out_dir, linears, fmt, config)
    return CheckpointReport(str(out_dir), fmt, tuple(errors), int(tokens.numel()),
                            time.perf_counter() - started)

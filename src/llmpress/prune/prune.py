"""`prune_model`: one entry point for `llmpress prune`, from a model to a pruned model.

    cfg = PruneConfig(method="sparsegpt", sparsity=0.5)          # or pattern="2:4", owl=True
    cfg = PruneConfig(method="layers", ratio=0.25)                # or n_layers=8, metric
    cfg = PruneConfig(method="width", ratio=0.2, uniform=True)
    result = prune_model(load_source(path), cfg, tokenizer)      # -> PruneResult
    write_pruned(result, "out.gguf")                              # input types, or a type

The pruned model is an in-memory ModelSource: tensors the pruner changed are float32,
the rest are the input's own (memory-mapped) tensors, so the evaluator, the distiller
and the writers take it like any loaded model. Memory: the calibration runner holds one
layer and the activations, but unstructured and width pruning keep every changed weight
in float32 until it is written (4 bytes per decoder weight; 0.4 GB for a 135M model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llmpress.calib.data import calibration_tokens, read_calibration_text
from llmpress.calib.runner import (
    LINEAR_NAMES, LayerStep, accumulate_gram, accumulate_moments, init_gram, init_moments,
    run_layers,
)
from llmpress.errors import LlmpressError
from llmpress.io.source import ModelSource, TensorRef
from llmpress.kernels.device import default_device
from llmpress.models.config import LlamaConfig, config_from_source
from llmpress.models.llama import LlamaModel
from llmpress.prune import structured, unstructured
from llmpress.prune.unstructured import Pattern
from llmpress.quant.write import read_float  # a tensor dequantized exactly, as torch

UNSTRUCTURED = unstructured.METHODS
STRUCTURED = ("layers", "width")
LAYER_METRICS = ("influence", "angular")
# Linears that read the same input share one set of statistics
SHARED_INPUT = {"attn_q": "attn_q", "attn_k": "attn_q", "attn_v": "attn_q",
                "attn_output": "attn_output", "ffn_gate": "ffn_gate", "ffn_up": "ffn_gate",
                "ffn_down": "ffn_down"}
STATE_SAMPLE = 4096  # hidden states kept per layer boundary for the angular metric

Progress = Callable[[str, int, int], None]  # (phase, done, total)


# --- models held in memory ------------------------------------------------------------------
def float_tensor_ref(name: str, values: torch.Tensor) -> TensorRef:
    """A TensorRef of type F32 over an in-memory tensor (its bytes, no copy)."""
    values = values.detach().to("cpu", torch.float32).contiguous()
    raw = values.view(-1).view(torch.uint8)
    return TensorRef(name=name, ggml_type=GGMLQuantizationType.F32, shape=tuple(values.shape),
                     n_bytes=raw.numel(), read_bytes=lambda: raw)


def in_memory_source(path: str | Path, metadata: Mapping[str, Any],
                     tensors: Mapping[str, torch.Tensor | TensorRef]) -> ModelSource:
    """A ModelSource whose tensors are float32 tensors (or refs kept from another source):
    what the pruner hands to the model, the evaluator, the distiller and the writers."""
    refs = {name: t if isinstance(t, TensorRef) else float_tensor_ref(name, t)
            for name, t in tensors.items()}
    return ModelSource(path=Path(path), metadata=dict(metadata), tensors=refs,
                       file_bytes=sum(r.n_bytes for r in refs.values()))


def count_params(source: ModelSource) -> int:
    return sum(int(np.prod(r.shape)) for r in source.tensors.values())


# --- configuration --------------------------------------------------------------------------
@dataclass(frozen=True)
class PruneConfig:
    """What `llmpress prune` takes; validated on construction."""

    method: str  # magnitude | wanda | sparsegpt | layers | width
    sparsity: float = 0.5  # unstructured: fraction of zeros
    pattern: str | None = None  # "2:4", "4:8": N:M instead of --sparsity
    owl: bool = False  # per-layer sparsity from outlier ratios
    damp: float = unstructured.SPARSEGPT_DAMP  # SparseGPT: λ / mean diag(H) (paper: 1%)
    ratio: float | None = None  # structured: fraction of layers / of layer parameters
    n_layers: int | None = None  # layers: how many to remove
    layer_metric: str = "influence"  # influence (ShortGPT) | angular (Gromov et al.)
    uniform: bool = True  # width: same widths in every layer (llama.cpp needs it)
    calib_text: str | Path | None = None  # None: the built-in text
    n_sequences: int = 32
    seq_len: int = 256
    batch_size: int = 4
    device: str | None = None

    def __post_init__(self) -> None:
        if self.method not in UNSTRUCTURED + STRUCTURED:
            raise LlmpressError(f"unknown pruning method {self.method!r}; use one of "
                                f"{', '.join(UNSTRUCTURED + STRUCTURED)}")
        if self.method in UNSTRUCTURED:
            if self.pattern is not None:
                unstructured.parse_pattern(self.pattern)
                if self.owl:
                    raise LlmpressError("--owl sets per-layer sparsities; an N:M --pattern "
                                        "fixes them, so use one or the other")
            else:
                unstructured.check_sparsity(self.sparsity)
        elif self.pattern is not None or self.owl:
            raise LlmpressError(f"--pattern and --owl apply to magnitude/wanda/sparsegpt, "
                                f"not to --method {self.method}")
        if self.method == "layers":
            if (self.ratio is None) == (self.n_layers is None):
                raise LlmpressError("--method layers needs either --ratio (e.g. 0.25) or "
                                    "--layers N")
            if self.layer_metric not in LAYER_METRICS:
                raise LlmpressError(f"unknown layer metric {self.layer_metric!r}; use "
                                    f"{' or '.join(LAYER_METRICS)}")
        if self.method == "width" and self.ratio is None:
            raise LlmpressError("--method width needs --ratio (e.g. 0.2)")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise LlmpressError(f"--ratio {self.ratio} must lie strictly between 0 and 1")
        if not 0 <= self.damp < 100:
            raise LlmpressError(f"--damp {self.damp}: give a fraction such as 0.01")
        if self.n_sequences < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise LlmpressError("calibration needs at least 1 sequence of at least 2 tokens")

    @property
    def parsed_pattern(self) -> Pattern | None:
        return unstructured.parse_pattern(self.pattern) if self.pattern else None

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.owl

    def label(self) -> str:
        if self.method in UNSTRUCTURED:
            amount = self.pattern or f"{self.sparsity:.0%}"
            return f"{self.method} {amount}" + (" OWL" if self.owl else "")
        if self.method == "layers":
            amount = f"{self.n_layers} layers" if self.n_layers else f"{self.ratio:.0%}"
            return f"layers {amount} ({self.layer_metric})"
        return f"width {self.ratio:.0%}" + (" uniform" if self.uniform else " per layer")


# --- results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearReport:
    layer: int  # blk.N of the input
    name: str  # attn_q, ..., ffn_down
    sparsity: float  # fraction of zeros in the new weight
    error: float  # relative output error (weight error for magnitude without calibration)


@dataclass
class PruneResult:
    source: ModelSource  # the pruned model (F32 tensors where changed)
    original: ModelSource
    config: PruneConfig
    params_before: int
    params_after: int
    nonzero_after: int
    changed: tuple[str, ...]  # names of the tensors the pruner wrote (output names)
    linears: list[LinearReport] = field(default_factory=list)
    layer_sparsity: list[float] = field(default_factory=list)  # OWL targets per layer
    removed_layers: list[int] = field(default_factory=list)
    layer_scores: list[float] = field(default_factory=list)
    widths: list[tuple[int, int, int]] = field(default_factory=list)  # (heads, kv, ffn)
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    seconds: float = 0.0

    def sparsity_by_type(self) -> dict[str, float]:
        """Zeros / weights per Linear type over all layers, as pruned (in float)."""
        out = {}
        for name in LINEAR_NAMES:
            refs = [self.source.tensors[t] for t in self.source.tensors
                    if t.startswith("blk.") and t.endswith(f".{name}.weight")]
            total = sum(int(np.prod(r.shape)) for r in refs)
            zeros = sum(int((read_float(r) == 0).sum()) for r in refs)
            out[name] = zeros / max(total, 1)
        return out


# --- the entry point -------------------------------------------------------------------------
def prune_model(source: ModelSource, config: PruneConfig, tokenizer=None,
                progress: Progress | None = None) -> PruneResult:
    """Prune `source` as `config` says. `tokenizer` cuts the calibration text (needed by
    every method but plain magnitude pruning)."""
    started = time.perf_counter()
    cfg = config_from_source(source)
    if cfg.n_experts:  # the methods below know one dense FFN per layer
        raise LlmpressError(f"{source.path}: pruning does not cover mixtures of experts yet")
    tokens = None
    if config.needs_calibration:
        if tokenizer is None:
            raise LlmpressError(f"{config.method} needs a tokenizer for its calibration text")
        text = read_calibration_text(config.calib_text)
        tokens = calibration_tokens(tokenizer, text, config.n_sequences, config.seq_len)
    if config.method in UNSTRUCTURED:
        result = _prune_unstructured(source, cfg, config, tokens, progress)
    elif config.method == "layers":
        result = _prune_layers(source, cfg, config, tokens, progress)
    else:
        result = _prune_width(source, cfg, config, tokens, progress)
    result.seconds = time.perf_counter() - started
    return result


def _model(source: ModelSource, config: PruneConfig) -> LlamaModel:
    device = config.device or default_device()
    return LlamaModel(source, mode="exact", device=device)


def _report(phase: str, progress: Progress | None):
    return None if progress is None else (lambda done, total: progress(phase, done, total))


# --- unstructured ----------------------------------------------------------------------------
def _check_pattern_fits(cfg: LlamaConfig, source: ModelSource, pattern: Pattern | None) -> None:
    if pattern is None:
        return
    for lc in cfg.layers:
        for name in LINEAR_NAMES:
            full = f"blk.{lc.index}.{name}.weight"
            unstructured.check_pattern_fits(pattern, source.tensors[full].shape[1], full)


def _owl_sparsities(model: LlamaModel, tokens, config: PruneConfig,
                    progress: Progress | None) -> list[float]:
    """OWL's first pass: each layer's outlier ratio of Wanda scores on the dense model."""
    ratios = []

    def per_layer(step: LayerStep) -> None:
        inputs = sorted(set(SHARED_INPUT.values()))
        moments = step.collect(inputs, init_moments, accumulate_moments)
        scores = [unstructured.wanda_scores(step.weight(n),
                                            moments[SHARED_INPUT[n]].column_norms())
                  for n in LINEAR_NAMES]
        ratios.append(unstructured.outlier_ratio(scores))

    run_layers(model, tokens, per_layer, batch_size=config.batch_size,
               progress=_report("outlier ratios", progress))
    return unstructured.owl_sparsities(ratios, config.sparsity)


def _prune_unstructured(source, cfg, config, tokens, progress) -> PruneResult:
    pattern = config.parsed_pattern
    _check_pattern_fits(cfg, source, pattern)
    sparsity = pattern.sparsity if pattern else config.sparsity
    new: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    reports: list[LinearReport] = []
    layer_sparsity = [sparsity] * cfg.n_layers

    def prune_one(layer: int, name: str, weight, target: float, xtx=None, count=0):
        full = f"blk.{layer}.{name}.weight"
        pruned = unstructured.prune_weight(config.method, weight, target, pattern, xtx, count,
                                           name=full, damp=config.damp)
        new[full], masks[full] = pruned.weight.cpu(), pruned.mask.cpu()
        zeros = 1 - float(pruned.mask.float().mean())
        reports.append(LinearReport(layer, name, zeros, pruned.error))
        return pruned.weight

    if not config.needs_calibration:  # plain magnitude: no data needed
        for i, lc in enumerate(cfg.layers):
            for name in LINEAR_NAMES:
                weight = read_float(source.tensors[f"blk.{lc.index}.{name}.weight"])
                prune_one(lc.index, name, weight, sparsity)
            if progress:
                progress("pruning", i + 1, cfg.n_layers)
    else:
        model = _model(source, config)
        if config.owl:
            layer_sparsity = _owl_sparsities(model, tokens, config, progress)

        def per_layer(step: LayerStep) -> None:
            inputs = sorted(set(SHARED_INPUT.values()))
            grams = step.collect(inputs, init_gram, accumulate_gram)
            for name in LINEAR_NAMES:
                gram = grams[SHARED_INPUT[name]]
                weight = prune_one(step.gguf_index, name, step.weight(name),
                                   layer_sparsity[step.index], gram.xtx, gram.count)
                step.set_weight(name, weight)  # the next layer sees the pruned outputs

        run_layers(model, tokens, per_layer, batch_size=config.batch_size,
                   progress=_report("pruning", progress))
        del model
    pruned_source = in_memory_source(source.path, source.metadata, {**source.tensors, **new})
    params = count_params(source)
    nonzero = params - sum(int((~m).sum()) for m in masks.values())
    return PruneResult(pruned_source, source, config, params, params, nonzero, tuple(new),
                       reports, layer_sparsity if config.owl else [], masks=masks)


# --- layers ----------------------------------------------------------------------------------
def layer_scores(model: LlamaModel, tokens: torch.Tensor, metric: str, count: int,
                 batch_size: int = 4, progress: Progress | None = None
                 ) -> tuple[list[int], list[float]]:
    """(layer positions to remove, score per layer or per start) for the metric."""
    influence: list[float] = []
    states: list[torch.Tensor] = []

    def per_layer(step: LayerStep) -> None:
        if metric == "influence":
            influence.append(structured.block_influence(step.inputs, step.outputs()))
        else:
            states.append(structured.sample_tokens(step.inputs, STATE_SAMPLE))

    final = run_layers(model, tokens, per_layer, batch_size=batch_size,
                       progress=_report("scoring layers", progress))
    if metric == "influence":
        return structured.lowest_influence_layers(influence, count), influence
    states.append(structured.sample_tokens(final, STATE_SAMPLE))
    return structured.closest_block(states, count)


def _prune_layers(source, cfg, config, tokens, progress) -> PruneResult:
    n = cfg.n_layers
    count = config.n_layers if config.n_layers is not None else int(config.ratio * n + 0.5)
    structured.layers_to_remove(n, count)
    model = _model(source, config)
    remove, scores = layer_scores(model, tokens, config.layer_metric, count,
                                  config.batch_size, progress)
    del model
    file_indices = [cfg.layers[i].index for i in remove]
    tensors, metadata = structured.remove_layers(source.tensors, source.metadata, n, file_indices)
    pruned = in_memory_source(source.path, metadata, tensors)
    params = count_params(pruned)
    return PruneResult(pruned, source, config, count_params(source), params, params, (),
                       removed_layers=file_indices, layer_scores=scores,
                       widths=_widths(pruned))


def _widths(source: ModelSource) -> list[tuple[int, int, int]]:
    cfg = config_from_source(source)
    return [(lc.n_heads, lc.n_kv_heads, lc.ffn_dim) for lc in cfg.layers]


# --- width -----------------------------------------------------------------------------------
def width_scores(model: LlamaModel, tokens: torch.Tensor, batch_size: int = 4,
                 progress: Progress | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: head-group contributions (n_kv,) and FFN channel contributions (ffn,)."""
    groups, channels = [], []

    def per_layer(step: LayerStep) -> None:
        stats = step.collect({"attn_output": (init_gram, accumulate_gram),
                              "ffn_down": (init_moments, accumulate_moments)})
        lc = step.model.cfg.layers[step.index]
        groups.append(structured.group_contribution(step.weight("attn_output"),
                                                    stats["attn_output"].xtx, lc.n_kv_heads))
        channels.append(structured.channel_contribution(step.weight("ffn_down"),
                                                        stats["ffn_down"].sum_sq))

    run_layers(model, tokens, per_layer, batch_size=batch_size,
               progress=_report("scoring heads and channels", progress))
    return groups, channels


def _ffn_alignment(source: ModelSource, cfg: LlamaConfig) -> int:
    """Kept FFN widths are whole blocks of ffn_down's type (its rows are FFN-wide)."""
    ref = source.tensors[f"blk.{cfg.layers[0].index}.ffn_down.weight"]
    return max(32, GGML_QUANT_SIZES[ref.ggml_type][0])


def _prune_width(source, cfg, config, tokens, progress) -> PruneResult:
    widths = {(lc.n_heads, lc.n_kv_heads, lc.ffn_dim) for lc in cfg.layers}
    if len(widths) != 1:
        raise LlmpressError(f"{source.path}: widths already differ between layers; width "
                            "pruning starts from a model with one width")
    n_heads, n_kv, ffn = widths.pop()
    if n_kv < 2 and ffn <= _ffn_alignment(source, cfg):
        raise LlmpressError(f"{source.path}: too narrow to prune (1 head group, FFN {ffn})")
    model = _model(source, config)
    group_scores, channel_scores = width_scores(model, tokens, config.batch_size, progress)
    del model
    hd, dim = cfg.head_dim, cfg.dim
    per_group = hd * dim * (2 * (n_heads // n_kv) + 2)
    per_layer = hd * dim * (2 * n_heads + 2 * n_kv) + 3 * dim * ffn
    plan = structured.plan_width(group_scores, channel_scores, config.ratio, config.uniform,
                                 _ffn_alignment(source, cfg), (per_group, 3 * dim, per_layer))
    tensors: dict[str, Any] = dict(source.tensors)
    heads, kvs, ffns = [], [], []
    for lc, keep_groups, keep_channels in zip(cfg.layers, plan.groups, plan.channels):
        prefix = f"blk.{lc.index}."
        names = [n[len(prefix):] for n in structured.layer_tensor_names(source.tensors, lc.index)]
        sliced_names = [n for n in names if n.split(".")[0] in
                        ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                         "ffn_down")]
        weights = {n: read_float(source.tensors[prefix + n]) for n in sliced_names}
        sliced = structured.slice_layer(weights, n_heads, n_kv, hd, list(keep_groups),
                                        list(keep_channels))
        tensors.update({prefix + n: t for n, t in sliced.items()})
        heads.append(len(keep_groups) * (n_heads // n_kv))
        kvs.append(len(keep_groups))
        ffns.append(len(keep_channels))
    metadata = structured.width_metadata(source.metadata, heads, kvs, ffns, hd)
    pruned = in_memory_source(source.path, metadata, tensors)
    params = count_params(pruned)
    changed = tuple(n for n, t in tensors.items() if not isinstance(t, TensorRef))
    scores = [float(s.mean()) for s in group_scores]
    return PruneResult(pruned, source, config, count_params(source), params, params, changed,
                       layer_scores=scores, widths=list(zip(heads, kvs, ffns)))


# --- output ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WriteReport:
    path: Path
    file_bytes: int
    types: dict[str, int]  # type name -> tensor count
    fell_back: tuple[str, ...]  # tensors whose input type did not fit their new rows
    zeros_kept: float | None  # of the pruned weights, the fraction still exactly 0 in the file


def output_type(name: str, values_shape: tuple[int, ...], wanted: GGMLQuantizationType
                ) -> tuple[GGMLQuantizationType, bool]:
    """`wanted` if the rows still fill whole blocks, else llama.cpp's fallback for it
    (tensor_type_fallback: e.g. Q4_K -> Q5_0), else F16."""
    from llmpress.quant.mix import FALLBACK
    row = values_shape[-1]
    if row % GGML_QUANT_SIZES[wanted][0] == 0:
        return wanted, False
    fallback = FALLBACK.get(wanted, GGMLQuantizationType.F16)
    if row % GGML_QUANT_SIZES[fallback][0]:
        fallback = GGMLQuantizationType.F16
    return fallback, True


def write_pruned(result: PruneResult, output: str | Path, then_quantize: str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> WriteReport:
    """Write the pruned model as GGUF. Without then_quantize each tensor keeps its input
    type (changed tensors are quantized back to it; unchanged ones are copied byte for
    byte); with it, the whole model goes through the quantizer as `llmpress quantize
    --type TYPE` would (allow-requantize implied). Block formats with a per-block minimum
    or offset (Q4_1, Q5_1, K-quants) cannot always store an exact zero: `zeros_kept`
    says how many pruned weights are still exactly zero after the round trip."""
    from llmpress.quant.mix import TensorChoice
    from llmpress.quant.quantize import QuantizeConfig, quantize_model
    from llmpress.quant.write import write_gguf

    output = Path(output)
    src = result.source

    def each(done, total, _report):
        if progress:
            progress(done, total)
    if then_quantize is not None:
        quantize_model(QuantizeConfig(src, output, then_quantize, allow_requantize=True),
                       each)
        return _written_report(result, output, ())
    changed = set(result.changed)
    choices = []
    for name, ref in src.tensors.items():
        wanted = ref.ggml_type
        if name in changed and name in result.original.tensors:
            wanted = result.original.tensors[name].ggml_type
        target, fell = output_type(name, ref.shape, wanted)
        choices.append(TensorChoice(name, ref.shape, ref.ggml_type, target, fell))
    write_gguf(output, src, choices, src.metadata, protect=[result.original.path],
               progress=each)
    return _written_report(result, output, tuple(c.name for c in choices if c.fell_back))


def _written_report(result: PruneResult, output: Path, fell_back: tuple[str, ...]) -> WriteReport:
    from llmpress.io.gguf import load_gguf
    written = load_gguf(output)
    types: dict[str, int] = {}
    for ref in written.tensors.values():
        types[ref.ggml_type.name] = types.get(ref.ggml_type.name, 0) + 1
    zeros_kept = None
    if result.masks:
        pruned = kept = 0
        for name, mask in result.masks.items():
            values = read_float(written.tensors[name])
            pruned += int((~mask).sum())
            kept += int(((values == 0) & ~mask).sum())
        zeros_kept = kept / max(pruned, 1)
    return WriteReport(output, written.file_bytes, types, fell_back, zeros_kept)


def with_weights(result: PruneResult, weights: Mapping[str, torch.Tensor]) -> PruneResult:
    """The result with some tensors replaced (e.g. by distillation)."""
    tensors = {**result.source.tensors, **weights}
    source = in_memory_source(result.source.path, result.source.metadata, tensors)
    changed = tuple(dict.fromkeys([*result.changed, *weights]))
    return PruneResult(**{**result.__dict__, "source": source, "changed": changed})


# --- Hugging Face directory output -----------------------------------------------------------
def write_pruned_hf(result: PruneResult, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """The pruned model as a Hugging Face directory (quant.write.write_hf_dir), with the
    original's tokenizer. Uniform widths only."""
    from llmpress.quant.write import write_hf_dir
    return write_hf_dir(result.source, out_dir, dtype, tokenizer_from=result.original)

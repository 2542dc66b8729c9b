"""Adaptive mixed precision: a GGUF type for every tensor so that the file fits a size
budget with the least predicted loss (`llmpress quantize IN OUT --target-bpw 4.25`).

The second producer of a type plan next to quant.mix.choose_types (llama.cpp's fixed
preset rules): it yields the same TensorChoice list, which the one writer
(quant.quantize / quant.calibrated) turns into a plain GGUF file that llama.cpp runs.

1. Candidates. Every quantizable tensor (mix.allows_quantization) may take any type of
   CANDIDATE_TYPES whose block divides its rows (256 for k-quants and IQ4_XS, 32 for the
   legacy types and IQ4_NL); the others keep their type and are fixed bytes.
2. Statistics. One pass of calibration text (the built-in text or --calib; never the
   evaluation text) through the exact model records every Linear's input energy
   E[x_j²], the final normed hidden states' (the head's input), and the base log-probs.
3. Raw error. Each tensor is quantized to each candidate (with the imatrix, as the writer
   will) on evenly spaced rows; its raw error is Σ_j E[x_j²] Σ_i (w_ij - q_ij)², scaled to
   all rows: the expected squared output error ‖(W - Q)x‖² under diagonal input moments.
4. Calibration against the end-to-end loss. Raw errors of different kinds and depths do
   not move the logits alike (a q/k error goes through softmax, a late ffn_down error
   lands on a larger residual), so a few perturbation passes measure the real thing:
   each kind of tensor (attn_q, ..., ffn_down, the embedding/head) in every layer, and
   every tensor of each third of the layers, quantized to a 4-bit probe type
   (PROBE_TYPES) while the rest stays exact; the KLD of each pass against the base
   gives a scale per kind (KLD / its raw error) and then one per depth (the layer
   group's KLD / its kind-scaled raw error). Predicted KLD of a tensor and type = kind
   scale × depth scale × raw error; of a mix = the sum (second order: small independent
   perturbations add).
5. Allocation. A knapsack: the least summed predicted KLD within the budget, solved by
   dynamic programming over the budget in 2^17 units (bytes rounded up, so it never
   overshoots), then a greedy pass spends what the rounding left on the upgrades with
   the most error saved per byte. (A Lagrangian price bisection came within 10-20% of
   the optimum on small cases, where the budget is lumpy; the DP is exact.) The file
   never exceeds the budget: bytes are counted exactly as the writer lays them out
   (io.gguf_write: header + each tensor padded to the alignment).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from llmpress.errors import LlmpressError
from llmpress.formats import FORMATS, dequantize_tensor
from llmpress.io.gguf_write import TensorSlot, plan_gguf
from llmpress.quant.mix import (
    FILE_TYPES,
    FLOAT_TYPES,
    NEEDS_IMATRIX,
    TensorChoice,
    TensorInfo,
    allows_quantization,
    llama_tensor_order,
    tensors_of,
)

# Types the optimizer may pick: every quantized type of llama-quantize's mixes that this
# build can write (formats.FORMATS[t].writable: the i-quants join when their quantizers
# do), plus F16. The ones in NEEDS_IMATRIX only with an imatrix (budget_config).
CANDIDATE_TYPES = tuple(t for t in (
    T.IQ1_S, T.IQ1_M, T.TQ1_0, T.IQ2_XXS, T.TQ2_0, T.IQ2_XS, T.IQ2_S, T.Q2_K, T.IQ3_XXS,
    T.IQ3_S, T.Q3_K, T.IQ4_XS, T.Q4_0, T.IQ4_NL, T.Q4_K, T.Q4_1, T.Q5_0, T.Q5_K, T.Q5_1,
    T.Q6_K, T.Q8_0, T.F16,
) if t in FORMATS and FORMATS[t].writable)  # fmt: skip
# Perturbation passes quantize to the first of these a tensor can take (4-bit: in the
# range the choices are made in; fast quantizers).
PROBE_TYPES = (T.Q4_K, T.Q4_0, T.Q5_K, T.Q5_0, T.Q6_K, T.Q8_0, T.F16)
HEAD = "head"  # the kind of token_embd / output: the embedding and the output matrix
LINEAR_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Linears that read the input of another one (the same E[x²]).
SHARED_INPUT = {"attn_k": "attn_q", "attn_v": "attn_q", "ffn_up": "ffn_gate"}
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10,
              "MIB": 2**20, "GIB": 2**30}


# --- the target ------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'900MiB', '1.2GB', '123456' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in SIZE_UNITS:
        raise LlmpressError(f"--target-size {text}: write a size like 900MiB, 1.2GB or a "
                            "number of bytes")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


@dataclass(frozen=True)
class BudgetTarget:
    """Exactly one of: bits per weight (file bytes * 8 / parameters, as QuantizeReport's
    bits_per_weight counts them) or a file size in bytes."""

    bpw: float | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        if (self.bpw is None) == (self.size is None):
            raise LlmpressError("give exactly one of --target-bpw and --target-size")
        if self.bpw is not None and not (math.isfinite(self.bpw) and self.bpw > 0):
            raise LlmpressError(f"--target-bpw {self.bpw}: must be a positive number")
        if self.size is not None and self.size <= 0:
            raise LlmpressError(f"--target-size {self.size}: must be a positive size")

    def budget_bytes(self, n_params: int) -> int:
        return self.size if self.size is not None else int(self.bpw * n_params / 8)


@dataclass(frozen=True)
class BudgetSettings:
    """How sensitivity is measured."""

    text: str | None = None  # calibration text file; None: the built-in text
    tokens: int = 1024  # calibration tokens for the statistics and perturbation passes
    seq_len: int = 512
    layer_groups: int = 3  # depth scales: one perturbation pass per group of layers
    sample_rows: int = 128  # rows per tensor quantized to estimate each candidate's error
    excluded: tuple[T, ...] = ()  # candidate types left out
    device: str | None = None

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.tokens < self.seq_len:
            raise LlmpressError(f"calibration: {self.tokens} tokens must be at least one "
                                f"sequence of {self.seq_len}")
        if self.layer_groups < 1 or self.sample_rows < 1:
            raise LlmpressError("layer_groups and sample_rows must be at least 1")


# --- candidates and their raw errors -----------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One type a tensor may take."""

    type: T
    n_bytes: int  # in the file, padded to the alignment
    raw_error: float  # Σ_j E[x_j²] Σ_i (w_ij - q_ij)² over all rows
    error: float = 0.0  # predicted KLD (nats): raw_error × the tensor's scale


@dataclass(frozen=True)
class TensorOptions:
    info: TensorInfo
    kind: str  # a LINEAR_KINDS name, HEAD, or "fixed"
    layer: int  # -1 outside the decoder layers
    options: tuple[Option, ...]  # by increasing bytes; a single one: the type is fixed

    @property
    def fixed(self) -> bool:
        return len(self.options) == 1


def _padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def tensor_bytes(info: TensorInfo, ggml_type: T, alignment: int) -> int:
    return _padded(TensorSlot(info.name, ggml_type, info.shape).n_bytes, alignment)


def candidate_types(info: TensorInfo, architecture: str) -> tuple[T, ...]:
    """The types this tensor may take: its own when it must keep it, else every candidate
    whose block divides the row length."""
    if not allows_quantization(info.name, info.shape, architecture):
        return (info.ggml_type,)
    row = info.shape[-1]
    return tuple(t for t in CANDIDATE_TYPES if row % GGML_QUANT_SIZES[t][0] == 0)


def kind_and_layer(name: str) -> tuple[str, int]:
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if match and match.group(2) in LINEAR_KINDS:
        return match.group(2), int(match.group(1))
    if name in ("token_embd.weight", "output.weight"):
        return HEAD, -1
    return "other", -1


def weighted_error(values: np.ndarray, restored: np.ndarray, energy: np.ndarray | None) -> float:
    """Σ_j energy_j Σ_i (w_ij - q_ij)² (energy 1 where unknown)."""
    diff = (values.astype(np.float64) - restored.astype(np.float64)) ** 2
    column = diff.sum(axis=0)
    return float(column.sum() if energy is None else column @ energy.astype(np.float64))


def round_trip(values: np.ndarray, ggml_type: T, importance: np.ndarray | None) -> np.ndarray:
    """values (rows, row) quantized to `ggml_type` as the writer does, and back."""
    from llmpress.quant.quantize import quantize_tensor

    data = quantize_tensor(values, ggml_type, importance)
    return dequantize_tensor(torch.from_numpy(data), ggml_type, values.shape).numpy()


def sampled_rows(n_rows: int, n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n_rows - 1, min(n_rows, n)).astype(np.int64))


# --- statistics and perturbation passes ------------------------------------------------
@dataclass
class Calibration:
    """What the exact model did on the calibration text."""

    energy: dict[str, np.ndarray]  # tensor name -> E[x_j²] of its input
    base_log_probs: torch.Tensor = field(repr=False)  # (tokens, vocab)
    tokens: torch.Tensor = field(repr=False)  # (N, T)


class _DenseEmbedding(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weight[tokens]


@contextmanager
def _head_replaced(model, weight: torch.Tensor | None):
    """The model with its embedding / output matrix replaced by `weight` (None: as is)."""
    if weight is None:
        yield
        return
    embed, dense = model.embed, model.output.dense
    if model.cfg.tied_output:
        model.embed = _DenseEmbedding(weight.to(model.device))
    model.output.dense = weight.to(model.device)
    try:
        yield
    finally:
        model.embed, model.output.dense = embed, dense


def _log_probs(model, hidden: torch.Tensor) -> torch.Tensor:
    from llmpress.calib.runner import final_logits

    logits = final_logits(model, hidden)
    return torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)


def _kld(base: torch.Tensor, log_probs: torch.Tensor) -> float:
    from llmpress.eval.kld import kl_divergence

    return float(kl_divergence(base, log_probs).mean())


def collect_calibration(model, tokens: torch.Tensor) -> Calibration:
    """The base pass: input energies of every Linear and of the head, and base log-probs."""
    from llmpress.calib.runner import accumulate_moments, init_moments
    from llmpress.models.llama import rms_norm

    energy: dict[str, np.ndarray] = {}

    def per_layer(step) -> None:
        observed = sorted(set(SHARED_INPUT.get(k, k) for k in LINEAR_KINDS))
        stats = step.collect(observed, init_moments, accumulate_moments)
        for kind in LINEAR_KINDS:
            moments = stats[SHARED_INPUT.get(kind, kind)]
            energy[f"blk.{step.gguf_index}.{kind}.weight"] = moments.mean_squares().cpu().numpy()

    from llmpress.calib.runner import run_layers

    hidden = run_layers(model, tokens, per_layer, batch_size=4)
    normed = rms_norm(hidden.to(model.device), model.norm, model.cfg.norm_eps)
    head_energy = normed.double().pow(2).reshape(-1, normed.shape[-1]).mean(0).cpu().numpy()
    energy["output.weight"] = head_energy
    if model.cfg.tied_output:
        energy["token_embd.weight"] = head_energy
    return Calibration(energy, _log_probs(model, hidden), tokens)


def perturbation_kld(model, calibration: Calibration, linears: dict[str, torch.Tensor],
                     head: torch.Tensor | None = None) -> float:
    """KLD against the base when the Linears named in `linears` ("blk.N.kind.weight" ->
    new weight) and the embedding/head (`head`) are replaced, the rest exact."""
    from llmpress.calib.runner import run_layers

    def per_layer(step) -> None:
        for kind in LINEAR_KINDS:
            new = linears.get(f"blk.{step.gguf_index}.{kind}.weight")
            if new is not None:
                step.set_weight(kind, new)

    with _head_replaced(model, head):
        hidden = run_layers(model, calibration.tokens, per_layer, batch_size=4)
        return _kld(calibration.base_log_probs, _log_probs(model, hidden))


# --- the plan ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Sensitivity:
    """Every tensor's options with their predicted KLD: measured once, then any number of
    budgets can be planned from it (plan_for_budget)."""

    tensors: tuple[TensorOptions, ...]  # in output order
    header: int  # bytes before the tensor data
    scales: dict[str, float]  # kind / layer group -> measured scale
    probes: dict[str, float]  # perturbation pass -> its measured KLD
    seconds: dict[str, float]  # stage -> seconds

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.info.shape) for t in self.tensors)

    @property
    def min_bytes(self) -> int:  # every tensor at its smallest type
        return self.header + sum(t.options[0].n_bytes for t in self.tensors)

    @property
    def max_bytes(self) -> int:  # every tensor at its largest type (F16)
        return self.header + sum(t.options[-1].n_bytes for t in self.tensors)


@dataclass(frozen=True)
class BudgetPlan:
    choices: tuple[TensorChoice, ...]  # in output order, for QuantizeConfig.choices
    picked: dict[str, Option]  # tensor name -> its option
    file_type: str  # a FILE_TYPES name for general.file_type: the type with most bytes
    budget: int
    file_bytes: int
    sensitivity: Sensitivity

    @property
    def predicted_kld(self) -> float:
        return sum(o.error for o in self.picked.values())


def check_reachable(budget: int, min_bytes: int, max_bytes: int, n_params: int,
                    target: BudgetTarget) -> None:
    if not min_bytes <= budget <= max_bytes:
        asked = (f"{budget:,} bytes" if target.size is not None
                 else f"{target.bpw} bits per weight = {budget:,} bytes")
        raise LlmpressError(
            f"target {asked} is out of reach: this model's "
            f"files range from {min_bytes:,} bytes ({min_bytes * 8 / n_params:.2f} bits per "
            f"weight, every tensor at its smallest type) to {max_bytes:,} bytes "
            f"({max_bytes * 8 / n_params:.2f}, F16)")


def plan_for_budget(sensitivity: Sensitivity, target: BudgetTarget) -> BudgetPlan:
    """The type of every tensor for `target`, the least predicted KLD that fits."""
    tensors = sensitivity.tensors
    budget = target.budget_bytes(sensitivity.n_params)
    check_reachable(budget, sensitivity.min_bytes, sensitivity.max_bytes,
                    sensitivity.n_params, target)
    fixed = sum(t.options[0].n_bytes for t in tensors if t.fixed)
    picked = allocate([t for t in tensors if not t.fixed], budget - sensitivity.header - fixed)
    picked |= {t.info.name: t.options[0] for t in tensors if t.fixed}
    file_bytes = sensitivity.header + sum(o.n_bytes for o in picked.values())
    choices = tuple(TensorChoice(t.info.name, t.info.shape, t.info.ggml_type,
                                 picked[t.info.name].type) for t in tensors)
    return BudgetPlan(choices, picked, representative_file_type(picked.values()), budget,
                      file_bytes, sensitivity)


DP_RESOLUTION = 1 << 17  # budget units of the knapsack: the rounding costs < N units


def allocate(tensors: Sequence[TensorOptions], budget: int) -> dict[str, Option]:
    """The option of every tensor minimising the summed error with Σ bytes ≤ budget
    (budget counts tensor bytes only): a knapsack solved exactly by dynamic programming
    over the budget in DP_RESOLUTION units (each option's bytes rounded up, so the sum
    never exceeds the budget), then a greedy fill of what the rounding left over."""
    unit = max(1, -(-budget // DP_RESOLUTION))
    capacity = budget // unit
    costs = [np.array([-(-o.n_bytes // unit) for o in t.options]) for t in tensors]
    if sum(int(c.min()) for c in costs) > capacity:
        raise LlmpressError("internal: the budget is below the smallest file")
    best = np.zeros(capacity + 1)  # least error of the tensors so far within w units
    picks = []
    for t, cost in zip(tensors, costs):
        new = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int16)
        for k, (c, option) in enumerate(zip(cost, t.options)):
            if c > capacity:
                continue
            candidate = best[:capacity + 1 - c] + option.error
            better = candidate < new[c:]
            new[c:][better] = candidate[better]
            pick[c:][better] = k
        best = new
        picks.append(pick)
    chosen: dict[str, Option] = {}
    w = capacity
    for t, cost, pick in zip(reversed(tensors), reversed(costs), reversed(picks)):
        k = int(pick[w])
        chosen[t.info.name] = t.options[k]
        w -= int(cost[k])
    left = budget - sum(o.n_bytes for o in chosen.values())
    return _greedy_fill(tensors, chosen, left)


def _greedy_fill(tensors: Sequence[TensorOptions], chosen: dict[str, Option],
                 left: int) -> dict[str, Option]:
    """Spend `left` bytes on the upgrades that save the most error per byte."""
    chosen = dict(chosen)
    while True:
        best, best_gain = None, 0.0
        for t in tensors:
            now = chosen[t.info.name]
            for o in t.options:
                extra = o.n_bytes - now.n_bytes
                if 0 < extra <= left and o.error < now.error:
                    gain = (now.error - o.error) / extra
                    if gain > best_gain:
                        best, best_gain = (t.info.name, o), gain
        if best is None:
            return chosen
        left -= best[1].n_bytes - chosen[best[0]].n_bytes
        chosen[best[0]] = best[1]


def representative_file_type(picked: Iterable[Option]) -> str:
    """The file type whose base type holds the most bytes (general.file_type is a label:
    llama.cpp reads the type of every tensor from the tensor itself)."""
    by_type: dict[T, int] = {}
    for o in picked:
        if o.type not in FLOAT_TYPES or o.type == T.F16:
            by_type[o.type] = by_type.get(o.type, 0) + o.n_bytes
    main = max(by_type, key=by_type.get) if by_type else T.F16
    return next(ft.name for ft in FILE_TYPES.values() if ft.default_type == main)


def _probe_type(t: TensorOptions) -> T:
    types = [o.type for o in t.options]
    return next((p for p in PROBE_TYPES if p in types), types[0])


def _header_bytes(metadata, infos: Sequence[TensorInfo]) -> tuple[int, int]:
    """(bytes before the tensor data, alignment): neither depends on the tensor types."""
    layout = plan_gguf(metadata, [TensorSlot(i.name, T.F32, i.shape) for i in infos])
    return layout.data_start, layout.alignment


def _candidates(source, metadata, excluded: tuple[T, ...]):
    """(tensor infos in output order, their candidate types, header bytes, alignment)."""
    infos = sorted(tensors_of(source.tensors.values()), key=lambda i: llama_tensor_order(i.name))
    arch = str(source.metadata.get("general.architecture", ""))
    candidates = {}
    for info in infos:
        types = candidate_types(info, arch)
        kept = tuple(t for t in types if t not in excluded)
        candidates[info.name] = kept if len(types) > 1 and kept else types
    return infos, candidates, *_header_bytes(metadata, infos)


def size_range(source, metadata, excluded: tuple[T, ...] = ()) -> tuple[int, int, int]:
    """(smallest file, largest file, parameters), from names and shapes only."""
    infos, candidates, header, alignment = _candidates(source, metadata, excluded)
    sizes = [[tensor_bytes(i, t, alignment) for t in candidates[i.name]] for i in infos]
    return (header + sum(map(min, sizes)), header + sum(map(max, sizes)),
            sum(math.prod(i.shape) for i in infos))


def measure_sensitivity(source, imatrix, metadata, settings: BudgetSettings = BudgetSettings(),
                        progress: Callable[[str], None] | None = None) -> Sensitivity:
    """Predicted KLD of every tensor at every candidate type of `source`
    (io.source.ModelSource). `imatrix`: quant.quantize.ImportanceMatrix or None (what the
    writer will use); `metadata`: the output's KVs (quant.quantize.output_metadata)."""
    from llmpress.calib.data import calibration_tokens, read_calibration_text
    from llmpress.io.loader import load_tokenizer
    from llmpress.kernels.device import default_device
    from llmpress.models.llama import LlamaModel
    from llmpress.quant.quantize import dequantize_ref

    say = progress or (lambda message: None)
    seconds: dict[str, float] = {}
    infos, candidates, header, alignment = _candidates(source, metadata, settings.excluded)

    started = time.perf_counter()
    model = LlamaModel(source, mode="exact", device=settings.device or default_device())
    n_seq = max(1, settings.tokens // settings.seq_len)
    tokens = calibration_tokens(load_tokenizer(source), read_calibration_text(settings.text),
                                n_seq, settings.seq_len)
    say(f"statistics: {tokens.numel():,} calibration tokens")
    calibration = collect_calibration(model, tokens)
    seconds["statistics"] = time.perf_counter() - started

    started = time.perf_counter()
    tensors: list[TensorOptions] = []
    weights: dict[str, np.ndarray] = {}  # the quantizable ones, for the perturbation passes
    for info in infos:
        kind, layer = kind_and_layer(info.name)
        types = candidates[info.name]
        if len(types) == 1:
            only = Option(types[0], tensor_bytes(info, types[0], alignment), 0.0)
            tensors.append(TensorOptions(info, "fixed", layer, (only,)))
            continue
        values = dequantize_ref(source.tensors[info.name]).reshape(-1, info.shape[-1])
        weights[info.name] = values
        rows = sampled_rows(values.shape[0], settings.sample_rows)
        sample = np.ascontiguousarray(values[rows])
        importance = _writer_importance(imatrix, info)
        energy = calibration.energy.get(info.name)
        options = []
        for t in types:
            raw = weighted_error(sample, round_trip(sample, t, importance), energy)
            options.append(Option(t, tensor_bytes(info, t, alignment),
                                  raw * values.shape[0] / len(rows)))
        options.sort(key=lambda o: (o.n_bytes, o.raw_error))
        tensors.append(TensorOptions(info, kind, layer, tuple(options)))
    seconds["raw errors"] = time.perf_counter() - started
    say(f"raw errors: {len(weights)} tensors x their candidate types "
        f"({seconds['raw errors']:.0f} s)")

    started = time.perf_counter()
    scales, probes, per_tensor = _calibrate_scales(model, calibration, tensors, weights,
                                                   imatrix, settings.layer_groups, say)
    seconds["perturbation passes"] = time.perf_counter() - started
    tensors = [t if t.fixed else _scaled(t, per_tensor[t.info.name]) for t in tensors]
    return Sensitivity(tuple(tensors), header, scales, probes, seconds)


def _writer_importance(imatrix, info: TensorInfo) -> np.ndarray | None:
    """The importance the writer passes for this tensor (quant.calibrated's rule)."""
    if imatrix is None:
        return None
    entry = imatrix.entries.get(info.name)
    return entry if entry is not None and entry.size == info.shape[-1] else None


def _calibrate_scales(model, calibration: Calibration, tensors: Sequence[TensorOptions],
                      weights: dict[str, np.ndarray], imatrix, n_groups: int,
                      say: Callable[[str], None]
                      ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Scales from perturbation passes, per kind then per layer group (module docstring).
    -> (scale per kind / group, KLD per pass, scale per tensor name)."""
    by_name = {t.info.name: t for t in tensors if not t.fixed}
    probed: dict[str, torch.Tensor] = {}  # tensor name -> its weight at the probe type
    probe_raw: dict[str, float] = {}
    for name, t in by_name.items():
        values = weights[name]
        restored = round_trip(values, _probe_type(t), _writer_importance(imatrix, t.info))
        probe_raw[name] = weighted_error(values, restored, calibration.energy.get(name))
        probed[name] = torch.from_numpy(restored.reshape(t.info.shape))
    scales: dict[str, float] = {}
    probes: dict[str, float] = {}

    def run(label: str, names: list[str]) -> float:
        heads = [n for n in names if by_name[n].kind == HEAD]
        linears = {n: probed[n] for n in names if by_name[n].kind != HEAD}
        kld = perturbation_kld(model, calibration, linears, probed[heads[0]] if heads else None)
        probes[label] = kld
        say(f"perturbation pass {label}: KLD {kld:.5f}")
        return kld

    kinds = sorted({t.kind for t in by_name.values()} - {"other"})
    for kind in kinds:
        names = [n for n, t in by_name.items() if t.kind == kind]
        raw = sum(probe_raw[n] for n in names)
        scales[kind] = run(kind, names) / raw if raw > 0 else 0.0
    # tensors no pass can replace take the median scale
    scales["other"] = float(np.median(list(scales.values()))) if scales else 1.0
    per_tensor = {n: scales[t.kind] for n, t in by_name.items()}
    layers = sorted({t.layer for t in by_name.values() if t.layer >= 0})
    if n_groups > 1 and len(layers) > 1:
        for g, group in enumerate(np.array_split(layers, min(n_groups, len(layers)))):
            names = [n for n, t in by_name.items() if t.layer in group and t.kind != "other"]
            predicted = sum(per_tensor[n] * probe_raw[n] for n in names)
            measured = run(f"layers {group[0]}-{group[-1]}", names)
            scales[f"layers {group[0]}-{group[-1]}"] = factor = (
                measured / predicted if predicted > 0 else 1.0)
            for n in names:
                per_tensor[n] *= factor
    return scales, probes, per_tensor


def _scaled(t: TensorOptions, scale: float) -> TensorOptions:
    """The options with their predicted KLD."""
    options = tuple(Option(o.type, o.n_bytes, o.raw_error, o.raw_error * scale)
                    for o in t.options)
    return TensorOptions(t.info, t.kind, t.layer, options)


def budget_config(config, target: BudgetTarget, settings: BudgetSettings = BudgetSettings(),
                  progress: Callable[[str], None] | None = None,
                  sensitivity: Sensitivity | None = None):
    """`config` (quant.quantize.QuantizeConfig; its `type` is ignored) with the type of
    every tensor chosen for `target`: -> (config for quantize_model / calibrated_quantize,
    BudgetPlan). Pass `sensitivity` from an earlier plan of the same model and settings
    to skip measuring it again. The writer's own layout is checked against the budget."""
    from dataclasses import replace

    from llmpress.io.loader import load_source
    from llmpress.quant.quantize import load_imatrix, output_metadata, plan_quantization

    source = load_source(config.input)
    imatrix = load_imatrix(config.imatrix) if config.imatrix is not None else None
    metadata = output_metadata(source.metadata, 0, imatrix)
    if imatrix is None:  # the writer refuses these without one (llama-quantize too)
        settings = replace(settings, excluded=tuple(settings.excluded) + NEEDS_IMATRIX)
    if sensitivity is None:  # refuse what the writer would refuse before measuring
        infos, candidates, _, _ = _candidates(source, metadata, settings.excluded)
        provisional = tuple(TensorChoice(i.name, i.shape, i.ggml_type, candidates[i.name][0])
                            for i in infos)
        plan_quantization(source, replace(config, choices=provisional), imatrix)
        smallest, largest, n_params = size_range(source, metadata, settings.excluded)
        check_reachable(target.budget_bytes(n_params), smallest, largest, n_params, target)
        sensitivity = measure_sensitivity(source, imatrix, metadata, settings, progress)
    plan = plan_for_budget(sensitivity, target)
    planned = replace(config, type=plan.file_type, choices=plan.choices)
    written = plan_quantization(source, planned, imatrix).layout.file_bytes
    if written != plan.file_bytes or written > plan.budget:
        raise LlmpressError(f"internal: the planned file has {written:,} bytes, the optimizer "
                            f"counted {plan.file_bytes:,} for a budget of {plan.budget:,}")
    return planned, plan


def bits_by_layer(plan: BudgetPlan) -> dict[int, dict[str, float]]:
    """layer -> kind -> bits per weight of the chosen type (decoder layers only)."""
    out: dict[int, dict[str, float]] = {}
    for t in plan.sensitivity.tensors:
        if t.layer >= 0 and not t.fixed:
            bits = plan.picked[t.info.name].n_bytes * 8 / math.prod(t.info.shape)
            out.setdefault(t.layer, {})[t.kind] = bits
    return out

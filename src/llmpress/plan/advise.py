"""Fit advice: where each quantization of a model runs on a machine (GPU, GPU and CPU,
CPU, streamed from disk, or not at all), the largest context that fits, the expected
generation speed, and the highest-quality type that fits.

Speed is a bandwidth bound: generating one token reads every weight once (one row of
the embedding table) plus the KV cache, so tok/s ~ bandwidth / bytes read per token
(the figure llama-bench's tg approaches on a memory-bound CPU).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmpress.errors import LlmpressError
from llmpress.plan.estimate import (
    LLAMA_CPP_KV_PAD,
    Estimate,
    ModelSpec,
    RuntimeMemory,
    Weights,
    cache_type,
    estimate,
    llama_cpp_gpu_memory,
    llama_cpp_memory,
    llmpress_gpu_memory,
    llmpress_memory,
    mix_types,
    weights,
)
from llmpress.plan.machine import Machine
from llmpress.quant.mix import file_type

# Mean KL divergence against FP16 of LLaMA 3 8B quantized without an imatrix, from
# llama.cpp's published table (tools/perplexity/README.md, llama.cpp's CUDA backend,
# Wikitext-2). The i-quants (IQ1_S ... IQ4_XS) are published with an imatrix only (its
# "WT 10m" rows); TQ1_0/TQ2_0 are not in the table and rank last. F32 is the original;
# BF16 is not in the table and ranks with F16 (both keep ~all of the 16-bit model).
PUBLISHED_KLD = {
    "F32": 0.0, "BF16": 0.000551, "F16": 0.000551, "Q8_0": 0.001355, "Q6_K": 0.005452,
    "Q5_K_M": 0.010762, "Q5_K_S": 0.016595, "Q5_1": 0.018045, "Q5_0": 0.022239,
    "Q4_K_M": 0.031273, "IQ4_NL": 0.035742, "IQ4_XS": 0.036334, "Q4_K_S": 0.043136,
    "Q4_1": 0.071683, "Q4_0": 0.071940, "Q3_K_L": 0.087176, "Q3_K_M": 0.101913,
    "Q3_K_S": 0.228217, "Q2_K": 0.445132, "IQ3_M": 0.102534, "IQ3_S": 0.111278,
    "IQ3_XS": 0.138693, "IQ3_XXS": 0.183625, "IQ2_M": 0.325989, "IQ2_S": 0.439197,
    "IQ2_XS": 0.546290, "IQ2_XXS": 0.812022, "IQ1_M": 1.393084, "IQ1_S": 2.254554,
}  # fmt: skip
PUBLISHED_SOURCE = "llama.cpp tools/perplexity/README.md (LLaMA 3 8B, mean KLD vs FP16)"

# The types `fit` shows by default, best first, and the classic grid's columns.
DEFAULT_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
GRID_TYPES = DEFAULT_TYPES
RUNTIMES = ("llama.cpp", "llmpress")
PLACEMENTS = {  # placement -> how the table says it
    "gpu": "fits in VRAM", "hybrid": "GPU + CPU", "ram": "fits in RAM",
    "disk": "mmap from disk only", "none": "does not fit",
}


@dataclass(frozen=True)
class Quality:
    kld: dict[str, float]  # file type -> mean KLD (lower is better)
    source: str

    def rank(self, ftype: str) -> float:
        return self.kld.get(ftype, float("inf"))


def published_quality() -> Quality:
    return Quality(dict(PUBLISHED_KLD), PUBLISHED_SOURCE)


def quality_from_sweep(path: str | Path) -> Quality:
    """Mean KLD per type from the sweep.json that `llmpress sweep` writes; types the sweep
    did not measure keep the published order after the measured ones."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        rows = report["models"]
        measured = {}
        for row in rows:
            if row.get("is_base") or row.get("kld_mean") is None:
                continue
            try:
                measured[file_type(str(row["label"])).name] = float(row["kld_mean"])
            except LlmpressError:
                continue  # a label that is not a type name (a hand-made model)
    except FileNotFoundError:
        raise LlmpressError(f"--sweep {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
            AttributeError) as exc:
        raise LlmpressError(f"--sweep {path}: not a sweep.json written by `llmpress sweep` "
                            f"({type(exc).__name__}: {exc})") from None
    if not measured:
        raise LlmpressError(f"--sweep {path}: no row is labelled with a quantization type "
                            "(e.g. Q4_K_M); run `llmpress sweep --types ...`")
    worst = max(measured.values())
    rest = {t: worst + 1 + k for t, k in PUBLISHED_KLD.items() if t not in measured}
    return Quality(measured | rest, f"{path} (measured mean KLD), then the published order")


# --- placing one option ------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    kind: str  # a PLACEMENTS key
    gpu_layers: int  # blocks on the GPU (llama.cpp's -ngl counts the output as one more)
    gpu_bytes: int
    ram_bytes: int

    @property
    def fits(self) -> bool:
        """Runs from memory: no streaming from disk."""
        return self.kind in ("gpu", "hybrid", "ram")


def place(cpu: RuntimeMemory, gpu: RuntimeMemory, machine: Machine) -> Placement:
    """The best place on the machine for a runtime whose memory is `cpu` when it runs on
    the CPU and `gpu` when everything is on the GPU."""
    if machine.has_gpu:
        if gpu.total <= machine.vram_free:
            return Placement("gpu", len(gpu.layer_weights), gpu.total, cpu.overhead)
        if cpu.runtime == "llama.cpp":  # llmpress puts a model on one device only
            split = _hybrid(cpu, gpu, machine)
            if split is not None:
                return split
    if cpu.total <= machine.ram_available:
        return Placement("ram", 0, 0, cpu.total)
    # the weights stay in the page cache as far as they fit, the rest is read from disk
    if cpu.total - cpu.weights <= machine.ram_available:
        return Placement("disk", 0, 0, machine.ram_available)
    return Placement("none", 0, 0, cpu.total)


def _hybrid(cpu: RuntimeMemory, gpu: RuntimeMemory, machine: Machine) -> Placement | None:
    """The most blocks llama.cpp can offload (-ngl N: their weights and KV cache on the
    GPU, a compute buffer on each device), with the rest in RAM."""
    budget = machine.vram_free - gpu.overhead - gpu.compute
    used, n = 0, 0
    for layer_w, layer_kv in zip(gpu.layer_weights, gpu.layer_kv):
        if used + layer_w + layer_kv > budget:
            break
        used, n = used + layer_w + layer_kv, n + 1
    if n == 0:
        return None
    in_ram = cpu.total - used
    if in_ram > machine.ram_available:
        return None
    return Placement("hybrid", n, used + gpu.compute + gpu.overhead, in_ram)


def tokens_per_second(w: Weights, mem: RuntimeMemory, placement: Placement,
                      machine: Machine) -> float:
    """Bandwidth bound on generation speed at the end of the context; `mem` is the
    memory of the placement (the GPU one for "gpu")."""
    per_token = w.read_per_token + mem.kv_read_per_token + mem.extra_read_per_token
    if placement.kind == "gpu":
        return machine.gpu_bandwidth / per_token
    if placement.kind == "hybrid":
        n = placement.gpu_layers
        kv_share = sum(mem.layer_kv[:n]) / max(mem.kv_cache, 1)
        on_gpu = sum(mem.layer_weights[:n]) + kv_share * mem.kv_read_per_token
        seconds = on_gpu / machine.gpu_bandwidth + (per_token - on_gpu) / machine.ram_bandwidth
        return 1 / seconds
    if placement.kind == "ram":
        return machine.ram_bandwidth / per_token
    if placement.kind == "disk":  # cycling through more than fits: every page misses
        return machine.disk_bandwidth / per_token
    return 0.0


# --- the options -------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    estimate: Estimate
    runtime: str
    placement: Placement
    max_ctx: int  # the largest context (multiple of 256, up to the model's) that fits
    tok_s: float
    kld: float | None  # lower is better; None when the quality source has no figure

    @property
    def ftype(self) -> str:
        return self.estimate.ftype

    @property
    def memory(self) -> RuntimeMemory:
        """The memory of its placement: all on the GPU, or the CPU's."""
        return self.estimate.runtime(self.runtime, gpu=self.placement.kind == "gpu")


def _memory_at(spec: ModelSpec, w: Weights, runtime: str, ctx: int, cache: str,
               flash_attn: bool = True) -> tuple[RuntimeMemory, RuntimeMemory]:
    """(on the CPU, all on the GPU) at a context."""
    if runtime == "llmpress":
        return llmpress_memory(spec, w, ctx, cache), llmpress_gpu_memory(spec, w, ctx, cache)
    return (llama_cpp_memory(spec, w, ctx, cache, flash_attn),
            llama_cpp_gpu_memory(spec, w, ctx, cache, flash_attn))


def max_context(spec: ModelSpec, w: Weights, runtime: str, cache: str,
                machine: Machine, flash_attn: bool = True) -> int:
    """Largest context, in steps of 256 up to the model's trained context, at which the
    option still runs from memory; 0 when not even 256 tokens fit."""
    def fits(ctx: int) -> bool:
        return place(*_memory_at(spec, w, runtime, ctx, cache, flash_attn), machine).fits

    step = LLAMA_CPP_KV_PAD
    low, high = 0, max(1, spec.context_length // step)
    if fits(high * step):
        return spec.context_length
    while low < high - 1:  # fits(low * step) or low == 0; not fits(high * step)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid * step) else (low, mid)
    return low * step


def option(spec: ModelSpec, ftype: str, ctx: int, machine: Machine, runtime: str,
           cache: str = "f16", quality: Quality | None = None,
           has_imatrix: bool = False, flash_attn: bool = True) -> Option:
    est = estimate(spec, ftype, ctx, cache, has_imatrix, flash_attn)
    placement = place(est.runtime(runtime), est.runtime(runtime, gpu=True), machine)
    mem = est.runtime(runtime, gpu=placement.kind == "gpu")
    w = est.weights
    kld = option_quality(spec, est.ftype, quality) if quality is not None else None
    return Option(est, runtime, placement,
                  max_context(spec, w, runtime, cache, machine, flash_attn),
                  tokens_per_second(w, mem, placement, machine), kld)


def option_quality(spec: ModelSpec, ftype: str, quality: Quality) -> float | None:
    """Mean KLD of a type; from an already quantized GGUF, no type can be better than the
    file's own (requantizing does not bring back what the first quantization lost)."""
    own = None
    if spec.origin == "gguf" and spec.file_type is not None:
        own = quality.kld.get(spec.file_type)
    if ftype == "file":
        return own
    kld = quality.kld.get(ftype)
    return kld if kld is None or own is None else max(kld, own)


def default_runtime(spec: ModelSpec) -> str:
    """llmpress where it runs the architecture, llama.cpp otherwise."""
    return "llmpress" if spec.runs_in_llmpress else "llama.cpp"


@dataclass(frozen=True)
class FitReport:
    spec: ModelSpec
    machine: Machine
    ctx: int
    cache: str
    runtime: str
    quality: Quality
    options: tuple[Option, ...]
    recommended: Option | None
    flash_attn: bool = True  # llama.cpp's


def plan_fit(spec: ModelSpec, machine: Machine, ctx: int, types: Sequence[str] = DEFAULT_TYPES,
             runtime: str | None = None, cache: str = "f16", quality: Quality | None = None,
             has_imatrix: bool = False, flash_attn: bool = True) -> FitReport:
    """Every type's fit on the machine and the recommendation. A GGUF input also gets a
    row for the file as it is ("file")."""
    runtime = runtime or default_runtime(spec)
    if runtime not in RUNTIMES:
        raise LlmpressError(f"runtime {runtime!r}: choose {' or '.join(RUNTIMES)}")
    if runtime == "llmpress" and not spec.runs_in_llmpress:
        raise LlmpressError(f"{spec.name}: `llmpress run` does not run {spec.architecture} "
                            "models; plan for --runtime llama.cpp")
    if ctx < 1:
        raise LlmpressError(f"--ctx {ctx}: the context must hold at least one token")
    cache_type(cache)  # validates
    quality = quality or published_quality()
    names = [file_type(t).name for t in types]
    if spec.origin == "gguf" and "file" not in names:
        names = ["file", *names]
    options = tuple(option(spec, t, ctx, machine, runtime, cache, quality, has_imatrix,
                           flash_attn) for t in dict.fromkeys(names))
    return FitReport(spec, machine, ctx, cache, runtime, quality, options, recommend(options),
                     flash_attn)


def recommend(options: Sequence[Option]) -> Option | None:
    """The highest-quality option that runs from memory at the requested context (ties:
    the faster); if none does, the fastest that streams from disk."""
    ranked = [o for o in options if o.kld is not None]
    fitting = [o for o in ranked if o.placement.fits]
    if fitting:
        return min(fitting, key=lambda o: (o.kld, -o.tok_s))
    streamed = [o for o in ranked if o.placement.kind == "disk"]
    return max(streamed, key=lambda o: o.tok_s, default=None)


def _gguf_name(spec: ModelSpec, ftype: str) -> str:
    stem = Path(spec.where).stem if spec.origin == "gguf" else spec.name
    return f"{stem}.{ftype}.gguf"


def run_commands(report: FitReport, chosen: Option) -> list[str]:
    """The commands that make and run the recommended option ("# ..." lines are notes)."""
    spec, ctx = report.spec, report.ctx
    commands = []
    if chosen.ftype == "file" or (spec.origin == "gguf" and spec.file_type == chosen.ftype):
        model = spec.where
    else:
        model = _gguf_name(spec, chosen.ftype)
        source = spec.where
        if spec.origin == "catalog":
            source = f"./{spec.name}"
            repo = spec.where.removeprefix("https://huggingface.co/").split("/blob/")[0]
            commands.append(f"# download the Hugging Face model {repo} into {source}")
        commands.append(f"llmpress quantize {source} {model} {chosen.ftype}"
                        + (" --allow-requantize" if spec.origin == "gguf" else ""))
    if chosen.runtime == "llmpress":
        device = " --device cuda" if chosen.placement.kind == "gpu" else " --device cpu"
        commands.append(f"llmpress run {model} --ctx {ctx}{device} -p \"...\"")
    else:
        ngl = {"gpu": spec.n_layers + 1, "hybrid": chosen.placement.gpu_layers}
        flags = f" -ngl {ngl.get(chosen.placement.kind, 0)}"
        if report.cache != "f16":
            flags += f" -fa on -ctk {report.cache} -ctv {report.cache}"
        elif not report.flash_attn:
            flags += " -fa off"
        commands.append(f"llama-cli -m {model} -c {ctx}{flags}")
    return commands


# --- the classic grid --------------------------------------------------------------------
@dataclass(frozen=True)
class GridRow:
    label: str  # the size asked for, e.g. "7B"
    model: str  # the catalog model standing for it
    parameters: int
    total_bytes: dict[str, int]  # file type -> llama.cpp's total at the grid's context
    file_bytes: dict[str, int]
    context_length: int  # the model's trained context (the grid's may exceed it)


def size_grid(labels: Sequence[str], ctx: int = 4096, types: Sequence[str] = GRID_TYPES,
              cache: str = "f16", flash_attn: bool = True) -> list[GridRow]:
    """Memory llama.cpp needs for each size and type (weights + KV + compute + overhead)."""
    from llmpress.plan.catalog import entry_for_size
    from llmpress.plan.estimate import spec_from_catalog
    rows = []
    for label in labels:
        entry = entry_for_size(label)
        spec = spec_from_catalog(entry.name)
        totals, files = {}, {}
        for t in types:
            w = weights(spec, mix_types(spec, file_type(t).name))
            totals[t] = llama_cpp_memory(spec, w, ctx, cache, flash_attn).total
            files[t] = w.file_bytes
        rows.append(GridRow(label.strip().upper(), entry.name, spec.parameters, totals, files,
                            spec.context_length))
    return rows

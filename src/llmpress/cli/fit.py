"""`llmpress fit`: will this model fit, at which quantization and context? Argument parsing
and rich/JSON output for llmpress.plan."""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from llmpress.errors import LlmpressError

console = Console()
GIB = 2**30


def _gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


def _speed(tok_s: float) -> str:
    if tok_s <= 0:
        return "-"
    return f"{tok_s:.0f}" if tok_s >= 100 else f"{tok_s:.1f}" if tok_s >= 1 else f"{tok_s:.2f}"


def add_fit_parser(sub: argparse._SubParsersAction) -> None:
    from llmpress.plan.advise import DEFAULT_TYPES, RUNTIMES
    from llmpress.plan.estimate import CACHE_TYPES
    p = sub.add_parser(
        "fit", help="will it fit? memory per quantization type, context and speed on this "
        "machine, and the best type that fits",
        description="Estimate from metadata alone (no weights read) how much memory a model "
        "needs at each quantization type, where it fits on this machine (or the one given "
        "with --ram/--vram; sizes are binary: 16GB = 16 GiB) and which type to use.")
    p.add_argument("model", nargs="?", help="a GGUF file, a Hugging Face directory or "
                   "config.json, or a catalog name (Llama-3.1-8B, Qwen2.5-32B ...; --list)")
    p.add_argument("--ctx", type=int, default=4096, help="context length (default 4096)")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES),
                   help=f"comma-separated file types (default {','.join(DEFAULT_TYPES)})")
    p.add_argument("--cache-type", default="f16", choices=[c for c in CACHE_TYPES
                                                           if c in ("f16", "q8_0", "q4_0")],
                   help="the KV cache type (-ctk/-ctv), llama.cpp's and llmpress's")
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help="which runtime to place and recommend for (default: llmpress when "
                   "it runs the architecture, else llama.cpp)")
    p.add_argument("--ram", default=None, help="plan for this much RAM, e.g. 16GB")
    p.add_argument("--vram", default=None, help="plan for this much GPU memory (0: no GPU)")
    p.add_argument("--measure", action="store_true",
                   help="measure memory bandwidth (a few seconds) instead of the default")
    p.add_argument("--sweep", metavar="FILE", default=None,
                   help="quality order from a `llmpress sweep` sweep.json instead of "
                   "llama.cpp's published KLD table")
    p.add_argument("--no-flash-attn", dest="flash_attn", action="store_false",
                   help="llama.cpp without flash attention (llama-cpp-python's default): its "
                   "compute buffer then holds heads x ctx x 512 attention scores")
    p.add_argument("--imatrix", action="store_true",
                   help="the quantization will use an importance matrix (changes the mix)")
    p.add_argument("--table", metavar="SIZES", default=None,
                   help="print the classic grid for sizes such as 7B,13B,32B,70B instead")
    p.add_argument("--list", action="store_true", help="list the built-in catalog")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_fit)


def cmd_fit(args: argparse.Namespace) -> None:
    if args.list:
        return _show_catalog(args.json)
    if args.table:
        return _show_grid(args)
    if not args.model:
        raise LlmpressError("fit: name a model (a GGUF file, a Hugging Face directory, or a "
                            "catalog name such as Llama-3.1-8B), or give --table 7B,13B")
    from llmpress.plan.advise import plan_fit, published_quality, quality_from_sweep
    from llmpress.plan.estimate import load_spec
    from llmpress.plan.machine import detect_machine
    spec = load_spec(args.model)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if not types:
        raise LlmpressError("--types: give a comma-separated list such as Q8_0,Q4_K_M")
    quality = quality_from_sweep(args.sweep) if args.sweep else published_quality()
    with console.status("measuring memory bandwidth ...") if args.measure and not args.json \
            else nullcontext():
        machine = detect_machine(args.ram, args.vram, args.measure)
    report = plan_fit(spec, machine, args.ctx, types, args.runtime, args.cache_type, quality,
                      args.imatrix, args.flash_attn)
    if args.json:
        print(json.dumps(report_dict(report), indent=2))
    else:
        _show_report(report)


# --- the per-model report ----------------------------------------------------------------
def report_dict(report) -> dict:
    from llmpress.plan.advise import PLACEMENTS, run_commands
    spec, m = report.spec, report.machine
    options = []
    for o in report.options:
        est, mem = o.estimate, o.memory
        options.append({
            "type": o.ftype, "file_bytes": est.weights.file_bytes,
            "bits_per_weight": round(est.bits_per_weight, 3), "tensor_types": est.weights.types,
            "llama_cpp": _memory_dict(est.llama_cpp), "llmpress": _memory_dict(est.llmpress),
            "llama_cpp_gpu": _memory_dict(est.llama_cpp_gpu),
            "llmpress_gpu": _memory_dict(est.llmpress_gpu),
            "runtime": o.runtime, "placement": o.placement.kind,
            "placement_text": PLACEMENTS[o.placement.kind],
            "gpu_layers": o.placement.gpu_layers, "gpu_bytes": o.placement.gpu_bytes,
            "ram_bytes": o.placement.ram_bytes, "max_ctx": o.max_ctx,
            "tokens_per_second": round(o.tok_s, 3), "mean_kld": o.kld,
        })
    best = report.recommended
    return {
        "model": {"name": spec.name, "origin": spec.origin, "where": spec.where,
                  "architecture": spec.architecture, "parameters": spec.parameters,
                  "active_parameters": spec.active_parameters,
                  "layers": spec.n_layers, "context_length": spec.context_length,
                  "file_type": spec.file_type, "header_exact": spec.header_exact},
        "machine": asdict(m), "ctx": report.ctx, "cache_type": report.cache,
        "flash_attn": report.flash_attn,
        "runtime": report.runtime, "quality_source": report.quality.source,
        "options": options,
        "recommended": None if best is None else {
            "type": best.ftype, "placement": best.placement.kind,
            "commands": run_commands(report, best)},
    }


def _memory_dict(mem) -> dict:
    return {"weights": mem.weights, "kv_cache": mem.kv_cache, "compute": mem.compute,
            "overhead": mem.overhead, "total": mem.total}


def _machine_line(m) -> str:
    ram = f"RAM {_gib(m.ram_total)}"
    if m.ram_available != m.ram_total:
        ram += f" ({_gib(m.ram_available)} available)"
    gpu = f"{m.gpu_name or 'GPU'} {_gib(m.vram_total)}" if m.has_gpu else "no GPU"
    speed = f"{m.ram_bandwidth / 1e9:.1f} GB/s RAM"
    if m.has_gpu:
        speed += f", {m.gpu_bandwidth / 1e9:.0f} GB/s GPU"
    how = "measured" if m.bandwidth_source == "measured" else "default; --measure probes it"
    return f"{'planned machine' if m.overridden else 'this machine'}: {ram}, {gpu}; " \
           f"bandwidth {speed} ({how})"


def _placement_text(o) -> str:
    from llmpress.plan.advise import PLACEMENTS
    if o.placement.kind == "hybrid":
        return f"GPU {o.placement.gpu_layers} layers + CPU"
    return PLACEMENTS[o.placement.kind]


def _show_report(report) -> None:
    from llmpress.plan.advise import run_commands
    spec = report.spec
    active = (f" ({spec.active_parameters / 1e9:.2f}B active per token)"
              if spec.active_parameters != spec.parameters else "")  # a mixture of experts
    title = (f"{spec.name}: {spec.parameters / 1e9:.2f}B parameters{active}, "
             f"{spec.architecture}, {spec.n_layers} layers, trained context "
             f"{spec.context_length:,}")
    table = Table(title=title)
    kv_title = f"KV {report.ctx:,} {report.cache}"
    gpu = report.machine.has_gpu
    columns = ["type", "file", "bpw", kv_title, "llama.cpp", "llmpress",
               *([f"{report.runtime} on GPU"] if gpu else []),
               f"{report.runtime}: fit", "max ctx", "tok/s", "mean KLD"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("type",) or "fit" in col else "right")
    for o in report.options:
        est = o.estimate
        label = f"{o.ftype} ({spec.file_type})" if o.ftype == "file" and spec.file_type \
            else o.ftype
        if o is report.recommended:
            label = f"[bold green]{label} *[/]"
        on_gpu = [_gib(est.runtime(report.runtime, gpu=True).total)] if gpu else []
        table.add_row(label, _gib(est.weights.file_bytes), f"{est.bits_per_weight:.2f}",
                      _gib(est.llama_cpp.kv_cache), _gib(est.llama_cpp.total),
                      _gib(est.llmpress.total), *on_gpu, _placement_text(o),
                      f"{o.max_ctx:,}" if o.max_ctx else "-", _speed(o.tok_s),
                      "-" if o.kld is None else f"{o.kld:.4f}")
    console.print(table)
    console.print(f"[dim]{_machine_line(report.machine)}[/]", highlight=False)
    notes = ["llama.cpp / llmpress: RAM each needs on the CPU (weights + KV cache + compute "
             "buffers + runtime overhead; llmpress caches float32 and counts torch's ~230 MiB)",
             "tok/s: bandwidth / bytes read per token with the context full (an upper bound)",
             *(["on GPU: VRAM with every layer offloaded, CUDA context included"] if gpu else []),
             f"quality: {report.quality.source}"]
    if not spec.header_exact:
        notes.append("file sizes include an estimate of the tokenizer's metadata")
    for note in notes:
        console.print(f"[dim]{note}[/]", highlight=False)
    best = report.recommended
    if best is None:
        console.print(f"[bold red]nothing fits[/] at {report.ctx:,} tokens, not even streamed "
                      "from disk; try a smaller model, a shorter --ctx or --cache-type q4_0")
        return
    how = _placement_text(best)
    if best.placement.fits:
        console.print(f"[bold]recommended:[/] {best.ftype} — {how} at {report.ctx:,} tokens, "
                      f"~{_speed(best.tok_s)} tok/s, up to {best.max_ctx:,} tokens of context")
    else:
        console.print(f"[bold yellow]no type fits in memory[/] at {report.ctx:,} tokens; "
                      f"{best.ftype} runs with its weights streamed from disk at "
                      f"~{_speed(best.tok_s)} tok/s")
    for command in run_commands(report, best):
        console.print(f"  [dim]{command}[/]" if command.startswith("#") else f"  {command}",
                      highlight=False, soft_wrap=True)


# --- catalog and grid --------------------------------------------------------------------
def _show_catalog(as_json: bool) -> None:
    from llmpress.plan.catalog import catalog
    entries = catalog().values()
    if as_json:
        print(json.dumps([{"name": e.name, "size": e.size, "source": e.source,
                           "note": e.note} for e in entries], indent=2))
        return
    table = Table(title="built-in catalog (config.json values as data)")
    for col in ("model", "size", "source"):
        table.add_column(col)
    for e in entries:
        table.add_row(e.name, e.size, e.source)
    console.print(table)


def _show_grid(args: argparse.Namespace) -> None:
    from llmpress.plan.advise import GRID_TYPES, size_grid
    labels = [s.strip() for s in args.table.split(",") if s.strip()]
    if not labels:
        raise LlmpressError("--table: give sizes such as 7B,13B,32B,70B")
    rows = size_grid(labels, args.ctx, GRID_TYPES, args.cache_type, args.flash_attn)
    if args.json:
        print(json.dumps({"ctx": args.ctx, "cache_type": args.cache_type, "runtime": "llama.cpp",
                          "flash_attn": args.flash_attn,
                          "rows": [asdict(r) for r in rows]}, indent=2))
        return
    table = Table(title=f"memory llama.cpp needs at {args.ctx:,} tokens of context (GiB)")
    table.add_column("size")
    table.add_column("model")
    for t in GRID_TYPES:
        table.add_column(t, justify="right")
    for r in rows:
        model = r.model + (" †" if args.ctx > r.context_length else "")
        table.add_row(r.label, model, *(f"{r.total_bytes[t] / GIB:.1f}" for t in GRID_TYPES))
    console.print(table)
    if any(args.ctx > r.context_length for r in rows):
        console.print(f"[dim]† trained for fewer than {args.ctx:,} tokens: the memory such a "
                      "context would take, not a context it handles well[/]", highlight=False)
    attention = "flash attention" if args.flash_attn else "no flash attention"
    console.print(f"[dim]weights (the llama-quantize type mix) + {args.cache_type} KV cache at "
                  f"{args.ctx:,} tokens + compute buffers ({attention}) + overhead; the OS and "
                  "other programs need their share on top[/]", highlight=False)

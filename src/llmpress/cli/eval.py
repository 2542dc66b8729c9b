"""`llmpress eval`, `compare` and `sweep`: what compression cost, in numbers.

Quality is measured in exact mode by default (weights dequantized exactly, float32 math),
so differences between files come from the files, not from the arithmetic; `--mode fast`
uses the packed kernels. Speed and memory are measured in fast mode, each model in a
process of its own so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from llmpress.cli.common import at_least
from llmpress.errors import LlmpressError
from llmpress.eval.compare import DEFAULT_CTX, CompareConfig, compare_models
from llmpress.eval.speed import BenchSettings

out = Console(highlight=False, width=None if sys.stdout.isatty() else 132)  # tables fit a log
# progress and notes go to stderr, so stdout stays clean for --json
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 132)

DEFAULT_BUDGET = 0.05


# --- progress ----------------------------------------------------------------------------
class WindowProgress:
    """A progress bar on stderr whose text is the running estimate."""

    def __init__(self, label: str, enabled: bool = True):
        self.label, self.enabled = label, enabled and err.is_terminal
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=err, transient=True)
        self.task = None

    def __enter__(self) -> Callable[[int, int, str], None]:
        if self.enabled:
            self.bar.start()

        def update(done: int, total: int, estimate: str) -> None:
            if not self.enabled:
                return
            if self.task is None:
                self.task = self.bar.add_task(self.label, total=total)
            self.bar.update(self.task, completed=done, description=f"{self.label}  {estimate}")
        return update

    def __exit__(self, *exc) -> bool:
        if self.enabled:
            self.bar.stop()
        return False


def _load(model: str, args, ctx: int):
    from llmpress.api import load
    with err.status(f"loading {model} ...") if err.is_terminal else nullcontext():
        return load(model, mode=args.mode, device=args.device, ctx=ctx,
                    cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v)


# --- eval --------------------------------------------------------------------------------
def _model_record(lm) -> dict[str, Any]:
    info = lm.info()
    return {"path": info.path, "name": info.name, "file_bytes": info.file_bytes,
            "bits_per_weight": info.bits_per_weight, "mode": lm.mode}


def cmd_eval(args) -> None:
    from llmpress.eval import kld as K
    from llmpress.eval.perplexity import evaluate_perplexity, perplexity_with_error, text_windows

    if args.base and args.base_logits:
        raise LlmpressError("give either --base MODEL or --base-logits FILE, not both")
    if args.save_base and (args.base or args.base_logits):
        raise LlmpressError("--save-base writes this model's log-probs as a base; it does not "
                            "combine with --base or --base-logits")
    if args.text is None and not args.base_logits:
        raise LlmpressError("give the evaluation text with --text FILE (e.g. WikiText-2's "
                            "wiki.test.raw)")
    if args.text is not None and not Path(args.text).is_file():
        raise LlmpressError(f"{args.text}: no such text file; give --text a UTF-8 text file")
    result: dict[str, Any] = {}
    if args.base_logits:
        base = K.load_base(args.base_logits)
        if args.ctx is not None and args.ctx != base.n_ctx:
            raise LlmpressError(f"{args.base_logits} holds windows of {base.n_ctx} tokens; "
                                f"drop --ctx or give --ctx {base.n_ctx}")
        base = base.first_windows(args.chunks)
        lm = _load(args.model, args, base.n_ctx)
        with WindowProgress("KLD", not args.json) as progress:
            kld = K.kld_on_text(lm, base, args.text, progress=progress)
        result = {"base": {"logits_file": str(args.base_logits), "source": base.source,
                           "mode": base.mode}}
    elif args.base:
        ctx = args.ctx or DEFAULT_CTX
        base_lm = _load(args.base, args, ctx)
        lm = _load(args.model, args, ctx)
        with WindowProgress("KLD", not args.json) as progress:
            kld = K.kld_on_text(lm, base_lm, args.text, ctx, args.chunks, progress)
        result = {"base": _model_record(base_lm)}
    else:
        kld = None
        ctx = args.ctx or DEFAULT_CTX
        lm = _load(args.model, args, ctx)
        with err.status("tokenizing ...") if err.is_terminal else nullcontext():
            tokens, plan = text_windows(lm.tokenizer, args.text, ctx, args.chunks)
        with WindowProgress("perplexity", not args.json) as progress:
            if args.save_base:
                base, nll = K.record_base(lm, tokens, plan, progress)
                estimate, window_ppl = perplexity_with_error(nll), _running_ppl(nll, plan)
            else:
                ppl = evaluate_perplexity(lm, tokens, plan, progress)
                estimate, window_ppl = ppl.estimate, list(ppl.window_ppl)
        result = {"ppl": estimate.ppl, "ppl_error": estimate.error, "window_ppl": window_ppl}
        if args.save_base:
            size = K.save_base(base, args.save_base)
            result["saved_base"] = {"path": str(args.save_base), "bytes": size}
    if kld is not None:
        plan = kld.plan
        result |= {"ppl": kld.summary.ppl, "ppl_error": kld.summary.ppl_error,
                   "kld": asdict(kld.summary)}
    result = {"model": _model_record(lm), "ctx": plan.n_ctx, "windows": plan.n_windows,
              "scored_tokens": plan.n_scored, "text": args.text} | result
    if args.json:
        print(json.dumps(result, indent=2))
        return
    _print_eval(result)


def _running_ppl(nll: np.ndarray, plan) -> list[float]:
    ends = np.arange(1, plan.n_windows + 1) * plan.scored_per_window
    return [float(np.exp(nll[:e].mean())) for e in ends]


def _percentile_name(name: str) -> str:
    return {"max": "Maximum", "min": "Minimum", "median": "Median"}.get(name, name + "%")


def _print_eval(r: dict) -> None:
    m = r["model"]
    out.print(f"[bold]{m['name']}[/]: {m['path']} ({m['file_bytes'] / 2**20:.1f} MiB, "
              f"{m['bits_per_weight']:.2f} bpw), {m['mode']} mode")
    out.print(f"text {r['text'] or '(tokens of the base file)'}: {r['windows']} windows of "
              f"{r['ctx']} tokens, {r['scored_tokens']} tokens scored (the second half of each)")
    out.print(f"Final estimate: PPL = {r['ppl']:.4f} +/- {r['ppl_error']:.5f}")
    if "saved_base" in r:
        s = r["saved_base"]
        out.print(f"base log-probs written to {s['path']} ({s['bytes'] / 2**20:.1f} MiB)")
    if "kld" not in r:
        return
    k = r["kld"]
    base = r["base"]
    out.print(f"base: {base.get('path') or base.get('logits_file')}")
    table = Table(show_header=False, title="against the base")
    pm = "±"
    rows = [
        ("Mean PPL(Q)", f"{k['ppl']:.6f} {pm} {k['ppl_error']:.6f}"),
        ("Mean PPL(base)", f"{k['ppl_base']:.6f} {pm} {k['ppl_base_error']:.6f}"),
        ("Cor(ln(PPL(Q)), ln(PPL(base)))", f"{100 * k['ln_ppl_correlation']:.2f}%"),
        ("Mean ln(PPL(Q)/PPL(base))",
         f"{k['ln_ppl_ratio']:.6f} {pm} {k['ln_ppl_ratio_error']:.6f}"),
        ("Mean PPL(Q)/PPL(base)", f"{k['ppl_ratio']:.6f} {pm} {k['ppl_ratio_error']:.6f}"),
        ("Mean PPL(Q)-PPL(base)", f"{k['ppl_diff']:.6f} {pm} {k['ppl_diff_error']:.6f}"),
        ("Mean KLD", f"{k['kld_mean']:.6f} {pm} {k['kld_error']:.6f}"),
    ]
    rows += [(f"{_percentile_name(n)} KLD", f"{v:.6f}") for n, v in k["kld_percentiles"].items()]
    rows += [("Mean Δp", f"{100 * k['p_diff_mean']:.3f} {pm} {100 * k['p_diff_error']:.3f} %")]
    rows += [(f"{_percentile_name(n)} Δp", f"{100 * v:.3f}%")
             for n, v in k["p_diff_percentiles"].items()]
    rows += [("RMS Δp", f"{100 * k['p_diff_rms']:.3f} {pm} {100 * k['p_diff_rms_error']:.3f} %"),
             ("Same top p", f"{100 * k['same_top']:.3f} {pm} {100 * k['same_top_error']:.3f} %")]
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)


# --- compare -------------------------------------------------------------------------------
class ConsoleProgress:
    """compare_models' progress on stderr: spinners and per-model window bars."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and err.is_terminal

    def status(self, text: str):
        return err.status(text) if self.enabled else nullcontext()

    def windows(self, label: str):
        return WindowProgress(label, self.enabled)


def _report(rows, settings: dict, out_dir: Path, stem: str, budget: float, title: str,
            as_json: bool) -> None:
    """The table first, then the plot (optional: matplotlib), then JSON and CSV naming the
    files that were made: a missing plot never costs the numbers."""
    from llmpress.eval import report as R
    if not as_json:
        out.print(R.comparison_table(rows, title))
        out.print(f"[dim]quality: {settings['quality_mode']} mode, ctx {settings['ctx']}, "
                  f"{settings['windows']} windows ({settings['scored_tokens']} tokens scored); "
                  "speed: fast mode, one process per model; * = on the Pareto front of size "
                  "and mean KLD[/]")
        out.print(R.recommendation_line(rows, budget))
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / f"{stem}.json", "csv": out_dir / f"{stem}.csv",
             "png": out_dir / f"{stem}.png"}
    try:
        R.plot_size_vs_kld(rows, files["png"], title, budget)
    except LlmpressError as exc:
        err.print(f"no plot: {exc}", markup=False)
        del files["png"]
    files = {k: str(v) for k, v in files.items()}
    report = R.report_dict(rows, settings, budget) | {"files": files}
    R.write_json(report, files["json"])
    R.write_csv(rows, files["csv"])
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        out.print(f"written: {', '.join(files.values())}")


def _bench_settings(args) -> BenchSettings | None:
    if args.no_bench:
        return None
    return BenchSettings(args.bench_prompt, args.bench_gen, args.bench_reps, args.threads)


def cmd_compare(args) -> None:
    cfg = CompareConfig(args.base, tuple(args.candidates), args.text, args.ctx or DEFAULT_CTX,
                        args.chunks, args.mode, args.device, args.base_logits,
                        _bench_settings(args))
    rows, settings = compare_models(cfg, ConsoleProgress(not args.json))
    title = f"compared with {Path(args.base).name}"
    _report(rows, settings, Path(args.out), "compare", args.budget, title, args.json)


# --- sweep -----------------------------------------------------------------------------------
def cmd_sweep(args) -> list:
    from llmpress import hub
    from llmpress.quant.quantize import QuantizeConfig, quantize_model

    model = hub.resolve(args.model)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if not types:
        raise LlmpressError("--types: give a comma-separated list such as Q8_0,Q6_K,Q4_K_M")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    suffix = ".imatrix" if args.imatrix else ""
    # allow_requantize: trying other types of an already quantized file is the point here;
    # error_rows=0: the comparison measures the cost, no per-tensor error pass needed.
    configs = [QuantizeConfig(model, work / f"{model.stem}.{t}{suffix}.gguf", t,
                              imatrix=args.imatrix, allow_requantize=True, error_rows=0)
               for t in types]
    outputs = []
    for config in configs:
        with err.status(f"quantizing to {config.type} ...") if err.is_terminal and not args.json \
                else nullcontext():
            report = quantize_model(config)
        if not args.json:
            err.print(f"{config.type}: {report.output} ({report.file_bytes / 2**20:.1f} MiB, "
                      f"{report.seconds:.1f} s)")
        outputs.append(str(report.output))
    cfg = CompareConfig(str(model), tuple(outputs), args.text, args.ctx or DEFAULT_CTX,
                        args.chunks, args.mode, args.device, args.base_logits,
                        _bench_settings(args), labels=tuple(types))
    rows, settings = compare_models(cfg, ConsoleProgress(not args.json))
    settings |= {"types": types, "imatrix": args.imatrix, "work_dir": str(work)}
    title = f"{model.name}: quantization sweep" + (" (imatrix)" if args.imatrix else "")
    _report(rows, settings, work, "sweep", args.budget, title, args.json)
    return rows


# --- argument parsing ------------------------------------------------------------------------
def _add_quality_args(p: argparse.ArgumentParser, text_required: bool = False) -> None:
    p.add_argument("--text", required=text_required, default=None,
                   help="evaluation text, read as UTF-8 bytes (e.g. wiki.test.raw)")
    p.add_argument("--ctx", type=int, default=None, help=f"window length (default {DEFAULT_CTX})")
    p.add_argument("--chunks", type=int, default=None,
                   help="evaluate only the first N windows (default: all the text fills)")
    p.add_argument("--mode", choices=("exact", "fast"), default="exact",
                   help="exact (default): dequantized weights, float32 math; fast: packed kernels")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("-ctk", "--cache-type-k", default=None, metavar="TYPE",
                   help="KV cache type of the keys: f16, f32, q8_0 or q4_0 (default: the mode's)")
    p.add_argument("-ctv", "--cache-type-v", default=None, metavar="TYPE",
                   help="KV cache type of the values: f16, f32, q8_0 or q4_0")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def _add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-logits", default=None,
                   help="reuse base log-probs written by `eval --save-base` (same windows)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help=f"mean KLD the recommendation may cost (default {DEFAULT_BUDGET})")
    p.add_argument("--no-bench", action="store_true", help="skip the speed and memory runs")
    p.add_argument("--bench-prompt", type=int, default=BenchSettings.prompt_tokens,
                   help="prompt tokens of the speed run")
    p.add_argument("--bench-gen", type=int, default=BenchSettings.gen_tokens,
                   help="generated tokens of the speed run")
    p.add_argument("--bench-reps", type=int, default=BenchSettings.repetitions)
    p.add_argument("-t", "--threads", type=at_least(1), default=None)


def add_eval_parsers(sub) -> None:
    """Register eval, compare and sweep on the `llmpress` subcommand parser."""
    p = sub.add_parser("eval", help="perplexity and KL divergence, as llama-perplexity measures "
                       "them")
    p.add_argument("model", help="a GGUF file, a Hugging Face directory, or a pulled name")
    _add_quality_args(p)
    p.add_argument("--base", default=None, help="KL divergence against this model (run here)")
    p.add_argument("--base-logits", default=None,
                   help="KL divergence against log-probs saved with --save-base")
    p.add_argument("--save-base", default=None,
                   help="also write this model's compact log-probs, a base for later runs")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="size, quality and speed of models against a base: "
                       "table, PNG plot, JSON, CSV")
    p.add_argument("base", help="the reference model (e.g. the F32 or F16 original)")
    p.add_argument("candidates", nargs="+", help="compressed models to measure")
    _add_quality_args(p)
    _add_compare_args(p)
    p.add_argument("--out", default="llmpress-compare",
                   help="directory for compare.json/.csv/.png (default ./llmpress-compare)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="quantize to several types and compare them: which "
                       "quant to pick")
    p.add_argument("model", help="the model to quantize (the base of the comparison)")
    p.add_argument("--types", required=True, help="comma-separated: Q8_0,Q6_K,Q4_K_M,...")
    p.add_argument("--imatrix", default=None, help="importance matrix for every type")
    _add_quality_args(p)
    _add_compare_args(p)
    p.add_argument("--work-dir", default="llmpress-sweep",
                   help="where the quantized files and sweep.json/.csv/.png go")
    p.set_defaults(func=cmd_sweep)


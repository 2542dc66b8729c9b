"""`llmpress prune MODEL -o OUT --method ...`: argument parsing and rich output for
llmpress.prune (PruneConfig / prune_model / distill / write_pruned)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmpress.errors import LlmpressError

console = Console()
METHODS = ("magnitude", "wanda", "sparsegpt", "layers", "width")


def add_prune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune", help="remove weights, heads, channels or layers; optionally distill",
        description="Prune a model and write it as GGUF. Unstructured: magnitude, wanda, "
        "sparsegpt with --sparsity or --pattern N:M. Structured: layers (--ratio or "
        "--layers N) and width (--ratio of each layer's parameters) give a smaller dense model.")
    p.add_argument("model", help="GGUF file, Hugging Face directory or pulled name")
    p.add_argument("-o", "--output", required=True,
                   help="the GGUF file to write (.gguf), or else a Hugging Face directory")
    p.add_argument("--hf-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="weight type of a Hugging Face directory output")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="unstructured: fraction of weights set to zero (default 0.5)")
    p.add_argument("--pattern", default=None, help="N:M sparsity instead, e.g. 2:4 or 4:8")
    p.add_argument("--owl", action="store_true",
                   help="per-layer sparsity from outlier ratios (OWL), same mean")
    p.add_argument("--damp", type=float, default=0.01,
                   help="sparsegpt: Hessian damping as a fraction of its mean diagonal "
                   "(default 0.01 as in the paper; more helps with little calibration text)")
    p.add_argument("--ratio", type=float, default=None,
                   help="layers: fraction of layers removed; width: fraction of each "
                   "layer's parameters removed")
    p.add_argument("--layers", dest="n_layers", type=int, default=None,
                   help="layers: how many decoder layers to remove")
    p.add_argument("--metric", choices=("influence", "angular"), default="influence",
                   help="layers: block influence (ShortGPT, any layers) or angular distance "
                   "(Gromov et al., one contiguous block)")
    width = p.add_mutually_exclusive_group()
    width.add_argument("--uniform", dest="uniform", action="store_true", default=True,
                       help="width: the same widths in every layer (default; llama.cpp "
                       "needs it)")
    width.add_argument("--per-layer", dest="uniform", action="store_false",
                       help="width: widths chosen per layer (runs in llmpress only)")
    p.add_argument("--calib", default=None, metavar="TEXT",
                   help="calibration text file (default: Python's built-in documentation)")
    p.add_argument("--calib-sequences", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--distill", type=int, default=0, metavar="STEPS",
                   help="recover with this many knowledge-distillation steps")
    p.add_argument("--lr", type=float, default=2e-4, help="distillation learning rate")
    p.add_argument("--seq-len", type=int, default=128, help="distillation sequence length")
    p.add_argument("--batch", type=int, default=2, help="distillation sequences per step")
    p.add_argument("--checkpoint", default=None,
                   help="distillation checkpoint file (resumed when it exists; default "
                   "OUT.distill.pt)")
    p.add_argument("--then-quantize", default=None, metavar="TYPE",
                   help="write as this file type (e.g. Q4_K_M) instead of the input's types")
    p.add_argument("--eval", default=None, metavar="TEXT",
                   help="measure PPL and KLD against the original on this text")
    p.add_argument("--ctx", type=int, default=512, help="--eval window length")
    p.add_argument("--chunks", type=int, default=40, help="--eval windows (at most)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_prune)


class _Bar:
    """One rich progress bar on stderr, whose task is renamed per phase."""

    def __init__(self):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[note]}"),
                                 console=Console(stderr=True), transient=True,
                                 disable=not sys.stderr.isatty())
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("", total=None, note="")
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, phase: str, done: int, total: int, note: str = "") -> None:
        self.progress.update(self.task, description=phase, completed=done, total=total,
                             note=note)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_prune(args: argparse.Namespace) -> None:
    from llmpress import hub
    from llmpress.io.loader import load_source, load_tokenizer
    from llmpress.prune.prune import PruneConfig, prune_model, write_pruned, write_pruned_hf

    config = PruneConfig(
        method=args.method, sparsity=args.sparsity, pattern=args.pattern, owl=args.owl,
        damp=args.damp,
        ratio=args.ratio, n_layers=args.n_layers, layer_metric=args.metric,
        uniform=args.uniform, calib_text=args.calib, n_sequences=args.calib_sequences,
        seq_len=args.calib_len, device=args.device)
    output = Path(args.output)
    as_hf = output.suffix.lower() != ".gguf"
    if as_hf and args.then_quantize:
        raise LlmpressError("--then-quantize writes GGUF: give an output file ending in .gguf")
    source = load_source(hub.resolve(args.model))
    needs_text = config.needs_calibration or args.distill
    tokenizer = load_tokenizer(source) if needs_text else None
    with _Bar() as bar:
        result = prune_model(source, config, tokenizer,
                             lambda phase, done, total: bar.update(phase, done, total))
        losses = None
        if args.distill:
            result, losses = _distill(args, config, result, tokenizer, bar)
        if as_hf:
            report = None
            write_pruned_hf(result, output, args.hf_dtype)
        else:
            report = write_pruned(result, output, args.then_quantize,
                                  lambda done, total: bar.update("writing", done, total))
    _print_result(result, report, source, output)
    if losses:
        from llmpress.prune.distill import save_loss_curve
        try:
            curve = save_loss_curve(losses, Path(str(output).rstrip("/") + ".distill.png"),
                                    f"{config.label()}: distillation")
        except LlmpressError as exc:  # no matplotlib: the model is written all the same
            curve = f"not drawn ({exc})"
        console.print(f"distillation: KD loss {losses[0]:.4f} -> {losses[-1]:.4f} "
                      f"over {len(losses)} steps; curve: {curve}", markup=False)
    if args.eval:
        _print_eval(evaluate_against_original(source.path, output, args.eval, args.ctx,
                                              args.chunks, args.device))


def _distill(args, config, result, tokenizer, bar):
    from llmpress.calib.data import calibration_tokens, read_calibration_text
    from llmpress.models.llama import LlamaModel
    from llmpress.prune.distill import DistillConfig, distill
    from llmpress.prune.prune import with_weights

    checkpoint = (Path(args.checkpoint) if args.checkpoint
                  else Path(args.output.rstrip("/") + ".distill.pt"))
    cfg = DistillConfig(steps=args.distill, lr=args.lr, batch_size=args.batch,
                        checkpoint=checkpoint, device=args.device)
    n_sequences = max(cfg.steps * cfg.batch_size // 2, 16)  # about two epochs, at least 16
    tokens = calibration_tokens(tokenizer, read_calibration_text(config.calib_text),
                                n_sequences, args.seq_len)
    teacher = LlamaModel(result.original, mode="fast", device=cfg.device or "cpu")
    done = distill(result.source, teacher, tokens, cfg, result.masks,
                   lambda step, steps, loss: bar.update("distilling", step, steps,
                                                        f"KD loss {loss:.4f}"))
    checkpoint.unlink(missing_ok=True)  # finished: the checkpoint has served its purpose
    return with_weights(result, done.weights), done.losses


def _print_result(result, report, source, output: Path) -> None:
    cfg = result.config
    table = Table(title=f"{cfg.label()} -> {output}", show_header=False)
    rows = [("parameters", f"{result.params_before:,} -> {result.params_after:,} "
             f"({result.params_after / result.params_before:.1%})")]
    if result.nonzero_after != result.params_after:
        rows.append(("nonzero parameters", f"{result.nonzero_after:,} "
                     f"({result.nonzero_after / result.params_after:.1%})"))
    if report is None:  # a Hugging Face directory
        size = sum(f.stat().st_size for f in output.iterdir() if f.is_file())
        rows.append(("directory size", f"{_mib(source.file_bytes)} -> {_mib(size)}"))
    else:
        rows.append(("file size", f"{_mib(source.file_bytes)} -> {_mib(report.file_bytes)}"))
        rows.append(("tensor types",
                     ", ".join(f"{n} x{c}" for n, c in sorted(report.types.items()))))
    if report is not None and report.fell_back:
        rows.append(("type fallbacks", f"{len(report.fell_back)} tensors (rows no longer fit "
                     "their type's blocks)"))
    if result.removed_layers:
        rows.append(("removed layers", ", ".join(map(str, result.removed_layers))))
    if result.widths and cfg.method == "width":
        heads = sorted({w[0] for w in result.widths})
        ffn = sorted({w[2] for w in result.widths})
        rows.append(("heads / FFN per layer", f"{heads} / {ffn}"
                     + ("" if len(heads) == len(ffn) == 1 else
                        "  (not uniform: llama.cpp's llama graph needs one width)")))
    if report is not None and report.zeros_kept is not None:
        rows.append(("pruned weights still 0 in the file", f"{report.zeros_kept:.1%}"))
    rows.append(("time", f"{result.seconds:.1f} s"))
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    if result.linears:
        by_type = result.sparsity_by_type()
        errors = Table(title="achieved sparsity and output error per layer type")
        for col in ("Linear", "sparsity", "mean rel. error", "max rel. error"):
            errors.add_column(col, justify="left" if col == "Linear" else "right")
        for name, sparsity in by_type.items():
            errs = [r.error for r in result.linears if r.name == name]
            errors.add_row(name, f"{sparsity:.2%}", f"{sum(errs) / len(errs):.4f}",
                           f"{max(errs):.4f}")
        console.print(errors)
        if cfg.method == "magnitude" and not cfg.owl:
            console.print("(magnitude uses no calibration data: errors are ‖ΔW‖²/‖W‖²; "
                          "the others are ‖ΔW·X‖²/‖W·X‖² on the calibration text)")


def evaluate_against_original(original: Path, pruned: Path, text: str, ctx: int, chunks: int,
                              device: str | None) -> dict:
    """PPL of both models and the KLD of the pruned one against the original."""
    from llmpress.api import load
    from llmpress.eval.kld import kld_on_text

    base = load(original, device=device)
    lm = load(pruned, device=device)
    with _Bar() as bar:
        result = kld_on_text(lm, base, text, ctx, chunks,
                             lambda done, total, note: bar.update("evaluating", done, total, note))
    s = result.summary
    return {"text": text, "ctx": ctx, "windows": result.plan.n_windows, "ppl_base": s.ppl_base,
            "ppl_base_error": s.ppl_base_error, "ppl": s.ppl, "ppl_error": s.ppl_error,
            "kld_mean": s.kld_mean, "kld_error": s.kld_error, "same_top": s.same_top}


def _print_eval(r: dict) -> None:
    table = Table(title=f"quality on {r['text']} (ctx {r['ctx']}, {r['windows']} windows)")
    for col in ("model", "PPL", "mean KLD", "same top-1"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row("original", f"{r['ppl_base']:.3f} ± {r['ppl_base_error']:.3f}", "", "")
    table.add_row("pruned", f"{r['ppl']:.3f} ± {r['ppl_error']:.3f}",
                  f"{r['kld_mean']:.4f} ± {r['kld_error']:.4f}", f"{r['same_top']:.1%}")
    console.print(table)


__all__ = ["add_prune_parser", "cmd_prune", "evaluate_against_original"]

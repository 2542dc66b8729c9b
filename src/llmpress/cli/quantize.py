"""`llmpress quantize IN OUT TYPE`: argument parsing and rich output for quant.quantize."""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmpress.quant.mix import FILE_TYPE_ALIASES, FILE_TYPES

console = Console()


def _tensor_type_option(text: str) -> tuple[str, str]:
    """--tensor-type REGEX=TYPE, split at the first '=' as llama-quantize does."""
    pattern, sep, type_name = text.partition("=")
    if not sep or not pattern or not type_name:
        raise argparse.ArgumentTypeError(f"{text!r}: write it as REGEX=TYPE, e.g. attn_v=q8_0")
    return pattern, type_name


def add_quantize_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `quantize`; the calibration options are added by cli.calibrated."""
    types = ", ".join(list(FILE_TYPES) + list(FILE_TYPE_ALIASES))
    p = sub.add_parser("quantize", help="quantize a model to a GGUF type mix, like llama-quantize",
                       description=f"Quantize a GGUF file or a Hugging Face directory. TYPE: {types}.")
    p.add_argument("input", metavar="IN", help="GGUF file or Hugging Face directory")
    p.add_argument("output", metavar="OUT", help="the GGUF file to write")
    p.add_argument("type", metavar="TYPE", nargs="?", default=None,
                   help="file type, e.g. Q4_K_M (or leave it out and give --target-bpw or "
                   "--target-size)")
    p.add_argument("--imatrix", metavar="FILE", default=None,
                   help="importance matrix (llama.cpp imatrix GGUF or legacy .dat)")
    p.add_argument("--allow-requantize", action="store_true",
                   help="allow tensors that are already quantized to be requantized")
    p.add_argument("--tensor-type", metavar="REGEX=TYPE", action="append", default=[],
                   type=_tensor_type_option, help="type for tensors whose name matches "
                   "(repeatable; the first match wins)")
    p.add_argument("--output-type", metavar="TYPE", default=None,
                   help="type of output.weight")
    p.add_argument("--embedding-type", metavar="TYPE", default=None,
                   help="type of token_embd.weight")
    p.add_argument("--pure", action="store_true",
                   help="no mix: every quantizable tensor gets TYPE's base type")
    p.add_argument("--summary", action="store_true",
                   help="print the per-type summary only, not every tensor")
    split = p.add_argument_group("split output, as llama.cpp's gguf-split writes it: "
                                 "OUT without .gguf, then -00001-of-0000N.gguf ...")
    split.add_argument("--split-max-size", metavar="SIZE", default=None,
                       help="tensor bytes per file: 500M, 2G (10^6, 10^9 as gguf-split), "
                       "900MiB or bytes")
    split.add_argument("--split-max-tensors", metavar="N", type=int, default=None,
                       help="tensors per file")
    group = p.add_argument_group("mixed precision to a size (instead of TYPE)")
    group.add_argument("--target-bpw", type=float, default=None, metavar="BITS",
                       help="file size in bits per weight, e.g. 4.25: a type for every "
                       "tensor chosen for the least predicted KL divergence")
    group.add_argument("--target-size", default=None, metavar="SIZE",
                       help="file size, e.g. 900MiB, 1.2GB or bytes")
    group.add_argument("--report", action="store_true",
                       help="print the chosen type of every tensor by layer and kind, and "
                       "write a PNG of bits per layer next to OUT")
    p.set_defaults(func=cmd_quantize)
    return p


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def split_size(text: str) -> int:
    """--split-max-size: gguf-split's 500M / 2G (decimal), or any size parse_size reads."""
    import re

    from llmpress.errors import LlmpressError
    from llmpress.quant.budget import parse_size

    match = re.fullmatch(r"\s*(\d+)\s*([MG])\s*", text)
    if match:
        return int(match.group(1)) * (10**6 if match.group(2) == "M" else 10**9)
    try:
        return parse_size(text)
    except LlmpressError:
        raise LlmpressError(f"--split-max-size {text}: write a size like 500M, 2G, 900MiB or "
                            "a number of bytes") from None


def split_limits(args: argparse.Namespace):
    """SplitLimits of --split-max-size / --split-max-tensors, or None (one file)."""
    size, tensors = getattr(args, "split_max_size", None), getattr(args, "split_max_tensors", None)
    if size is None and tensors is None:
        return None
    from llmpress.io.gguf_write import SplitLimits

    return SplitLimits(None if size is None else split_size(size), tensors)


def quantize_config(args: argparse.Namespace):
    """The QuantizeConfig of `quantize`'s arguments; with --target-bpw / --target-size the
    type of every tensor is chosen here (quant.budget). -> (config, BudgetPlan or None)."""
    from llmpress.errors import LlmpressError
    from llmpress.quant.quantize import QuantizeConfig

    target = None
    if args.target_bpw is not None or args.target_size is not None:
        from llmpress.quant.budget import BudgetTarget, parse_size

        size = None if args.target_size is None else parse_size(args.target_size)
        target = BudgetTarget(bpw=args.target_bpw, size=size)
        if args.type is not None:
            raise LlmpressError(f"give either TYPE ({args.type}) or a target size, not both: "
                                "the target chooses the type of every tensor")
        if args.tensor_type or args.output_type or args.embedding_type or args.pure:
            raise LlmpressError("--tensor-type, --output-type, --embedding-type and --pure set "
                                "types by rule; a target size chooses every type itself")
    elif args.type is None:
        raise LlmpressError("give a TYPE (e.g. Q4_K_M) or --target-bpw / --target-size")
    config = QuantizeConfig(
        input=args.input, output=args.output, type=args.type or "F16", imatrix=args.imatrix,
        allow_requantize=args.allow_requantize, tensor_types=tuple(args.tensor_type),
        output_type=args.output_type, embedding_type=args.embedding_type, pure=args.pure,
        split=split_limits(args),
    )
    if target is None:
        return config, None
    from llmpress.quant.budget import BudgetSettings, budget_config

    settings = BudgetSettings(text=getattr(args, "calib", None),
                              device=getattr(args, "device", None))
    err = Console(stderr=True)
    config, plan = budget_config(config, target, settings,
                                 progress=lambda line: err.print(line, highlight=False))
    if args.report:
        print_budget(plan, config.output)
    return config, plan


def cmd_quantize(args: argparse.Namespace) -> None:
    from llmpress.quant.quantize import quantize_model

    config, _ = quantize_config(args)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[tensor]}"),
                  console=Console(stderr=True), transient=True,
                  disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(f"quantizing to {config.type.upper()}", total=None, tensor="")

        def progress(done: int, total: int, tensor) -> None:
            bar.update(task, completed=done, total=total, tensor=tensor.name)

        report = quantize_model(config, progress)
    print_report(report, per_tensor=not args.summary)


def print_report(report, per_tensor: bool) -> None:
    """A QuantizeReport as tables: every tensor (per_tensor), then a summary by type."""
    if per_tensor:
        table = Table(title=f"{report.output} ({report.file_type})")
        for col in ("tensor", "shape", "from", "type", "size", "rel. error", "ms"):
            table.add_column(col, justify="left" if col in ("tensor", "from", "type") else "right")
        for t in report.tensors:
            note = " (fallback)" if t.fell_back else ""
            table.add_row(t.name, "x".join(map(str, t.shape)), t.source_type, t.type + note,
                          _mib(t.n_bytes), _error(t.error), f"{t.seconds * 1000:.0f}")
        console.print(table)
    by_type: dict[str, list] = defaultdict(list)
    for t in report.tensors:
        by_type[t.type].append(t)
    summary = Table(title="by type")
    for col in ("type", "tensors", "size", "rel. error (weighted by size)"):
        summary.add_column(col, justify="left" if col == "type" else "right")
    for name, items in sorted(by_type.items(), key=lambda kv: -sum(t.n_bytes for t in kv[1])):
        measured = [(t.error, math.prod(t.shape)) for t in items if t.error is not None]
        weight = sum(n for _, n in measured)
        mean = sum(e * n for e, n in measured) / weight if weight else None
        summary.add_row(name, str(len(items)), _mib(sum(t.n_bytes for t in items)), _error(mean))
    console.print(summary)
    imatrix = f", imatrix: {report.imatrix_entries} entries" if report.imatrix_entries else ""
    console.print(f"wrote {report.output}: {_mib(report.file_bytes)}, "
                  f"{report.bits_per_weight:.2f} bits per weight over {report.n_params:,} "
                  f"parameters, {report.seconds:.1f} s{imatrix}")


def print_budget(plan, output) -> None:
    """The chosen types by layer and kind, the predicted KLD, and a PNG of bits per layer
    (OUT with .bits.png)."""
    from pathlib import Path

    from llmpress.quant.budget import LINEAR_KINDS, bits_by_layer

    sens = plan.sensitivity
    by_layer = bits_by_layer(plan)
    kinds = [k for k in LINEAR_KINDS if any(k in row for row in by_layer.values())]
    table = Table(title=f"types chosen for {plan.budget:,} bytes (predicted KLD "
                  f"{plan.predicted_kld:.4f})")
    table.add_column("layer")
    for kind in kinds:  # attn_q -> q, ffn_gate -> gate: the table fits a terminal
        table.add_column(kind.split("_", 1)[1] if kind.startswith("attn_") else kind[4:])
    by_name = {(t.layer, t.kind): plan.picked[t.info.name] for t in sens.tensors
               if t.layer >= 0 and not t.fixed}
    for layer in sorted(by_layer):
        table.add_row(str(layer), *[by_name[layer, k].type.name if (layer, k) in by_name
                                    else "" for k in kinds])
    console.print(table)
    for t in sens.tensors:  # the embedding / output matrix
        if t.layer < 0 and not t.fixed:
            console.print(f"{t.info.name}: {plan.picked[t.info.name].type.name}",
                          highlight=False)
    passes = ", ".join(f"{k} {v:.4f}" for k, v in sens.probes.items())
    console.print(f"perturbation passes (KLD at the probe type): {passes}", highlight=False)
    console.print(f"file {plan.file_bytes:,} bytes of {plan.budget:,} "
                  f"({plan.file_bytes * 8 / sens.n_params:.3f} bits per weight); "
                  f"measuring took {sum(sens.seconds.values()):.0f} s", highlight=False)
    png = Path(str(output) + ".bits.png")
    _plot_bits(by_layer, png, f"{Path(output).name}: bits per weight by layer")
    console.print(f"wrote {png}", highlight=False)


def _plot_bits(by_layer: dict, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmpress.quant.budget import LINEAR_KINDS

    layers = sorted(by_layer)
    kinds = [k for k in LINEAR_KINDS if any(k in row for row in by_layer.values())]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for kind in kinds:
        ax.plot(layers, [by_layer[i].get(kind, float("nan")) for i in layers], marker="o",
                markersize=3, label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("bits per weight")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["add_quantize_parser", "cmd_quantize", "print_budget", "print_report",
           "quantize_config"]


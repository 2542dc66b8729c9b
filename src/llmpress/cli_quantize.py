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
    """Register `quantize`; the calibration options are added by cli_calibrated."""
    types = ", ".join(list(FILE_TYPES) + list(FILE_TYPE_ALIASES))
    p = sub.add_parser("quantize", help="quantize a model to a GGUF type mix, like llama-quantize",
                       description=f"Quantize a GGUF file or a Hugging Face directory. TYPE: {types}.")
    p.add_argument("input", metavar="IN", help="GGUF file or Hugging Face directory")
    p.add_argument("output", metavar="OUT", help="the GGUF file to write")
    p.add_argument("type", metavar="TYPE", help="file type, e.g. Q4_K_M")
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
    p.set_defaults(func=cmd_quantize)
    return p


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def cmd_quantize(args: argparse.Namespace) -> None:
    from llmpress.quant.quantize import QuantizeConfig, quantize_model

    config = QuantizeConfig(
        input=args.input, output=args.output, type=args.type, imatrix=args.imatrix,
        allow_requantize=args.allow_requantize, tensor_types=tuple(args.tensor_type),
        output_type=args.output_type, embedding_type=args.embedding_type, pure=args.pure,
    )
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


__all__ = ["add_quantize_parser", "cmd_quantize", "print_report"]


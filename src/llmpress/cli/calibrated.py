"""The calibration commands of the `llmpress` CLI: `imatrix` (llama.cpp's importance
matrix), and the `--method gptq|awq|awq+gptq` path of `quantize`. Thin: parse, call the
library, print with rich. cli/__init__.py registers these with add_calibrated_parsers(sub)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from llmpress.errors import LlmpressError

console = Console(stderr=True)


def _progress_bar(description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress("[progress.description]{task.description}", BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)


# --- imatrix --------------------------------------------------------------------------------
def cmd_imatrix(args) -> None:
    from llmpress import hub
    from llmpress.io.loader import load_source, load_tokenizer
    from llmpress.kernels.device import default_device
    from llmpress.calib.data import read_calibration_text
    from llmpress.models.llama import LlamaModel
    from llmpress.quant.imatrix import calibration_chunks, collect_imatrix, write_imatrix

    model_path = hub.resolve(args.model)
    output = Path(args.output)
    if output.exists() and output.resolve() == Path(model_path).resolve():
        raise LlmpressError(f"{output}: the output would overwrite the model; choose another -o")
    source = load_source(Path(model_path))
    tokenizer = load_tokenizer(source)
    text = read_calibration_text(args.text)
    if args.text is None:
        console.print(f"no --text given: using the built-in calibration text, Python's "
                      f"pydoc_data.topics ({len(text):,} characters)", highlight=False)
    chunks = calibration_chunks(tokenizer, text, args.ctx, args.chunks)
    model = LlamaModel(source, mode="exact", device=args.device or default_device())
    dataset = args.text if args.text is not None else "pydoc_data.topics"
    console.print(f"{chunks.shape[0]} chunks of {chunks.shape[1]} tokens "
                  f"({chunks.numel():,} tokens), {len(model.blocks)} layers", highlight=False)
    with _progress_bar("imatrix") as bar:
        task = bar.add_task("layers", total=len(model.blocks))
        imatrix = collect_imatrix(model, chunks, datasets=[dataset], batch_size=args.batch,
                                  progress=lambda done, total: bar.update(task, completed=done))
    write_imatrix(imatrix, output)
    console.print(f"wrote {output}: {len(imatrix.sums)} entries, {imatrix.chunk_count} chunks "
                  f"of {imatrix.chunk_size}", highlight=False)


def _shrink(args) -> float:
    from llmpress.quant.calibrated import DEFAULT_SHRINK

    return DEFAULT_SHRINK if args.shrink is None else args.shrink


# --- quantize --method ------------------------------------------------------------------------
def cmd_quantize_calibrated(args) -> None:
    from rich.table import Table

    from llmpress.cli.quantize import print_report, quantize_config
    from llmpress.quant.calibrated import CalibrationConfig, calibrated_quantize
    from llmpress.quant.gptq import GPTQConfig

    config, _ = quantize_config(args)  # TYPE, or the types chosen for --target-*
    calib = CalibrationConfig(method=args.method, text=args.calib, tokens=args.calib_tokens,
                              seq_len=args.calib_ctx, awq_grid=args.awq_grid, device=args.device,
                              gptq=GPTQConfig(damp=args.damp, act_order=args.act_order,
                                              shrink=_shrink(args)))
    if args.calib is None:
        console.print("no --calib given: calibrating on the built-in text, Python's "
                      "pydoc_data.topics", highlight=False)
    with _progress_bar(args.method) as bar:
        task = bar.add_task(f"{args.method}: layers", total=None)
        report = calibrated_quantize(
            config, calib,
            layer_progress=lambda done, total: bar.update(task, completed=done, total=total))
    table = Table(title=f"{args.method}: output error per Linear on the calibration inputs, "
                  "‖(W−Ŵ)X‖²/‖WX‖²")
    for col in ("tensor", "type", "rounding", args.method, "ratio", "AWQ α"):
        table.add_column(col, justify="left" if col in ("tensor", "type") else "right")
    for e in report.linears:
        ratio = e.error / e.rtn_error if e.rtn_error > 0 else float("nan")
        table.add_row(e.name, e.type, f"{e.rtn_error:.3e}", f"{e.error:.3e}", f"{ratio:.2f}",
                      "-" if e.awq_alpha is None else f"{e.awq_alpha:.2f}")
    if report.linears:
        Console().print(table)
        mean = sum(e.error / e.rtn_error for e in report.linears if e.rtn_error > 0) / \
            max(1, sum(e.rtn_error > 0 for e in report.linears))
        console.print(f"mean error ratio {args.method}/rounding: {mean:.3f} over "
                      f"{len(report.linears)} Linears, {report.calib_tokens:,} calibration "
                      f"tokens, {report.seconds:.0f} s", highlight=False)
    print_report(report.quantize, per_tensor=False)


def add_method_options(p) -> None:
    """--method and the calibration options on `llmpress quantize` (cli/__init__.py calls this);
    --method rtn (the default) leaves the command as it was."""
    from llmpress.quant.calibrated import METHODS

    group = p.add_argument_group("calibration-aware quantization")
    group.add_argument("--method", choices=METHODS, default="rtn",
                       help="rtn: plain rounding (default); gptq: GPTQ into the GGUF types; "
                       "awq: AWQ scales then rounding; awq+gptq: both")
    group.add_argument("--calib", metavar="TEXT", default=None, help="calibration text file "
                       "(default: the built-in text, Python's pydoc_data.topics)")
    group.add_argument("--calib-tokens", type=int, default=32768,
                       help="calibration tokens (default 32768)")
    group.add_argument("--calib-ctx", type=int, default=512,
                       help="tokens per calibration sequence (default 512)")
    group.add_argument("--act-order", action="store_true",
                       help="GPTQ: columns by decreasing activation energy, static block scales")
    group.add_argument("--damp", type=float, default=0.01,
                       help="GPTQ: damping, a fraction of the Hessian's mean diagonal (0.01)")
    group.add_argument("--shrink", type=float, default=None,
                       help="GPTQ: H + SHRINK*diag(H), less fitting to the calibration "
                       "text (default 1; 0 is GPTQ as published)")
    group.add_argument("--awq-grid", type=int, default=20, help="AWQ: α values tried (20)")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    plain = p.get_default("func")
    p.set_defaults(func=lambda args: plain(args) if args.method == "rtn"
                   else cmd_quantize_calibrated(args))


# --- gptq (checkpoint export) and convert -------------------------------------------------------
def cmd_gptq(args) -> None:
    from rich.table import Table

    from llmpress.quant.calibrated import CalibrationConfig, gptq_checkpoint
    from llmpress.quant.gptq import GPTQConfig, IntGrid

    grid = IntGrid(args.bits, args.group_size, symmetric=not args.zero_point)
    calib = CalibrationConfig(method="gptq", text=args.calib, tokens=args.calib_tokens,
                              seq_len=args.calib_ctx, device=args.device,
                              gptq=GPTQConfig(damp=args.damp, act_order=args.act_order,
                                              shrink=_shrink(args)))
    if args.calib is None:
        console.print("no --calib given: calibrating on the built-in text, Python's "
                      "pydoc_data.topics", highlight=False)
    with _progress_bar("gptq") as bar:
        task = bar.add_task("gptq: layers", total=None)
        report = gptq_checkpoint(
            args.input, args.output, grid, args.format, calib,
            layer_progress=lambda done, total: bar.update(task, completed=done, total=total))
    table = Table(title="output error per Linear on the calibration inputs, ‖(W−Ŵ)X‖²/‖WX‖²")
    for col in ("tensor", "rounding", "gptq", "ratio"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for e in report.linears:
        table.add_row(e.name, f"{e.rtn_error:.3e}", f"{e.error:.3e}",
                      f"{e.error / e.rtn_error:.2f}" if e.rtn_error > 0 else "-")
    Console().print(table)
    console.print(f"wrote {report.output} ({report.format}, {grid.bits}-bit, group "
                  f"{grid.group_size}, {'zero point' if args.zero_point else 'symmetric'}) "
                  f"from {report.calib_tokens:,} calibration tokens in {report.seconds:.0f} s",
                  highlight=False)


def cmd_convert(args) -> None:
    from llmpress.cli.quantize import print_report
    from llmpress.quant.quantize import QuantizeConfig, quantize_model

    report = quantize_model(QuantizeConfig(args.input, args.output, args.type))
    print_report(report, per_tensor=False)


def add_calibrated_parsers(sub) -> None:
    """Register `imatrix`, `gptq` and `convert` on the CLI's subparsers."""
    p = sub.add_parser("imatrix", help="importance matrix of a model on calibration text "
                       "(llama.cpp's imatrix GGUF)")
    p.add_argument("model", help="a GGUF file, a Hugging Face directory, or a pulled name")
    p.add_argument("--text", "-f", default=None, help="calibration text file (default: the "
                   "built-in text, Python's pydoc_data.topics)")
    p.add_argument("-o", "--output", default="imatrix.gguf", help="output file "
                   "(default: imatrix.gguf)")
    p.add_argument("--ctx", "-c", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks "
                   "(default: all the text gives)")
    p.add_argument("--batch", type=int, default=4, help="chunks per forward pass (default 4)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.set_defaults(func=cmd_imatrix)

    p = sub.add_parser("gptq", help="GPTQ a Hugging Face model into a GPTQ or "
                       "compressed-tensors checkpoint (transformers / vLLM load it)")
    p.add_argument("input", metavar="IN", help="a float Hugging Face model directory")
    p.add_argument("output", metavar="OUT", help="the checkpoint directory to create")
    p.add_argument("--format", choices=("gptq", "compressed-tensors"), default="gptq")
    p.add_argument("--bits", type=int, default=4, help="2, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale "
                   "(default 128; -1: one per row)")
    p.add_argument("--zero-point", action="store_true", help="asymmetric grid with a zero "
                   "point per group (default: symmetric)")
    p.add_argument("--act-order", action="store_true", help="columns by decreasing "
                   "activation energy (static groups: the layout stays ordinary)")
    p.add_argument("--damp", type=float, default=0.01, help="damping (default 0.01)")
    p.add_argument("--shrink", type=float, default=None, help="H + SHRINK*diag(H), less "
                   "fitting to the calibration text (default 1; 0 is GPTQ as published)")
    p.add_argument("--calib", metavar="TEXT", default=None, help="calibration text file "
                   "(default: the built-in text)")
    p.add_argument("--calib-tokens", type=int, default=32768)
    p.add_argument("--calib-ctx", type=int, default=512)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.set_defaults(func=cmd_gptq)

    p = sub.add_parser("convert", help="a GGUF file of float weights from a Hugging Face "
                       "directory (float, GPTQ, AWQ or compressed-tensors) or a GGUF file")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT", help="the GGUF file to write")
    p.add_argument("--type", choices=("F32", "F16", "BF16", "Q8_0"), default="F16",
                   help="tensor type (default F16, as convert_hf_to_gguf; F32 keeps "
                   "dequantized GPTQ/AWQ weights exactly)")
    p.set_defaults(func=cmd_convert)


"""The calibration commands of the `llmpress` CLI: `imatrix` (llama.cpp's importance
matrix), and the `--method gptq|awq|awq+gptq` path of `quantize`. Thin: parse, call the
library, print with rich. cli.py registers these with add_calibrated_parsers(sub)."""

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
    from llmpress.api import default_device, load_source, load_tokenizer
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


def add_calibrated_parsers(sub) -> None:
    """Register `imatrix` on the CLI's subparsers."""
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


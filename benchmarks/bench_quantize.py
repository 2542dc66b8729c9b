"""Quantize a model with llmpress and with llama.cpp's quantizer, same run, alternating.

    python benchmarks/bench_quantize.py [--types Q8_0,Q4_K_M] [--repeats 3] [--model NAME|PATH]
                                        [--numpy] [--threads 2] [--workdir DIR]

The input is the model dequantized to F32 (made once with `llmpress quantize
--allow-requantize ... F32`, as reference/README.md describes); default: the default
model. For each type both tools quantize that file, alternating, `--repeats` times:
llama.cpp through llama-cpp-python's `llama_model_quantize` (the code behind
llama-quantize, `--threads` threads), llmpress through `quantize_model` (its C
quantizers use all cores). The table shows the median times, their ratio, both file sizes
and whether the files are byte-identical. `--numpy` adds a column for llmpress with its
numpy quantizers (the fallback when the C library is not built).
"""

from __future__ import annotations

import argparse
import ctypes
import filecmp
import os
import statistics
import tempfile
import time
from pathlib import Path

import llama_cpp
from rich.console import Console
from rich.table import Table

from llmpress import hub
from llmpress.formats import cquant
from llmpress.quant.mix import file_type
from llmpress.quant.quantize import QuantizeConfig, quantize_model

DEFAULT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")


def llama_quantize(source: Path, out: Path, type_name: str, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = file_type(type_name).number
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(),
                                      ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {type_name}")


def llmpress_quantize(source: Path, out: Path, type_name: str, numpy: bool = False) -> None:
    previous = os.environ.get("LLMPRESS_NUMPY_QUANTIZE")
    os.environ["LLMPRESS_NUMPY_QUANTIZE"] = "1" if numpy else "0"
    try:
        quantize_model(QuantizeConfig(source, out, type_name))
    finally:
        if previous is None:
            del os.environ["LLMPRESS_NUMPY_QUANTIZE"]
        else:
            os.environ["LLMPRESS_NUMPY_QUANTIZE"] = previous


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES))
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per type")
    parser.add_argument("--model", default=hub.DEFAULT_MODEL, help="catalog name or GGUF path")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads")
    parser.add_argument("--numpy", action="store_true", help="also time the numpy quantizers")
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    console = Console(width=140)
    if not cquant.available():
        console.print("[yellow]the C quantizers are not built: llmpress uses the numpy ports")
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    source = Path(args.model) if Path(args.model).exists() else hub.pull(args.model)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        f32 = work / "f32.gguf"
        seconds = timed(lambda: quantize_model(QuantizeConfig(
            source, f32, "F32", allow_requantize=True)))
        console.print(f"F32 original: {f32.stat().st_size:,} bytes ({seconds:.1f} s)")
        table = Table(title=f"quantizing {source.name} (as F32) — llmpress vs llama.cpp "
                            f"({args.threads} threads), median of {args.repeats}")
        columns = ["type", "llama.cpp s", "llmpress s", "ratio"]
        columns += ["llmpress numpy s"] if args.numpy else []
        columns += ["llama.cpp bytes", "llmpress bytes", "bytes equal"]
        for col in columns:
            table.add_column(col, justify="left" if col == "type" else "right")
        for type_name in args.types.split(","):
            theirs, ours = work / f"llama-{type_name}.gguf", work / f"ours-{type_name}.gguf"
            ours_numpy = work / f"numpy-{type_name}.gguf"
            times: dict[str, list[float]] = {"llama": [], "ours": [], "numpy": []}
            for _ in range(args.repeats):
                times["llama"].append(timed(lambda: llama_quantize(
                    f32, theirs, type_name, args.threads)))
                times["ours"].append(timed(lambda: llmpress_quantize(f32, ours, type_name)))
                if args.numpy:
                    times["numpy"].append(timed(lambda: llmpress_quantize(
                        f32, ours_numpy, type_name, numpy=True)))
            t_llama, t_ours = (statistics.median(times[k]) for k in ("llama", "ours"))
            same = filecmp.cmp(theirs, ours, shallow=False) and (
                not args.numpy or filecmp.cmp(theirs, ours_numpy, shallow=False))
            row = [type_name, f"{t_llama:.2f}", f"{t_ours:.2f}", f"{t_ours / t_llama:.2f}x"]
            row += [f"{statistics.median(times['numpy']):.2f}"] if args.numpy else []
            row += [f"{theirs.stat().st_size:,}", f"{ours.stat().st_size:,}",
                    "yes" if same else "NO"]
            table.add_row(*row)
            console.print("  ".join(row))  # progress: the table comes at the end
            for path in (theirs, ours, ours_numpy):
                path.unlink(missing_ok=True)
        console.print(table)


if __name__ == "__main__":
    main()

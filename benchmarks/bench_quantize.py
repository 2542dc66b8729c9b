"""Quantize the default model with llmpress and with llama.cpp's quantizer, same run.

    python benchmarks/bench_quantize.py [--types Q8_0,Q4_K_M] [--workdir DIR]

The input is the default model dequantized to F32 (made once with `llmpress quantize
--allow-requantize ... F32`, as reference/README.md describes). For each type both tools
quantize that file: llama.cpp through llama-cpp-python's `llama_model_quantize` (the code
behind llama-quantize, 2 threads), llmpress through `quantize_model`. The table shows
both times, their ratio, both file sizes and whether the files are byte-identical.
"""

from __future__ import annotations

import argparse
import ctypes
import filecmp
import tempfile
import time
from pathlib import Path

import llama_cpp
from rich.console import Console
from rich.table import Table

from llmpress import hub
from llmpress.quant.mix import file_type
from llmpress.quant.quantize import QuantizeConfig, quantize_model

DEFAULT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")


def llama_quantize(source: Path, out: Path, type_name: str, threads: int = 2) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = file_type(type_name).number
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(),
                                      ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {type_name}")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES))
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    console = Console(width=120)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        f32 = work / "smollm2-135m-f32.gguf"
        seconds = timed(lambda: quantize_model(QuantizeConfig(
            hub.pull(hub.DEFAULT_MODEL), f32, "F32", allow_requantize=True)))
        console.print(f"F32 original: {f32.stat().st_size:,} bytes ({seconds:.1f} s)")
        table = Table(title="quantizing SmolLM2-135M (F32) — llmpress vs llama.cpp, 2 cores")
        for col in ("type", "llama.cpp s", "llmpress s", "ratio", "llama.cpp bytes",
                    "llmpress bytes", "bytes equal"):
            table.add_column(col, justify="left" if col == "type" else "right")
        for type_name in args.types.split(","):
            theirs, ours = work / f"llama-{type_name}.gguf", work / f"ours-{type_name}.gguf"
            t_llama = timed(lambda t=type_name, out=theirs: llama_quantize(f32, out, t))
            t_ours = timed(lambda t=type_name, out=ours: quantize_model(QuantizeConfig(f32, out, t)))
            same = filecmp.cmp(theirs, ours, shallow=False)
            table.add_row(type_name, f"{t_llama:.1f}", f"{t_ours:.1f}", f"{t_ours / t_llama:.1f}x",
                          f"{theirs.stat().st_size:,}", f"{ours.stat().st_size:,}",
                          "yes" if same else "NO")
            theirs.unlink()
            ours.unlink()
        console.print(table)


if __name__ == "__main__":
    main()

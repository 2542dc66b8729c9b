"""Predicted against measured peak RSS of `llmpress run` (llmpress.plan's runtime model).

For each context the prompt is WikiText-2 text of ctx - 16 tokens, so the KV cache is
(nearly) full; the run generates 8 tokens greedily in a fresh process whose peak RSS
(VmHWM) is the measurement.

    python benchmarks/bench_memory.py                 # contexts 512, 2048, 8192
    python benchmarks/bench_memory.py --contexts 512,1024 --threads 2

One thread by default: on a shared 2-core machine two OpenMP threads spin against each
other and the 8192-token prefill takes many minutes; the thread count does not change
the memory model (it moves torch's scratch by a few MiB).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmpress import hub
from llmpress.io.tokenizer import Tokenizer
from llmpress.plan import estimate
from llmpress.plan.machine import peak_rss_of_module

WIKITEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "wikitext-2-raw" / \
    "wiki.test.raw"
MIB = 2**20
GENERATED = 8


def prompt_of(tokenizer: Tokenizer, n_tokens: int) -> str:
    """The first n_tokens tokens of WikiText-2, as text (re-encodes to about as many)."""
    text = WIKITEXT.read_bytes()[: n_tokens * 8].decode("utf-8", errors="ignore")
    return tokenizer.decode(tokenizer.encode(text)[:n_tokens])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    parser.add_argument("--contexts", default="512,2048,8192")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    model = Path(args.model) if args.model else hub.pull(hub.DEFAULT_MODEL)
    spec = estimate.spec_from_gguf(model)
    tokenizer = Tokenizer.from_gguf_metadata(spec.metadata)
    console = Console()
    table = Table(title=f"peak RSS of `llmpress run` on {model.name} ({args.threads} thread(s))")
    for col in ("ctx", "prompt tokens", "torch + loader", "file", "KV f32", "workspace",
                "predicted", "measured", "error", "seconds"):
        table.add_column(col, justify="right")
    worst = 0.0
    for ctx in (int(c) for c in args.contexts.split(",")):
        prompt = prompt_of(tokenizer, ctx - 16)
        n_prompt = len(tokenizer.encode(prompt))
        run = peak_rss_of_module("llmpress.cli", [
            "run", str(model), "--ctx", str(ctx), "-p", "-", "-n", str(GENERATED),
            "--temp", "0", "-t", str(args.threads)], prompt)
        if run.returncode:
            console.print(f"[red]ctx {ctx}: llmpress run failed[/]\n{run.stderr[-2000:]}")
            return 1
        mem = estimate.estimate(spec, "file", ctx).llmpress
        error = mem.total / run.peak_rss - 1
        worst = max(worst, abs(error))
        table.add_row(f"{ctx:,}", f"{n_prompt:,}", f"{mem.overhead / MIB:.1f}",
                      f"{mem.weights / MIB:.1f}", f"{mem.kv_cache / MIB:.1f}",
                      f"{mem.compute / MIB:.1f}", f"{mem.total / MIB:.1f}",
                      f"{run.peak_rss / MIB:.1f}", f"{100 * error:+.1f}%", f"{run.seconds:.0f}")
        console.print(f"ctx {ctx}: measured {run.peak_rss / MIB:.1f} MiB, predicted "
                      f"{mem.total / MIB:.1f} MiB ({100 * error:+.1f}%)", highlight=False)
    console.print(table)
    console.print(f"largest error: {100 * worst:.1f}% (MiB; the prediction assumes the whole "
                  "context is used, the run's cache holds ctx - 8 tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

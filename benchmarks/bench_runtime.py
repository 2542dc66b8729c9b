"""Speed and memory of llmpress next to llama.cpp on the same GGUF file, same machine,
same run: pp (prompt tokens/s, one pass over random tokens) and tg (tokens generated one
at a time), median of repetitions, and each engine's peak RSS in its own process.

    python benchmarks/bench_runtime.py [MODEL] [--threads 2] [--repetitions 3] [--modes fast]

MODEL: a GGUF path or a pulled name (default: the default model). The engines take turns,
one repetition each per round, so load on a shared machine hits them alike; each number
is the median over rounds. The last columns relate tg to memory bandwidth: the bytes of
weights one token reads (every matmul weight and the output head; one embedding row) and
the share of the machine's read bandwidth, measured here, that tg reaches.

llama.cpp runs through llama-cpp-python (the same C code as llama-bench; its Python
wrapper adds a little per-token overhead to tg).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

LLAMA_CPP_CHILD = r"""
import json, random, statistics, sys, time
from llama_cpp import Llama
from llmpress.plan.machine import peak_rss_bytes
path, threads, n_prompt, n_gen, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = Llama(path, n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_threads=threads,
            n_threads_batch=threads, verbose=False)
vocab = llm.n_vocab()
rng = random.Random(0)
pp, tg = [], []
llm.eval([rng.randrange(vocab) for _ in range(8)]); llm.reset()   # warm-up
for r in range(reps):
    tokens = [rng.randrange(vocab) for _ in range(n_prompt)]
    start = time.perf_counter(); llm.eval(tokens); pp.append(n_prompt / (time.perf_counter() - start))
    llm.reset()
    start = time.perf_counter()
    for i in range(n_gen):
        llm.eval([rng.randrange(vocab)])
    tg.append(n_gen / (time.perf_counter() - start))
    llm.reset()
print(json.dumps({"prompt_runs": pp, "gen_runs": tg,
                  "peak_rss_bytes": peak_rss_bytes()}))
"""


def run_llmpress(model: str, threads: int, n_prompt: int, n_gen: int, reps: int, mode: str):
    cmd = [sys.executable, "-m", "llmpress.cli", "bench", model, "-t", str(threads), "-p",
           str(n_prompt), "-n", str(n_gen), "-r", str(reps), "--mode", mode, "--json"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def run_llama_cpp(model: str, threads: int, n_prompt: int, n_gen: int, reps: int):
    cmd = [sys.executable, "-c", LLAMA_CPP_CHILD, model, str(threads), str(n_prompt),
           str(n_gen), str(reps)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def weight_bytes_per_token(model: str) -> int:
    """Bytes of weights a generated token reads: every 2-D tensor but the token embedding
    (one row of it), unless the embedding doubles as the output head."""
    from llmpress.io.gguf import load_gguf
    tensors = load_gguf(model).tensors
    tied = "output.weight" not in tensors
    return sum(ref.n_bytes for name, ref in tensors.items()
               if len(ref.shape) == 2 and (tied or name != "token_embd.weight"))


def read_bandwidth(threads: int, n_bytes: int = 1 << 30) -> float:
    """Bytes per second a sum over a large float32 array reads (best of 5)."""
    import torch
    torch.set_num_threads(threads)
    data = torch.ones(n_bytes // 4)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return n_bytes / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--modes", default="fast,exact",
                        help="llmpress modes to run (exact is slow on large models)")
    args = parser.parse_args()
    from llmpress import hub
    model = args.model or hub.DEFAULT_MODEL
    if not __import__("os").path.exists(model):  # a catalog name
        model = str(hub.pull(model))
    size = __import__("os").path.getsize(model)

    console = Console()
    modes = [m for m in args.modes.split(",") if m]
    engines = {"llama.cpp": lambda: run_llama_cpp(model, args.threads, args.prompt_tokens,
                                                  args.gen_tokens, 1)}
    for mode in modes:
        engines[f"llmpress {mode}"] = lambda mode=mode: run_llmpress(
            model, args.threads, args.prompt_tokens, args.gen_tokens, 1, mode)
    runs = {name: {"prompt_runs": [], "gen_runs": [], "peak_rss_bytes": 0} for name in engines}
    with console.status(f"running {', '.join(engines)} (taking turns) ..."):
        started = time.time()
        bandwidth = read_bandwidth(args.threads)
        for _ in range(args.repetitions):
            for name, run in engines.items():
                r = run()
                runs[name]["prompt_runs"] += r["prompt_runs"]
                runs[name]["gen_runs"] += r["gen_runs"]
                runs[name]["peak_rss_bytes"] = max(runs[name]["peak_rss_bytes"], r["peak_rss_bytes"])
    per_token = weight_bytes_per_token(model)
    ref_pp = statistics.median(runs["llama.cpp"]["prompt_runs"])
    ref_tg = statistics.median(runs["llama.cpp"]["gen_runs"])
    table = Table(title=f"{model} ({size / 2**20:.1f} MiB), {args.threads} threads, "
                        f"median of {args.repetitions} rounds, {time.time() - started:.0f} s; "
                        f"a token reads {per_token / 1e6:.0f} MB of weights; measured read "
                        f"bandwidth {bandwidth / 1e9:.1f} GB/s")
    for col in ("engine", f"pp{args.prompt_tokens} tok/s", "× llama.cpp",
                f"tg{args.gen_tokens} tok/s", "× llama.cpp", "tg GB/s", "of bandwidth",
                "peak RSS MiB", "RSS / file"):
        table.add_column(col, justify="right")
    for name, r in runs.items():
        pp, tg = statistics.median(r["prompt_runs"]), statistics.median(r["gen_runs"])
        rss = r["peak_rss_bytes"]
        table.add_row(name, f"{pp:.1f}", f"{pp / ref_pp:.2f}", f"{tg:.1f}", f"{tg / ref_tg:.2f}",
                      f"{tg * per_token / 1e9:.1f}", f"{tg * per_token / bandwidth:.0%}",
                      f"{rss / 2**20:.0f}", f"{rss / size:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()

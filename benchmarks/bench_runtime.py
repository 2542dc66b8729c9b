"""Speed and memory of llmpress next to llama.cpp on the same GGUF files, same machine,
same run: pp (prompt tokens/s, one pass over random tokens), tg (tokens generated one at a
time), optionally tg after a long context, and each engine's peak RSS in its own process.

    python benchmarks/bench_runtime.py [MODEL ...] [--threads 1,2] [--depth 4096]
                                       [--repetitions 3] [--modes fast]

MODEL (default: the default model), any number of:
- a GGUF path or a pulled name (`smollm2`, `qwen2.5-coder-1.5b`, `gemma3-270m`);
- `NAME@TYPE`: the pulled model NAME requantized to TYPE by `llmpress quantize` from its
  F32 dequantization (e.g. `qwen2.5-coder-1.5b@Q8_0`);
- `random-llama`: a Llama-shaped model with random weights (hidden 2048, FFN 8192, 16
  layers, 32/8 heads, Q4_K_M; speed does not depend on the values).
Files this script makes are kept in the cache (~/.cache/llmpress/bench) for the next run.

For every model and thread count the engines take turns, one repetition each per round,
so load on a shared machine hits them alike; each number is the median over rounds. The
bandwidth columns relate tg to memory: the bytes of weights one token reads (every matmul
weight and the output head; one embedding row) and the share of the machine's read
bandwidth, measured here for each thread count, that tg reaches. --depth D adds tg with D
tokens already in the context (llama-bench's `-d`), both engines with f16 KV caches.

llama.cpp runs through llama-cpp-python (the same C code as llama-bench; its Python
wrapper adds a little per-token overhead to tg).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

LLAMA_CPP_CHILD = r"""
import json, random, sys, time
from llama_cpp import Llama
from llmpress.plan.machine import peak_rss_bytes
path, threads, n_prompt, n_gen, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = Llama(path, n_ctx=depth + max(n_prompt, n_gen) + 8, n_batch=max(n_prompt, 512), n_threads=threads,
            n_threads_batch=threads, verbose=False)
vocab = llm.n_vocab()
rng = random.Random(0)
llm.eval([rng.randrange(vocab) for _ in range(8)]); llm.reset()   # warm-up
llm.eval([rng.randrange(vocab) for _ in range(depth)])           # the context each test starts from
pp = tg = 0.0
if n_prompt:
    tokens = [rng.randrange(vocab) for _ in range(n_prompt)]
    start = time.perf_counter(); llm.eval(tokens); pp = n_prompt / (time.perf_counter() - start)
    llm.n_tokens = depth   # the next eval drops what came after the context
if n_gen:
    start = time.perf_counter()
    for i in range(n_gen):
        llm.eval([rng.randrange(vocab)])
    tg = n_gen / (time.perf_counter() - start)
print(json.dumps({"pp": pp, "tg": tg, "peak_rss_bytes": peak_rss_bytes()}))
"""

RANDOM_LLAMA = dict(dim=2048, ffn=8192, layers=16, heads=32, kv_heads=8, type="Q4_K_M")


def _run_json(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def run_llmpress(model: str, threads: int, n_prompt: int, n_gen: int, depth: int, mode: str) -> dict:
    r = _run_json([sys.executable, "-m", "llmpress.cli", "bench", model, "-t", str(threads),
                   "-p", str(n_prompt), "-n", str(n_gen), "-r", "1", "-d", str(depth),
                   "--mode", mode, "--json"])
    return {"pp": r["prompt_tok_s"], "tg": r["gen_tok_s"], "peak_rss_bytes": r["peak_rss_bytes"]}


def run_llama_cpp(model: str, threads: int, n_prompt: int, n_gen: int, depth: int) -> dict:
    return _run_json([sys.executable, "-c", LLAMA_CPP_CHILD, model, str(threads), str(n_prompt),
                      str(n_gen), str(depth)])


# --- the models ---------------------------------------------------------------------------
def bench_dir() -> Path:
    from llmpress import hub
    folder = hub.cache_dir() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _quantize(source: str, out: Path, type_name: str) -> None:
    subprocess.run([sys.executable, "-m", "llmpress.cli", "quantize", source, str(out), type_name,
                    "--allow-requantize", "--summary"], check=True, stdout=subprocess.DEVNULL)


def requantized(name: str, type_name: str) -> Path:
    """NAME's F32 dequantization requantized to TYPE (both made once, kept in the cache)."""
    from llmpress import hub
    out = bench_dir() / f"{name}-{type_name}.gguf"
    if not out.exists():
        f32 = bench_dir() / f"{name}-F32.gguf"
        if not f32.exists():
            _quantize(str(hub.pull(name)), f32, "F32")
        _quantize(str(f32), out, type_name)
    return out


def random_llama() -> Path:
    """RANDOM_LLAMA's shape with random F16 weights and the default model's tokenizer,
    quantized to its type by `llmpress quantize` (made once, kept in the cache)."""
    import numpy as np
    from gguf import GGMLQuantizationType as T

    from llmpress import hub
    from llmpress.io.gguf import load_gguf
    from llmpress.io.gguf_write import GGUFStreamWriter, TensorSlot, plan_gguf
    s = RANDOM_LLAMA
    out = bench_dir() / f"random-llama-{s['type']}.gguf"
    if out.exists():
        return out
    tokenizer = {k: v for k, v in load_gguf(hub.pull(hub.DEFAULT_MODEL)).metadata.items()
                 if k.startswith("tokenizer.")}
    vocab = len(tokenizer["tokenizer.ggml.tokens"])
    metadata = {"general.architecture": "llama", "general.name": "random-llama",
                "llama.block_count": s["layers"], "llama.context_length": 8192,
                "llama.embedding_length": s["dim"], "llama.feed_forward_length": s["ffn"],
                "llama.attention.head_count": s["heads"],
                "llama.attention.head_count_kv": s["kv_heads"],
                "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
                **tokenizer}
    kv_dim = s["dim"] // s["heads"] * s["kv_heads"]
    shapes = {"token_embd.weight": (vocab, s["dim"]), "output_norm.weight": (s["dim"],),
              "output.weight": (vocab, s["dim"])}
    for i in range(s["layers"]):
        shapes |= {f"blk.{i}.attn_norm.weight": (s["dim"],), f"blk.{i}.ffn_norm.weight": (s["dim"],),
                   f"blk.{i}.attn_q.weight": (s["dim"], s["dim"]),
                   f"blk.{i}.attn_k.weight": (kv_dim, s["dim"]),
                   f"blk.{i}.attn_v.weight": (kv_dim, s["dim"]),
                   f"blk.{i}.attn_output.weight": (s["dim"], s["dim"]),
                   f"blk.{i}.ffn_gate.weight": (s["ffn"], s["dim"]),
                   f"blk.{i}.ffn_up.weight": (s["ffn"], s["dim"]),
                   f"blk.{i}.ffn_down.weight": (s["dim"], s["ffn"])}
    slots = [TensorSlot(n, T.F32 if len(shape) == 1 else T.F16, shape) for n, shape in shapes.items()]
    f16 = bench_dir() / "random-llama-F16.gguf"
    rng = np.random.default_rng(0)
    with GGUFStreamWriter(f16, plan_gguf(metadata, slots)) as writer:
        for slot in slots:
            if len(slot.shape) == 1:
                writer.write_tensor(slot.name, np.ones(slot.shape, dtype=np.float32))
            else:
                scale = slot.shape[1] ** -0.5
                writer.write_tensor(slot.name, (rng.standard_normal(slot.shape, dtype=np.float32)
                                                * scale).astype(np.float16))
    _quantize(str(f16), out, s["type"])
    f16.unlink()
    return out


def resolve_model(spec: str) -> tuple[str, str]:
    """(label, GGUF path) of a MODEL argument."""
    from llmpress import hub
    if spec == "random-llama":
        return spec, str(random_llama())
    if "@" in spec:
        name, type_name = spec.split("@", 1)
        return spec, str(requantized(name, type_name))
    return spec, spec if os.path.exists(spec) else str(hub.pull(spec))


def weight_bytes_per_token(model: str) -> int:
    """Bytes of weights a generated token reads: every 2-D tensor but the token embedding
    (one row of it), unless the embedding doubles as the output head."""
    from llmpress.io.gguf import load_gguf
    tensors = load_gguf(Path(model)).tensors
    tied = "output.weight" not in tensors
    return sum(ref.n_bytes for name, ref in tensors.items()
               if len(ref.shape) >= 2 and (tied or name != "token_embd.weight"))


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


# --- one model at one thread count -----------------------------------------------------------
def measure(path: str, threads: int, args, modes: list[str]) -> dict[str, dict]:
    """Per engine: pp, tg (and tg at depth) runs over the rounds, and the peak RSS."""
    engines = {"llama.cpp": lambda p, n, d: run_llama_cpp(path, threads, p, n, d)}
    for mode in modes:
        engines[f"llmpress {mode}"] = lambda p, n, d, mode=mode: run_llmpress(path, threads, p, n, d, mode)
    runs = {name: {"pp": [], "tg": [], "tg_depth": [], "rss": 0} for name in engines}
    for _ in range(args.repetitions):
        for name, run in engines.items():
            r = run(args.prompt_tokens, args.gen_tokens, 0)
            runs[name]["pp"].append(r["pp"])
            runs[name]["tg"].append(r["tg"])
            runs[name]["rss"] = max(runs[name]["rss"], r["peak_rss_bytes"])
            if args.depth:
                runs[name]["tg_depth"].append(run(0, args.gen_tokens, args.depth)["tg"])
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", metavar="MODEL")
    parser.add_argument("--threads", default="2", help="thread counts, comma-separated")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--depth", type=int, default=0,
                        help="also tg with this many tokens already in the context")
    parser.add_argument("--modes", default="fast", help="llmpress modes to run, comma-separated "
                        "(exact is slow on large models)")
    args = parser.parse_args()
    from llmpress import hub
    console = Console(width=max(Console().width, 170))  # the table's 14 columns
    threads = [int(t) for t in args.threads.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    with console.status("preparing the models ..."):
        models = [resolve_model(spec) for spec in args.models or [hub.DEFAULT_MODEL]]
    bandwidth = {}
    n, started = args.gen_tokens, time.time()
    table = Table(title=f"pp{args.prompt_tokens} and tg{n} tok/s, llmpress next to llama.cpp "
                        f"(median of {args.repetitions} rounds, engines taking turns)")
    columns = ["model", "MiB", "threads", "engine", f"pp{args.prompt_tokens}", "×",
               f"tg{n}", "×"] + ([f"tg{n} @ d{args.depth}", "×"] if args.depth else []) + [
               "tg GB/s", "of bandwidth", "peak RSS MiB", "RSS / file"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "engine") else "right")
    for label, path in models:
        size, per_token = os.path.getsize(path), weight_bytes_per_token(path)
        for t in threads:
            if t not in bandwidth:
                bandwidth[t] = read_bandwidth(t)
            with console.status(f"{label}, {t} threads: engines taking turns ..."):
                runs = measure(path, t, args, modes)
            ref = {k: statistics.median(v) for k, v in runs["llama.cpp"].items() if k != "rss" and v}
            for name, r in runs.items():
                med = {k: statistics.median(v) for k, v in r.items() if k != "rss" and v}
                row = [label, f"{size / 2**20:.0f}", str(t), name, f"{med['pp']:.1f}",
                       f"{med['pp'] / ref['pp']:.2f}", f"{med['tg']:.1f}", f"{med['tg'] / ref['tg']:.2f}"]
                if args.depth:
                    row += [f"{med['tg_depth']:.1f}", f"{med['tg_depth'] / ref['tg_depth']:.2f}"]
                row += [f"{med['tg'] * per_token / 1e9:.1f}",
                        f"{med['tg'] * per_token / bandwidth[t]:.0%}",
                        f"{r['rss'] / 2**20:.0f}", f"{r['rss'] / size:.2f}"]
                table.add_row(*row)
            table.add_section()
    table.caption = (f"{time.time() - started:.0f} s; measured read bandwidth "
                     + ", ".join(f"{b / 1e9:.1f} GB/s at {t} threads" for t, b in bandwidth.items()))
    console.print(table)


if __name__ == "__main__":
    main()

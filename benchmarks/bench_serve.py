"""Serving under load: N concurrent clients (the official openai client, streaming chat
completions, greedy) against `llmpress serve` and, in the same run, against llama.cpp's
server from llama-cpp-python (`python -m llama_cpp.server`) on the same GGUF file, with
the same prompts, max_tokens and thread count.

    python benchmarks/bench_serve.py [--model smollm2] [--clients 1,4,8,16,32]
        [--requests 2] [--max-tokens 32] [--rounds 3] [--threads 2] [--parallel 4]
        [--engines llmpress,llama.cpp]

Per engine and client count (medians over --rounds rounds; latencies over every request):
  tok/s        all clients' generated tokens over the round's wall time
  TTFT         time to the first content token, p50 / p95
  per token    a request's time from its first token to its last over its tokens after
               the first, p50 / p95
  errors       requests that failed (an HTTP error, a dropped stream)
  peak RSS     the server's high-water mark (VmHWM) after that client count's rounds
               (the first row also shows it before any load, after the warm-up)

The client counts run in increasing order (so the RSS column shows growth under load);
within each count the engines take turns, round by round, so a shared machine's load
drifts over both alike. llmpress generates up to --parallel requests at once, their
forward passes batched (runtime/batching.py); llama-cpp-python's server answers one
request at a time (here with --interrupt_requests False: by default a new request
cuts off the one streaming). Its extras (fastapi, sse-starlette, ...): pip install 'llmpress[bench]'.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import openai
from rich.console import Console
from rich.table import Table

from llmpress import hub
from llmpress.plan.machine import peak_rss_bytes

QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Explain what a hash table is in two sentences.", "What is 17 times 3?",
             "Give me a synonym for happy.", "Why is the sky blue? One sentence.",
             "What does a compiler do?", "Write a haiku about autumn."]
ENGINES = ("llmpress", "llama.cpp")
CTX = 4096  # both servers: the same KV-cache size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_cpp_server_problem() -> str | None:
    """Why `python -m llama_cpp.server` cannot run here (its extras), or None."""
    try:
        importlib.import_module("llama_cpp.server.app")
    except ImportError as exc:
        return f"{exc} (pip install 'llmpress[bench]')"
    return None


def server_command(engine: str, model: str, port: int, threads: int, parallel: int) -> list[str]:
    if engine == "llmpress":
        return [sys.executable, "-m", "llmpress.cli", "serve", model, "--host", "127.0.0.1",
                "--port", str(port), "--ctx", str(CTX), "--threads", str(threads),
                "--parallel", str(parallel)]
    return [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(CTX), "--n_threads", str(threads),
            "--n_threads_batch", str(threads),
            # by default a new request cuts off the one streaming: queue it instead
            "--interrupt_requests", "False"]


def start(command: list[str], port: int, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(command[:4])} exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{' '.join(command[:4])} did not come up")


@dataclass
class Request:
    ttft: float  # seconds to the first content token
    tokens: int
    per_token: float | None  # seconds per token after the first; None for one token


def one_request(client: openai.OpenAI, model: str, question: str, max_tokens: int) -> Request:
    """A streamed, greedy chat answer. Tokens: the server's usage count when it sends one
    (include_usage), else the content chunks (one per token on both servers)."""
    started, first, last = time.perf_counter(), None, None
    chunks, usage = 0, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            chunks += 1
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    if first is None:
        raise RuntimeError("the answer had no content")
    tokens = usage or chunks
    return Request(first - started, tokens,
                   (last - first) / (tokens - 1) if tokens > 1 else None)


@dataclass
class Row:
    """One engine at one client count, over all its rounds."""

    rates: list[float] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    errors: int = 0
    rss_bytes: int = 0


def run_round(base: str, model: str, clients: int, requests: int, max_tokens: int,
              row: Row) -> None:
    """Each client asks `requests` questions one after the other; all clients at once."""
    done, lock = [], threading.Lock()

    def client_loop(index: int) -> None:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                               timeout=600)
        for r in range(requests):
            question = QUESTIONS[(index + r) % len(QUESTIONS)]
            try:
                result = one_request(client, model, question, max_tokens)
            except (openai.OpenAIError, httpx.HTTPError, RuntimeError):
                with lock:
                    row.errors += 1
                continue
            with lock:
                done.append(result)

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row.rates.append(sum(r.tokens for r in done) / (time.perf_counter() - started))
    row.requests += done


def percentile(values: list[float], q: float) -> float:
    """Nearest rank; nan for no values."""
    values = sorted(values)
    return values[max(math.ceil(q * len(values)) - 1, 0)] if values else float("nan")


def mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def report(args, clients: list[int], engines: list[str], rows: dict, rss_start: dict) -> None:
    table = Table(title=f"{args.model}: streaming chat, greedy, max_tokens {args.max_tokens}, "
                        f"{args.requests} request(s) per client per round, {args.rounds} "
                        f"rounds, {args.threads} threads, llmpress --parallel {args.parallel}; "
                        "medians")
    for name in ("engine", "clients", "tok/s", "x llama.cpp", "TTFT p50 (s)", "TTFT p95 (s)",
                 "per token p50 (ms)", "per token p95 (ms)", "errors", "peak RSS (MiB)"):
        table.add_column(name, justify="left" if name == "engine" else "right")
    for c in clients:
        for engine in engines:
            row = rows[engine, c]
            rate = statistics.median(row.rates)
            reference = rows.get(("llama.cpp", c))
            ratio = f"{rate / statistics.median(reference.rates):.2f}" \
                if reference and engine != "llama.cpp" else ""
            ttfts = [r.ttft for r in row.requests]
            per_token = [r.per_token * 1e3 for r in row.requests if r.per_token is not None]
            rss = mib(row.rss_bytes)
            if c == clients[0]:
                rss = f"{mib(rss_start[engine])} -> {rss}"
            table.add_row(engine, str(c), f"{rate:.1f}", ratio,
                          f"{percentile(ttfts, 0.5):.2f}", f"{percentile(ttfts, 0.95):.2f}",
                          f"{percentile(per_token, 0.5):.0f}",
                          f"{percentile(per_token, 0.95):.0f}", str(row.errors), rss)
    Console(width=max(Console().width, 150)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", default="1,4,8,16,32")
    parser.add_argument("--requests", type=int, default=2, help="per client per round")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="CPU threads of each server")
    parser.add_argument("--parallel", type=int, default=4, help="llmpress's slots: requests "
                        "generated at once (batched), each with its prompt cache")
    parser.add_argument("--engines", default=",".join(ENGINES))
    args = parser.parse_args()
    path = str(hub.resolve(args.model))
    clients = sorted(int(c) for c in args.clients.split(","))
    engines = [e for e in args.engines.split(",") if e]
    if unknown := set(engines) - set(ENGINES):
        raise SystemExit(f"unknown engine(s) {', '.join(sorted(unknown))}; pick from "
                         f"{', '.join(ENGINES)}")
    if "llama.cpp" in engines and (problem := llama_cpp_server_problem()):
        print(f"llama.cpp server: not run, `python -m llama_cpp.server` cannot start: {problem}")
        engines.remove("llama.cpp")
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for engine in engines:
            port = free_port()
            command = server_command(engine, path, port, args.threads, args.parallel)
            servers[engine] = (start(command, port, args.threads), f"http://127.0.0.1:{port}")
        model_ids = {e: openai.OpenAI(base_url=b + "/v1", api_key="unused").models.list()
                     .data[0].id for e, (_, b) in servers.items()}
        rss_start = {}
        for engine, (proc, base) in servers.items():  # warm-up: weights paged in
            run_round(base, model_ids[engine], 1, 1, 4, Row())
            rss_start[engine] = peak_rss_bytes(proc.pid)
        rows = {(e, c): Row() for e in engines for c in clients}
        for c in clients:
            for _ in range(args.rounds):
                for engine, (proc, base) in servers.items():  # in turn: the load drifts
                    run_round(base, model_ids[engine], c, args.requests, args.max_tokens,
                              rows[engine, c])
            for engine, (proc, _) in servers.items():
                rows[engine, c].rss_bytes = peak_rss_bytes(proc.pid)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    report(args, clients, engines, rows, rss_start)


if __name__ == "__main__":
    main()

"""Serving throughput: N concurrent clients (the official openai client, streaming chat
completions) against `llmpress serve`, and against llama.cpp's server
(`python -m llama_cpp.server`) when the venv can start it. Prints, per engine and client
count, the aggregate generated tokens/s (all clients' tokens over the wall time of the
round) and the median time to first token, medians over --rounds rounds.

    python benchmarks/bench_serve.py [--model smollm2] [--clients 1,4,8] [--requests 2]
        [--max-tokens 32] [--rounds 3] [--threads N] [--parallel N]

With `--parallel N`, llmpress generates up to N requests at once and batches their
forward passes (runtime/batching.py); with 1 it runs them one at a time, so the aggregate
rate stays the one-stream rate and the time to first token grows with the queue. The
engines take turns, one round each, so the machine's load drifts over both alike.
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

import httpx
import openai

from llmpress import hub

QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Explain what a hash table is in two sentences.", "What is 17 times 3?",
             "Give me a synonym for happy.", "Why is the sky blue? One sentence.",
             "What does a compiler do?", "Write a haiku about autumn."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_cpp_server_problem() -> str | None:
    """Why `python -m llama_cpp.server` cannot run here (its extras), or None."""
    try:
        importlib.import_module("llama_cpp.server.app")
    except ImportError as exc:
        return f"{exc} (llama-cpp-python's [server] extras are not installed)"
    return None


def server_command(engine: str, model: str, port: int, args) -> list[str]:
    if engine == "llmpress":
        return [sys.executable, "-m", "llmpress.cli", "serve", model, "--host", "127.0.0.1",
                "--port", str(port), "--parallel", str(args.parallel)]
    return [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", "4096", *(
                ["--n_threads", str(args.threads)] if args.threads else [])]


def start(command: list[str], port: int, threads: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{command[2]} exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{command[2]} did not come up")


def one_request(client: openai.OpenAI, model: str, question: str, max_tokens: int):
    """-> (seconds to the first content token, tokens generated)."""
    started, first = time.perf_counter(), None
    tokens = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return (first if first is not None else time.perf_counter() - started), tokens


def run_round(base: str, model: str, clients: int, requests: int, max_tokens: int):
    """-> (aggregate tokens/s, every request's time to first token)."""
    ttfts, tokens, lock = [], [0], threading.Lock()

    def client_loop(index: int) -> None:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                               timeout=600)
        for r in range(requests):
            ttft, n = one_request(client, model, QUESTIONS[(index + r) % len(QUESTIONS)],
                                  max_tokens)
            with lock:
                ttfts.append(ttft)
                tokens[0] += n

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0] / (time.perf_counter() - started), ttfts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--requests", type=int, default=2, help="per client per round")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--parallel", type=int, default=1, help="llmpress's slots: requests "
                        "generated at once (batched), each with its prompt cache")
    args = parser.parse_args()
    path = str(hub.resolve(args.model))
    clients = [int(c) for c in args.clients.split(",")]
    engines = ["llmpress"]
    if problem := llama_cpp_server_problem():
        print(f"llama.cpp server: not run, `python -m llama_cpp.server` cannot start from this "
              f"venv: {problem}")
    else:
        engines.append("llama.cpp")
    servers = {}
    try:
        for engine in engines:
            port = free_port()
            servers[engine] = (start(server_command(engine, path, port, args), port,
                                     args.threads), f"http://127.0.0.1:{port}")
        model_ids = {e: openai.OpenAI(base_url=b + "/v1", api_key="unused").models.list()
                     .data[0].id for e, (_, b) in servers.items()}
        for engine, (_, base) in servers.items():  # warm-up: weights paged in
            run_round(base, model_ids[engine], 1, 1, 4)
        results = {(e, c): ([], []) for e in engines for c in clients}
        for _ in range(args.rounds):
            for c in clients:
                for engine, (_, base) in servers.items():  # in turn: the load drifts
                    rate, ttfts = run_round(base, model_ids[engine], c, args.requests,
                                            args.max_tokens)
                    results[engine, c][0].append(rate)
                    results[engine, c][1].extend(ttfts)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    print(f"model {args.model}, {args.requests} requests per client per round, max_tokens "
          f"{args.max_tokens}, {args.rounds} rounds, greedy, streaming; medians")
    print(f"{'engine':<10} {'clients':>7} {'tok/s (aggregate)':>18} {'TTFT median (s)':>16} "
          f"{'TTFT p90 (s)':>13}")
    for (engine, c), (rates, ttfts) in results.items():
        ttfts = sorted(ttfts)
        print(f"{engine:<10} {c:>7} {statistics.median(rates):>18.2f} "
              f"{statistics.median(ttfts):>16.3f} {ttfts[math.ceil(0.9 * len(ttfts)) - 1]:>13.3f}")


if __name__ == "__main__":
    main()

"""A bounded load test of `llmpress serve` on loopback: many streaming clients at once.

Starts the real server (a subprocess on a free 127.0.0.1 port), asks the library itself for
the greedy answer to each prompt (the reference), then runs CLIENTS concurrent clients
that each stream REQUESTS chat completions. Every response must be complete (a finish
reason, then `data: [DONE]`), error-free and equal to its reference. Prints throughput,
latency percentiles and the server's RSS before and after (from /proc/PID/status).

    python benchmarks/load_test.py [--model smollm2] [--clients 32] [--requests 3]
                                   [--max-tokens 8] [--threads N]

On a machine shared with other busy processes, --threads 1 avoids OpenMP threads
waiting on each other at every parallel region (the server and the reference both use it).

Exit status 1 when any response is wrong or the RSS grows by more than --rss-slack-mb.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import torch
from rich.console import Console
from rich.table import Table

import llmpress
from llmpress import hub

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary color.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What do bees make?",
    "Which planet is closest to the Sun?",
    "What is the opposite of hot?",
    "How many legs does a spider have?",
]


@dataclass
class Result:
    question: str
    text: str
    finish_reason: str | None
    completion_tokens: int | None
    done: bool  # `data: [DONE]` arrived
    error: str | None
    first_token_s: float | None
    total_s: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """VmRSS of a process, from /proc (no psutil needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: q in [0, 100]."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100)
    return ordered[int(rank) - 1]


def start_server(model: Path, port: int, threads: int | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "LLMPRESS_API_KEY"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch and the packed kernel read it
    proc = subprocess.Popen([sys.executable, "-m", "llmpress.runtime.server", str(model),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up within 120 s")


async def stream_chat(http: httpx.AsyncClient, question: str, max_tokens: int) -> Result:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    pieces, finish, tokens, done, error, first = [], None, None, False, None, None
    started = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        error = event["error"]["message"]
                        break
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    for choice in event["choices"]:
                        if choice["delta"].get("content"):
                            first = first or time.perf_counter() - started
                            pieces.append(choice["delta"]["content"])
                        finish = choice["finish_reason"] or finish
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return Result(question, "".join(pieces), finish, tokens, done, error, first,
                  time.perf_counter() - started)


async def run_clients(base: str, clients: int, requests: int, max_tokens: int,
                      progress: Callable[[int], None] = lambda done: None) -> list[Result]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    finished = 0
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(900), limits=limits) as http:
        async def client(i: int) -> list[Result]:
            nonlocal finished
            results = []
            for j in range(requests):
                question = QUESTIONS[(i * requests + j) % len(QUESTIONS)]
                results.append(await stream_chat(http, question, max_tokens))
                finished += 1
                progress(finished)
            return results
        per_client = await asyncio.gather(*(client(i) for i in range(clients)))
    return [r for results in per_client for r in results]


def check(result: Result, reference) -> str | None:
    """-> what is wrong with a response, or None."""
    if result.error:
        return result.error
    if not result.done:
        return "no data: [DONE]"
    if result.text != reference.text:
        return f"text {result.text!r} != reference {reference.text!r}"
    if result.finish_reason != reference.finish_reason:
        return f"finish_reason {result.finish_reason} != {reference.finish_reason}"
    if result.completion_tokens != reference.completion_tokens:
        return f"{result.completion_tokens} tokens != {reference.completion_tokens}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=hub.DEFAULT_MODEL)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3, help="per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the server and the reference (default: torch's)")
    parser.add_argument("--rss-slack-mb", type=float, default=32.0,
                        help="allowed growth of the server's RSS over the run")
    args = parser.parse_args()
    console = Console()

    if args.threads:
        torch.set_num_threads(args.threads)
    model = hub.resolve(args.model)
    lm = llmpress.load(model)
    references = {q: lm.generate(lm.chat_prompt([{"role": "user", "content": q}]),
                                 max_tokens=args.max_tokens, temperature=0) for q in QUESTIONS}
    del lm

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(model, port, args.threads)
    try:
        # one request per question first, so that lazy allocations are behind us
        asyncio.run(run_clients(base, 1, len(QUESTIONS), args.max_tokens))
        rss_before = rss_mb(server.pid)
        total = args.clients * args.requests

        def progress(done: int) -> None:
            if done % max(1, total // 8) == 0 or done == total:
                console.print(f"{done}/{total} responses after "
                              f"{time.perf_counter() - started:.1f} s", highlight=False)

        started = time.perf_counter()
        results = asyncio.run(run_clients(base, args.clients, args.requests, args.max_tokens,
                                          progress))
        wall = time.perf_counter() - started
        time.sleep(0.5)
        rss_after = rss_mb(server.pid)
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(30)

    problems = [(r.question, p) for r in results if (p := check(r, references[r.question]))]
    tokens = sum(r.completion_tokens or 0 for r in results)
    totals = [r.total_s for r in results]
    firsts = [r.first_token_s for r in results if r.first_token_s is not None]
    growth = rss_after - rss_before

    table = Table(title=f"llmpress serve under load: {args.clients} streaming clients x "
                        f"{args.requests} requests, {args.max_tokens} tokens max, greedy",
                  show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("model", model.stem)
    table.add_row("requests (correct / all)", f"{len(results) - len(problems)} / {len(results)}")
    table.add_row("wall time", f"{wall:.1f} s")
    table.add_row("throughput", f"{len(results) / wall:.2f} req/s, {tokens / wall:.1f} tok/s")
    if firsts:
        table.add_row("first token p50 / p95",
                      f"{percentile(firsts, 50):.2f} s / {percentile(firsts, 95):.2f} s")
    table.add_row("request p50 / p95",
                  f"{percentile(totals, 50):.2f} s / {percentile(totals, 95):.2f} s")
    table.add_row("server RSS before / after",
                  f"{rss_before:.1f} MB / {rss_after:.1f} MB ({growth:+.1f} MB)")
    table.add_row("server alive after", "yes" if alive else "NO")
    console.print(table)
    for question, problem in problems[:10]:
        console.print(f"[red]wrong:[/] {question!r}: {problem}")
    ok = not problems and alive and growth <= args.rss_slack_mb
    console.print("[green]all responses complete and correct[/]" if ok else "[red]FAILED[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

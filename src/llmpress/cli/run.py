"""`llmpress run`, `chat`, `bench` and `serve`: a model answering, and how fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from contextlib import nullcontext
from pathlib import Path

from rich.table import Table

from llmpress.cli.common import (
    _add_chat_args,
    _add_model_args,
    _add_sampling_args,
    _add_speculative_args,
    _chat_template,
    _load,
    _mib,
    _print_stream,
    _speculative,
    _sampling,
    at_least,
    _use_threads,
    console,
)
from llmpress.errors import LlmpressError


def cmd_run(args) -> None:
    _use_threads(args)
    lm = _load(args)
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    if args.chat:
        prompt = lm.chat_prompt([{"role": "user", "content": prompt}])
    schema = _read_json_schema(args.json_schema) if args.json_schema else None
    _print_stream(lm.stream(prompt, args.max_tokens, tuple(args.stop), json_schema=schema,
                            **_sampling(args)), verbose=True)


def _read_json_schema(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise LlmpressError(f"cannot read the JSON schema {path}: {exc.strerror}") from None
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise LlmpressError(f"{path} is not a JSON file: {exc}") from None


def cmd_chat(args) -> None:
    _use_threads(args)
    lm = _load(args)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    console.print(f"[bold]{lm.info().name}[/] — type a message; /reset clears history, "
                  "/exit quits.", highlight=False)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            console.print("[dim](history cleared)[/]")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            answer = _print_stream(lm.stream(lm.chat_prompt(history), args.max_tokens,
                                             **_sampling(args)))
        except KeyboardInterrupt:  # stop this answer, keep the session
            print("\n(interrupted)")
            history.pop()
            continue
        except LlmpressError as exc:  # e.g. the history outgrew the context
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})


# --- bench ------------------------------------------------------------------------------
def cmd_bench(args) -> None:
    from rich.progress import Progress

    from llmpress.eval.speed import measure_speed
    lm = _load(args)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("benchmark", total=args.repetitions * 2)

        def step(description: str) -> None:
            bar.update(task, description=description, advance=1)

        if args.depth:
            bar.update(task, description=f"filling the context with {args.depth} tokens")
        result = measure_speed(lm.model, args.prompt_tokens, args.gen_tokens,
                               args.repetitions, args.threads, step, args.depth)
    info = lm.info()
    if args.json:
        print(json.dumps(asdict(result) | {"model": info.path, "mode": lm.mode}, indent=2))
        return
    table = Table(title=f"{info.name}: {_mib(info.file_bytes)}, {info.bits_per_weight:.2f} bpw, "
                        f"{lm.mode} mode, {result.threads} threads")
    for col in ("test", "tok/s (median)", "runs"):
        table.add_column(col, justify="right")
    at = f" @ d{result.depth}" if result.depth else ""  # llama-bench's name for a test at depth
    if result.prompt_tokens:
        table.add_row(f"pp{result.prompt_tokens}{at}", f"{result.prompt_tok_s:.1f}",
                      " ".join(f"{r:.1f}" for r in result.prompt_runs))
    if result.gen_tokens:
        table.add_row(f"tg{result.gen_tokens}{at}", f"{result.gen_tok_s:.1f}",
                      " ".join(f"{r:.1f}" for r in result.gen_runs))
    console.print(table)
    console.print(f"peak RSS: {_mib(result.peak_rss_bytes)}")
    if lm.speculation.enabled:
        _bench_speculative(lm, args)


def _bench_speculative(lm, args) -> None:
    from llmpress.eval.speed import EDITING_PROMPT, measure_speculative
    with console.status("speculative decoding: plain vs drafted ...") \
            if sys.stdout.isatty() else nullcontext():
        spec = measure_speculative(lm, lm.chat_prompt([{"role": "user",
                                                         "content": EDITING_PROMPT}]),
                                   args.gen_tokens, args.repetitions)
    console.print(f"speculative decoding on a code-editing answer ({spec.gen_tokens} tokens, "
                  f"greedy): {spec.plain_tok_s:.1f} -> {spec.speculative_tok_s:.1f} tok/s "
                  f"({spec.speculative_tok_s / spec.plain_tok_s:.2f}x), "
                  f"{spec.accepted}/{spec.drafted} drafted tokens accepted", highlight=False)


def cmd_serve(args) -> None:
    from llmpress.runtime.server import serve
    _use_threads(args)
    serve(args.model, host=args.host, port=args.port, ctx=args.ctx,
          api_key=args.api_key or os.environ.get("LLMPRESS_API_KEY"), mode=args.mode,
          device=args.device, chat_template=_chat_template(args), parallel=args.parallel,
          cors=tuple(args.cors), cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
          speculative=_speculative(args), pooling=args.pooling, cache_ram_mib=args.cache_ram)


def add_run_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate text for one prompt, streamed")
    _add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text, or - for stdin")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    _add_chat_args(p)
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="answer with JSON valid against this schema (constrained decoding)")
    _add_sampling_args(p)
    _add_speculative_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat with history")
    _add_model_args(p)
    _add_chat_args(p)
    p.add_argument("--system", default=None, help="a system message")
    _add_sampling_args(p)
    _add_speculative_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="prompt and generation speed, like llama-bench")
    _add_model_args(p)
    p.add_argument("-p", "--prompt-tokens", type=int, default=512)
    p.add_argument("-n", "--gen-tokens", type=int, default=128)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-t", "--threads", type=at_least(1), default=None)
    p.add_argument("-d", "--depth", type=at_least(0), default=0,
                   help="tokens already in the context when each test starts (llama-bench's -d)")
    p.add_argument("--json", action="store_true")
    _add_speculative_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_model_args(p)
    _add_chat_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require this bearer token "
                   "(or set LLMPRESS_API_KEY)")
    p.add_argument("--parallel", type=int, default=1, help="requests generated at once, their "
                   "forward passes batched, and conversations whose prompt cache is kept "
                   "(slots); a request reuses the one sharing its longest prefix")
    p.add_argument("-cram", "--cache-ram", type=float, default=None, metavar="MiB",
                   help="bound the prompt-cache slots' KV memory; the least recently used "
                   "go first (default and -1: no bound)")
    p.add_argument("--pooling", choices=("mean", "last", "cls"), default="mean",
                   help="how /v1/embeddings pools the tokens' hidden states (as llama.cpp)")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (repeatable; * for any)")
    _add_speculative_args(p)
    p.set_defaults(func=cmd_serve)

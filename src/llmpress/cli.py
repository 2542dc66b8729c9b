"""The `llmpress` command: a thin layer that parses arguments, calls the library and
prints with rich. Every user error is one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmpress.errors import LlmpressError

console = Console()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# --- pull / info ------------------------------------------------------------------------
def cmd_pull(args) -> None:
    from llmpress import hub
    path = hub.pull(args.name)  # draws its own progress bar
    console.print(f"{args.name}: {path} ({_mib(path.stat().st_size)})")


def cmd_list(args) -> None:
    from llmpress import hub
    table = Table(title=f"models ({hub.cache_dir() / 'models'})")
    for col in ("name", "size", "type", "where"):
        table.add_column(col, justify="right" if col == "size" else "left",
                         overflow="fold")
    for name, entry in hub.CATALOG.items():
        where = str(hub.cached_path(name)) if hub.is_pulled(name) else "not pulled"
        table.add_row(name, _mib(entry.size), entry.quant_type, where)
    console.print(table)


def cmd_rm(args) -> None:
    from llmpress import hub
    console.print(f"removed {hub.remove(args.name)}", highlight=False)


def _load(args, **overrides):
    from llmpress import hub
    from llmpress.api import load
    model = hub.resolve(args.model)  # a pull draws its own progress bar, before the spinner
    with console.status(f"loading {args.model} ...") if sys.stdout.isatty() else _nothing():
        return load(model, mode=getattr(args, "mode", "fast"), ctx=getattr(args, "ctx", None),
                    device=getattr(args, "device", None), chat_template=_chat_template(args),
                    cache_type_k=getattr(args, "cache_type_k", None),
                    cache_type_v=getattr(args, "cache_type_v", None),
                    **_speculative(args), **overrides)


def _speculative(args) -> dict:
    """load()'s speculative decoding options, from the commands that have them."""
    if not hasattr(args, "draft"):
        return {}
    return {"draft": args.draft, "lookup_ngram": args.lookup_ngram, "draft_max": args.draft_max,
            "draft_min": args.draft_min, "draft_p_min": args.draft_p_min}


def _report_drafts(last) -> None:
    if last is not None and last.drafted_tokens:
        print(f"speculative decoding: {last.accepted_tokens}/{last.drafted_tokens} drafted "
              f"tokens accepted ({last.accepted_tokens / last.drafted_tokens:.0%})",
              file=sys.stderr)


def _chat_template(args) -> str | None:
    """The text of --chat-template FILE, or None (the model's own template)."""
    path = getattr(args, "chat_template", None)
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise LlmpressError(f"cannot read the chat template {path}: "
                            f"{exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise LlmpressError(f"the chat template {path} is not UTF-8 text") from None


def _use_threads(args) -> None:
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def cmd_info(args) -> None:
    info = _load(args).info()
    if args.json:
        print(json.dumps(asdict(info) | {"bits_per_weight": info.bits_per_weight}, indent=2))
        return
    table = Table(title=info.name, show_header=False)
    rows = [
        ("file", info.path),
        ("architecture", info.architecture), ("parameters", f"{info.parameters:,}"),
        ("layers", info.layers), ("heads / KV heads", f"{info.heads} / {info.kv_heads}"),
        ("embedding / FFN", f"{info.embedding} / {info.ffn}"), ("vocabulary", f"{info.vocab:,}"),
        ("context length", f"{info.context_length:,}"), ("file size", _mib(info.file_bytes)),
        ("bits per weight", f"{info.bits_per_weight:.2f}"),
        ("chat template", "yes" if info.has_chat_template else "no"),
        ("matmuls", info.matmul),
    ]
    if info.experts:  # a mixture of experts: what one token computes with
        rows[3:3] = [("experts (used / total)", f"{info.experts_used} / {info.experts}"),
                     ("active parameters", f"{info.active_parameters:,}")]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    types = Table(title="tensor types")
    for col in ("type", "tensors", "bytes"):
        types.add_column(col, justify="right" if col != "type" else "left")
    for t in info.tensor_types:
        types.add_row(t.type_name, str(t.count), _mib(t.n_bytes))
    console.print(types)


# --- run / chat -------------------------------------------------------------------------
def _sampling(args) -> dict:
    return {"temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p,
            "min_p": args.min_p, "repeat_penalty": args.repeat_penalty, "seed": args.seed}


def _print_stream(chunks, verbose: bool = False) -> str:
    text, chunk = [], None
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        text.append(chunk.text)
    sys.stdout.write("\n")
    if verbose:
        sys.stdout.flush()
        _report_drafts(chunk)
    return "".join(text)


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

        result = measure_speed(lm.model, args.prompt_tokens, args.gen_tokens,
                               args.repetitions, args.threads, step)
    info = lm.info()
    if args.json:
        print(json.dumps(asdict(result) | {"model": info.path, "mode": lm.mode}, indent=2))
        return
    table = Table(title=f"{info.name}: {_mib(info.file_bytes)}, {info.bits_per_weight:.2f} bpw, "
                        f"{lm.mode} mode, {result.threads} threads")
    for col in ("test", "tok/s (median)", "runs"):
        table.add_column(col, justify="right")
    if result.prompt_tokens:
        table.add_row(f"pp{result.prompt_tokens}", f"{result.prompt_tok_s:.1f}",
                      " ".join(f"{r:.1f}" for r in result.prompt_runs))
    if result.gen_tokens:
        table.add_row(f"tg{result.gen_tokens}", f"{result.gen_tok_s:.1f}",
                      " ".join(f"{r:.1f}" for r in result.gen_runs))
    console.print(table)
    console.print(f"peak RSS: {_mib(result.peak_rss_bytes)}")
    if lm.speculation.enabled:
        _bench_speculative(lm, args)


def _bench_speculative(lm, args) -> None:
    from llmpress.eval.speed import EDITING_PROMPT, measure_speculative
    with console.status("speculative decoding: plain vs drafted ...") \
            if sys.stdout.isatty() else _nothing():
        spec = measure_speculative(lm, lm.chat_prompt([{"role": "user",
                                                         "content": EDITING_PROMPT}]),
                                   args.gen_tokens, args.repetitions)
    console.print(f"speculative decoding on a code-editing answer ({spec.gen_tokens} tokens, "
                  f"greedy): {spec.plain_tok_s:.1f} -> {spec.speculative_tok_s:.1f} tok/s "
                  f"({spec.speculative_tok_s / spec.plain_tok_s:.2f}x), "
                  f"{spec.accepted}/{spec.drafted} drafted tokens accepted", highlight=False)


# --- demo / serve -----------------------------------------------------------------------
DEMO_TYPES = "Q8_0,Q6_K,Q4_K_M,Q4_0,Q3_K_M"


def cmd_demo(args) -> None:
    """The whole story on the default model in a few minutes: what it is, what each
    quantization type costs (table + plot), which one to pick, and that one answering."""
    from llmpress import hub
    from llmpress.calib.data import default_calibration_text
    from llmpress.cli_eval import cmd_sweep
    from llmpress.eval.report import recommend

    path = hub.pull(hub.DEFAULT_MODEL)
    args.model, args.json = str(path), False
    cmd_info(args)
    work = hub.cache_dir() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    text = work / "pydoc-topics.txt"  # evaluation text every Python install carries
    text.write_text(default_calibration_text(), encoding="utf-8")
    console.print(f"\n[bold]Quantizing to {DEMO_TYPES} and measuring each against the "
                  f"original[/] (text: Python's pydoc topics, {args.chunks} windows of "
                  f"{args.ctx_eval} tokens)")
    sweep = build_parser().parse_args([  # `llmpress sweep` itself, its defaults included
        "sweep", str(path), "--types", DEMO_TYPES, "--text", str(text),
        "--ctx", str(args.ctx_eval), "--chunks", str(args.chunks), "--budget", str(args.budget),
        "--no-bench", "--work-dir", str(work)])
    best = recommend(cmd_sweep(sweep), args.budget)
    chosen = best.path if best else str(path)
    args.model = chosen
    lm = _load(args)
    question = "What is the capital of France? Answer in one sentence."
    console.print(f"\n[bold]{Path(chosen).name}[/]\n[bold]user:[/] {question}\n"
                  "[bold]assistant:[/] ", end="", highlight=False)
    _print_stream(lm.stream(lm.chat_prompt([{"role": "user", "content": question}]),
                            max_tokens=64, temperature=0))


def cmd_serve(args) -> None:
    from llmpress.runtime.server import serve
    _use_threads(args)
    serve(args.model, host=args.host, port=args.port, ctx=args.ctx,
          api_key=args.api_key or os.environ.get("LLMPRESS_API_KEY"), mode=args.mode,
          device=args.device, chat_template=_chat_template(args), parallel=args.parallel,
          cors=tuple(args.cors), cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
          speculative=_speculative(args), pooling=args.pooling, cache_ram_mib=args.cache_ram)


# --- argument parsing -------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a GGUF file, a Hugging Face directory, or a pulled name")
    p.add_argument("--mode", choices=("fast", "exact"), default="fast",
                   help="fast: packed kernels (default); exact: dequantize + float32 math")
    p.add_argument("--ctx", type=int, default=None, help="context length (default 4096 "
                   "or the model's limit if smaller)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("-ctk", "--cache-type-k", default=None, metavar="TYPE", help="KV cache "
                   "type of the keys: f16 (fast mode's default) or f32 (exact mode's)")
    p.add_argument("-ctv", "--cache-type-v", default=None, metavar="TYPE", help="KV cache "
                   "type of the values: f16 or f32")


def _add_chat_args(p: argparse.ArgumentParser) -> None:
    """What run, chat and serve share beyond the model: threads and the chat template."""
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: "
                   "torch's choice)")
    p.add_argument("--chat-template", metavar="FILE", default=None, help="a Jinja chat "
                   "template used instead of the model's own")


def _add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (the same output, fewer forward passes)")
    g.add_argument("-md", "--model-draft", "--draft", dest="draft", metavar="MODEL",
                   default=None, help="a smaller model with the same vocabulary that drafts "
                   "tokens (e.g. a Q2_K copy of the model)")
    g.add_argument("--lookup-ngram", type=int, default=0, metavar="N", help="draft by prompt "
                   "lookup: copy what followed the last N tokens earlier in the text (0: off)")
    g.add_argument("--draft-max", type=int, default=16, help="tokens drafted per step at most")
    g.add_argument("--draft-min", type=int, default=0, help="fewer drafted tokens than this: "
                   "decode plainly")
    g.add_argument("--draft-p-min", type=float, default=0.75, help="the draft model stops "
                   "where its top probability is lower")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpress", description="Compress, measure and run "
                                     "large language models locally.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an "
                        "internal error (also LLMPRESS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", help="fetch a named model into the cache")
    p.add_argument("name", help="a catalog name (see `llmpress list`), or hf:ORG/NAME[:FILE]")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="the catalog's models: size, type, where pulled")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rm", help="delete a pulled model from the cache")
    p.add_argument("name")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("info", help="architecture, sizes and tensor types of a model")
    _add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

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
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    _add_speculative_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the default model end to end: info, a quantization "
                       "sweep with its table and plot, the recommended file answering")
    p.add_argument("--chunks", type=int, default=8, help="evaluation windows per model")
    p.add_argument("--ctx-eval", type=int, default=256, help="tokens per evaluation window")
    p.add_argument("--budget", type=float, default=0.05, help="mean-KLD budget for the pick")
    p.set_defaults(func=cmd_demo, mode="fast", ctx=None, device=None)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_model_args(p)
    _add_chat_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require this bearer token "
                   "(or set LLMPRESS_API_KEY)")
    p.add_argument("--parallel", type=int, default=1, help="conversations whose prompt cache "
                   "is kept (slots); a request reuses the one sharing its longest prefix")
    p.add_argument("-cram", "--cache-ram", type=float, default=None, metavar="MiB",
                   help="bound the prompt-cache slots' KV memory; the least recently used "
                   "go first (default and -1: no bound)")
    p.add_argument("--pooling", choices=("mean", "last", "cls"), default="mean",
                   help="how /v1/embeddings pools the tokens' hidden states (as llama.cpp)")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (repeatable; * for any)")
    _add_speculative_args(p)
    p.set_defaults(func=cmd_serve)

    from llmpress.cli_calibrated import add_calibrated_parsers, add_method_options
    add_calibrated_parsers(sub)

    from llmpress.cli_quantize import add_quantize_parser
    add_method_options(add_quantize_parser(sub))  # --method gptq|awq|awq+gptq, --calib ...

    from llmpress.cli_fit import add_fit_parser
    add_fit_parser(sub)

    from llmpress.cli_prune import add_prune_parser
    add_prune_parser(sub)

    from llmpress.cli_eval import add_eval_parsers  # eval, compare, sweep
    add_eval_parsers(sub)
    return parser


def _crash_log(exc: BaseException) -> Path | None:
    """The full traceback of an unexpected error, written where the one-line message
    points; None when even that cannot be written."""
    import traceback

    from llmpress.hub import cache_dir
    try:
        path = cache_dir() / "logs" / "last-error.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
        return path
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or bool(os.environ.get("LLMPRESS_DEBUG"))
    try:
        args.func(args)
    except LlmpressError as exc:
        print("error: " + str(exc).replace("\n", " "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # a bug of ours, or a library's panic (the tokenizers
        # library's Rust PanicException is a BaseException): one line, the log on request
        if debug:
            raise
        log = _crash_log(exc)
        detail = " ".join(str(exc).split())[:300]
        where = f"full log: {log}" if log else "the log could not be written"
        print(f"error: internal error, please report ({type(exc).__name__}: {detail}); "
              f"{where}; --debug prints the traceback", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

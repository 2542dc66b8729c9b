"""`llmpress demo`: the default model end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmpress.cli.common import _load, _print_stream, console
from llmpress.cli.models import cmd_info


DEMO_TYPES = "Q8_0,Q6_K,Q4_K_M,Q4_0,Q3_K_M"


def cmd_demo(args) -> None:
    """The whole story on the default model in a few minutes: what it is, what each
    quantization type costs (table + plot), which one to pick, and that one answering."""
    from llmpress import hub
    from llmpress.calib.data import default_calibration_text
    from llmpress.cli import build_parser
    from llmpress.cli.eval import cmd_sweep
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


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the default model end to end: info, a quantization "
                       "sweep with its table and plot, the recommended file answering")
    p.add_argument("--chunks", type=int, default=8, help="evaluation windows per model")
    p.add_argument("--ctx-eval", type=int, default=256, help="tokens per evaluation window")
    p.add_argument("--budget", type=float, default=0.05, help="mean-KLD budget for the pick")
    p.set_defaults(func=cmd_demo, mode="fast", ctx=None, device=None)

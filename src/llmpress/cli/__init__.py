"""The `llmpress` command: a thin layer that parses arguments, calls the library and
prints with rich. Every user error is one line on stderr and exit status 1.

One module per command group: models (pull, list, rm, info), run (run, chat, bench,
serve), demo, quantize and calibrated (quantize, gptq, imatrix ...), fit, prune, eval
(eval, compare, sweep); common holds what they share."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llmpress.errors import LlmpressError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpress", description="Compress, measure and run "
                                     "large language models locally.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an "
                        "internal error (also LLMPRESS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from llmpress.cli.models import add_model_parsers
    add_model_parsers(sub)  # pull, list, rm, info

    from llmpress.cli.run import add_run_parsers
    add_run_parsers(sub)  # run, chat, bench, serve

    from llmpress.cli.demo import add_demo_parser
    add_demo_parser(sub)

    from llmpress.cli.calibrated import add_calibrated_parsers, add_method_options
    add_calibrated_parsers(sub)

    from llmpress.cli.quantize import add_quantize_parser
    add_method_options(add_quantize_parser(sub))  # --method gptq|awq|awq+gptq, --calib ...

    from llmpress.cli.fit import add_fit_parser
    add_fit_parser(sub)

    from llmpress.cli.prune import add_prune_parser
    add_prune_parser(sub)

    from llmpress.cli.eval import add_eval_parsers  # eval, compare, sweep
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

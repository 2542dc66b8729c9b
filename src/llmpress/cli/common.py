"""What the command groups share: the console, loading a model with the common options,
the model/chat/sampling arguments, streaming text to the terminal."""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console

from llmpress.errors import LlmpressError

console = Console()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _load(args, **overrides):
    from llmpress import hub
    from llmpress.api import load
    model = hub.resolve(args.model)  # a pull draws its own progress bar, before the spinner
    with console.status(f"loading {args.model} ...") if sys.stdout.isatty() else nullcontext():
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


def at_least(minimum: int):
    """An argparse type: an integer no smaller than `minimum` (a thread count of 0 or a
    negative depth is refused at once, with the option's name)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse


def _use_threads(args) -> None:
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)


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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a GGUF file, a Hugging Face directory, or a pulled name")
    p.add_argument("--mode", choices=("fast", "exact"), default="fast",
                   help="fast: packed kernels (default); exact: dequantize + float32 math")
    p.add_argument("--ctx", type=int, default=None, help="context length (default 4096 "
                   "or the model's limit if smaller)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("-ctk", "--cache-type-k", default=None, metavar="TYPE", help="KV cache "
                   "type of the keys: f16 (fast mode's default), f32 (exact mode's), q8_0 or q4_0")
    p.add_argument("-ctv", "--cache-type-v", default=None, metavar="TYPE", help="KV cache "
                   "type of the values: f16, f32, q8_0 or q4_0")


def _add_chat_args(p: argparse.ArgumentParser) -> None:
    """What run, chat and serve share beyond the model: threads and the chat template."""
    p.add_argument("-t", "--threads", type=at_least(1), default=None, help="CPU threads (default: "
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

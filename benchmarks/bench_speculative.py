"""Speculative decoding: greedy decode tokens/s of plain decoding, a draft model and
prompt lookup, on a code-editing prompt (the answer repeats the prompt) and on free text.
The three run in turn on each prompt, repeated; medians. Greedy, so all three produce the
same tokens (checked here too).

    python benchmarks/bench_speculative.py [--model qwen2.5-coder-1.5b] [--draft FILE]
        [--draft-type Q2_K] [--lookup-ngram 3] [-n 64] [-r 3] [--threads N]

Without --draft, the draft is the model requantized to --draft-type (made once, kept in
the llmpress cache): the same vocabulary by construction.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import llmpress
from llmpress import hub
from llmpress.eval.speed import EDITING_PROMPT, decode_speed
from llmpress.quant.quantize import QuantizeConfig, quantize_model

FREE_TEXT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def requantized_draft(model: str, draft_type: str):
    source = hub.resolve(model)
    path = hub.cache_dir() / "drafts" / f"{source.stem}.{draft_type}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"making the draft {path} ...", flush=True)
        quantize_model(QuantizeConfig(source, path, draft_type, allow_requantize=True,
                                      error_rows=0))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default=None)
    parser.add_argument("--draft-type", default="Q2_K")
    parser.add_argument("--lookup-ngram", type=int, default=3)
    parser.add_argument("--draft-max", type=int, default=16)
    parser.add_argument("-n", "--gen-tokens", type=int, default=64)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    draft = args.draft or requantized_draft(args.model, args.draft_type)
    with_draft = llmpress.load(args.model, draft=draft, draft_max=args.draft_max)
    with_lookup = llmpress.load(args.model, lookup_ngram=args.lookup_ngram,
                                draft_max=args.draft_max)
    engines = {"plain": (with_draft, False), "draft": (with_draft, True),
               "lookup": (with_lookup, True)}
    prompts = {"code editing": EDITING_PROMPT, "free text": FREE_TEXT}
    print(f"model {args.model}, draft {draft}, lookup n-gram {args.lookup_ngram}, "
          f"draft-max {args.draft_max}, {args.gen_tokens} tokens, {torch.get_num_threads()} "
          f"threads, {args.repetitions} repetitions (medians)")
    print(f"{'prompt':<13} {'engine':<7} {'tok/s':>7} {'vs plain':>9} {'accepted':>13} runs")
    for name, text in prompts.items():
        ids = with_draft.encode(with_draft.chat_prompt([{"role": "user", "content": text}]))
        runs = {e: [] for e in engines}
        drafted = {e: [0, 0] for e in engines}
        outputs = {}
        for _ in range(args.repetitions):
            for engine, (lm, speculative) in engines.items():  # in turn: the load drifts
                rate, last = decode_speed(lm, ids, args.gen_tokens, speculative)
                runs[engine].append(rate)
                drafted[engine][0] += last.drafted_tokens
                drafted[engine][1] += last.accepted_tokens
        for engine, (lm, speculative) in engines.items():
            outputs[engine] = lm.generate(ids, args.gen_tokens, temperature=0,
                                          prompt_cache=False, speculative=speculative).token_ids
        assert all(o == outputs["plain"] for o in outputs.values()), "greedy outputs differ"
        plain = statistics.median(runs["plain"])
        for engine in engines:
            rate = statistics.median(runs[engine])
            d, a = drafted[engine]
            accepted = f"{a}/{d} {a / d:.0%}" if d else "-"
            print(f"{name:<13} {engine:<7} {rate:>7.2f} {rate / plain:>8.2f}x {accepted:>13} "
                  + " ".join(f"{r:.2f}" for r in runs[engine]), flush=True)


if __name__ == "__main__":
    main()

"""Time to first token of each turn of a 10-turn chat, with and without the prompt cache,
in one process on the same model (the two alternate at every turn, so machine noise hits
both alike).

    python benchmarks/bench_prompt_cache.py [--model smollm2] [--turns 10] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

import llmpress

QUESTIONS = [
    "Tell me about the city of Paris.", "What is its most famous museum?",
    "Which river runs through it?", "Name three famous bridges over that river.",
    "What food is the city known for?", "Describe a typical French breakfast.",
    "What is the population of the city?", "How old is the Eiffel Tower?",
    "Which artists lived in Montmartre?", "Summarize our conversation in two sentences.",
]


def first_token_seconds(lm, prompt: str, prompt_cache: bool, max_tokens: int):
    started = time.perf_counter()
    chunks = lm.stream(prompt, max_tokens, prompt_cache=prompt_cache, temperature=0)
    first = next(chunks)
    ttft = time.perf_counter() - started
    rest = [first, *chunks]
    return ttft, "".join(c.text for c in rest), rest[-1].cached_tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = llmpress.load(args.model)
    history: list[dict] = []
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'ttft off (s)':>13} {'ttft on (s)':>12} "
          f"{'on/off':>7}")
    for turn in range(args.turns):
        history.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        prompt = lm.chat_prompt(history)
        off, _, _ = first_token_seconds(lm, prompt, False, 1)
        on, answer, cached = first_token_seconds(lm, prompt, True, args.max_tokens)
        history.append({"role": "assistant", "content": answer})
        print(f"{turn + 1:>4} {len(lm.encode(prompt)):>7} {cached:>7} {off:>13.3f} {on:>12.3f} "
              f"{on / off:>7.2f}")


if __name__ == "__main__":
    main()

"""Batched decoding: aggregate tokens/s when B sequences share each forward pass
(`LlamaModel.forward_batch`, what `serve --parallel N` does for concurrent requests),
against one sequence per pass. Each sequence has its own KV cache and its own position.

    python benchmarks/bench_batching.py [MODEL] [--batches 1,2,4,8] [--steps 16]
        [--repetitions 3] [--threads N]

The batch sizes take turns within each repetition, so load on a shared machine hits them
alike; each figure is the median over repetitions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import llmpress


def steps_per_second(model, prompt: list[int], batch: int, steps: int) -> float:
    caches = [model.new_cache(len(prompt) + steps + 1) for _ in range(batch)]
    logits = model.forward_batch([(prompt, cache) for cache in caches])
    start = time.perf_counter()
    for _ in range(steps):
        tokens = [int(row[-1].argmax()) for row in logits]
        logits = model.forward_batch([([t], cache) for t, cache in zip(tokens, caches)])
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = llmpress.load(args.model)
    prompt = lm.encode("The quick brown fox jumps over the lazy dog. Once upon a time")
    batches = [int(b) for b in args.batches.split(",")]
    steps_per_second(lm.model, prompt, 1, 2)  # warm-up: page in the weights
    runs = {b: [] for b in batches}
    for _ in range(args.repetitions):
        for b in batches:
            runs[b].append(steps_per_second(lm.model, prompt, b, args.steps))
    table = Table(title=f"{args.model}: {args.steps} decode steps, {torch.get_num_threads()} "
                        f"threads, median of {args.repetitions}")
    for col in ("sequences per pass", "aggregate tok/s", "× one sequence"):
        table.add_column(col, justify="right")
    single = statistics.median(runs[batches[0]])
    for b in batches:
        rate = statistics.median(runs[b])
        table.add_row(str(b), f"{rate:.1f}", f"{rate / single:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()

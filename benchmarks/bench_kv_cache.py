"""KV cache types at a long context: bytes and generation speed of llmpress (fast mode)
next to llama.cpp (flash attention, which its quantized V cache needs), same GGUF file.

    python benchmarks/bench_kv_cache.py [MODEL] [--depth 2048] [--gen 16] [--rounds 3]
                                        [--types f16,q8_0,q4_0] [--threads 2]

Each engine and cache type first processes `depth` random tokens (pp, timed once); then
every round times `gen` tokens generated one at a time after them (tg at that depth; the
cache is rewound to `depth` between rounds). The engines and types take turns round by
round, so load on a shared machine hits them alike; tg is the median over rounds. KV
bytes: llmpress's cache for depth + gen tokens (KVCache.bytes), llama.cpp's buffer as its
load log gives it (plan/estimate.py's kv_cache_bytes, checked against the log in tests).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def llmpress_engine(model: str, cache: str, depth: int, gen: int):
    import llmpress

    lm = llmpress.load(model, cache_type_k=cache, cache_type_v=cache, ctx=depth + gen)
    tokens = torch.randint(0, lm.model.cfg.vocab_size, (1, depth + gen),
                           generator=torch.Generator().manual_seed(0))
    kv = lm.model.new_cache(depth + gen)
    start = time.perf_counter()
    lm.model(tokens[:, :depth], kv, last_only=True)
    pp = depth / (time.perf_counter() - start)

    def generate() -> float:
        kv.length = depth
        start = time.perf_counter()
        for i in range(depth, depth + gen):
            lm.model(tokens[:, i:i + 1], kv, last_only=True)
        return gen / (time.perf_counter() - start)

    return pp, generate, kv.bytes()


def llama_cpp_engine(model: str, cache: str, depth: int, gen: int, threads: int):
    import random

    from llama_cpp import Llama

    from llmpress.plan import estimate

    types = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2}  # GGML_TYPE_*
    llm = Llama(model, n_ctx=depth + gen, n_batch=512, n_threads=threads,
                n_threads_batch=threads, type_k=types[cache], type_v=types[cache],
                flash_attn=True, verbose=False)
    rng = random.Random(0)
    tokens = [rng.randrange(llm.n_vocab()) for _ in range(depth + gen)]
    start = time.perf_counter()
    llm.eval(tokens[:depth])
    pp = depth / (time.perf_counter() - start)

    def generate() -> float:
        llm.n_tokens = depth  # rewind: eval drops the cache's positions from n_tokens on
        start = time.perf_counter()
        for token in tokens[depth:]:
            llm.eval([token])
        return gen / (time.perf_counter() - start)

    kv_bytes = estimate.kv_cache_bytes(estimate.spec_from_gguf(model), depth + gen, cache)
    return pp, generate, kv_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--depth", type=int, default=2048)
    parser.add_argument("--gen", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-llama-cpp", action="store_true")
    args = parser.parse_args()
    from llmpress import hub

    model = str(hub.pull(args.model or hub.DEFAULT_MODEL))
    torch.set_num_threads(args.threads)
    engines = {}
    for cache in args.types.split(","):
        engines[f"llmpress {cache}"] = llmpress_engine(model, cache, args.depth, args.gen)
        if not args.no_llama_cpp:
            engines[f"llama.cpp {cache}"] = llama_cpp_engine(model, cache, args.depth, args.gen,
                                                             args.threads)
    tg = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, (_, generate, _) in engines.items():
            tg[name].append(generate())
    print(f"{model}: depth {args.depth}, tg{args.gen} median of {args.rounds} rounds, "
          f"{args.threads} threads")
    for name, (pp, _, kv_bytes) in engines.items():
        runs = ", ".join(f"{x:.1f}" for x in tg[name])
        print(f"{name:18} KV {kv_bytes / 2**20:7.1f} MiB  pp{args.depth} {pp:7.1f} tok/s  "
              f"tg {statistics.median(tg[name]):6.1f} tok/s  ({runs})")


if __name__ == "__main__":
    main()

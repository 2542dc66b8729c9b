"""Load time and decode speed of two source trees, alternating run by run (the machine is
shared: each run is a fresh process, medians are quoted): did a change make loading or
decoding slower? Each tree needs its C extensions built in place.

    python benchmarks/bench_load_before_after.py BEFORE_SRC AFTER_SRC [--runs 5]

BEFORE_SRC / AFTER_SRC: the `src` directories of the two checkouts (e.g. a worktree of
main at the branch point, and this one). Models: the default one and Qwen2.5-Coder-1.5B
(hub.pull), one thread, 32 greedy tokens after a short prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MODELS = ("smollm2", "qwen2.5-coder-1.5b")
RUN = """
import json, time, torch
torch.set_num_threads(1)
import llmpress
from llmpress import hub
path = hub.pull({model!r})
start = time.perf_counter()
lm = llmpress.load(path, ctx=256)
loaded = time.perf_counter() - start
lm.generate("The capital of France is", max_tokens=2, temperature=0)  # warm
start = time.perf_counter()
out = lm.generate("Once upon a time", max_tokens=32, temperature=0, prompt_cache=False)
decode = time.perf_counter() - start
print(json.dumps({{"load_s": loaded, "tok_s": len(out.token_ids) / decode,
                  "text": out.text}}))
"""


def one_run(src: str, model: str) -> dict:
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", RUN.format(model=model)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    print("| model | load before (s) | load after (s) | ratio | decode before (tok/s) "
          "| decode after (tok/s) | ratio |\n|---|---:|---:|---:|---:|---:|---:|")
    for model in MODELS:
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(args.runs):
            for name in ("before", "after"):
                runs[name].append(one_run(getattr(args, name), model))
        texts = {r["text"] for rs in runs.values() for r in rs}
        assert len(texts) == 1, f"{model}: the two trees generate different text: {texts}"
        load = {k: statistics.median(r["load_s"] for r in v) for k, v in runs.items()}
        speed = {k: statistics.median(r["tok_s"] for r in v) for k, v in runs.items()}
        print(f"| {model} | {load['before']:.2f} | {load['after']:.2f} | "
              f"{load['after'] / load['before']:.2f} | {speed['before']:.1f} | "
              f"{speed['after']:.1f} | {speed['after'] / speed['before']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

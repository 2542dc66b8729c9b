"""Prompt-processing and generation speed, measured like llama-bench: pp = a prompt of
random tokens processed in one pass, tg = tokens generated one at a time; each test is
repeated and the median kept. Peak RSS is the process's high-water mark."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from llmpress.errors import LlmpressError
from llmpress.plan.machine import peak_rss_bytes


@dataclass(frozen=True)
class SpeedResult:
    prompt_tokens: int
    gen_tokens: int
    threads: int
    prompt_tok_s: float  # median over repetitions
    gen_tok_s: float
    prompt_runs: tuple[float, ...]
    gen_runs: tuple[float, ...]
    peak_rss_bytes: int
    depth: int = 0  # tokens already in the context when each test starts


def _random_tokens(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def filled_cache(model, depth: int, room: int, seed: int = 12345):
    """A KV cache holding `depth` random tokens with room for `room` more (llama-bench's
    -d: the context a test starts from), filled in prompt-sized chunks."""
    cache = model.new_cache(depth + room)
    tokens = _random_tokens(depth, model.cfg.vocab_size, seed)
    for start in range(0, depth, 512):
        model(tokens[:, start:start + 512], cache, last_only=True)
    return cache


def time_prompt(model, n_tokens: int, seed: int, cache=None) -> float:
    """One pass over n_tokens random tokens, after what `cache` holds (else from empty);
    the cache is left as it was."""
    tokens = _random_tokens(n_tokens, model.cfg.vocab_size, seed)
    cache = cache or model.new_cache(n_tokens)
    depth = cache.length
    start = time.perf_counter()
    model(tokens, cache, last_only=True)
    elapsed = time.perf_counter() - start
    cache.length = depth
    return n_tokens / elapsed


def time_generation(model, n_tokens: int, seed: int, cache=None) -> float:
    """Decode n_tokens one at a time after what `cache` holds (else from empty: llama-bench's
    tg test); the cache is left as it was."""
    tokens = _random_tokens(n_tokens, model.cfg.vocab_size, seed)
    cache = cache or model.new_cache(n_tokens)
    depth = cache.length
    start = time.perf_counter()
    for i in range(n_tokens):
        model(tokens[:, i:i + 1], cache)
    elapsed = time.perf_counter() - start
    cache.length = depth
    return n_tokens / elapsed


def measure_speed(model, prompt_tokens: int = 512, gen_tokens: int = 128,
                  repetitions: int = 3, threads: int | None = None, progress=None,
                  depth: int = 0) -> SpeedResult:
    """`model` is a LlamaModel. `progress(step_description)` is called before each run.
    depth > 0: each test starts after that many tokens in the context (filled once)."""
    if threads:
        torch.set_num_threads(threads)
    time_generation(model, 4, seed=0)  # warm-up: page in weights, build kernels' state
    cache = filled_cache(model, depth, max(prompt_tokens, gen_tokens)) if depth else None
    prompt_runs, gen_runs = [], []
    for r in range(repetitions):
        if prompt_tokens:
            progress and progress(f"pp{prompt_tokens} run {r + 1}/{repetitions}")
            prompt_runs.append(time_prompt(model, prompt_tokens, seed=r, cache=cache))
        if gen_tokens:
            progress and progress(f"tg{gen_tokens} run {r + 1}/{repetitions}")
            gen_runs.append(time_generation(model, gen_tokens, seed=r, cache=cache))
    return SpeedResult(
        prompt_tokens, gen_tokens, torch.get_num_threads(),
        statistics.median(prompt_runs) if prompt_runs else 0.0,
        statistics.median(gen_runs) if gen_runs else 0.0,
        tuple(prompt_runs), tuple(gen_runs), peak_rss_bytes(), depth,
    )


# --- speed in a process of its own -----------------------------------------------------------
@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 256
    gen_tokens: int = 64
    repetitions: int = 2
    threads: int | None = None


def _speed_worker(path: str, device: str | None, bench: BenchSettings) -> dict:
    from llmpress.api import load
    lm = load(path, mode="fast", device=device, ctx=max(bench.prompt_tokens, bench.gen_tokens))
    return asdict(measure_speed(lm.model, bench.prompt_tokens, bench.gen_tokens,
                                bench.repetitions, bench.threads))


def _speed_child_main() -> None:
    """Entry point of the child process: argv = path, device, settings as JSON."""
    path, device, settings = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3])
    print(json.dumps(_speed_worker(path, device, BenchSettings(**settings))))


def measure_speed_isolated(path: str, device: str | None, bench: BenchSettings) -> dict:
    """measure_speed in a fresh Python process, so that peak RSS is this model's alone."""
    code = "from llmpress.eval.speed import _speed_child_main; _speed_child_main()"
    done = subprocess.run([sys.executable, "-c", code, path, device or "",
                           json.dumps(asdict(bench))], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LlmpressError(f"{path}: the speed run failed ({last})")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- speculative decoding ------------------------------------------------------------------
# A code-editing request: the answer repeats most of the prompt, where drafting pays.
EDITING_PROMPT = """Rename the variable `total` to `result` in this code and change nothing else:

```python
def summarize(values):
    total = 0
    for value in values:
        if value > 0:
            total += value
    average = total / len(values) if values else 0.0
    return {"total": total, "average": average, "count": len(values)}


def report(rows):
    lines = []
    for name, values in rows.items():
        summary = summarize(values)
        lines.append(f"{name}: total={summary['total']} average={summary['average']:.2f}")
    return "\\n".join(lines)
```"""


@dataclass(frozen=True)
class SpeculativeSpeed:
    plain_tok_s: float  # greedy generation, one token per forward pass (median)
    speculative_tok_s: float  # the same tokens with the model's drafting (median)
    drafted: int  # over all speculative runs
    accepted: int
    gen_tokens: int  # tokens each run generated

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def decode_speed(lm, ids: list[int], gen_tokens: int, speculative: bool):
    """-> (tokens/s, the last chunk) of one greedy generation after ids, without the
    prompt cache, timed from the first generated token to the last (as llama.cpp's eval
    time: the prompt's pass is left out, it is the same with or without drafting)."""
    start, tokens, last = None, 0, None
    for last in lm.stream(ids, gen_tokens, temperature=0, prompt_cache=False,
                          speculative=speculative):
        start = start or time.perf_counter()
        tokens += len(last.token_ids)
    return (tokens - 1) / (time.perf_counter() - start), last


def measure_speculative(lm, prompt: str, gen_tokens: int = 128,
                        repetitions: int = 3) -> SpeculativeSpeed:
    """Greedy generation after `prompt` with and without lm's speculative decoding,
    alternating (the machine's load drifts), medians of tokens/s."""
    ids = lm.encode(prompt)
    plain, speculative, drafted, accepted, n = [], [], 0, 0, 0
    for _ in range(repetitions):
        for use, runs in ((False, plain), (True, speculative)):
            rate, last = decode_speed(lm, ids, gen_tokens, use)
            runs.append(rate)
            if use:
                drafted, accepted = drafted + last.drafted_tokens, accepted + last.accepted_tokens
    n = len(lm.generate(ids, gen_tokens, temperature=0, prompt_cache=False).token_ids)
    return SpeculativeSpeed(statistics.median(plain), statistics.median(speculative),
                            drafted, accepted, n)

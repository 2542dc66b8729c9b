"""`python -m tests.fuzz --cases 20000`: a longer fuzzing campaign; prints the outcome table
and every case that was not a clean run or a clean one-line error."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .campaign import ACCEPTABLE, KINDS, Asan, failures, memory_summary, plan, run_campaign, table
from .http import run_http
from .seeds import build_seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz")
    p.add_argument("--cases", type=int, default=1500, help="total cases, split 69%% GGUF, "
                   "17%% HF directories, 14%% chat templates (default: the CI set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    p.add_argument("--as-gib", type=float, default=4.0, help="address-space limit per worker")
    p.add_argument("--work", type=Path, default=None, help="seeds and case files (temp dir)")
    p.add_argument("--keep", type=Path, default=None, help="copy failing inputs here")
    p.add_argument("--no-real", action="store_true", help="skip the real default model")
    p.add_argument("--http", type=int, default=250, help="hostile HTTP requests against a "
                   "real server on the default model (default: the CI set's 250; 0: none)")
    p.add_argument("--asan", action="store_true", help="GGUF cases only, their workers "
                   "running the C extensions built with AddressSanitizer (built into --work)")
    args = p.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="llmpress-fuzz-"))
    seeds = build_seeds(work / "seeds", real=not args.no_real)
    n_hf, n_tpl = (0, 0) if args.asan else (args.cases * 17 // 100, args.cases * 14 // 100)
    kinds = plan(args.cases - n_hf - n_tpl, n_hf, n_tpl)
    asan = Asan.build(work) if args.asan else None
    if asan is not None:
        asan.prove(int(args.as_gib * 2**30))
    start = time.perf_counter()

    def progress(result, done, total):
        if result.outcome not in ACCEPTABLE or done % 100 == 0:
            print(f"[{done}/{total}] case {result.case} {result.kind} ({result.seed}): "
                  f"{result.outcome} {result.detail or ''}", file=sys.stderr, flush=True)

    results = run_campaign(seeds, work / "cases", kinds, args.seed, args.jobs, args.timeout,
                           int(args.as_gib * 2**30), args.keep, progress, asan)
    if args.http and not args.asan:
        from llmpress import hub
        http_results, server_peak = run_http(hub.pull(hub.DEFAULT_MODEL), hub.DEFAULT_MODEL,
                                             args.http, args.seed, progress=progress)
        results += http_results
        print(f"server peak resident memory: {server_peak / 2**20:.0f} MiB")
    print(table(results))
    print(f"\n{len(results)} cases in {time.perf_counter() - start:.0f} s, seed {args.seed}")
    for kind in KINDS:
        if not any(r.kind == kind for r in results):
            continue
        times = sorted(r.seconds for r in results if r.kind == kind)
        print(f"{kind}: median {times[len(times) // 2]:.2f} s, max {times[-1]:.1f} s per case")
    print(memory_summary(results))
    bad = failures(results)
    for r in bad:
        print(f"case {r.case} {r.kind} ({r.seed}): {r.outcome} {r.detail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

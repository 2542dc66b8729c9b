"""The fixed-seed fuzzing set of issue 16 (tests/fuzz): hostile GGUF files, Hugging Face
directories and chat templates, each run in a sandboxed worker, and hostile HTTP requests
against a real server on the default model. No case may crash the process natively, hang,
exhaust the address space, raise anything but LlmpressError, or grow its worker's
resident memory by more than twice its input's size (plus a 32 MiB floor); no request
may get a 5xx or a 4xx without OpenAI's error body, or kill or hang the server. The
outcome table is printed (into the CI log, pass or fail).

LLMPRESS_FUZZ_CASES scales the file set; the default 1,500 is the issue's CI set (1,035
GGUF + 255 HF + 210 templates, about 4 minutes on 2 cores: workers are reused across
cases), LLMPRESS_FUZZ_HTTP the requests (250, about 2 minutes).
`python -m tests.fuzz --cases 20000` is the long campaign, `--asan` the AddressSanitizer
one."""

from __future__ import annotations

import os

from fuzz.campaign import failures, memory_summary, plan, run_campaign, table
from fuzz.http import run_http
from fuzz.seeds import build_seeds

from llmpress import hub

CASES = int(os.environ.get("LLMPRESS_FUZZ_CASES", 1500))
HTTP_REQUESTS = int(os.environ.get("LLMPRESS_FUZZ_HTTP", 250))


def test_fixed_seed_fuzzing_set(tmp_path_factory, default_model_path, capsys):
    work = tmp_path_factory.mktemp("fuzz")
    seeds = build_seeds(work / "seeds")
    n_hf, n_templates = CASES * 17 // 100, CASES * 14 // 100
    results = run_campaign(seeds, work / "cases", plan(CASES - n_hf - n_templates, n_hf,
                                                       n_templates), seed=0, jobs=2)
    http_results, server_peak = run_http(default_model_path, hub.DEFAULT_MODEL,
                                         HTTP_REQUESTS, seed=0)
    results += http_results
    report = (f"{table(results)}\n{memory_summary(results)}\n"
              f"server peak resident memory: {server_peak / 2**20:.0f} MiB")
    with capsys.disabled():  # into the CI log even when the test passes
        print("\nfuzzing set outcomes:\n" + report)
    bad = failures(results)
    assert not bad, report + "\n" + "\n".join(
        f"case {r.case} {r.kind} ({r.seed}): {r.outcome} {r.detail}" for r in bad[:30])
    assert len(results) == CASES + HTTP_REQUESTS

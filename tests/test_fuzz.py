"""The fixed-seed fuzzing set of issue 16 (tests/fuzz): hostile GGUF files, Hugging Face
directories and chat templates, each run in a sandboxed worker. No case may crash the
process natively, hang, exhaust the address space or raise anything but LlmpressError.
The outcome table is printed (pytest -s, or in the CI log on failure).

LLMPRESS_FUZZ_CASES scales the set; the default 1,450 is the issue's CI set (1,000 GGUF +
246 HF + 203 templates, about 4 minutes on 2 cores: workers are reused across cases);
`python -m tests.fuzz --cases 20000` is the long campaign."""

from __future__ import annotations

import os

from fuzz.campaign import failures, plan, run_campaign, table
from fuzz.seeds import build_seeds

CASES = int(os.environ.get("LLMPRESS_FUZZ_CASES", 1450))


def test_fixed_seed_fuzzing_set(tmp_path_factory, default_model_path):
    work = tmp_path_factory.mktemp("fuzz")
    seeds = build_seeds(work / "seeds")
    n_hf, n_templates = CASES * 17 // 100, CASES * 14 // 100
    results = run_campaign(seeds, work / "cases", plan(CASES - n_hf - n_templates, n_hf,
                                                       n_templates), seed=0, jobs=2)
    print("\n" + table(results))
    bad = failures(results)
    assert not bad, table(results) + "\n" + "\n".join(
        f"case {r.case} {r.kind} ({r.seed}): {r.outcome} {r.detail}" for r in bad[:30])
    assert len(results) == CASES

"""Quality per bit: llama.cpp's presets against our mixed precision at the same size.

For each preset (default Q2_K, Q3_K_M, IQ4_XS, Q4_K_S, Q4_K_M, Q5_K_M, Q6_K) the default
model (SmolLM2-135M-Instruct: its Q4_1 weights dequantized exactly are the F32 original)
is quantized with the same importance matrix (tests/data/reference, llama-imatrix on the
pydoc text) twice:
  preset   `llmpress quantize IN OUT PRESET --imatrix` (byte-identical to llama-quantize)
  mixed    `llmpress quantize IN OUT --target-size <the preset's file size>`: a type per
           tensor from the measured sensitivities (quant.budget; calibrated on the
           built-in pydoc text, never on the evaluation text)
and, with --exclude-source-type, a third file "mixed-noQ4_1": the same without Q4_1
among the candidates. The default model's weights are Q4_1, so rounding them to Q4_1
again is lossless: a real saving for this file, but not one a true F32 original offers;
this row shows the optimizer without it. With --gptq the mixed files are written with
GPTQ (quant.calibrated) instead of rounding.

Each file is scored by our exact evaluator (llama-perplexity's statistics) for mean KL
divergence against the F32 original on WikiText-2 test, ctx 512, --chunks windows;
llama.cpp (llama-cpp-python) loads each mixed file and its top-1 agreement with our exact
mode over one 512-token window is printed. Sensitivities are measured once per candidate
set and reused for every size. A Pareto PNG (size against KLD) is written to --out.

    python benchmarks/bench_quality.py [--presets Q4_K_M Q3_K_M] [--chunks 40]
        [--exclude-source-type] [--gptq] [--out DIR]

Measured (2026-12-07, 2-core shared CPU under load, `--chunks 16 --exclude-source-type`:
16 windows = 4,080 scored tokens; sensitivities from 1,024 pydoc tokens, default settings):

| preset | method | MiB | mean KLD | ratio to preset |
|---|---|---:|---:|---:|
| Q2_K | preset | 84.12 | 0.29618 ± 0.00494 | 1.00 |
| Q2_K | mixed | 84.10 | 0.01720 ± 0.00022 | 0.06 |
| Q2_K | mixed-noQ4_1 | 84.12 | 0.06496 ± 0.00150 | 0.22 |
| Q3_K_M | preset | 89.18 | 0.08515 ± 0.00167 | 1.00 |
| Q3_K_M | mixed | 85.37 | 0.01651 ± 0.00020 | 0.19 |
| Q3_K_M | mixed-noQ4_1 | 89.18 | 0.03342 ± 0.00077 | 0.39 |
| IQ4_XS | preset | 86.69 | 0.10240 ± 0.00237 | 1.00 |
| IQ4_XS | mixed | 85.37 | 0.01651 ± 0.00020 | 0.16 |
| IQ4_XS | mixed-noQ4_1 | 86.68 | 0.04834 ± 0.00115 | 0.47 |
| Q4_K_S | preset | 97.31 | 0.03383 ± 0.00064 | 1.00 |
| Q4_K_S | mixed | 93.81 | 0.00000 ± 0.00000 | 0.00 |
| Q4_K_S | mixed-noQ4_1 | 97.31 | 0.01858 ± 0.00066 | 0.55 |
| Q4_K_M | preset | 100.57 | 0.03124 ± 0.00060 | 1.00 |
| Q4_K_M | mixed | 93.81 | 0.00000 ± 0.00000 | 0.00 |
| Q4_K_M | mixed-noQ4_1 | 100.57 | 0.00421 ± 0.00016 | 0.13 |

(Q5_K_M and Q6_K: the run did not finish their KLD before the session ended.)
"mixed" below the budget (Q3_K_M, IQ4_XS): every tensor but the embedding is already at
its lossless Q4_1 there and the embedding's next step up does not fit, so more bytes buy
nothing. From the Q4_K_S size up "mixed" is 93.81 MiB: the source's own types (Q4_1,
embedding Q8_0), lossless; "mixed-noQ4_1" stops at 110 MiB below Q6_K's 132 MiB, Q5_1
being all but lossless on Q4_1 weights.
Sensitivity took 3-9 minutes per candidate set on the loaded machine (statistics 27-40 s,
raw errors 43-105 s, 11 perturbation passes 6-50 s each); planning each further size
from it, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_gptq import REFERENCE_IMATRIX, WIKITEXT, llama_cpp_agreement, log

PRESETS = ["Q2_K", "Q3_K_M", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K"]


def plot_pareto(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["bytes"] / 2**20, r["kld"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method)
        if method == "preset":
            for r in rows:
                if r["method"] == "preset":
                    ax.annotate(r["preset"], (r["bytes"] / 2**20, r["kld"]), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KLD vs F32 (WikiText-2, ctx 512)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--chunks", type=int, default=40, help="WikiText windows of 512")
    parser.add_argument("--exclude-source-type", action="store_true",
                        help="also plan without the source's own quantized type")
    parser.add_argument("--gptq", action="store_true", help="write the mixed files with GPTQ")
    parser.add_argument("--out", type=Path, default=Path("/tmp/llmpress-bench-quality"))
    args = parser.parse_args()

    from gguf import GGMLQuantizationType as T

    from llmpress import hub
    from llmpress.api import load
    from llmpress.eval.kld import kld_against_base, record_base
    from llmpress.eval.perplexity import plan_windows, read_text, tokenize_for_perplexity
    from llmpress.quant.budget import BudgetSettings, BudgetTarget, budget_config
    from llmpress.quant.calibrated import CalibrationConfig, calibrated_quantize
    from llmpress.quant.quantize import QuantizeConfig, quantize_model

    args.out.mkdir(parents=True, exist_ok=True)
    model = hub.pull(hub.DEFAULT_MODEL)
    variants = {"mixed": BudgetSettings()}
    if args.exclude_source_type:
        variants["mixed-noQ4_1"] = BudgetSettings(excluded=(T.Q4_1,))
    suffix = "-gptq" if args.gptq else ""

    files: list[tuple[str, str, Path]] = []  # (preset, method, path)
    sensitivities: dict[str, object] = {}
    stage_seconds: dict[str, float] = {}
    for preset in args.presets:
        path = args.out / f"smollm2-{preset}-preset.gguf"
        if not path.exists():
            quantize_model(QuantizeConfig(model, path, preset, imatrix=REFERENCE_IMATRIX,
                                          allow_requantize=True, error_rows=0))
        files.append((preset, "preset", path))
        for variant, settings in variants.items():
            mixed = args.out / f"smollm2-{preset}-{variant}{suffix}.gguf"
            files.append((preset, variant + suffix, mixed))
            if mixed.exists():
                continue
            started = time.perf_counter()
            config = QuantizeConfig(model, mixed, "F16", imatrix=REFERENCE_IMATRIX,
                                    allow_requantize=True, error_rows=0)
            planned, plan = budget_config(config, BudgetTarget(size=path.stat().st_size),
                                          settings, progress=lambda m: log("   ", m),
                                          sensitivity=sensitivities.get(variant))
            sensitivities[variant] = plan.sensitivity
            for stage, s in plan.sensitivity.seconds.items():
                stage_seconds.setdefault(f"{variant}: {stage}", s)
            if args.gptq:
                calibrated_quantize(planned, CalibrationConfig(method="gptq", tokens=16384))
            else:
                quantize_model(planned)
            log(f"  {mixed.name}: {mixed.stat().st_size:,} bytes for a budget of "
                f"{plan.budget:,}, predicted KLD {plan.predicted_kld:.4f} "
                f"({time.perf_counter() - started:.0f} s)")
    for stage, s in stage_seconds.items():
        log(f"  sensitivity {stage}: {s:.0f} s")

    base_lm = load(model, mode="exact")
    tokens = tokenize_for_perplexity(base_lm.tokenizer, read_text(WIKITEXT))
    windows = plan_windows(len(tokens), 512, args.chunks)
    base, _ = record_base(base_lm, tokens, windows)
    window = [int(t) for t in base.tokens[:512]]
    rows = []
    for preset, method, path in files:
        lm = load(path, mode="exact")
        summary = kld_against_base(lm, base).summary
        agreement = None
        if method != "preset":
            agreement = llama_cpp_agreement(path, window, lm.logits(window).cpu())
        rows.append({"preset": preset, "method": method, "bytes": path.stat().st_size,
                     "kld": summary.kld_mean, "kld_error": summary.kld_error,
                     "ppl": summary.ppl, "llama_cpp_top1": agreement})
        log(f"  {preset} {method}: {path.stat().st_size / 2**20:.2f} MiB, KLD "
            f"{summary.kld_mean:.5f} ± {summary.kld_error:.5f}")

    log(f"\nKLD vs F32 on WikiText-2 test, ctx 512, {windows.n_windows} windows "
        f"({windows.n_scored} scored tokens), exact-mode evaluator\n")
    log("| preset | method | MiB | mean KLD | ratio to preset | PPL | llama.cpp top-1 vs ours |")
    log("|---|---|---:|---:|---:|---:|---:|")
    preset_kld = {r["preset"]: r["kld"] for r in rows if r["method"] == "preset"}
    for r in rows:
        agree = "" if r["llama_cpp_top1"] is None else f"{100 * r['llama_cpp_top1']:.1f}%"
        log(f"| {r['preset']} | {r['method']} | {r['bytes'] / 2**20:.2f} | "
            f"{r['kld']:.5f} ± {r['kld_error']:.5f} | {r['kld'] / preset_kld[r['preset']]:.2f} | "
            f"{r['ppl']:.3f} | {agree} |")
    (args.out / "results.json").write_text(json.dumps(
        {"windows": windows.n_windows, "rows": rows}, indent=2))
    png = args.out / "pareto-smollm2.png"
    plot_pareto(rows, png, f"SmolLM2-135M: size against KLD ({windows.n_windows} windows)")
    log(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

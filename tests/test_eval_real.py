"""`llmpress eval` on the real default model against llama.cpp (llama-cpp-python), a short
version of the benchmark: 4 windows of 512 WikiText tokens, scored as llama-perplexity
scores them, on the Q4_1 file and its exact F32 dequantization (written with gguf-py).

Each test prints what it measured (`pytest -s` shows it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import llmpress
from llmpress.cli import main as cli_main
from llmpress.eval import kld as K
from llmpress.eval import perplexity as P

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.slow

N_CTX, N_WINDOWS = 512, 4
KLD_WINDOWS = 2  # of those, the ones the KLD tests run (llama.cpp's Q4_1, our exact Q4_1)
TEXT_BYTES = 24_000  # a WikiText prefix that holds 4 windows (about 5 bytes per token)


# --- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_real")


@pytest.fixture(scope="module")
def text_path(wikitext_bytes, workdir):
    path = workdir / "wiki-prefix.raw"
    path.write_bytes(wikitext_bytes[:TEXT_BYTES])
    return path


@pytest.fixture(scope="module")
def f32_lm(f32_gguf):
    return llmpress.load(f32_gguf, mode="exact", ctx=N_CTX)


@pytest.fixture(scope="module")
def tokens(f32_lm, text_path):
    return P.tokenize_for_perplexity(f32_lm.tokenizer, P.read_text(text_path))


@pytest.fixture(scope="module")
def plan(tokens):
    return P.plan_windows(len(tokens), N_CTX, N_WINDOWS)


def llama_scored_log_probs(path, tokens: list[int], plan: P.WindowPlan) -> torch.Tensor:
    """llama.cpp's logits of every scored position, windows evaluated as llama-perplexity
    does (fresh cache per window, BOS first when the vocabulary adds one), log-softmaxed
    here in float64: (n_windows * scored, vocab)."""
    llm = llama_cpp.Llama(str(path), n_ctx=plan.n_ctx, n_batch=plan.n_ctx, logits_all=True,
                          n_threads=2, verbose=False)
    add_bos = llm._model.add_bos_token()
    out = []
    for w in range(plan.n_windows):
        window = list(tokens[w * plan.n_ctx:(w + 1) * plan.n_ctx])
        if add_bos:
            window[0] = llm.token_bos()
        llm.reset()
        llm.eval(window)
        scored = np.array(llm.scores[plan.first:plan.n_ctx - 1], dtype=np.float64)
        out.append(torch.log_softmax(torch.from_numpy(scored), dim=-1))
    llm.close()
    return torch.cat(out)


@pytest.fixture(scope="module")
def targets(tokens, plan) -> torch.Tensor:
    t = torch.tensor(tokens[:plan.n_tokens]).view(plan.n_windows, plan.n_ctx)
    return t[:, plan.first + 1:].reshape(-1)


@pytest.fixture(scope="module")
def llama_f32(f32_gguf, tokens, plan):
    return llama_scored_log_probs(f32_gguf, tokens, plan)


@pytest.fixture(scope="module")
def llama_q41(default_model_path, tokens):
    return llama_scored_log_probs(default_model_path, tokens, P.WindowPlan(N_CTX, KLD_WINDOWS))


@pytest.fixture(scope="module")
def our_base(f32_lm, tokens, plan):
    """Our run of the F32 file: compact base log-probs and the NLL of every scored token."""
    return K.record_base(f32_lm, tokens, plan)


# --- tests --------------------------------------------------------------------------------
def test_tokens_match_llama_cpp(default_model_path, text_path, tokens):
    vocab = llama_cpp.Llama(str(default_model_path), vocab_only=True, verbose=False)
    theirs = vocab.tokenize(text_path.read_bytes(), add_bos=True, special=False)
    assert tokens == theirs
    assert len(tokens) >= N_CTX * N_WINDOWS


def test_perplexity_matches_llama_cpp(our_base, llama_f32, targets, plan):
    """Same windows, same scoring; F32 on both sides, so no 8-bit activation noise."""
    _, nll = our_base
    ours = P.perplexity_with_error(nll)
    their_nll = -llama_f32.gather(-1, targets[:, None])[:, 0].numpy()
    theirs = math.exp(their_nll.mean())
    their_error = theirs * their_nll.std(ddof=1) / math.sqrt(their_nll.size)
    print(f"\nPPL over {plan.n_windows} windows of {plan.n_ctx}: ours {ours.ppl:.4f} ± "
          f"{ours.error:.4f}, llama.cpp {theirs:.4f} ± {their_error:.4f}; max |Δnll| "
          f"{np.abs(nll - their_nll).max():.2e}, mean {np.abs(nll - their_nll).mean():.2e}")
    assert ours.count == plan.n_scored == their_nll.size == 4 * 255
    assert ours.ppl == pytest.approx(theirs, rel=0.01)
    assert ours.ppl == pytest.approx(theirs, rel=1e-3)  # in fact much closer
    assert ours.error == pytest.approx(their_error, rel=0.01)
    # llama.cpp keeps its KV cache in F16: single tokens differ by a few 1e-3 nats
    assert np.abs(nll - their_nll).mean() < 2e-3 and np.abs(nll - their_nll).max() < 0.05


def test_kld_statistics_by_hand_on_llama_cpp_logits(llama_f32, llama_q41, targets):
    """Q4_1 against F32, both run by llama.cpp: our statistics (exact, and through the
    compact base file) against the same statistics computed by hand in numpy."""
    n = len(llama_q41)
    llama_f32, targets = llama_f32[:n], targets[:n]
    b, q = llama_f32.numpy(), llama_q41.numpy()
    t = targets.numpy()
    rows = np.arange(len(t))
    kld = (np.exp(b) * (b - q)).sum(-1)
    nll, nll_base = -q[rows, t], -b[rows, t]
    by_hand = {
        "kld_mean": kld.mean(), "kld_99": np.quantile(kld, 0.99), "kld_median": np.median(kld),
        "kld_max": kld.max(), "same_top": (q.argmax(-1) == b.argmax(-1)).mean(),
        "ppl": math.exp(nll.mean()), "ppl_base": math.exp(nll_base.mean()),
        "ln_ratio": (nll - nll_base).mean(),
        "ln_ratio_error": (nll - nll_base).std(ddof=1) / math.sqrt(len(t)),
        "p_diff_rms": math.sqrt(((np.exp(-nll) - np.exp(-nll_base)) ** 2).mean()),
    }

    def as_dict(s: K.KldSummary) -> dict:
        return {"kld_mean": s.kld_mean, "kld_99": s.kld_percentiles["99"],
                "kld_median": s.kld_percentiles["median"], "kld_max": s.kld_percentiles["max"],
                "same_top": s.same_top, "ppl": s.ppl, "ppl_base": s.ppl_base,
                "ln_ratio": s.ln_ppl_ratio, "ln_ratio_error": s.ln_ppl_ratio_error,
                "p_diff_rms": s.p_diff_rms}

    exact = as_dict(K.summarize(K.token_stats(llama_f32, llama_q41, targets)))
    compact_rows = K.compress_log_probs(llama_f32, targets)
    compact = as_dict(K.summarize(K.compact_token_stats(compact_rows, llama_q41, targets)))
    print("\nllama.cpp Q4_1 vs F32: " + ", ".join(f"{k} {v:.6g}" for k, v in by_hand.items()))
    print("compact base:          " + ", ".join(f"{k} {v:.6g}" for k, v in compact.items()))
    for key, value in by_hand.items():
        assert exact[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    for key in ("same_top", "ppl", "ppl_base", "ln_ratio", "ln_ratio_error", "p_diff_rms"):
        assert compact[key] == pytest.approx(by_hand[key], rel=1e-9), key
    assert compact["kld_mean"] == pytest.approx(by_hand["kld_mean"], rel=0.01)
    assert compact["kld_median"] == pytest.approx(by_hand["kld_median"], rel=0.02)


@pytest.fixture(scope="module")
def base_file(our_base, workdir):
    path = workdir / "f32-base.safetensors"
    size = K.save_base(our_base[0], path)
    assert size == path.stat().st_size
    return path


def test_exact_mode_reads_q41_as_its_f32_dequantization(f32_gguf, default_model_path,
                                                        our_base, base_file, plan, workdir,
                                                        capsys):
    """`llmpress compare` with the F32 run's base file against the Q4_1 file in exact mode
    (KLD_WINDOWS of the 4 windows): the weights are the same numbers, so the divergence is
    rounding only; and the table's files are written."""
    out = workdir / "compare"
    rc = cli_main(["compare", str(f32_gguf), str(default_model_path), "--base-logits",
                   str(base_file), "--chunks", str(KLD_WINDOWS), "--no-bench", "--out", str(out),
                   "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    base, q41 = report["models"]
    size = base_file.stat().st_size
    print(f"\nours, exact: Q4_1 vs F32 mean KLD {q41['kld_mean']:.3g}, same top "
          f"{100 * q41['same_top']:.2f}%, PPL {q41['ppl']:.4f} vs {base['ppl']:.4f}; base file "
          f"{size / 2**20:.2f} MiB for {plan.n_scored} tokens")
    assert base["is_base"] and base["kld_mean"] == 0 and not q41["is_base"]
    base_nll = our_base[1][:KLD_WINDOWS * plan.scored_per_window]
    assert base["ppl"] == pytest.approx(P.perplexity_with_error(base_nll).ppl, rel=1e-12)
    assert q41["kld_mean"] < 1e-6 and q41["same_top"] >= 0.99
    assert q41["ppl"] == pytest.approx(base["ppl"], rel=1e-4)
    assert q41["label"] == default_model_path.name
    assert report["recommended"] == q41["label"] and report["settings"]["windows"] == KLD_WINDOWS
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "compare.csv").read_text().count("\n") == 3
    assert json.loads((out / "compare.json").read_text())["models"] == report["models"]
    assert size < 2200 * plan.n_scored + 4 * plan.n_tokens + 4096  # ~2.1 kB per scored token


def test_sweep_quantizes_compares_and_recommends(default_model_path, text_path, workdir,
                                                 capsys):
    """`llmpress sweep` end to end on one window: quantize (our quantize_model) to Q8_0,
    compare with the model it came from, recommend."""
    work = workdir / "sweep"
    rc = cli_main(["sweep", str(default_model_path), "--types", "Q8_0", "--text", str(text_path),
                   "--chunks", "1", "--work-dir", str(work), "--no-bench", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    base, q8 = report["models"]
    print(f"\nsweep: Q8_0 of the Q4_1 file: KLD {q8['kld_mean']:.3g}, same top "
          f"{100 * q8['same_top']:.1f}%")
    assert q8["label"] == "Q8_0" and Path(q8["path"]).parent == work
    assert 0 < q8["kld_mean"] < 0.01 and q8["same_top"] > 0.9
    assert q8["file_bytes"] > base["file_bytes"]  # Q8_0 is bigger than Q4_1
    # Q8_0 is within the budget but bigger than the Q4_1 it came from: keep the base
    assert report["recommended"] == base["label"] == default_model_path.name
    assert (work / "sweep.png").exists() and (work / "sweep.csv").exists()


def test_speed_runs_in_its_own_process(default_model_path):
    """compare's speed column: measure_speed in a fresh process whose peak RSS is its own,
    not this (larger) test process's high-water mark."""
    from llmpress.eval.speed import BenchSettings, measure_speed_isolated
    ballast = np.ones(600 * 2**20 // 8)  # this process passes 600 MiB
    speed = measure_speed_isolated(str(default_model_path), None, BenchSettings(8, 4, 1))
    print(f"\nspeed: pp8 {speed['prompt_tok_s']:.1f} tok/s, tg4 {speed['gen_tok_s']:.1f} "
          f"tok/s, peak RSS {speed['peak_rss_bytes'] / 2**20:.0f} MiB")
    assert speed["gen_tok_s"] > 0 and speed["prompt_tok_s"] > 0
    assert 50 * 2**20 < speed["peak_rss_bytes"] < ballast.nbytes


# --- bad input ----------------------------------------------------------------------------
def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_too_short_text_is_a_clear_error(default_model_path, workdir, capsys):
    short = workdir / "short.txt"
    short.write_bytes(b"Only a few words here.\r\n")
    assert cli_main(["eval", str(default_model_path), "--text", str(short)]) == 1
    assert "fewer than one window" in _error_line(capsys)
    empty = workdir / "empty.txt"
    empty.write_bytes(b"")
    assert cli_main(["eval", str(default_model_path), "--text", str(empty), "--ctx", "64"]) == 1
    assert "only 0 tokens" in _error_line(capsys)


def test_missing_files_are_clear_errors(default_model_path, text_path, workdir, capsys):
    assert cli_main(["eval", str(workdir / "nope.gguf"), "--text", str(text_path)]) == 1
    assert "nope.gguf" in _error_line(capsys)
    assert cli_main(["eval", str(default_model_path), "--text", str(workdir / "no.txt")]) == 1
    assert "no such text file" in _error_line(capsys)
    assert cli_main(["eval", str(default_model_path),
                     "--base-logits", str(workdir / "no.safetensors")]) == 1
    assert "no such base" in _error_line(capsys)
    assert cli_main(["eval", str(default_model_path)]) == 1
    assert "--text" in _error_line(capsys)


def test_base_with_another_vocabulary_is_a_clear_error(default_model_path, workdir, capsys):
    vocab = 1000
    lp = torch.log_softmax(torch.randn(255, vocab, dtype=torch.float64), -1)
    rows = K.compress_log_probs(lp, torch.zeros(255, dtype=torch.int64))
    other = K.BaseLogProbs(np.zeros(512, np.int32), 512, 1, vocab, None, rows, "other.gguf")
    K.save_base(other, workdir / "other-vocab.safetensors")
    assert cli_main(["eval", str(default_model_path),
                     "--base-logits", str(workdir / "other-vocab.safetensors")]) == 1
    assert "vocabulary of 1000 tokens" in _error_line(capsys)


def test_bench_at_depth(default_model_path, capsys):
    """`bench -d N` (llama-bench's depth): each test starts from a context of N tokens,
    filled once; every run leaves the cache at N again."""
    from llmpress.api import load
    from llmpress.eval.speed import filled_cache, time_generation, time_prompt
    model = load(default_model_path).model
    cache = filled_cache(model, 40, 8)
    assert cache.length == 40
    time_generation(model, 4, seed=0, cache=cache)
    time_prompt(model, 8, seed=0, cache=cache)
    assert cache.length == 40
    assert cli_main(["bench", str(default_model_path), "-p", "8", "-n", "4", "-r", "1",
                     "-d", "40", "--json"]) in (0, None)
    result = json.loads(capsys.readouterr().out)
    assert result["depth"] == 40 and len(result["gen_runs"]) == 1 and result["gen_tok_s"] > 0

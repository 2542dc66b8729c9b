"""Statistics of `llmpress eval` on hand-made distributions with known answers: KL
divergence, perplexity and the standard errors llama-perplexity prints, the windows it
scores, the compact base-log-prob file, and the compare report."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.eval import kld as K
from llmpress.eval import perplexity as P
from llmpress.eval import report as R


def _log_probs(logits) -> torch.Tensor:
    return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)


def _random_log_probs(n: int, vocab: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return _log_probs(sharpness * torch.randn(n, vocab, generator=g, dtype=torch.float64))


# --- KL divergence ------------------------------------------------------------------------
def test_kld_of_identical_distributions_is_zero():
    lp = _random_log_probs(50, 1000, seed=0)
    assert torch.equal(K.kl_divergence(lp, lp), torch.zeros(50, dtype=torch.float64))
    targets = torch.arange(50) % 1000
    stats = K.token_stats(lp, lp, targets)
    s = K.summarize(stats)
    assert s.kld_mean == 0 and s.kld_percentiles["max"] == 0
    assert s.same_top == 1.0 and s.p_diff_rms == 0 and s.ln_ppl_ratio == 0
    assert s.ppl == s.ppl_base


@pytest.mark.slow
def test_kld_of_bernoulli_pairs_matches_closed_form():
    a = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64)
    b = torch.tensor([0.2, 0.5, 0.6, 0.01], dtype=torch.float64)
    base = torch.stack([a, 1 - a], -1).log()
    model = torch.stack([b, 1 - b], -1).log()
    closed = a * torch.log(a / b) + (1 - a) * torch.log((1 - a) / (1 - b))
    torch.testing.assert_close(K.kl_divergence(base, model), closed, rtol=1e-12, atol=1e-15)


def test_kld_with_zero_base_probabilities():
    """Base uniform over half the vocabulary, model uniform over all of it: KL = ln 2 (the
    zero-probability half adds 0 * log 0 = 0, not NaN)."""
    vocab = 64
    base = torch.full((3, vocab), -math.inf, dtype=torch.float64)
    base[:, : vocab // 2] = -math.log(vocab // 2)
    model = torch.full((3, vocab), -math.log(vocab), dtype=torch.float64)
    torch.testing.assert_close(K.kl_divergence(base, model),
                               torch.full((3,), math.log(2), dtype=torch.float64))


def test_kld_of_shifted_gaussians_matches_closed_form():
    """Discretized N(0, 1) and N(mu, 1) on a fine grid: KL = mu^2 / 2."""
    x = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    mus = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    base = _log_probs(-0.5 * x[None, :] ** 2 + 0 * mus[:, None])
    model = _log_probs(-0.5 * (x[None, :] - mus[:, None]) ** 2)
    torch.testing.assert_close(K.kl_divergence(base, model), mus ** 2 / 2, rtol=1e-6, atol=1e-12)


def test_token_stats_p_diff_and_top1():
    base = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64).log()
    model = torch.tensor([[0.5, 0.4, 0.1], [0.6, 0.3, 0.1]], dtype=torch.float64).log()
    stats = K.token_stats(base, model, torch.tensor([1, 2]))
    np.testing.assert_allclose(stats.p_diff, [0.4 - 0.2, 0.1 - 0.6])
    np.testing.assert_allclose(stats.nll, [-math.log(0.4), -math.log(0.1)])
    np.testing.assert_allclose(stats.nll_base, [-math.log(0.2), -math.log(0.6)])
    assert stats.same_top.tolist() == [True, False]


# --- perplexity and its errors ------------------------------------------------------------
@pytest.mark.parametrize("vocab", [2, 7, 49152])
def test_perplexity_of_uniform_model_is_vocabulary_size(vocab):
    lp = _log_probs(torch.zeros(20, vocab))
    nll = P.token_nll(lp, torch.arange(20) % vocab).numpy()
    est = P.perplexity_with_error(nll)
    assert est.ppl == pytest.approx(vocab, rel=1e-12)
    assert est.error < 1e-6 * vocab and est.count == 20  # E[x^2] - E[x]^2: rounding only


def test_perplexity_error_matches_direct_computation():
    nll = np.random.default_rng(1).gamma(2.0, 1.5, size=1000)
    est = P.perplexity_with_error(nll)
    ppl = math.exp(nll.mean())
    assert est.ppl == pytest.approx(ppl, rel=1e-12)
    # llama.cpp's sqrt((E[x^2] - E[x]^2) / (N - 1)) is the sample std / sqrt(N)
    assert est.error == pytest.approx(ppl * nll.std(ddof=1) / math.sqrt(nll.size), rel=1e-9)


def test_mean_and_error_and_covariance_match_numpy():
    rng = np.random.default_rng(2)
    a = rng.normal(3, 1, 500)
    b = 0.8 * a + rng.normal(0, 0.3, 500)
    mean, error = K.mean_and_error(a)
    assert mean == pytest.approx(a.mean(), rel=1e-12)
    assert error == pytest.approx(a.std(ddof=1) / math.sqrt(a.size), rel=1e-9)
    assert K.covariance_of_means(a, b) == pytest.approx(np.cov(a, b)[0, 1] / a.size, rel=1e-9)
    assert K.mean_and_error(a[:10]) == (pytest.approx(a[:10].mean()), 0.0)  # llama.cpp: n > 10


def test_summary_errors_match_direct_computation():
    rng = np.random.default_rng(3)
    n = 2000
    nll_base = rng.gamma(2.0, 1.5, n)
    nll = nll_base + rng.normal(0.05, 0.2, n)
    kld = rng.exponential(0.05, n)
    p_diff = rng.normal(-0.01, 0.05, n)
    same = rng.random(n) < 0.9
    s = K.summarize(K.TokenStats(nll, nll_base, kld, p_diff, same))
    d = nll - nll_base  # var(mean(a) - mean(b)) = var(a - b) / n
    assert s.ln_ppl_ratio == pytest.approx(d.mean(), rel=1e-9)
    assert s.ln_ppl_ratio_error == pytest.approx(d.std(ddof=1) / math.sqrt(n), rel=1e-6)
    assert s.ppl_ratio == pytest.approx(math.exp(nll.mean()) / math.exp(nll_base.mean()))
    assert s.ln_ppl_correlation == pytest.approx(np.corrcoef(nll, nll_base)[0, 1], rel=1e-6)
    assert s.kld_mean == pytest.approx(kld.mean()) and s.kld_error == pytest.approx(
        kld.std(ddof=1) / math.sqrt(n), rel=1e-9)
    assert s.kld_percentiles["median"] == pytest.approx(np.median(kld), rel=1e-12)
    for name, fraction in (("99.9", 0.999), ("99", 0.99), ("95", 0.95), ("90", 0.9)):
        assert s.kld_percentiles[name] == pytest.approx(np.quantile(kld, fraction), rel=1e-12)
    assert s.kld_percentiles["max"] == kld.max() and s.kld_percentiles["min"] == kld.min()
    assert s.p_diff_percentiles["75"] == pytest.approx(np.quantile(p_diff, 0.75), rel=1e-12)
    assert s.p_diff_rms == pytest.approx(math.sqrt((p_diff ** 2).mean()), rel=1e-12)
    assert s.same_top == pytest.approx(same.mean())
    assert s.same_top_error == pytest.approx(math.sqrt(same.mean() * (1 - same.mean()) / (n - 1)))


# --- windows ------------------------------------------------------------------------------
def test_window_plan_counts_like_llama_perplexity():
    plan = P.plan_windows(n_tokens=5000, n_ctx=512)
    assert (plan.n_windows, plan.first, plan.scored_per_window) == (9, 256, 255)
    assert plan.n_scored == 9 * 255  # count += n_ctx - first - 1 per chunk
    assert P.plan_windows(5000, 512, max_windows=4).n_windows == 4
    assert P.plan_windows(5000, 512, max_windows=40).n_windows == 9
    assert P.plan_windows(7, 7).scored_per_window == 7 - 1 - 3


@pytest.mark.parametrize("n_tokens, n_ctx, chunks", [(0, 512, None), (511, 512, None),
                                                      (100, 2, None), (1000, 512, 0)])
def test_window_plan_bad_input(n_tokens, n_ctx, chunks):
    with pytest.raises(LlmpressError):
        P.plan_windows(n_tokens, n_ctx, chunks)


def test_window_batch_puts_bos_first_and_scores_second_half():
    tokens = torch.arange(100, 140)
    plan = P.WindowPlan(n_ctx=8, n_windows=5)
    windows = P.window_batch(tokens, plan, range(1, 3), bos_id=1)
    assert windows.tolist() == [[1, 109, 110, 111, 112, 113, 114, 115],
                                [1, 117, 118, 119, 120, 121, 122, 123]]
    assert tokens[8] == 108  # the text itself is left as it was
    assert P.window_batch(tokens, plan, range(0, 1), None).tolist() == [list(range(100, 108))]
    assert P.scored_targets(windows, plan).tolist() == [[113, 114, 115], [121, 122, 123]]
    logits = torch.arange(2 * 8 * 5, dtype=torch.float32).reshape(2, 8, 5)
    assert P.scored_log_probs(logits, plan).shape == (2, 3, 5)  # positions 4, 5, 6


class _CountingModel(torch.nn.Module):
    """Predicts token t+1 after token t with probability 0.9 (uniform rest): NLL known."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.device = torch.device("cpu")
        self.cfg = type("cfg", (), {"vocab_size": vocab})
        self.calls = []

    def new_cache(self, max_tokens: int, batch: int = 1):
        return None

    def forward(self, tokens, cache):
        self.calls.append(tokens.clone())
        rest = math.log(0.1 / (self.vocab - 1))
        logits = torch.full((*tokens.shape, self.vocab), rest)
        logits.scatter_(-1, ((tokens + 1) % self.vocab)[..., None], math.log(0.9))
        return logits


class _StubLM:
    def __init__(self, vocab: int, bos: int | None):
        self.model = _CountingModel(vocab)
        self.tokenizer = type("tok", (), {"bos_id": bos, "add_bos": bos is not None})
        self.source = type("src", (), {"path": "stub.gguf"})
        self.mode = "exact"


def _expected_nll(tokens: list[int], n_ctx: int, n_windows: int, vocab: int,
                  bos: int | None) -> list[float]:
    """llama-perplexity's loop written out plainly for the counting model."""
    out = []
    for w in range(n_windows):
        window = tokens[w * n_ctx:(w + 1) * n_ctx]
        inputs = ([bos] + window[1:]) if bos is not None else window
        for pos in range(n_ctx // 2, n_ctx - 1):
            hit = (inputs[pos] + 1) % vocab == window[pos + 1]
            out.append(-math.log(0.9 if hit else 0.1 / (vocab - 1)))
    return out


@pytest.mark.parametrize("bos", [None, 0])
def test_evaluate_perplexity_scores_the_right_tokens(bos):
    vocab, n_ctx = 11, 16
    rng = np.random.default_rng(4)
    tokens = [int(t) for t in rng.integers(1, vocab, 16 * 9 + 5)]
    for i in range(0, len(tokens) - 1, 3):  # some runs the model predicts right
        tokens[i + 1] = (tokens[i] + 1) % vocab
    lm = _StubLM(vocab, bos)
    plan = P.plan_windows(len(tokens), n_ctx, 7)
    seen = []
    result = P.evaluate_perplexity(lm, tokens, plan, lambda *a: seen.append(a))
    expected = _expected_nll(tokens, n_ctx, 7, vocab, bos)
    np.testing.assert_allclose(result.nll, expected, rtol=1e-6)
    assert result.estimate.ppl == pytest.approx(math.exp(np.mean(expected)), rel=1e-6)
    assert [s[:2] for s in seen] == [(i, 7) for i in range(1, 8)]
    assert result.window_ppl[-1] == pytest.approx(result.estimate.ppl)
    # 2048 tokens per forward pass, as llama.cpp's n_batch: all 7 windows of 16 in one call
    assert len(lm.model.calls) == 1 and lm.model.calls[0].shape == (7, 16)
    if bos is not None:
        assert (lm.model.calls[0][:, 0] == bos).all()


def test_check_vocabulary_mismatch_is_a_clear_error():
    with pytest.raises(LlmpressError, match="vocabulary of 100 tokens"):
        P.check_vocabulary(_StubLM(11, None), 100, "the base")


def test_read_text_errors(tmp_path):
    with pytest.raises(LlmpressError, match="no such text file"):
        P.read_text(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(LlmpressError, match="not UTF-8"):
        P.read_text(bad)
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"a\r\nb\r\n")
    assert P.read_text(crlf) == "a\r\nb\r\n"


class _CharTokenizer:
    """One token per character, `shift` added to every id: two of them with different
    shifts tokenize a text differently."""

    def __init__(self, vocab: int, shift: int = 0):
        self.vocab, self.shift, self.bos_id, self.add_bos = vocab, shift, None, False

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        return [(ord(c) + self.shift) % self.vocab for c in text]


@pytest.mark.parametrize("stored", [False, True], ids=["base-model", "base-file"])
def test_kld_on_text_needs_one_tokenizer(tmp_path, stored):
    """The one KLD entry (eval, compare, prune): same tokenizer, KLD 0 for the same model;
    a candidate that tokenizes the text differently is one clear error before any model
    runs, whether the base is a model or its stored log-probs."""
    vocab = 11
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(97 + i % 7) for i in range(16 * 4)))
    base, same, other = (_StubLM(vocab, None) for _ in range(3))
    base.tokenizer, same.tokenizer = _CharTokenizer(vocab), _CharTokenizer(vocab)
    other.tokenizer = _CharTokenizer(vocab, shift=1)
    if stored:
        tokens, plan = P.text_windows(base.tokenizer, text, 16)
        base, _ = K.record_base(base, tokens, plan)
    assert K.kld_on_text(same, base, text, 16).summary.kld_mean == pytest.approx(0, abs=1e-6)
    with pytest.raises(LlmpressError, match="tokenize the text differently .first at token 0"):
        K.kld_on_text(other, base, text, 16)
    assert other.model.calls == []


# --- compact base log-probs ---------------------------------------------------------------
def test_compact_round_trip_within_stated_error(tmp_path):
    vocab, n = 3000, 40
    lp = _random_log_probs(n, vocab, seed=5)
    targets = torch.arange(n) * 71 % vocab
    c = K.compress_log_probs(lp, targets, top_k=64, tail_samples=32)
    # top k: the right ids in falling order, values within half a uint16 step
    values, ids = torch.sort(lp, dim=-1, descending=True)
    assert np.array_equal(c.top_ids, ids[:, :64].numpy())
    decoded = K.dequantize_uint16(c.top_codes, c.top_scale, c.top_offset)
    top_step = torch.from_numpy(c.top_scale).max()
    assert (decoded - values[:, :64]).abs().max() <= top_step / 2 + 1e-12
    np.testing.assert_allclose(c.tail_mass, (1 - values[:, :64].exp().sum(-1)).numpy(), rtol=1e-9)
    np.testing.assert_array_equal(c.target_log_prob, lp.gather(-1, targets[:, None])[:, 0].numpy())
    # tail samples are tail tokens and carry their own log-probs
    assert not (c.tail_ids[:, :, None] == c.top_ids[:, None, :]).any()
    tail_decoded = K.dequantize_uint16(c.tail_codes, c.tail_scale, c.tail_offset)
    tail_true = lp.gather(-1, torch.from_numpy(c.tail_ids.astype(np.int64)))
    tail_step = torch.from_numpy(c.tail_scale).max()
    assert (tail_decoded - tail_true).abs().max() <= tail_step / 2 + 1e-12
    # the file: same arrays back, stated size
    base = K.BaseLogProbs(np.arange(3 * 16, dtype=np.int32) % vocab, n_ctx=16, n_windows=3,
                          n_vocab=vocab, bos_id=None, rows=c.rows(0, 21), source="x")
    path = tmp_path / "base.safetensors"
    size = K.save_base(base, path)
    assert size == path.stat().st_size and size < base.n_bytes + 4096
    back = K.load_base(path)
    assert (back.n_ctx, back.n_windows, back.n_vocab, back.bos_id) == (16, 3, vocab, None)
    for f in K.CompactLogProbs.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(back.rows, f), getattr(base.rows, f))
    np.testing.assert_array_equal(back.tokens, base.tokens)


def test_compact_kld_of_identical_model_is_zero():
    lp = _random_log_probs(30, 5000, seed=6)
    c = K.compress_log_probs(lp, torch.zeros(30, dtype=torch.int64))
    kld = K.compact_kl_divergence(c, lp)
    assert kld.abs().max() < 1e-8  # rounding enters to second order only


def test_compact_kld_exact_when_the_tail_is_only_rescaled():
    """Model = base with its top-k log-probs changed and the tail scaled to match: the
    divergence inside the tail is 0, so the compact form is exact up to rounding."""
    lp = _random_log_probs(30, 4000, seed=7)
    k = 32
    top = torch.topk(lp, k, dim=-1).indices
    g = torch.Generator().manual_seed(8)
    logits = lp.clone()
    logits.scatter_add_(-1, top, 0.5 * torch.randn(30, k, generator=g, dtype=torch.float64))
    model = _log_probs(logits)
    c = K.compress_log_probs(lp, torch.zeros(30, dtype=torch.int64), top_k=k, tail_samples=16)
    torch.testing.assert_close(K.compact_kl_divergence(c, model), K.kl_divergence(lp, model),
                               rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_compact_kld_close_to_exact_on_broad_distributions():
    """Heavy tails (30% of the mass outside the top k): the tail estimate keeps the mean
    within 1% where top-k plus rest mass alone would read far lower."""
    n, vocab = 400, 8000
    base = _random_log_probs(n, vocab, seed=9, sharpness=1.5)
    g = torch.Generator().manual_seed(10)
    model = _log_probs(base + 0.3 * torch.randn(n, vocab, generator=g, dtype=torch.float64))
    c = K.compress_log_probs(base, torch.zeros(n, dtype=torch.int64), top_k=64, tail_samples=64)
    assert c.tail_mass.mean() > 0.3
    exact = K.kl_divergence(base, model)
    approx = K.compact_kl_divergence(c, model)
    assert approx.mean().item() == pytest.approx(exact.mean().item(), rel=0.01)
    no_tail = K.compress_log_probs(base, torch.zeros(n, dtype=torch.int64), top_k=64,
                                   tail_samples=0)
    assert K.compact_kl_divergence(no_tail, model).mean() < 0.8 * exact.mean()


def test_compact_stats_agree_with_full_stats_where_exact():
    lp = _random_log_probs(60, 2000, seed=11)
    model = _random_log_probs(60, 2000, seed=12)
    targets = torch.arange(60) * 13 % 2000
    c = K.compress_log_probs(lp, targets)
    full, compact = K.token_stats(lp, model, targets), K.compact_token_stats(c, model, targets)
    for name in ("nll", "nll_base", "p_diff", "same_top"):
        np.testing.assert_array_equal(getattr(compact, name), getattr(full, name))


def test_compression_is_deterministic():
    lp = _random_log_probs(20, 3000, seed=13)
    a = K.compress_log_probs(lp, torch.zeros(20, dtype=torch.int64))
    b = K.compress_log_probs(lp.clone(), torch.zeros(20, dtype=torch.int64))
    for f in K.CompactLogProbs.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_top1_ties_take_the_lowest_id_like_argmax():
    lp = _log_probs(torch.zeros(4, 300))  # all tied
    c = K.compress_log_probs(lp, torch.zeros(4, dtype=torch.int64), top_k=10, tail_samples=4)
    assert c.top_ids[:, 0].tolist() == [0, 0, 0, 0] == lp.argmax(-1).tolist()


def test_base_file_errors(tmp_path):
    with pytest.raises(LlmpressError, match="no such base"):
        K.load_base(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(LlmpressError, match="unreadable|not a base"):
        K.load_base(junk)
    from safetensors.numpy import save_file
    other = tmp_path / "other.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(other))
    with pytest.raises(LlmpressError, match="not a base log-prob file"):
        K.load_base(other)
    lp = _random_log_probs(7, 500, seed=14)
    rows = K.compress_log_probs(lp, torch.zeros(7, dtype=torch.int64), top_k=8, tail_samples=8)
    bad = K.BaseLogProbs(np.zeros(32, np.int32), 16, 2, 500, 1, rows)  # 7 rows, 2 windows need 14
    K.save_base(bad, tmp_path / "bad.safetensors")
    with pytest.raises(LlmpressError, match="damaged"):
        K.load_base(tmp_path / "bad.safetensors")


# --- report -------------------------------------------------------------------------------
def _row(label, size, kld, base=False, ppl=10.0):
    return R.ModelRow(label, f"/m/{label}.gguf", size, size * 8 / 1e6, ppl, 0.1, ppl - 10.0, kld,
                      kld / 10, kld * 5, 1 - kld, is_base=base, gen_tok_s=50.0,
                      peak_rss_bytes=300 * 2 ** 20)


def test_pareto_front_by_hand():
    sizes = [100, 80, 60, 70, 50, 90]
    klds = [0.0, 0.01, 0.05, 0.06, 0.2, 0.02]
    #        front  front  front  (60 smaller & better)  front  (80 better & smaller)
    assert R.pareto_front(sizes, klds) == [True, True, True, False, True, False]
    assert R.pareto_front([1, 1], [0.5, 0.5]) == [True, True]  # equal points dominate nothing


def test_recommend_smallest_within_budget():
    rows = [_row("F32", 500, 0.0, base=True), _row("Q8_0", 140, 0.004), _row("Q6_K", 130, 0.009),
            _row("Q4_K_M", 100, 0.058), _row("Q4_0", 88, 0.29)]
    assert R.recommend(rows, 0.05).label == "Q6_K"
    assert R.recommend(rows, 0.1).label == "Q4_K_M"
    assert R.recommend(rows, 0.001).label == "F32"  # the base itself is within any budget
    assert "Q6_K" in R.recommendation_line(rows, 0.05)
    assert "keep the base F32" in R.recommendation_line(rows, 0.001)
    assert R.recommend(rows[1:], 0.001) is None
    assert "no model" in R.recommendation_line(rows[1:], 0.001)
    # a base smaller than every candidate (a Q4_1 file requantized to bigger types): keep it
    small_base = [_row("Q4_1", 94, 0.0, base=True), _row("Q8_0", 138, 0.001),
                  _row("Q4_K_M", 101, 0.049)]
    assert R.recommend(small_base, 0.05).is_base


def test_the_base_is_a_point_of_the_front():
    """The README's sweep: a Q4_1 base requantized to larger and smaller types. The front
    runs through the base, not only through the smaller files."""
    rows = [_row("Q4_1", 93.8, 0.0, base=True), _row("Q8_0", 138.1, 0.00114),
            _row("Q6_K", 132.0, 0.00489), _row("Q4_K_M", 100.6, 0.0495),
            _row("Q4_0", 87.5, 0.292), _row("Q3_K_M", 89.2, 0.132), _row("Q2_K", 84.1, 0.406)]
    assert [r.label for r in R.front_line(rows)] == ["Q2_K", "Q4_0", "Q3_K_M", "Q4_1"]


def test_without_matplotlib_the_numbers_stay_and_one_line_says_why(tmp_path, monkeypatch, capsys):
    from llmpress.cli import eval as cli_eval

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import fails
    with pytest.raises(LlmpressError, match=r"pip install 'llmpress\[plot\]'"):
        R.pyplot()
    rows = [_row("F32", 500 * 2 ** 20, 0.0, base=True), _row("Q8_0", 140 * 2 ** 20, 0.004)]
    settings = {"quality_mode": "exact", "ctx": 512, "windows": 4, "scored_tokens": 1000}
    cli_eval._report(rows, settings, tmp_path, "sweep", 0.05, "t", as_json=False)
    printed = capsys.readouterr()
    assert "Q8_0" in printed.out and "written:" in printed.out and "sweep.png" not in printed.out
    assert printed.err.strip() == "no plot: plots need matplotlib: pip install 'llmpress[plot]'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv", "sweep.json"]
    assert "png" not in json.loads((tmp_path / "sweep.json").read_text())["files"]


@pytest.mark.slow
def test_report_files(tmp_path):
    rows = [_row("F32", 500 * 2 ** 20, 0.0, base=True), _row("Q8_0", 140 * 2 ** 20, 0.004),
            _row("Q4_0", 88 * 2 ** 20, 0.29), _row("Q5_0", 100 * 2 ** 20, 0.3)]
    report = R.report_dict(rows, {"ctx": 512}, 0.05)
    R.write_json(report, tmp_path / "r.json")
    R.write_csv(rows, tmp_path / "r.csv")
    R.plot_size_vs_kld(rows, tmp_path / "r.png", "test", 0.05)
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["recommended"] == "Q8_0"
    assert [m["pareto"] for m in loaded["models"]] == [True, True, True, False]
    with open(tmp_path / "r.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == ["F32", "Q8_0", "Q4_0", "Q5_0"]
    assert float(table[2]["kld_mean"]) == 0.29 and table[3]["pareto"] == "False"
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    R.comparison_table(rows, "t")  # builds without error


# --- the CUDA path -----------------------------------------------------------------------------
class _ModelLM:
    """What the eval functions use of a LanguageModel, around a bare LlamaModel."""

    def __init__(self, model, path: str):
        self.model, self.mode = model, "exact"
        self.tokenizer = type("tok", (), {"bos_id": 1, "add_bos": True})
        self.source = type("src", (), {"path": path})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_eval_on_cuda_equals_cpu(tmp_path):
    """Perplexity, the compact base and KLD run on the GPU give the CPU's numbers (tiny
    random Llama, 4 windows of 64)."""
    from tiny import save_tiny_hf_model

    from llmpress.io.hf import load_hf_dir
    from llmpress.models.llama import LlamaModel

    src = load_hf_dir(save_tiny_hf_model(tmp_path / "tiny"))
    tokens = torch.randint(2, 512, (4 * 64 + 7,), generator=torch.Generator().manual_seed(0))
    plan = P.plan_windows(len(tokens), 64)
    cpu = _ModelLM(LlamaModel(src, "exact", "cpu"), "tiny-cpu")
    gpu = _ModelLM(LlamaModel(src, "exact", "cuda"), "tiny-gpu")
    ppl_cpu, ppl_gpu = (P.evaluate_perplexity(lm, tokens, plan) for lm in (cpu, gpu))
    np.testing.assert_allclose(ppl_gpu.nll, ppl_cpu.nll, atol=1e-4)
    base_cpu, _ = K.record_base(cpu, tokens, plan)
    base_gpu, nll_gpu = K.record_base(gpu, tokens, plan)
    np.testing.assert_allclose(nll_gpu, ppl_cpu.nll, atol=1e-4)
    assert (base_gpu.rows.top_ids[:, 0] == base_cpu.rows.top_ids[:, 0]).mean() > 0.99
    against_cpu_base = K.kld_against_base(gpu, base_cpu).summary
    both_live = K.kld_against_model(gpu, cpu, tokens, plan).summary
    assert against_cpu_base.kld_mean < 1e-6 and both_live.kld_mean < 1e-6
    assert both_live.same_top > 0.99 and both_live.ppl == pytest.approx(ppl_cpu.estimate.ppl,
                                                                        rel=1e-4)

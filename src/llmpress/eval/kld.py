"""KL divergence of a model's next-token distributions from a base model's, with the
statistics llama-perplexity --kl-divergence prints (tools/perplexity/perplexity.cpp,
kl_divergence()): mean KLD, its percentiles, "same top p", Δp of the correct token, and
PPL(Q), PPL(base), their ratio and ln ratio with standard errors.

Per token t with base log-probs b and model log-probs q over the vocabulary:
    KLD_t = sum_i exp(b_i) * (b_i - q_i)        (KL(base || model), in nats)
    Δp_t  = exp(q[target]) - exp(b[target])
    same top: argmax q == argmax b               (first index on ties, like the C loop)

Base log-probs are either computed live from a base model (exact), or read from a compact
file (`--save-base` / `--base-logits`). llama.cpp's file keeps every log-prob as uint16,
2 bytes x vocabulary per token: 1.97 GB for 20k tokens of a 49k vocabulary. Ours keeps,
per scored token:
  - the top_k most likely tokens: ids and log-probs (uint16 codes, per-token scale/offset),
  - the tail's mass R (everything outside the top k), exactly (float64),
  - tail_samples tokens drawn from the tail by systematic sampling in vocabulary order
    (deterministic: the token at the midpoint of each of tail_samples equal slices of R),
    with their log-probs (uint16, own scale/offset),
  - the log-prob of the correct token (float64), so PPL(base) and Δp are exact.
That is 4 * (top_k + tail_samples) + 48 bytes per scored token (2.1 kB with the defaults,
42 MB for 20k tokens), plus the evaluated token ids. The KLD is then
    sum_top p_i (b_i - q_i) + R (log R - log Q_R) + R * E_tail[r - 1 - log r],
where Q_R is the model's mass outside the base's top k (computed exactly from the model)
and r = (q_s / Q_R) / (p_s / R) at the samples: the first two terms are the KLD between
the two distributions coarsened to (top k tokens, tail), and the last is the divergence
inside the tail, estimated with the non-negative low-variance estimator E_p[r - 1 - log r]
(E_p[r] = 1). The top-k terms are exact up to the uint16 step; the tail term is an
estimate whose error shrinks with the mean over many tokens. Measured on SmolLM2-135M
(510 WikiText tokens, F32 base, top_k = tail_samples = 256): mean KLD within 0.1% of the
exact value for a Q8_0 (KLD 0.0012) and a Q4_0 (KLD 0.39) file; single tokens within
3e-4 and 0.17 (so high percentiles of a few hundred tokens move by a few %). Top-k plus
the rest mass alone (no tail estimate) reads 12% low there. On the benchmark (40 windows
of 512, 10,200 tokens, Q4_K_M against F32; benchmarks/bench_eval.py) the file is 20.5 MiB
(llama.cpp's: 956 MiB) and reads mean KLD 0.053635 against 0.053633 exact, p99 0.3670
against 0.3641. `eval --base MODEL` runs both models and is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from llmpress.errors import LlmpressError
from llmpress.io.files import write_bytes_atomically
from llmpress.eval.perplexity import (
    Progress,
    WindowPlan,
    check_same_tokens,
    check_vocabulary,
    iter_window_log_probs,
    model_bos,
    read_text,
    text_windows,
    token_nll,
    tokenize_for_perplexity,
)

DEFAULT_TOP_K = 256
DEFAULT_TAIL_SAMPLES = 256
CODE_MAX = 65535  # uint16 codes, as llama.cpp's log_softmax(..., uint16_t * log_prob, ...)
# Log-probs are stored no lower than this (p < 4e-44: nothing any sum can notice), so every
# stored value is finite and a code's range stays bounded.
LOG_PROB_FLOOR = -100.0
FILE_FORMAT = "llmpress-base-logprobs"
FILE_VERSION = "1"
PERCENTILES = (("max", 1.0), ("99.9", 0.999), ("99", 0.99), ("95", 0.95), ("90", 0.9),
               ("median", 0.5), ("10", 0.1), ("5", 0.05), ("1", 0.01), ("0.1", 0.001),
               ("min", 0.0))
P_DIFF_PERCENTILES = PERCENTILES[:5] + (("75", 0.75),) + PERCENTILES[5:6] + (("25", 0.25),) \
    + PERCENTILES[6:]


# --- per-token statistics -------------------------------------------------------------------
@dataclass(frozen=True)
class TokenStats:
    """One entry per scored token (float64 arrays; same_top is bool)."""

    nll: np.ndarray  # -log q[target]
    nll_base: np.ndarray  # -log p_base[target]
    kld: np.ndarray
    p_diff: np.ndarray  # q[target] - p_base[target] as probabilities
    same_top: np.ndarray

    @staticmethod
    def concat(parts: list[TokenStats]) -> TokenStats:
        return TokenStats(*(np.concatenate([getattr(p, f) for p in parts])
                            for f in ("nll", "nll_base", "kld", "p_diff", "same_top")))


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def kl_divergence(base_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """(N,) KL(base || model) in nats from (N, vocab) log-probs; 0 * log 0 counts as 0."""
    p = base_log_probs.exp()
    terms = torch.where(p > 0, p * (base_log_probs - log_probs), torch.zeros_like(p))
    return terms.sum(-1)


def token_stats(base_log_probs: torch.Tensor, log_probs: torch.Tensor,
                targets: torch.Tensor) -> TokenStats:
    """Statistics of (N, vocab) model log-probs against full base log-probs."""
    nll = token_nll(log_probs, targets)
    nll_base = token_nll(base_log_probs, targets)
    return TokenStats(
        nll=_numpy(nll), nll_base=_numpy(nll_base),
        kld=_numpy(kl_divergence(base_log_probs, log_probs)),
        p_diff=_numpy(torch.exp(-nll) - torch.exp(-nll_base)),
        same_top=_numpy(log_probs.argmax(-1) == base_log_probs.argmax(-1)),
    )


# --- compact base log-probs -------------------------------------------------------------------
@dataclass(frozen=True)
class CompactLogProbs:
    """Base log-probs of N scored tokens, compressed (see the module docstring)."""

    top_ids: np.ndarray  # (N, k) uint16 (int32 for vocabularies over 65536), most likely first
    top_codes: np.ndarray  # (N, k) uint16
    top_scale: np.ndarray  # (N,) float64: log-prob = code * scale + offset
    top_offset: np.ndarray
    tail_ids: np.ndarray  # (N, m)
    tail_codes: np.ndarray  # (N, m) uint16
    tail_scale: np.ndarray
    tail_offset: np.ndarray
    tail_mass: np.ndarray  # (N,) float64: base probability outside the top k
    target_log_prob: np.ndarray  # (N,) float64: base log-prob of the correct token

    def __len__(self) -> int:
        return len(self.target_log_prob)

    def rows(self, start: int, stop: int) -> CompactLogProbs:
        return CompactLogProbs(*(getattr(self, f)[start:stop] for f in _COMPACT_FIELDS))

    @property
    def n_bytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in _COMPACT_FIELDS)


_COMPACT_FIELDS = tuple(CompactLogProbs.__dataclass_fields__)


def quantize_uint16(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row affine uint16 codes of finite (N, n) values: (codes, scale, offset) with
    values ~= codes * scale + offset, error at most scale / 2 (llama.cpp's min/scale idea)."""
    offset = values.min(-1).values
    scale = (values.max(-1).values - offset) / CODE_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((values - offset[:, None]) / safe[:, None]).clamp(0, CODE_MAX)
    return codes.to(torch.int32), scale, offset


def dequantize_uint16(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(codes.astype(np.float64)) * torch.from_numpy(scale)[:, None]
            + torch.from_numpy(offset)[:, None])


def _id_dtype(n_vocab: int):
    return np.uint16 if n_vocab <= 65536 else np.int32


def _top_k_by_id(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values per row, falling, ties in increasing id (so [:, 0] is argmax)."""
    values, ids = torch.topk(log_probs, k, dim=-1)
    ids, by_id = ids.sort(dim=-1)
    values = values.gather(-1, by_id)
    values, by_value = values.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, by_value)
    # topk may pick any of several tokens tied at the maximum; put argmax's (the lowest id)
    # first, swapping it for an equal one where topk left it out.
    first = log_probs.argmax(-1)
    missing = ~(ids == first[:, None]).any(-1)
    ids[:, 0] = torch.where(missing, first, ids[:, 0])
    return values, ids


def compress_log_probs(log_probs: torch.Tensor, targets: torch.Tensor,
                       top_k: int = DEFAULT_TOP_K,
                       tail_samples: int = DEFAULT_TAIL_SAMPLES) -> CompactLogProbs:
    """Compact form of (N, vocab) float64 base log-probs (see the module docstring)."""
    n_vocab = log_probs.shape[-1]
    top_k = min(top_k, n_vocab)
    target_log_prob = -token_nll(log_probs, targets)  # exact, before the floor
    log_probs = log_probs.clamp_min(LOG_PROB_FLOOR)
    top_values, top_ids = _top_k_by_id(log_probs, top_k)
    n, device = log_probs.shape[0], log_probs.device
    tail_mass = torch.zeros(n, dtype=torch.float64, device=device)
    tail_ids = torch.zeros((n, 0), dtype=torch.int64, device=device)
    tail_values = torch.zeros((n, 0), dtype=torch.float64, device=device)
    if top_k < n_vocab:
        cdf = log_probs.exp().scatter(-1, top_ids, 0.0).cumsum(-1)  # (N, vocab), top k left out
        tail_mass = cdf[:, -1]
        if tail_samples:
            # Systematic sampling of the tail in vocabulary order: the token holding the
            # middle of each of tail_samples equal slices of the tail's mass (no sort, no RNG).
            slices = torch.arange(tail_samples, dtype=torch.float64, device=device) + 0.5
            u = slices[None, :] / tail_samples * tail_mass[:, None]
            tail_ids = torch.searchsorted(cdf, u).clamp_max(n_vocab - 1)
            tail_values = log_probs.gather(-1, tail_ids)
    top_codes, top_scale, top_offset = quantize_uint16(top_values)
    if tail_values.shape[1]:
        tail_codes, tail_scale, tail_offset = quantize_uint16(tail_values)
    else:
        tail_codes = torch.zeros((n, 0), dtype=torch.int32)
        tail_scale = tail_offset = torch.zeros(n, dtype=torch.float64)
    ids = _id_dtype(n_vocab)
    return CompactLogProbs(
        top_ids=_numpy(top_ids).astype(ids), top_codes=_numpy(top_codes).astype(np.uint16),
        top_scale=_numpy(top_scale).astype(np.float64),
        top_offset=_numpy(top_offset).astype(np.float64),
        tail_ids=_numpy(tail_ids).astype(ids), tail_codes=_numpy(tail_codes).astype(np.uint16),
        tail_scale=_numpy(tail_scale).astype(np.float64),
        tail_offset=_numpy(tail_offset).astype(np.float64),
        tail_mass=_numpy(tail_mass).astype(np.float64),
        target_log_prob=_numpy(target_log_prob).astype(np.float64),
    )


def compact_kl_divergence(base: CompactLogProbs, log_probs: torch.Tensor) -> torch.Tensor:
    """(N,) KL(base || model) estimated from compact base log-probs (module docstring)."""
    device = log_probs.device
    top_ids = torch.from_numpy(base.top_ids.astype(np.int64)).to(device)
    tail_mass = torch.from_numpy(base.tail_mass).to(device)
    top_b = dequantize_uint16(base.top_codes, base.top_scale, base.top_offset).to(device)
    # Renormalize the rounded top-k log-probs so that they and R sum to 1 exactly: then the
    # coarsened term is a true KLD (>= 0) and the rounding enters only to second order.
    top_mass = (1 - tail_mass).clamp_min(torch.finfo(torch.float64).tiny)
    top_b = top_b + (top_mass.log() - top_b.logsumexp(-1))[:, None]
    head = (top_b.exp() * (top_b - log_probs.gather(-1, top_ids))).sum(-1)  # b >= floor
    has_tail = tail_mass > 0
    if not has_tail.any():
        return head
    # log Q_R: the model's probability outside the base's top k, from its full log-probs.
    log_q_rest = log_probs.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    log_r_mass = torch.where(has_tail, tail_mass, torch.ones_like(tail_mass)).log()
    tail = tail_mass * (log_r_mass - log_q_rest)
    if base.tail_ids.shape[1]:
        tail_b = dequantize_uint16(base.tail_codes, base.tail_scale, base.tail_offset).to(device)
        tail_ids = torch.from_numpy(base.tail_ids.astype(np.int64)).to(device)
        log_r = (log_probs.gather(-1, tail_ids) - log_q_rest[:, None]) \
            - (tail_b - log_r_mass[:, None])
        tail = tail + tail_mass * (torch.expm1(log_r) - log_r).mean(-1)  # E[r - 1 - log r]
    return head + torch.where(has_tail, tail, torch.zeros_like(head))


def compact_token_stats(base: CompactLogProbs, log_probs: torch.Tensor,
                        targets: torch.Tensor) -> TokenStats:
    """Statistics of (N, vocab) model log-probs against compact base log-probs."""
    nll = token_nll(log_probs, targets)
    nll_base = torch.from_numpy(-base.target_log_prob).to(log_probs.device)
    top1 = torch.from_numpy(base.top_ids[:, 0].astype(np.int64)).to(log_probs.device)
    return TokenStats(
        nll=_numpy(nll), nll_base=_numpy(nll_base),
        kld=_numpy(compact_kl_divergence(base, log_probs)),
        p_diff=_numpy(torch.exp(-nll) - torch.exp(-nll_base)),
        same_top=_numpy(log_probs.argmax(-1) == top1),
    )


# --- summary statistics (kl_divergence() in perplexity.cpp) ---------------------------------
def mean_and_error(values: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: mean and sqrt((E[x^2] - E[x]^2) / (n - 1)),
    the error 0 for 10 values or fewer."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n < 1:
        return 0.0, 0.0
    mean = float(values.sum() / n)
    var = float((values * values).sum() / n - mean * mean)
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def covariance_of_means(a: np.ndarray, b: np.ndarray) -> float:
    """llama.cpp's covariance(): (E[ab] - E[a]E[b]) / (n - 1), 0 below 10 values."""
    n = len(a)
    if n < 10:
        return 0.0
    return float(((a * b).sum() / n - (a.sum() / n) * (b.sum() / n)) / (n - 1))


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation at fraction * (n - 1), as perplexity.cpp's percentile lambda."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, len(sorted_values) - 1)])


@dataclass(frozen=True)
class KldSummary:
    count: int
    ppl: float
    ppl_error: float
    ppl_base: float
    ppl_base_error: float
    ln_ppl_correlation: float
    ln_ppl_ratio: float
    ln_ppl_ratio_error: float
    ppl_ratio: float
    ppl_ratio_error: float
    ppl_diff: float
    ppl_diff_error: float
    kld_mean: float
    kld_error: float
    kld_percentiles: dict[str, float] = field(default_factory=dict)  # "max", "99.9", ...
    p_diff_mean: float = 0.0
    p_diff_error: float = 0.0
    p_diff_percentiles: dict[str, float] = field(default_factory=dict)
    p_diff_rms: float = 0.0
    p_diff_rms_error: float = 0.0
    same_top: float = 0.0  # fraction of tokens whose most likely token agrees
    same_top_error: float = 0.0


def summarize(stats: TokenStats) -> KldSummary:
    """Every statistic of llama-perplexity --kl-divergence's final report, same formulas."""
    n = len(stats.kld)
    if n == 0:
        raise LlmpressError("no tokens were scored")
    log_ppl, log_ppl_err = mean_and_error(stats.nll)
    log_base, log_base_err = mean_and_error(stats.nll_base)
    cov = covariance_of_means(stats.nll, stats.nll_base)
    ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
    ppl_err, ppl_base_err = ppl * log_ppl_err, ppl_base * log_base_err
    ratio = log_ppl - log_base
    ratio_err = math.sqrt(max(0.0, log_ppl_err ** 2 + log_base_err ** 2 - 2 * cov))
    denominator = log_ppl_err * log_base_err
    ppl_cov = ppl * ppl_base * cov
    kld_mean, kld_err = mean_and_error(stats.kld)
    p_mean, p_err = mean_and_error(stats.p_diff)
    mse, mse_err = mean_and_error(stats.p_diff ** 2)
    rms = math.sqrt(mse)
    same = float(stats.same_top.sum()) / n
    kld_sorted, p_sorted = np.sort(stats.kld), np.sort(stats.p_diff)
    return KldSummary(
        count=n, ppl=ppl, ppl_error=ppl_err, ppl_base=ppl_base, ppl_base_error=ppl_base_err,
        ln_ppl_correlation=cov / denominator if denominator > 0 else 0.0,
        ln_ppl_ratio=ratio, ln_ppl_ratio_error=ratio_err,
        ppl_ratio=math.exp(ratio), ppl_ratio_error=math.exp(ratio) * ratio_err,
        ppl_diff=ppl - ppl_base,
        ppl_diff_error=math.sqrt(max(0.0, ppl_err ** 2 + ppl_base_err ** 2 - 2 * ppl_cov)),
        kld_mean=kld_mean, kld_error=kld_err,
        kld_percentiles={name: percentile(kld_sorted, f) for name, f in PERCENTILES},
        p_diff_mean=p_mean, p_diff_error=p_err,
        p_diff_percentiles={name: percentile(p_sorted, f) for name, f in P_DIFF_PERCENTILES},
        p_diff_rms=rms, p_diff_rms_error=0.5 / rms * mse_err if rms > 0 else 0.0,
        same_top=same,
        same_top_error=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
    )


def running_line(stats: TokenStats) -> str:
    """The per-window line of llama-perplexity --kl-divergence, short form."""
    ppl = math.exp(stats.nll.mean())
    return (f"PPL {ppl:.4f}  KLD {stats.kld.mean():.5f}  "
            f"same top {100 * stats.same_top.mean():.2f}%")


# --- the base file ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseLogProbs:
    """A base model's compact log-probs over the windows of a text, and those windows."""

    tokens: np.ndarray  # int32 (n_windows * n_ctx,): the text's tokens (before BOS replacement)
    n_ctx: int
    n_windows: int
    n_vocab: int
    bos_id: int | None  # the BOS the base put at each window start (None: it did not)
    rows: CompactLogProbs  # n_windows * scored_per_window rows, window after window
    source: str = ""  # the base model, for the record
    mode: str = "exact"

    @property
    def plan(self) -> WindowPlan:
        return WindowPlan(self.n_ctx, self.n_windows)

    @property
    def n_bytes(self) -> int:
        return self.tokens.nbytes + self.rows.n_bytes

    def first_windows(self, n: int | None) -> BaseLogProbs:
        """The same base cut to its first n windows (--chunks with a base file)."""
        if n is None or n >= self.n_windows:
            return self
        if n < 1:
            raise LlmpressError(f"--chunks {n}: give at least 1 window")
        per = self.plan.scored_per_window
        return replace(self, n_windows=n, tokens=self.tokens[:n * self.n_ctx],
                       rows=self.rows.rows(0, n * per))


def save_base(base: BaseLogProbs, path: str | Path) -> int:
    """Write a safetensors file atomically (temporary file, fsync, rename); returns its size."""
    from safetensors.numpy import save

    path = Path(path)
    tensors = {"tokens": base.tokens.astype(np.int32)}
    tensors |= {f: np.ascontiguousarray(getattr(base.rows, f)) for f in _COMPACT_FIELDS}
    metadata = {"format": FILE_FORMAT, "version": FILE_VERSION, "n_ctx": str(base.n_ctx),
                "n_windows": str(base.n_windows), "n_vocab": str(base.n_vocab),
                "bos_id": "" if base.bos_id is None else str(base.bos_id),
                "source": base.source, "mode": base.mode}
    data = save(tensors, metadata=metadata)
    write_bytes_atomically(path, data)
    return len(data)


def load_base(path: str | Path) -> BaseLogProbs:
    """Read and check a file written by save_base."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LlmpressError(f"{path}: no such base log-prob file; write one with "
                            "`llmpress eval BASE --text FILE --save-base FILE`")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FILE_FORMAT:
                raise LlmpressError(f"{path}: not a base log-prob file of llmpress")
            if meta.get("version") != FILE_VERSION:
                raise LlmpressError(f"{path}: base file version {meta.get('version')}, this "
                                    f"llmpress reads version {FILE_VERSION}; write it again")
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LlmpressError(f"{path}: unreadable base log-prob file ({exc})") from None
    try:
        n_ctx, n_windows, n_vocab = (int(meta[k]) for k in ("n_ctx", "n_windows", "n_vocab"))
        bos = int(meta["bos_id"]) if meta.get("bos_id") else None
        rows = CompactLogProbs(*(arrays[f] for f in _COMPACT_FIELDS))
        tokens = arrays["tokens"]
    except (KeyError, ValueError) as exc:
        raise LlmpressError(f"{path}: damaged base log-prob file (missing {exc})") from None
    _check_base(path, tokens, n_ctx, n_windows, n_vocab, rows)
    return BaseLogProbs(tokens, n_ctx, n_windows, n_vocab, bos, rows,
                        meta.get("source", ""), meta.get("mode", "exact"))


def _check_base(path: Path, tokens, n_ctx, n_windows, n_vocab, rows: CompactLogProbs) -> None:
    bad = None
    n_rows = n_windows * (n_ctx - 1 - n_ctx // 2) if n_ctx >= 4 and n_windows >= 1 else -1
    if n_rows < 0 or n_vocab < 1 or tokens.shape != (n_ctx * n_windows,):
        bad = "window sizes"
    elif any(getattr(rows, f).shape[:1] != (n_rows,) for f in _COMPACT_FIELDS):
        bad = "row counts"
    elif rows.top_ids.shape != rows.top_codes.shape or rows.tail_ids.shape != rows.tail_codes.shape:
        bad = "shapes"
    elif rows.top_ids.shape[1] < 1:
        bad = "an empty top-k"
    elif any(a.size and (a.min() < 0 or a.max() >= n_vocab)
             for a in (tokens, rows.top_ids, rows.tail_ids)):
        bad = "token ids"
    if bad:
        raise LlmpressError(f"{path}: damaged base log-prob file (inconsistent {bad})")


# --- running models ----------------------------------------------------------------------------
@dataclass(frozen=True)
class KldResult:
    summary: KldSummary
    stats: TokenStats
    plan: WindowPlan


def record_base(lm, tokens: list[int] | torch.Tensor, plan: WindowPlan,
                progress: Progress | None = None, top_k: int = DEFAULT_TOP_K,
                tail_samples: int = DEFAULT_TAIL_SAMPLES) -> tuple[BaseLogProbs, np.ndarray]:
    """Run the base model over the windows once: its compact log-probs, and the NLL of
    every scored token (exact, for its perplexity)."""
    tokens = torch.as_tensor(tokens, dtype=torch.int64)[:plan.n_tokens]
    parts: list[CompactLogProbs] = []
    bos = model_bos(lm)
    for index, log_probs, targets in iter_window_log_probs(lm, tokens, plan, bos):
        parts.append(compress_log_probs(log_probs, targets, top_k, tail_samples))
        if progress:
            nll = -np.concatenate([p.target_log_prob for p in parts])
            progress(index + 1, plan.n_windows, f"PPL {math.exp(nll.mean()):.4f}")
    rows = CompactLogProbs(*(np.concatenate([getattr(p, f) for p in parts])
                             for f in _COMPACT_FIELDS))
    base = BaseLogProbs(tokens.numpy().astype(np.int32), plan.n_ctx, plan.n_windows,
                        lm.model.cfg.vocab_size, bos, rows, str(lm.source.path), lm.mode)
    return base, -rows.target_log_prob


def kld_against_base(lm, base: BaseLogProbs, progress: Progress | None = None) -> KldResult:
    """KLD statistics of `lm` against stored base log-probs, on the base's own tokens."""
    check_vocabulary(lm, base.n_vocab, f"the base log-probs ({base.source or 'file'})")
    plan = base.plan
    per = plan.scored_per_window
    parts: list[TokenStats] = []
    tokens = torch.from_numpy(base.tokens.astype(np.int64))
    for index, log_probs, targets in iter_window_log_probs(lm, tokens, plan, base.bos_id):
        parts.append(compact_token_stats(base.rows.rows(index * per, (index + 1) * per),
                                         log_probs, targets))
        if progress:
            progress(index + 1, plan.n_windows, running_line(TokenStats.concat(parts)))
    stats = TokenStats.concat(parts)
    return KldResult(summarize(stats), stats, plan)


def _paired_log_probs(lm, base_lm, tokens: torch.Tensor, plan: WindowPlan, bos: int | None
                      ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    base_iter = iter_window_log_probs(base_lm, tokens, plan, bos)
    for (index, log_probs, targets), (_, base_log_probs, _) in zip(
            iter_window_log_probs(lm, tokens, plan, bos), base_iter):
        yield index, base_log_probs.to(log_probs.device), log_probs, targets


def kld_against_model(lm, base_lm, tokens: list[int] | torch.Tensor, plan: WindowPlan,
                      progress: Progress | None = None) -> KldResult:
    """Exact KLD statistics of `lm` against `base_lm`, both run over the same windows
    (tokens from the base's tokenizer, BOS as the base adds it)."""
    check_vocabulary(lm, base_lm.model.cfg.vocab_size, f"the base {base_lm.source.path}")
    tokens = torch.as_tensor(tokens, dtype=torch.int64)
    parts: list[TokenStats] = []
    for index, base_lp, log_probs, targets in _paired_log_probs(lm, base_lm, tokens, plan,
                                                                model_bos(base_lm)):
        parts.append(token_stats(base_lp, log_probs, targets))
        if progress:
            progress(index + 1, plan.n_windows, running_line(TokenStats.concat(parts)))
    stats = TokenStats.concat(parts)
    return KldResult(summarize(stats), stats, plan)


def kld_on_text(lm, base, text: str | Path | None, n_ctx: int | None = None,
                max_windows: int | None = None, progress: Progress | None = None) -> KldResult:
    """The one KLD entry point (eval, compare, prune): `lm` against `base`, either a loaded
    base model (both run over the text's windows, cut by the base's tokenizer) or stored
    base log-probs (BaseLogProbs, over its own windows; `text`, when given, checks `lm`'s
    tokenizer against the stored tokens). The vocabularies and the tokenizations must
    agree, else a clear error before any model runs."""
    if isinstance(base, BaseLogProbs):
        check_vocabulary(lm, base.n_vocab, f"the base log-probs ({base.source or 'file'})")
        if text is not None:
            own = tokenize_for_perplexity(lm.tokenizer, read_text(text))
            check_same_tokens(own, base.tokens, base.plan.n_tokens,
                              f"{lm.source.path} and the base log-probs ({base.source or 'file'})")
        return kld_against_base(lm, base, progress)
    check_vocabulary(lm, base.model.cfg.vocab_size, f"the base {base.source.path}")
    if text is None:
        raise LlmpressError("give the evaluation text with --text FILE")
    tokens, plan = text_windows(base.tokenizer, text, n_ctx, max_windows)
    own = tokenize_for_perplexity(lm.tokenizer, read_text(text))
    check_same_tokens(tokens, own, plan.n_tokens, f"{base.source.path} and {lm.source.path}")
    return kld_against_model(lm, base, tokens, plan, progress)

"""Perplexity measured the way llama.cpp's llama-perplexity measures it
(tools/perplexity/perplexity.cpp, perplexity()), so our figures sit beside published ones:

- the whole text is tokenized once, with BOS when the model adds one and special tokens
  read as plain text (common_tokenize(ctx, text, add_special=true, parse_special=false));
- the tokens are cut into non-overlapping windows of n_ctx; when the model adds BOS, each
  window's first token is replaced by BOS (that token is then never seen, as in llama.cpp);
- each window is one forward pass from an empty cache, and only its second half is scored:
  the logits at positions first .. n_ctx-2 (first = n_ctx // 2) predict the tokens at
  first+1 .. n_ctx-1, so n_ctx - 1 - first tokens per window;
- PPL = exp(mean NLL) and its standard error PPL * sqrt((E[nll^2] - E[nll]^2) / (N - 1)).

One deliberate difference: llama-perplexity refuses text shorter than 2 * n_ctx tokens;
we need only one window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from llmpress.errors import LlmpressError

# llama.cpp evaluates n_batch = 2048 tokens per decode call: 4 windows of 512 at once.
TOKENS_PER_FORWARD = 2048

Progress = Callable[[int, int, str], None]  # (windows done, windows in all, running estimate)


@dataclass(frozen=True)
class WindowPlan:
    """Which tokens are evaluated: n_windows windows of n_ctx tokens from the start."""

    n_ctx: int
    n_windows: int

    @property
    def first(self) -> int:
        return self.n_ctx // 2  # perplexity.cpp: const int first = n_ctx/2

    @property
    def scored_per_window(self) -> int:
        return self.n_ctx - 1 - self.first

    @property
    def n_scored(self) -> int:
        return self.n_windows * self.scored_per_window

    @property
    def n_tokens(self) -> int:
        return self.n_windows * self.n_ctx


@dataclass(frozen=True)
class PerplexityEstimate:
    ppl: float
    error: float  # one standard error of the PPL, as llama-perplexity prints after "+/-"
    mean_nll: float
    count: int


@dataclass(frozen=True)
class PerplexityResult:
    estimate: PerplexityEstimate
    plan: WindowPlan
    nll: np.ndarray  # float64 (n_scored,): negative log-likelihood of every scored token
    window_ppl: tuple[float, ...]  # running estimate after each window (llama.cpp's [i]x.xxxx)


# --- text and tokens --------------------------------------------------------------------
def read_text(path: str | Path) -> str:
    """The file's bytes decoded as UTF-8, line endings kept as stored (no CRLF folding)."""
    path = Path(path)
    if not path.is_file():
        raise LlmpressError(f"{path}: no such text file; give --text a UTF-8 text file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LlmpressError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); "
                            "convert it to UTF-8") from None


def tokenize_for_perplexity(tokenizer, text: str) -> list[int]:
    """common_tokenize(ctx, text, add_special=true, parse_special=false)."""
    return tokenizer.encode(text, parse_special=False)


def plan_windows(n_tokens: int, n_ctx: int, max_windows: int | None = None,
                 source: str = "the text") -> WindowPlan:
    """As many whole windows as the tokens fill (n_chunk_max = n_tokens / n_ctx), at most
    max_windows (--chunks)."""
    if n_ctx < 4:
        raise LlmpressError(f"--ctx {n_ctx} is too small: a window needs at least 4 tokens so "
                            "that its second half holds a scored token")
    if max_windows is not None and max_windows < 1:
        raise LlmpressError(f"--chunks {max_windows}: give at least 1 window")
    available = n_tokens // n_ctx
    if available < 1:
        raise LlmpressError(f"{source} tokenizes to only {n_tokens} tokens, fewer than one window "
                            f"of --ctx {n_ctx}; give a longer text or a smaller --ctx")
    return WindowPlan(n_ctx, available if max_windows is None else min(available, max_windows))


def text_windows(tokenizer, path: str | Path, n_ctx: int, max_windows: int | None = None
                 ) -> tuple[list[int], WindowPlan]:
    """The text file read, tokenized and cut into windows: what every quality figure
    starts from (eval, compare, prune's evaluation)."""
    tokens = tokenize_for_perplexity(tokenizer, read_text(path))
    return tokens, plan_windows(len(tokens), n_ctx, max_windows, source=str(path))


def check_same_tokens(tokens_a, tokens_b, n: int, what: str) -> None:
    """Two tokenizations agree on their first n tokens, or a clear error: log-probs of two
    models are only comparable token by token."""
    a, b = np.asarray(tokens_a[:n]), np.asarray(tokens_b[:n])
    if a.shape != b.shape or not np.array_equal(a, b):
        common = min(len(a), len(b))
        at = int(np.argmax(a[:common] != b[:common])) if common else 0
        raise LlmpressError(f"{what} tokenize the text differently (first at token {at}); "
                            "KL divergence needs one tokenizer")


def window_batch(tokens: torch.Tensor, plan: WindowPlan, indices: range,
                 bos_id: int | None) -> torch.Tensor:
    """int64 (len(indices), n_ctx): the windows' tokens, the first one replaced by BOS
    when bos_id is given (the model adds BOS)."""
    starts = torch.tensor(list(indices), dtype=torch.int64) * plan.n_ctx
    windows = tokens[starts[:, None] + torch.arange(plan.n_ctx)]  # (B, n_ctx)
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows


def scored_targets(windows: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """(B, scored_per_window): the tokens the scored positions predict."""
    return windows[:, plan.first + 1:]


def scored_log_probs(logits: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """float64 (..., scored_per_window, vocab) log-softmax of the scored positions' logits."""
    return torch.log_softmax(logits[..., plan.first:plan.n_ctx - 1, :].double(), dim=-1)


def token_nll(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) negative log-probability of each target under (N, vocab) log-probs."""
    return -log_probs.gather(-1, targets[..., None].to(log_probs.device))[..., 0]


def perplexity_with_error(nll: np.ndarray) -> PerplexityEstimate:
    """exp(mean) and the standard error llama-perplexity prints:
    ppl * sqrt((mean(nll^2) - mean(nll)^2) / (N - 1))."""
    nll = np.asarray(nll, dtype=np.float64)
    count = nll.size
    if count == 0:
        raise LlmpressError("no tokens were scored")
    mean = float(nll.sum() / count)
    variance = float((nll * nll).sum() / count - mean * mean)
    ppl = math.exp(mean)
    error = ppl * math.sqrt(variance / (count - 1)) if variance > 0 and count > 1 else 0.0
    return PerplexityEstimate(ppl, error, mean, count)


# --- running a model over the windows ----------------------------------------------------
def model_bos(lm) -> int | None:
    """BOS id to put at each window start, or None when the model does not add BOS."""
    tok = lm.tokenizer
    return tok.bos_id if tok.add_bos and tok.bos_id is not None else None


def check_vocabulary(lm, n_vocab: int, what: str) -> None:
    if lm.model.cfg.vocab_size != n_vocab:
        raise LlmpressError(f"{what} has a vocabulary of {n_vocab} tokens but "
                            f"{lm.source.path} has {lm.model.cfg.vocab_size}; "
                            "compare models that share one tokenizer")


def iter_window_log_probs(lm, tokens: torch.Tensor, plan: WindowPlan,
                          bos_id: int | None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(window index, float64 log-probs (scored, vocab), targets (scored,)) per window.
    Several windows share one forward pass (each its own sequence from an empty cache), as
    llama.cpp's n_seq = n_batch / n_ctx does."""
    per_pass = max(1, TOKENS_PER_FORWARD // plan.n_ctx)
    for start in range(0, plan.n_windows, per_pass):
        indices = range(start, min(start + per_pass, plan.n_windows))
        windows = window_batch(tokens, plan, indices, bos_id)
        cache = lm.model.new_cache(plan.n_ctx, batch=len(indices))
        logits = lm.model(windows.to(lm.model.device), cache)  # (B, n_ctx, vocab)
        targets = scored_targets(windows, plan)
        for row, index in enumerate(indices):
            yield index, scored_log_probs(logits[row], plan), targets[row]
        del logits, cache


def evaluate_perplexity(lm, tokens: list[int] | torch.Tensor, plan: WindowPlan,
                        progress: Progress | None = None) -> PerplexityResult:
    """PPL of `lm` over the plan's windows of `tokens` (from tokenize_for_perplexity)."""
    tokens = torch.as_tensor(tokens, dtype=torch.int64)
    nll = np.zeros(plan.n_scored)
    running = []
    per = plan.scored_per_window
    for index, log_probs, targets in iter_window_log_probs(lm, tokens, plan, model_bos(lm)):
        nll[index * per:(index + 1) * per] = token_nll(log_probs, targets).cpu().numpy()
        running.append(math.exp(nll[:(index + 1) * per].mean()))
        if progress:
            progress(index + 1, plan.n_windows, f"PPL {running[-1]:.4f}")
    return PerplexityResult(perplexity_with_error(nll), plan, nll, tuple(running))

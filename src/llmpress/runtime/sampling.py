"""Choosing the next token from logits, in llama.cpp's default order:
repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
Temperature 0 means greedy (argmax). A seeded torch.Generator makes draws reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmpress.errors import LlmpressError


# Beyond these a penalty pushes float32 logits to infinity (1e-300 divides them) or is
# indistinguishable from the bounds; llama.cpp does not bound it, but gets NaNs there.
MIN_REPEAT_PENALTY, MAX_REPEAT_PENALTY = 0.01, 100.0


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        numbers = {"temperature": self.temperature, "top_p": self.top_p, "min_p": self.min_p,
                   "repeat_penalty": self.repeat_penalty}
        for name, value in numbers.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LlmpressError(f"{name} must be a finite number, not {value!r}")
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (MIN_REPEAT_PENALTY <= self.repeat_penalty <= MAX_REPEAT_PENALTY,
             f"repeat_penalty must be in [{MIN_REPEAT_PENALTY}, {MAX_REPEAT_PENALTY}]"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise LlmpressError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repeat_penalty(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty (llama.cpp's penalties sampler): positive logits of recently
    seen tokens are divided by the penalty, negative ones multiplied."""
    if penalty == 1.0 or not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_candidates(logits: torch.Tensor, cfg: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (candidate token ids, their logits), sorted by logit, after top-k/top-p/min-p."""
    k = cfg.top_k if 0 < cfg.top_k < logits.numel() else logits.numel()
    values, ids = torch.topk(logits, k)  # sorted, descending
    probs = torch.softmax(values, dim=-1)
    keep = torch.ones_like(values, dtype=torch.bool)
    if cfg.top_p < 1.0:  # smallest prefix whose mass reaches top_p
        before = torch.cumsum(probs, dim=-1) - probs
        keep &= before < cfg.top_p
    if cfg.min_p > 0:
        keep &= probs >= cfg.min_p * probs[0]
    keep[0] = True
    return ids[keep], values[keep]


def checked_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits with NaN and +inf refused: they come from corrupt weights (or an overflow)
    and would make the draw raise deep in torch. -inf (a banned token) is fine as long as
    some token remains possible."""
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise LlmpressError("the model produced NaN or infinite logits (corrupt or overflowing "
                            "weights?); try --mode exact or another file")
    if torch.isneginf(logits).all():
        raise LlmpressError("the model's logits rule out every token")
    return logits


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.generator = torch.Generator()
        if cfg.seed is not None:
            self.generator.manual_seed(cfg.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: list[int],
                 allowed: torch.Tensor | None = None) -> int:
        """logits: (vocab,) float32 for the next position; history: all tokens so far;
        allowed: bool (vocab,) mask of the only tokens that may be drawn (a grammar's)."""
        logits = self._penalized(logits, history, allowed)
        if self.cfg.greedy:
            return int(torch.argmax(logits))
        ids, probs = self._candidates(logits)
        return int(ids[torch.multinomial(probs, 1, generator=self.generator)])

    def probabilities(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        """float64 (vocab,): the distribution __call__ draws from (greedy: a point mass on
        its choice). Speculative decoding compares the target's and the draft's."""
        logits = self._penalized(logits, history, None)
        probs = torch.zeros(logits.numel(), dtype=torch.float64)
        if self.cfg.greedy:
            probs[int(torch.argmax(logits))] = 1.0
            return probs
        ids, candidate_probs = self._candidates(logits)
        probs[ids] = candidate_probs
        return probs

    def draw(self, probs: torch.Tensor) -> int:
        """One token from a probability vector, with this sampler's random stream."""
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand(1, generator=self.generator, dtype=torch.float64))

    def _penalized(self, logits: torch.Tensor, history: list[int],
                   allowed: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        logits = logits.float().cpu()
        if allowed is not None:  # first: penalties and filters then see only these
            logits = logits.masked_fill(~allowed, float("-inf"))
        if not torch.isfinite(logits).all():
            logits = checked_logits(logits)
        recent = history[-cfg.repeat_last_n:] if cfg.repeat_last_n else []
        return apply_repeat_penalty(logits, recent, cfg.repeat_penalty)

    def _candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (candidate ids, their float64 probabilities after the filters and temperature)."""
        ids, values = filter_candidates(logits, self.cfg)
        # shifted so the best is 0, and in float64 (where 1e-300 is not 0): a tiny
        # temperature sends the rest to -inf, never to NaN
        return ids, torch.softmax((values - values[0]).double() / self.cfg.temperature, dim=-1)

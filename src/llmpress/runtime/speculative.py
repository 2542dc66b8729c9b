"""Speculative decoding: guess several next tokens cheaply, then let the target model
check them all in one forward pass of k+1 rows instead of k+1 passes of one.

Two ways to guess (draft):
- a draft model: a smaller model with the same vocabulary (a requantized copy of the
  target, or a small sibling), run token by token on its own KV cache;
- prompt lookup: the tokens that followed the most recent earlier occurrence of the
  last n tokens (code editing, summaries and RAG answers repeat their input).

The target's distribution is kept exactly: greedy decoding takes a draft token only when
it is the target's own argmax (the logits of a row do not depend on how many rows a pass
has, so the output is the plain-decoding output, bit for bit); sampling uses the standard
rejection scheme (Leviathan et al. 2023, Chen et al. 2023): accept token d with
probability min(1, p(d)/q(d)), else draw from max(0, p - q) normalized; prompt lookup's q
is a point mass on its guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from llmpress.errors import LlmpressError
from llmpress.runtime.prompt_cache import PromptCache, Slot, common_prefix
from llmpress.runtime.sampling import Sampler, SamplingConfig


@dataclass(frozen=True)
class SpeculativeConfig:
    """Options named as llama.cpp's (--draft-max, --draft-min, --draft-p-min)."""

    draft_max: int = 16  # tokens drafted per step at most
    draft_min: int = 0  # fewer drafted tokens than this: a plain step instead
    draft_p_min: float = 0.75  # the draft model stops where its top probability is lower
    lookup_ngram: int = 0  # prompt lookup: match the last n tokens (0: off)

    def __post_init__(self):
        checks = [(1 <= self.draft_max <= 256, "--draft-max must be in 1..256"),
                  (0 <= self.draft_min <= self.draft_max, "--draft-min must be in 0..draft-max"),
                  (0 <= self.draft_p_min <= 1, "--draft-p-min must be in [0, 1]"),
                  (0 <= self.lookup_ngram <= 64, "--lookup-ngram must be in 0..64")]
        for ok, message in checks:
            if not ok:
                raise LlmpressError(message)


@dataclass
class DraftModel:
    """A draft model and the prompt cache of its KV caches (kept across generations, like
    the target's: the next chat turn drafts without re-running the conversation)."""

    model: object  # models.llama.LlamaModel
    cache: PromptCache


@dataclass
class Speculation:
    """How a model drafts: prompt lookup, a draft model, or both (lookup first: it is free)."""

    config: SpeculativeConfig
    draft: DraftModel | None = None

    @property
    def enabled(self) -> bool:
        return self.draft is not None or self.config.lookup_ngram > 0


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] | None = None  # the draft's q for each token; None: point masses


@dataclass
class Tally:
    drafted: int = 0
    accepted: int = 0


def check_same_vocabulary(target_tokenizer, draft_tokenizer, target_vocab: int,
                          draft_vocab: int, draft_name: str) -> None:
    """A draft must spell every token id as the target does (else its guesses mean other
    text); one clear error naming the first difference."""
    where = f"the draft model {draft_name}"
    if draft_tokenizer.vocab_size != target_tokenizer.vocab_size:
        raise LlmpressError(f"{where} has {draft_tokenizer.vocab_size} tokens but the model "
                            f"{target_tokenizer.vocab_size}; a draft needs the same vocabulary")
    if draft_vocab > target_vocab:
        raise LlmpressError(f"{where} has {draft_vocab} embedding rows, more than the model's "
                            f"{target_vocab}; a draft needs the same vocabulary")
    for i in range(target_tokenizer.vocab_size):
        if draft_tokenizer.token_bytes(i) != target_tokenizer.token_bytes(i):
            raise LlmpressError(f"{where} spells token {i} as {draft_tokenizer.token_bytes(i)!r}"
                                f" but the model as {target_tokenizer.token_bytes(i)!r}; a "
                                "draft needs the same vocabulary")
    if draft_tokenizer.eos_ids != target_tokenizer.eos_ids:
        raise LlmpressError(f"{where} ends generation on other tokens than the model; a draft "
                            "needs the same vocabulary")


def lookup_draft(history: list[int], ngram: int, n_max: int) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the last
    `ngram` tokens, at most n_max of them. No fallback to shorter n-grams: checking a
    guess costs a row of the verifying pass, and short matches mostly guess wrong."""
    tokens = np.asarray(history, dtype=np.int64)
    if len(tokens) <= ngram:
        return []
    # windows that end before the last token, so each has a continuation
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], ngram)
    hits = np.flatnonzero((windows == tokens[-ngram:]).all(axis=1))
    if not hits.size:
        return []
    start = int(hits[-1]) + ngram
    return tokens[start:start + n_max].tolist()


class ModelDrafter:
    """Drafts with a small model on its own KV cache slot, kept in step with the history."""

    def __init__(self, model, slot: Slot, sampling: SamplingConfig, p_min: float,
                 prefill_chunk: int):
        self.model, self.slot, self.p_min, self.chunk = model, slot, p_min, prefill_chunk
        # its own random stream: drafting must not shift the target's draws
        seed = None if sampling.seed is None else sampling.seed + 1
        self.sampler = Sampler(SamplingConfig(**{**sampling.__dict__, "seed": seed}))

    def _run(self, ids: list[int]) -> torch.Tensor:
        logits = None
        for start in range(0, len(ids), self.chunk):
            part = ids[start:start + self.chunk]
            logits = self.model(torch.tensor([part]), self.slot.cache, last_only=True)[0, -1]
            self.slot.tokens.extend(part)
        return logits

    def sync(self, history: list[int]) -> torch.Tensor:
        """Bring the draft's cache to history (keeping the prefix it shares) -> the logits
        after it. At least the last token is run: its logits draft."""
        self.slot.rewind(min(common_prefix(self.slot.tokens, history), len(history) - 1))
        return self._run(history[len(self.slot.tokens):])

    def propose(self, history: list[int], n_max: int) -> Draft:
        logits = self.sync(history)
        context = list(history)
        draft = Draft(probs=[])
        while len(draft.tokens) < n_max:
            if float(torch.softmax(logits.float(), dim=-1).max()) < self.p_min:
                break  # the draft is unsure: its guesses would mostly be rejected
            q = self.sampler.probabilities(logits, context)
            token = int(torch.argmax(q)) if self.sampler.cfg.greedy else self.sampler.draw(q)
            draft.tokens.append(token)
            draft.probs.append(q)
            context.append(token)
            if len(draft.tokens) < n_max:
                logits = self._run([token])
        return draft


class Drafter:
    """What one generation drafts with (made by `drafter_for`, closed when it ends)."""

    def __init__(self, config: SpeculativeConfig, model_drafter: ModelDrafter | None,
                 release=lambda: None):
        self.config, self.model_drafter, self._release = config, model_drafter, release
        self.tally = Tally()
        self.limit = config.draft_max  # tokens to draft next: follows the acceptance

    def adapt(self, accepted: int, drafted: int) -> None:
        """A rejected guess costs a row of the checking pass (on the CPU nearly a pass):
        after a miss draft only as far as the last run of hits went (+1); after all hits,
        reach 2 further (as transformers' assisted generation)."""
        if accepted == drafted:
            self.limit = min(self.config.draft_max, self.limit + 2)
        else:
            self.limit = max(1, self.config.draft_min, accepted + 1)

    def propose(self, history: list[int], n_max: int) -> Draft:
        if self.config.lookup_ngram:
            tokens = lookup_draft(history, self.config.lookup_ngram, n_max)
            if tokens:
                return Draft(tokens)
        if self.model_drafter is not None:
            return self.model_drafter.propose(history, n_max)
        return Draft()

    def close(self) -> None:
        self._release()


def drafter_for(speculation: Speculation, prompt_ids: list[int], sampling: SamplingConfig,
                prefill_chunk: int) -> Drafter:
    config, draft = speculation.config, speculation.draft
    if draft is None:
        return Drafter(config, None)
    slot, _ = draft.cache.acquire(prompt_ids)  # the draft's slot sharing most of the prompt

    def release() -> None:
        draft.cache.release(slot)
    try:
        model_drafter = ModelDrafter(draft.model, slot, sampling, config.draft_p_min,
                                     prefill_chunk)
        model_drafter.sync(prompt_ids)  # the draft's prefill: with the model's, before a token
    except Exception:
        slot.clear()
        release()
        raise
    return Drafter(config, model_drafter, release)


def accept_or_correct(sampler: Sampler, logits: torch.Tensor, history: list[int], guess: int,
                      q: torch.Tensor | None) -> int:
    """The token the target emits at a drafted position: `guess` when accepted, else a
    draw from the residual distribution. Greedy: the target's own argmax."""
    if sampler.cfg.greedy:
        return sampler(logits, history)
    p = sampler.probabilities(logits, history)
    q_guess = 1.0 if q is None else float(q[guess])
    if sampler.uniform() < float(p[guess]) / q_guess:
        return guess
    if q is None:  # a point mass: the residual is p without the guess
        residual = p.clone()
        residual[guess] = 0.0
    else:
        residual = (p - q).clamp(min=0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: rejection had no mass
        residual = p
    return sampler.draw(residual / residual.sum())


def speculative_tokens(run, rewind, logits: torch.Tensor, sampler: Sampler,
                       history: list[int], drafter: Drafter, end: int):
    """Yield (token, its logits row) like plain decoding. The consumer appends each token
    to `history` before asking for the next and may stop at any token. run(ids) runs
    ids on the cache and returns every row's logits; rewind(n) keeps n cached tokens.
    `end`: the history length where generation must stop (the cache holds end - 1)."""
    cfg = drafter.config
    token = sampler(logits, history)
    yield token, logits
    while True:
        room = end - len(history)  # drafts beyond it could not be emitted nor cached
        draft = drafter.propose(history, min(drafter.limit, room)) if room > 0 else Draft()
        if not draft.tokens or len(draft.tokens) < cfg.draft_min:
            logits = run([token])[-1]
            token = sampler(logits, history)
            yield token, logits
            continue
        cached = len(history) - 1  # every token but the last one emitted
        rows = run([token, *draft.tokens])  # (k + 1, vocab): checks all k guesses at once
        drafter.tally.drafted += len(draft.tokens)
        accepted = 0
        for i, guess in enumerate(draft.tokens):
            q = draft.probs[i] if draft.probs else None
            token = accept_or_correct(sampler, rows[i], history, guess, q)
            yield token, rows[i]
            if token != guess:
                break
            accepted += 1
            drafter.tally.accepted += 1
        else:  # all accepted: the last row gives one more token for free
            token = sampler(rows[-1], history)
            yield token, rows[-1]
        drafter.adapt(accepted, len(draft.tokens))
        rewind(cached + 1 + accepted)  # drop the rejected guesses' keys and values

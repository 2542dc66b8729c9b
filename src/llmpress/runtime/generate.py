"""Token-by-token generation with a KV cache: prefill the prompt, then decode one token
at a time, streaming text as soon as it is complete UTF-8 and not a possible start of a
stop string."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from llmpress.errors import LlmpressError
from llmpress.runtime.grammar import Constraint
from llmpress.runtime.prompt_cache import PromptCache, Slot
from llmpress.runtime.sampling import Sampler, SamplingConfig
from llmpress.runtime.speculative import Speculation, drafter_for, speculative_tokens

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds activation memory


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    grammar: str | None = None  # from runtime.grammar: the output must match it
    logprobs: int | None = None  # report each token's log-probability and this many top ones

    def __post_init__(self):
        if self.max_tokens < 0:
            raise LlmpressError("max_tokens must be >= 0")


@dataclass
class Chunk:
    """One streamed piece. The last chunk has finish_reason "stop" or "length"."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    cached_tokens: int = 0  # on the last chunk: prompt tokens taken from the prompt cache
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when asked
    drafted_tokens: int = 0  # on the last chunk: tokens speculative decoding guessed
    accepted_tokens: int = 0  # ... and how many of them the model kept


@dataclass(frozen=True)
class TokenLogprob:
    """A drawn token's log-probability under the model (its raw logits: before penalties,
    temperature and grammar), and the most likely tokens at that position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprob(logits: torch.Tensor, token: int, n_top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, n_top) if n_top else (logprobs[:0], logprobs[:0])
    return TokenLogprob(token, float(logprobs[token]),
                        [(int(i), float(v)) for i, v in zip(ids, values)])


class TextAssembler:
    """Turns generated ids into text increments: holds back incomplete UTF-8 (a character
    split over tokens) and any tail that could still grow into a stop string."""

    def __init__(self, decode, stop: tuple[str, ...]):
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """-> (text now safe to emit, whether a stop string was reached)."""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # incomplete multi-byte character: wait for more
            return "", False
        for s in self.stop:
            hit = text.find(s, max(0, self.emitted - len(s)))
            if hit >= 0:
                piece = text[self.emitted:hit]
                self.emitted = len(text)
                return piece, True
        safe = len(text) - self._held_back(text)
        piece = text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return piece, False

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        text = self.decode(self.ids)
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece


def stream(model, tokenizer, prompt_ids: list[int], cfg: GenerationConfig,
           context_length: int, prompt_cache: PromptCache | None = None,
           speculation: Speculation | None = None) -> Iterator[Chunk]:
    """Generate after prompt_ids. The context must hold the prompt plus one token. With a
    prompt cache, the prompt's longest prefix cached by an earlier call is not run again.
    speculation: draft several tokens per forward pass (same output distribution); a
    grammar-constrained generation decodes plainly."""
    if not prompt_ids:
        raise LlmpressError("the prompt is empty (no tokens)")
    if len(prompt_ids) >= context_length:
        raise LlmpressError(f"the prompt is {len(prompt_ids)} tokens but the context holds "
                            f"{context_length}; shorten it or raise --ctx")
    budget = min(cfg.max_tokens, context_length - len(prompt_ids))
    if prompt_cache is None:
        slot, reused = Slot(model.new_cache(len(prompt_ids) + budget)), 0
    else:
        slot, reused = prompt_cache.acquire(prompt_ids)
    drafter = None
    try:
        if speculation is not None and speculation.enabled and cfg.grammar is None:
            drafter = drafter_for(speculation, prompt_ids, cfg.sampling, PREFILL_CHUNK)
        yield from _generate(model, tokenizer, prompt_ids, cfg, budget, slot, reused, drafter)
    except Exception:
        slot.clear()  # a forward pass failed midway: the cache may not match its tokens
        raise
    finally:
        if prompt_cache is not None:
            prompt_cache.release(slot)
        if drafter is not None:
            drafter.close()


def _generate(model, tokenizer, prompt_ids: list[int], cfg: GenerationConfig, budget: int,
              slot: Slot, reused: int, drafter=None) -> Iterator[Chunk]:
    """Run prompt_ids[reused:] on top of the slot's cache, then decode."""
    def run(ids: list[int], last_only: bool = True) -> torch.Tensor:
        """-> (rows, vocab) logits: the last row, or every row."""
        logits = model(torch.tensor([ids]), slot.cache, last_only=last_only)[0]
        slot.tokens.extend(ids)  # only once the cache holds them
        return logits

    sampler = Sampler(cfg.sampling)
    assembler = TextAssembler(tokenizer.decode, cfg.stop)
    constraint = Constraint(cfg.grammar, tokenizer) if cfg.grammar else None
    history = list(prompt_ids)
    logits = None
    for start in range(reused, len(prompt_ids), PREFILL_CHUNK):
        logits = run(prompt_ids[start:start + PREFILL_CHUNK])
    if drafter is None:
        tokens = _plain_tokens(run, logits[-1], sampler, history, constraint)
    else:
        tokens = speculative_tokens(lambda ids: run(ids, last_only=False), slot.rewind,
                                    logits[-1], sampler, history, drafter,
                                    len(prompt_ids) + budget)
    tally = drafter.tally if drafter else None

    def last(text: str, ids: list[int], reason: str, scored=None) -> Chunk:
        return Chunk(text, ids, reason, reused, scored, tally.drafted if tally else 0,
                     tally.accepted if tally else 0)

    for token, row in tokens if budget else ():
        history.append(token)
        scored = None if cfg.logprobs is None else [token_logprob(row, token, cfg.logprobs)]
        if cfg.stop_at_eos and token in tokenizer.eos_ids:
            yield last(assembler.flush(), [token], "stop", scored)
            return
        if constraint:
            constraint.accept(token)
        text, stopped = assembler.push(token)
        if stopped or (constraint and constraint.finished):  # the grammar is complete
            if not stopped:
                text += assembler.flush()
            yield last(text, [token], "stop", scored)
            return
        yield Chunk(text, [token], logprobs=scored)
        if len(history) - len(prompt_ids) == budget:
            break
    yield last(assembler.flush(), [], "length")


def _plain_tokens(run, logits: torch.Tensor, sampler: Sampler, history: list[int],
                  constraint: Constraint | None) -> Iterator[tuple[int, torch.Tensor]]:
    """One forward pass per token. Yields (token, the logits it was drawn from); the
    consumer appends it to history (and the grammar) before asking for the next."""
    while True:
        allowed = constraint.allowed(logits.shape[-1]) if constraint else None
        token = sampler(logits, history, allowed)
        yield token, logits
        logits = run([token])[-1]

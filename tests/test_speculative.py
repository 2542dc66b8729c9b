"""Speculative decoding: greedy output identical to plain decoding on the real default
model (a Q2_K draft, prompt lookup), and sampling that keeps the target's distribution
(chi-square over many seeds on a Markov chain whose probabilities are known exactly)."""

from __future__ import annotations

import itertools

import pytest
import torch

import llmpress
from llmpress.errors import LlmpressError
from llmpress.quant.quantize import QuantizeConfig, quantize_model
from llmpress.runtime.prompt_cache import Slot
from llmpress.runtime.sampling import Sampler, SamplingConfig
from llmpress.runtime.speculative import (Drafter, ModelDrafter, SpeculativeConfig,
                                          lookup_draft, speculative_tokens)

# --- the distribution, on a chain whose probabilities are known ---------------------------
V = 4  # vocabulary of the toy chain
PURE = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # sampling = softmax(logits)


class ToyCache:
    def __init__(self, max_tokens: int):
        self.max_tokens, self.length = max_tokens, 0

    def first_free(self, n: int) -> int:
        assert self.length + n <= self.max_tokens
        return self.length


class ChainModel:
    """Next-token logits = table[last token]: a Markov chain."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def new_cache(self, max_tokens: int) -> ToyCache:
        return ToyCache(max_tokens)

    def __call__(self, tokens, cache, last_only=False):
        cache.length = cache.first_free(tokens.shape[1]) + tokens.shape[1]
        rows = self.table[tokens[0]]
        return (rows[-1:] if last_only else rows)[None]


def sequence_probabilities(table: torch.Tensor, start: int, n: int) -> dict[tuple, float]:
    p = torch.softmax(table.double(), dim=-1)
    out = {}
    for seq in itertools.product(range(V), repeat=n):
        prob, last = 1.0, start
        for t in seq:
            prob, last = prob * float(p[last, t]), t
        out[seq] = prob
    return out


def chi_square_p_value(counts: dict[tuple, int], expected_probs: dict[tuple, float]) -> float:
    """Pearson's test; cells expected below 5 are pooled into one."""
    n = sum(counts.values())
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for key, prob in expected_probs.items():
        expected, observed = prob * n, counts.get(key, 0)
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + observed, pooled_exp + expected
            continue
        stat += (observed - expected) ** 2 / expected
        cells += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    df = cells - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def speculative_samples(target, make_drafter, prompt: list[int], n_tokens: int,
                        n_samples: int) -> tuple[dict[tuple, int], int, int]:
    counts, drafted, accepted = {}, 0, 0
    for seed in range(n_samples):
        slot = Slot(target.new_cache(64))
        sampling = SamplingConfig(**PURE, seed=seed)
        drafter = make_drafter(sampling)

        def run(ids):
            rows = target(torch.tensor([ids]), slot.cache)[0]
            slot.tokens.extend(ids)
            return rows

        history = list(prompt)
        logits = run(prompt)[-1]
        tokens = speculative_tokens(run, slot.rewind, logits, Sampler(sampling), history,
                                    drafter, len(prompt) + n_tokens + 8)
        for token, _ in tokens:
            history.append(token)
            if len(history) == len(prompt) + n_tokens:
                break
        key = tuple(history[len(prompt):])
        counts[key] = counts.get(key, 0) + 1
        drafted, accepted = drafted + drafter.tally.drafted, accepted + drafter.tally.accepted
    return counts, drafted, accepted


def test_a_draft_model_keeps_the_targets_distribution():
    torch.manual_seed(0)
    target, draft = ChainModel(torch.randn(V, V) * 1.5), ChainModel(torch.randn(V, V) * 1.5)
    config = SpeculativeConfig(draft_max=2, draft_p_min=0.0)

    def make_drafter(sampling):
        slot = Slot(draft.new_cache(64))
        return Drafter(config, ModelDrafter(draft, slot, sampling, 0.0, prefill_chunk=16))

    counts, drafted, accepted = speculative_samples(target, make_drafter, [0], 3, 3000)
    assert drafted > 0 and 0 < accepted < drafted  # both branches ran: accept and resample
    assert chi_square_p_value(counts, sequence_probabilities(target.table, 0, 3)) > 1e-3
    # the test can tell distributions apart: the draft's own is rejected
    assert chi_square_p_value(counts, sequence_probabilities(draft.table, 0, 3)) < 1e-6


def test_prompt_lookup_keeps_the_targets_distribution():
    torch.manual_seed(1)
    target = ChainModel(torch.randn(V, V) * 1.5)
    config = SpeculativeConfig(draft_max=3, lookup_ngram=1)
    prompt = [0, 1, 2, 3, 0, 2, 1, 3, 3, 0]  # every token has an earlier continuation
    counts, drafted, accepted = speculative_samples(
        target, lambda sampling: Drafter(config, None), prompt, 3, 3000)
    assert drafted > 0 and 0 < accepted < drafted
    assert chi_square_p_value(counts, sequence_probabilities(target.table, 0, 3)) > 1e-3


def test_lookup_draft_copies_what_followed_the_latest_match():
    history = [5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6]
    assert lookup_draft(history, 2, 4) == [1, 2, 5, 6]  # the latest earlier "5 6"
    assert lookup_draft(history, 2, 1) == [1]
    assert lookup_draft(history, 3, 4) == []  # "9 5 6"... "2 5 6" never occurred before
    assert lookup_draft([1, 2], 2, 4) == []


# --- greedy identity on the real model -------------------------------------------------------
EDIT_PROMPT = """<|im_start|>user
Add a docstring to every function and keep the code otherwise unchanged:

```python
def area(width, height):
    return width * height


def perimeter(width, height):
    return 2 * (width + height)


def diagonal(width, height):
    return (width ** 2 + height ** 2) ** 0.5
```<|im_end|>
<|im_start|>assistant
"""


@pytest.fixture(scope="module")
def q2k_draft(default_model_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("draft") / "smollm2-q2_k.gguf"
    quantize_model(QuantizeConfig(default_model_path, path, "Q2_K", allow_requantize=True,
                                  error_rows=0))
    return path


@pytest.fixture(scope="module")
def plain_answer(default_model_path):
    lm = llmpress.load(default_model_path)
    return lm.generate(EDIT_PROMPT, 96, temperature=0, prompt_cache=False)


@pytest.mark.parametrize("how", ["draft", "lookup", "both"])
def test_greedy_output_is_plain_decodings(default_model_path, q2k_draft, plain_answer, how):
    options = {"draft": dict(draft=q2k_draft), "lookup": dict(lookup_ngram=3),
               "both": dict(draft=q2k_draft, lookup_ngram=3, draft_max=8)}[how]
    lm = llmpress.load(default_model_path, **options)
    assert plain_answer.completion_tokens >= 64
    first = lm.generate(EDIT_PROMPT, 96, temperature=0)
    again = lm.generate(EDIT_PROMPT, 96, temperature=0)  # prompt cache and draft cache hit
    for answer in (first, again):
        assert answer.token_ids == plain_answer.token_ids
        assert 0 < answer.accepted_tokens <= answer.drafted_tokens
    assert again.cached_tokens > 0
    print(f"{how}: {first.accepted_tokens}/{first.drafted_tokens} drafted tokens accepted")


def test_a_draft_with_another_vocabulary_is_refused(default_model_path):
    with pytest.raises(LlmpressError, match="same vocabulary"):
        llmpress.load(default_model_path, draft="gemma3-270m")


@pytest.mark.parametrize("option", [dict(draft_max=0), dict(draft_min=20),
                                    dict(lookup_ngram=-1), dict(draft_p_min=2.0)])
def test_bad_speculative_options_are_one_clear_error(default_model_path, option):
    with pytest.raises(LlmpressError, match="--(draft|lookup)"):
        llmpress.load(default_model_path, **option)

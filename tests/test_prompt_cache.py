"""The prompt cache: a request that shares a prefix with an earlier one runs only its new
tokens, and gets the logits the model gives without any cache.

Not bit for bit: float32 matmuls and attention round differently for different row
counts, so the keys and values of a prefix computed in another pass shape (the previous
prompt, or one decode step per token) differ in the last bits from those of a single pass
over the new prompt, with or without a cache (5e-5 on logits of magnitude 10 here; the
same as splitting a fresh prompt in two). Stale or misplaced cache entries would differ by
whole units. So: logits within 1e-3 of a fresh single pass, the same greedy tokens, and
an exact count of the tokens run."""

from __future__ import annotations

import httpx
import pytest
import torch

import llmpress
from llmpress.runtime.generate import GenerationConfig, stream
from llmpress.runtime.prompt_cache import PromptCache, common_prefix
from llmpress.runtime.sampling import SamplingConfig

CTX = 512
GREEDY = GenerationConfig(max_tokens=12, sampling=SamplingConfig(temperature=0))
TURN1 = [{"role": "user", "content": "What is the capital of France?"}]


class Recorder:
    """The model, with a record of every forward pass: tokens in, logits out."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def new_cache(self, max_tokens):
        return self.model.new_cache(max_tokens)

    def __call__(self, tokens, cache, last_only=False):
        logits = self.model(tokens, cache, last_only=last_only)
        self.calls.append((tokens[0].tolist(), cache.length, logits[0, -1].clone()))
        return logits

    def prompt_passes(self, n_generated: int):
        """The passes before the first sampled token (each decode step is one more)."""
        return self.calls[:len(self.calls) - (n_generated - 1)]


def generate(recorder, lm, prompt_ids, prompt_cache):
    recorder.calls = []
    chunks = list(stream(recorder, lm.tokenizer, prompt_ids, GREEDY, CTX, prompt_cache))
    tokens = [t for c in chunks for t in c.token_ids]
    return tokens, chunks[-1].cached_tokens


def fresh_logits(lm, ids):
    """Last logits of ids run in one pass through a new cache."""
    return lm.model(torch.tensor([ids]), lm.model.new_cache(len(ids)))[0, -1]


@pytest.fixture(scope="module", params=["exact", "fast"])
def lm(request, default_model_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield llmpress.load(default_model_path, ctx=CTX, mode=request.param)
    torch.set_num_threads(threads)


def test_next_chat_turn_runs_only_its_new_tokens(lm):
    recorder = Recorder(lm.model)
    cache = PromptCache(recorder.new_cache, CTX)
    first = lm.encode(lm.chat_prompt(TURN1))
    answer, cached = generate(recorder, lm, first, cache)
    assert cached == 0 and sum(len(c[0]) for c in recorder.prompt_passes(len(answer))) \
        == len(first)
    reply = lm.tokenizer.decode(answer[:-1] if answer[-1] in lm.tokenizer.eos_ids else answer)
    second = lm.encode(lm.chat_prompt(TURN1 + [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And what is the capital of Spain?"}]))
    # the cache holds the first prompt and every generated token but the last
    held = first + answer[:-1]
    shared = common_prefix(held, second)
    assert shared >= len(first)  # the whole first turn at least

    tokens, cached = generate(recorder, lm, second, cache)
    passes = recorder.prompt_passes(len(tokens))
    assert cached == shared
    assert sum(len(p[0]) for p in passes) == len(second) - shared  # only the new tokens
    assert passes[0][0] == second[shared:shared + len(passes[0][0])]
    hit = passes[-1][2]

    assert (hit - fresh_logits(lm, second)).abs().max() < 1e-3
    assert tokens == generate(recorder, lm, second, None)[0]  # same greedy answer, no cache


def test_rewinding_past_a_longer_diverging_sequence(lm):
    """The slot holds more than the shared prefix (another conversation's tail): its stale
    keys and values beyond the prefix must not leak into the new request."""
    recorder = Recorder(lm.model)
    cache = PromptCache(recorder.new_cache, CTX)
    base = lm.encode("The quick brown fox jumps over the lazy dog. " * 3)
    generate(recorder, lm, base + lm.encode(" Then it ran far away into the woods"), cache)
    held = list(cache.slots[0].tokens)
    prompt = base + lm.encode(" Meanwhile, the dog slept")
    tokens, cached = generate(recorder, lm, prompt, cache)
    assert cached == common_prefix(held, prompt) and len(base) - 1 <= cached < len(held) - 10
    assert (recorder.prompt_passes(len(tokens))[-1][2] - fresh_logits(lm, prompt)).abs().max() \
        < 1e-3
    assert tokens == generate(recorder, lm, prompt, None)[0]


def test_the_same_prompt_twice_reruns_one_token(lm):
    recorder = Recorder(lm.model)
    cache = PromptCache(recorder.new_cache, CTX)
    prompt = lm.encode(lm.chat_prompt(TURN1))
    first, _ = generate(recorder, lm, prompt, cache)
    again, cached = generate(recorder, lm, prompt, cache)
    assert cached == len(prompt) - 1  # the last token runs again: its logits start the answer
    assert [p[0] for p in recorder.prompt_passes(len(again))] == [prompt[-1:]]
    assert again == first


def test_api_generate_reports_cached_tokens(lm):
    prompt = lm.chat_prompt(TURN1)
    lm.prompt_cache.clear()
    cold = lm.generate(prompt, max_tokens=4, temperature=0)
    warm = lm.generate(prompt, max_tokens=4, temperature=0)
    off = lm.generate(prompt, max_tokens=4, temperature=0, prompt_cache=False)
    assert (cold.cached_tokens, warm.cached_tokens, off.cached_tokens) == \
        (0, cold.prompt_tokens - 1, 0)
    assert cold.text == warm.text == off.text


# --- slot choice, without a model -------------------------------------------------------
class FakeCache:
    length = 0


def test_slots_longest_prefix_then_least_recently_used():
    cache = PromptCache(lambda n: FakeCache(), 100, slots=2)
    a, reused = cache.acquire([1, 2, 3, 4])
    a.tokens[:] = [1, 2, 3, 4]
    cache.release(a)
    assert reused == 0
    b, _ = cache.acquire([9, 9, 9])  # a miss takes a new slot: a's prefix stays
    assert b is not a
    b.tokens[:] = [9, 9, 9]
    cache.release(b)
    again, reused = cache.acquire([1, 2, 3, 7, 8])
    assert again is a and reused == 3 and a.tokens == [1, 2, 3] and a.cache.length == 3
    cache.release(a)
    lru, reused = cache.acquire([5, 5])  # both slots taken: the least recently used goes
    assert lru is b and reused == 0 and b.tokens == []
    cache.release(b)
    assert cache.hits == 1 and cache.reused_tokens == 3


def test_a_slot_in_use_is_never_shared():
    cache = PromptCache(lambda n: FakeCache(), 100, slots=1)
    a, _ = cache.acquire([1, 2, 3])
    a.tokens[:] = [1, 2, 3]
    b, reused = cache.acquire([1, 2, 3, 4])  # a is busy (a nested generator)
    assert b is not a and reused == 0 and b not in cache.slots


# --- --cache-ram: a bound on the kept slots' memory ----------------------------------------
def test_cache_ram_evicts_least_recently_used_and_stays_correct(default_model_path):
    lm = llmpress.load(default_model_path, ctx=CTX)
    per_token = lm.model.new_cache(CTX).bytes() // CTX  # keys + values of every layer
    # no shared prefix (a chat template's system prompt would be one): three slots
    prompts = [lm.encode(t) for t in ("The capital of France is", "Three primary colors are",
                                      "Once upon a time, in a small village,")]
    unbounded = PromptCache(lm.model.new_cache, CTX, slots=3)

    def answer(ids, cache):
        return [t for c in stream(lm.model, lm.tokenizer, ids, GREEDY, CTX, cache)
                for t in c.token_ids]

    expected = [answer(ids, unbounded) for ids in prompts]
    sizes = [s.resident_bytes() for s in unbounded.slots]
    assert sizes[0] == per_token * len(unbounded.slots[0].tokens)  # what was written
    budget = sizes[1] + sizes[2]  # the last two conversations fit, all three do not
    bounded = PromptCache(lm.model.new_cache, CTX, slots=3, max_bytes=budget)
    for ids, tokens in zip(prompts, expected):
        assert answer(ids, bounded) == tokens
        assert bounded.resident_bytes() <= budget
    assert bounded.evictions == 1 and len(bounded.slots) == 2 and len(unbounded.slots) == 3
    # the first conversation went (least recently used); the others still hit
    assert [s.tokens[:len(p)] for s, p in zip(bounded.slots, prompts[1:])] == prompts[1:]
    for i in (2, 1, 0):  # the kept two hit, the evicted one comes back in; answers unchanged
        assert answer(prompts[i], bounded) == expected[i]
        assert bounded.resident_bytes() <= budget
    assert bounded.hits == 2 and bounded.evictions == 2
    # a conversation larger than the whole budget is not kept at all
    tiny = PromptCache(lm.model.new_cache, CTX, slots=2, max_bytes=per_token * 4)
    assert answer(prompts[0], tiny) == expected[0]
    assert tiny.slots == [] and tiny.evictions == 1


def test_serve_cache_ram_evicts(default_model_path, tmp_path):
    from test_server import ServerProcess
    server = ServerProcess(default_model_path, tmp_path, extra_args=(
        "--parallel", "2", "--cache-ram", "0.01"))  # 10 KiB: no conversation fits
    try:
        client = server.client()
        answers = [client.completions.create(model="smollm2", prompt="The capital of France is",
                                             max_tokens=6, temperature=0).choices[0].text
                   for _ in range(2)]
        metrics = httpx.get(server.base + "/metrics", timeout=10).text
    finally:
        server.close()
    lm = llmpress.load(default_model_path, ctx=512)
    assert answers == [lm.generate("The capital of France is", 6, temperature=0).text] * 2
    assert "llmpress_prompt_cache_evictions_total 2" in metrics
    assert "llmpress_prompt_cached_tokens_total 0" in metrics  # nothing was kept to reuse

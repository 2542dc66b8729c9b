"""Continuous batching: several sequences in one forward pass give each the same bits as
a pass of its own, in the model, in concurrent generations, and in the server with
`--parallel N` (where the official openai client's concurrent requests must get the
answers they get one at a time)."""

from __future__ import annotations

import re
import threading

import httpx
import pytest
import torch

import llmpress
from gguf import GGMLQuantizationType
from llmpress.api import LanguageModel
from llmpress.io.loader import load_source
from llmpress.runtime.batching import BatchedModel
from llmpress.runtime.generate import GenerationConfig, stream
from llmpress.runtime.sampling import SamplingConfig
from test_hf_parity import VOCAB, write_byte_level_tokenizer
from test_server import ServerProcess, ask_concurrently
from tiny import quantized, save_tiny_hf_model

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return",
           "Once upon a time, a little girl", "Water is made of"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny random Llama with a byte-level tokenizer, its matmuls in Q4_0 so that fast
    mode runs them in the C kernels (the batched rows); what a batched pass must give is
    the same for any model (the real one is batched in the server test below)."""
    path = save_tiny_hf_model(tmp_path_factory.mktemp("tiny_batching"), "llama",
                              vocab_size=VOCAB)
    write_byte_level_tokenizer(path)
    return LanguageModel(quantized(load_source(path), GGMLQuantizationType.Q4_0), mode="fast")


@pytest.fixture(scope="module")
def real_lm(default_model_path):
    return llmpress.load(default_model_path)


def greedy_rows(model, prompt_ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """One sequence alone: the prompt's last logits, then `steps` greedy tokens'."""
    cache = model.new_cache(len(prompt_ids) + steps + 1)
    logits = [model(torch.tensor([prompt_ids]), cache, last_only=True)[0, -1]]
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(model(torch.tensor([[tokens[-1]]]), cache, last_only=True)[0, -1])
    return tokens, logits


def greedy_text(model, tokenizer, ids: list[int], n: int) -> str:
    config = GenerationConfig(max_tokens=n, sampling=SamplingConfig(temperature=0),
                              stop_at_eos=False)
    return "".join(c.text for c in stream(model, tokenizer, ids, config, 256))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_batched_pass_gives_each_sequence_its_own_bits(lm, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_staggered_batches(lm)
    finally:
        torch.set_num_threads(before)


def check_staggered_batches(lm):
    model = lm.model
    prompts = [lm.tokenizer.encode(p) for p in PROMPTS]
    alone = [greedy_rows(model, p, 6) for p in prompts]
    caches = [model.new_cache(64) for _ in prompts]
    # staggered: sequence i joins at step i, so prompt rows and one-token rows share passes
    pending = {i: list(p) for i, p in enumerate(prompts)}
    seen = {i: 0 for i in pending}
    for step in range(len(prompts) + 6):
        active = [i for i in pending if i <= step and seen[i] <= 6]
        if not active:
            break
        logits = model.forward_batch([(pending[i], caches[i]) for i in active])
        for i, row in zip(active, logits):
            assert torch.equal(row[-1], alone[i][1][seen[i]]), (i, seen[i])
            pending[i] = [alone[i][0][seen[i]]] if seen[i] < 6 else []
            seen[i] += 1
    assert all(n == 7 for n in seen.values())


def test_every_row_when_asked(lm):
    model = lm.model
    ids = lm.tokenizer.encode(PROMPTS[0])
    whole = model(torch.tensor([ids]), model.new_cache(32))[0]
    rows = model.forward_batch([(ids, model.new_cache(32)), (ids[:3], model.new_cache(32))],
                               [True, False])
    assert torch.equal(rows[0], whole) and rows[1].shape == (1, whole.shape[-1])


def test_concurrent_generations_share_passes_and_keep_their_answers(lm):
    prompts = [lm.tokenizer.encode(p) for p in PROMPTS]

    def generate(model, ids) -> str:
        return greedy_text(model, lm.tokenizer, ids, 12)

    expected = [generate(lm.model, ids) for ids in prompts]
    batched, answers = BatchedModel(lm.model), [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def worker(i):
        with batched.member():
            start.wait()
            answers[i] = generate(batched, prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == expected
    # 4 sequences x (1 prompt pass + 11 token passes), mostly shared
    assert batched.sequences == 4 * 12 and batched.passes < 2 * 12


def test_a_full_cache_fails_only_its_own_sequence(lm):
    model = BatchedModel(lm.model)
    ids = lm.tokenizer.encode(PROMPTS[0])
    small, big = lm.model.new_cache(len(ids)), lm.model.new_cache(64)
    errors, results = [], []
    barrier = threading.Barrier(2)

    def run(cache, tokens):
        with model.member():
            barrier.wait()
            try:
                results.append(model(torch.tensor([tokens]), cache, last_only=True))
            except ValueError as exc:
                errors.append(str(exc))

    a = threading.Thread(target=run, args=(small, ids + ids))  # does not fit
    b = threading.Thread(target=run, args=(big, ids))
    a.start(); b.start(); a.join(60); b.join(60)
    assert len(results) == 1 and len(errors) == 1 and "exceed the cache" in errors[0]
    assert big.length == len(ids) and small.length == 0


@pytest.fixture(scope="module")
def parallel_server(default_model_path, tmp_path_factory):
    proc = ServerProcess(default_model_path, tmp_path_factory.mktemp("parallel"),
                         extra_args=("--parallel", "4"))
    yield proc
    proc.close()


def test_parallel_server_batches_concurrent_clients(parallel_server, real_lm):
    expected = [greedy_text(real_lm.model, real_lm.tokenizer, real_lm.encode(p), 10)
                for p in PROMPTS]

    assert ask_concurrently(parallel_server.base, PROMPTS, 10, ignore_eos=True) == expected
    metrics = httpx.get(parallel_server.base + "/metrics").text
    passes = int(float(re.search(r"^llmpress_batch_passes_total (\S+)", metrics, re.M).group(1)))
    sequences = int(float(re.search(r"^llmpress_batch_sequences_total (\S+)", metrics, re.M).group(1)))
    assert sequences == 4 * 10 and passes < sequences  # several clients per pass

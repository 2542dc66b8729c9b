"""Generation on the real default model: streaming, stops, limits, reproducibility."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import llmpress
from llmpress.errors import LlmpressError
from llmpress.kernels import cpu


@pytest.fixture(scope="module")
def lm(default_model_path):
    return llmpress.load(default_model_path, ctx=512)


@pytest.fixture(scope="module")
def exact_lm(default_model_path):
    """Fast mode's 8-bit activations flip near-ties as llama.cpp's do (on the question below
    both answer "L'Étoile, ..."); the float32 reference answers "Paris"."""
    return llmpress.load(default_model_path, ctx=512, mode="exact")


def chat(lm, text):
    return lm.chat_prompt([{"role": "user", "content": text}])


def test_streamed_chunks_concatenate_to_the_generated_answer(lm):
    prompt = chat(lm, "Name three colours.")
    chunks = list(lm.stream(prompt, max_tokens=40, temperature=0))
    whole = lm.generate(prompt, max_tokens=40, temperature=0)
    assert len(chunks) > 5
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_chat_answer_ends_at_end_of_turn(exact_lm):
    answer = exact_lm.generate(chat(exact_lm, "What is the capital of France?"), max_tokens=64,
                               temperature=0)
    assert answer.finish_reason == "stop"
    assert "Paris" in answer.text and "<|im_end|>" not in answer.text


def test_max_tokens_gives_length(lm):
    answer = lm.generate("Once upon a time", max_tokens=7, temperature=0)
    assert answer.finish_reason == "length" and answer.completion_tokens == 7


def test_stop_string_cuts_the_answer(lm):
    full = lm.generate("1, 2, 3, 4,", max_tokens=24, temperature=0).text
    assert " 7," in full  # the model counts on
    cut = lm.generate("1, 2, 3, 4,", max_tokens=24, temperature=0, stop=(" 7,",))
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(" 7,")]


def test_same_seed_same_sample_other_seed_other_sample(lm):
    prompt = chat(lm, "Write a short poem about the sea.")
    a = lm.generate(prompt, max_tokens=24, temperature=1.0, seed=42).text
    b = lm.generate(prompt, max_tokens=24, temperature=1.0, seed=42).text
    c = lm.generate(prompt, max_tokens=24, temperature=1.0, seed=43).text
    assert a == b and a != c


def test_prompt_longer_than_the_context_is_refused(lm):
    with pytest.raises(LlmpressError, match="the context holds 512"):
        lm.generate("word " * 600, max_tokens=4)


def test_generation_stops_at_the_context_limit(default_model_path):
    small = llmpress.load(default_model_path, ctx=24)
    ids = small.encode("The history of the Roman empire")
    answer = small.generate(ids, max_tokens=100, temperature=0)
    assert answer.finish_reason == "length"
    assert len(ids) + answer.completion_tokens == 24


def test_fast_mode_logits_match_exact_mode(lm, default_model_path, wikitext_bytes):
    exact = llmpress.load(default_model_path, mode="exact", ctx=512)
    ids = lm.encode(wikitext_bytes[:3000].decode("utf-8"))[:200]
    fast_logits, exact_logits = lm.logits(ids), exact.logits(ids)
    # 8-bit activations cost what llama.cpp's do (test_kernel_kld measures both) ...
    base = exact_logits.double().log_softmax(-1)
    kld = (base.exp() * (base - fast_logits.double().log_softmax(-1))).sum(-1).mean().item()
    same_top1 = (fast_logits.argmax(-1) == exact_logits.argmax(-1)).float().mean().item()
    assert kld <= 0.01 and same_top1 >= 0.9, (kld, same_top1)
    # ... and one token at a time gives the very bits of the 200-token prefill
    cache = lm.model.new_cache(16)
    stepwise = torch.cat([lm.model(torch.tensor([[t]]), cache)[0] for t in ids[:16]])
    assert torch.equal(stepwise, fast_logits[:16])


def test_cli_run_streams_the_same_greedy_answer(lm, default_model_path):
    expected = lm.generate("The capital of France is", max_tokens=12, temperature=0).text
    done = subprocess.run([sys.executable, "-m", "llmpress.cli", "run", str(default_model_path),
                           "-p", "The capital of France is", "-n", "12", "--temp", "0"],
                          capture_output=True, text=True, check=True)
    assert done.stdout == expected + "\n"


def test_cli_info_json(default_model_path):
    import json
    done = subprocess.run([sys.executable, "-m", "llmpress.cli", "info", str(default_model_path),
                           "--json"], capture_output=True, text=True, check=True)
    info = json.loads(done.stdout)
    assert info["parameters"] == 134_515_008  # reference/README.md
    assert (info["layers"], info["heads"], info["kv_heads"]) == (30, 9, 3)
    types = {t["type_name"]: t["count"] for t in info["tensor_types"]}
    assert types == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert info["has_chat_template"] and info["context_length"] == 8192
    isa = cpu.kernel_info()["isa"]  # the kernel .so is built (CI checks it), so never None
    # every matmul (Q4_1 and the Q8_0 output head: rows in multiples of 8) runs repacked
    assert info["matmul"] == (f"fast: C kernels ({isa}, 8-bit activations; 211 of 211 "
                              "repacked in 8-row groups) + all layers in one call")

"""The real Gemma 3 270M (Q4_K_M, pulled by name from the catalog) against llama.cpp.

llama.cpp (llama-cpp-python) runs the file dequantized to F32 by gguf-py with an F32 KV
cache; our exact mode runs the Q4_K_M file itself (dequantized exactly, the same values).
Windows of 1,024 tokens, longer than the model's 512-position sliding window, so the
local layers' window mask and RoPE base are exercised; we feed each window in chunks
through the KV cache, so the cached path with a window (keys dropped from the front) is
too. Every window starts with BOS, as Gemma's tokenizer adds it, so position 0 is a
reference as well.

Each test prints the numbers it measured (`pytest -s` shows them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_f32_gguf

from llmpress import hub
from llmpress.api import load
from llmpress.models.kv_cache import KV_TYPES

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.slow

WINDOW, N_WINDOWS, CHUNK = 1024, 2, 256  # 2,048 WikiText tokens, fed 256 at a time
FAST_TOKENS, GREEDY_PROMPT, GREEDY_STEPS = 64, 32, 32
FUSED_TOKENS = 640  # past the 512-position sliding window


@pytest.fixture(scope="module")
def gemma_path():
    return hub.pull("gemma3-270m")


@pytest.fixture(scope="module")
def gemma_f32(gemma_path, tmp_path_factory):
    return write_f32_gguf(gemma_path, tmp_path_factory.mktemp("gemma") / "gemma-3-270m.F32.gguf")


@pytest.fixture(scope="module")
def llama_f32(gemma_f32):
    return llama_cpp.Llama(str(gemma_f32), logits_all=True, n_ctx=WINDOW, n_batch=WINDOW,
                           n_threads=2, verbose=False,
                           type_k=0, type_v=0)  # F32 KV cache: float math against float math


@pytest.fixture(scope="module")
def reference_tokenizer(gemma_path):
    return llama_cpp.Llama(str(gemma_path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def windows(reference_tokenizer, wikitext_bytes) -> list[list[int]]:
    """WikiText-2 test text tokenized by llama.cpp, in windows of BOS + WINDOW - 1 tokens."""
    ids = reference_tokenizer.tokenize(wikitext_bytes[:40_000], add_bos=False, special=False)
    body = WINDOW - 1
    assert len(ids) >= body * N_WINDOWS
    bos = reference_tokenizer.token_bos()
    return [[bos] + ids[w * body:(w + 1) * body] for w in range(N_WINDOWS)]


@pytest.fixture(scope="module")
def exact(gemma_path):
    return load(gemma_path, mode="exact", device="cpu", ctx=WINDOW)


@pytest.fixture(scope="module")
def fast(gemma_path):
    return load(gemma_path, mode="fast", device="cpu", ctx=WINDOW)


def kl_top1_sums(base_logits: torch.Tensor, logits: torch.Tensor, rows: int = 64):
    """(sum of KL(base || other), number of top-1 agreements) over positions, in float64 as
    llama-perplexity's --kl-divergence computes them, a few rows at a time (the vocabulary
    is 262,144 wide)."""
    kld, agree = 0.0, 0
    for s in range(0, base_logits.shape[0], rows):
        base = base_logits[s:s + rows].double().log_softmax(-1)
        other = logits[s:s + rows].double().log_softmax(-1)
        kld += (base.exp() * (base - other)).sum(-1).sum().item()
        agree += int((base.argmax(-1) == other.argmax(-1)).sum())
    return kld, agree


def chunked_logits(model, ids: list[int], chunk: int) -> torch.Tensor:
    cache = model.new_cache(len(ids))
    return torch.cat([model(torch.tensor([ids[s:s + chunk]]), cache)[0]
                      for s in range(0, len(ids), chunk)])


def test_tokenizer_matches_llama_cpp(exact, reference_tokenizer, wikitext_bytes):
    text = wikitext_bytes[:20_000].decode("utf-8")
    chat = exact.chat_prompt([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "What is the capital of France?"}])
    assert chat.startswith("<start_of_turn>user\nBe brief.\n\nWhat is")  # Gemma's own format
    for sample in (text, chat):
        assert exact.encode(sample) == reference_tokenizer.tokenize(
            sample.encode(), add_bos=True, special=True)


def test_exact_matches_llama_cpp(llama_f32, exact, windows):
    llm = llama_f32
    kld_sum, agree, per_window = 0.0, 0, []
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        ref = torch.from_numpy(np.array(llm.scores[:WINDOW], dtype=np.float32))
        ours = chunked_logits(exact.model, ids, CHUNK)
        kld, top1 = kl_top1_sums(ref, ours)
        per_window.append(kld / WINDOW)
        kld_sum, agree = kld_sum + kld, agree + top1
    n = WINDOW * N_WINDOWS
    kld, top1 = kld_sum / n, agree / n
    print(f"\nGemma 3 270M exact vs llama.cpp F32, {n} tokens: mean KLD {kld:.3g} "
          f"(per window {', '.join(f'{k:.2g}' for k in per_window)}), top-1 {top1:.3%}")
    assert top1 >= 0.995
    assert kld <= 1e-4


@pytest.fixture(scope="module")
def exact_logits(exact, windows) -> torch.Tensor:
    """Exact mode's logits over the first window, fed CHUNK tokens at a time."""
    return chunked_logits(exact.model, windows[0], CHUNK)


def test_fast_mode_costs_no_more_than_llama_cpp(gemma_path, fast, exact_logits, windows):
    """Fast mode (8-bit activations into the packed kernels, as llama.cpp's; the fused C
    decoder layers) against exact mode on a 1,024-token window, next to llama.cpp on the
    same Q4_K_M file against the same exact logits: the price of the integer kernels,
    ours beside theirs."""
    ids, base, model = windows[0], exact_logits, fast.model
    assert model.decoder is not None
    kld, top1 = kl_top1_sums(base, chunked_logits(model, ids, CHUNK))
    steps = chunked_logits(model, ids[:FAST_TOKENS], 1)  # the decode path: one token per call
    kld_steps, top1_steps = kl_top1_sums(base[:FAST_TOKENS], steps)
    llm = llama_cpp.Llama(str(gemma_path), logits_all=True, n_ctx=WINDOW, n_batch=WINDOW,
                          n_threads=2, verbose=False)
    llm.eval(ids)
    theirs, their_top1 = kl_top1_sums(base, torch.from_numpy(np.array(llm.scores[:WINDOW],
                                                                      dtype=np.float32)))
    n = len(ids)
    print(f"\nGemma 3 270M fast vs exact, {n} tokens: mean KLD {kld / n:.3g}, top-1 {top1 / n:.2%}"
          f" (llama.cpp on the same file: {theirs / n:.3g}, {their_top1 / n:.2%}); one token a "
          f"step over {FAST_TOKENS}: {kld_steps / FAST_TOKENS:.3g}, top-1 {top1_steps}")
    assert 0 < kld / n <= 1.25 * theirs / n  # equal up to the noise of one window
    assert kld_steps / FAST_TOKENS <= 2 * theirs / n and top1_steps >= 0.9 * FAST_TOKENS


def test_greedy_decoding_matches_llama_cpp(exact, llama_f32, windows):
    """32 greedy steps of exact mode (KV cache, one token at a time); then one llama.cpp
    pass over prompt + continuation on the F32 file must pick each next token the same
    way (its teacher-forced argmax at every step is what its greedy decoding takes)."""
    prompt = windows[1][:GREEDY_PROMPT]
    ours = exact.generate(prompt, max_tokens=GREEDY_STEPS, temperature=0).token_ids
    assert len(ours) == GREEDY_STEPS
    llama_f32.reset()
    llama_f32.eval(prompt + ours)
    scores = np.array(llama_f32.scores[GREEDY_PROMPT - 1:GREEDY_PROMPT - 1 + GREEDY_STEPS])
    theirs = scores.argmax(-1).tolist()
    print(f"\ngreedy: {sum(a == b for a, b in zip(ours, theirs))} of {GREEDY_STEPS} tokens as "
          "llama.cpp (F32) picks them")
    assert ours == theirs


def test_fused_layers_cost_no_more_than_the_torch_layers(fast, exact_logits, windows):
    """The fused C decoder layers against Gemma's torch layers running the same packed
    kernels (fast mode without the fused path), both against exact mode, over 640 tokens
    fed 256 at a time: past the sliding window, so the local layers' window and RoPE table
    decide the last rows. The two differ only in float order (an activation on a rounding
    boundary takes another 8-bit code), so they cost exact mode the same."""
    ids, base = windows[0][:FUSED_TOKENS], exact_logits[:FUSED_TOKENS]
    fused = chunked_logits(fast.model, ids, CHUNK)
    decoder, fast.model.decoder = fast.model.decoder, None
    try:
        layers = chunked_logits(fast.model, ids, CHUNK)
    finally:
        fast.model.decoder = decoder
    (kld_fused, top1_fused), (kld_layers, top1_layers) = (kl_top1_sums(base, x)
                                                          for x in (fused, layers))
    late = slice(512, FUSED_TOKENS)  # rows whose local layers drop keys
    kld_late = [kl_top1_sums(base[late], x[late])[0] for x in (fused, layers)]
    n, n_late = len(ids), FUSED_TOKENS - 512
    print(f"\nGemma 3 270M, {n} tokens, KL to exact: fused {kld_fused / n:.3g} (top-1 "
          f"{top1_fused / n:.2%}), torch layers {kld_layers / n:.3g} (top-1 "
          f"{top1_layers / n:.2%}); rows past the window: {kld_late[0] / n_late:.3g}, "
          f"{kld_late[1] / n_late:.3g}")
    assert kld_fused <= 1.2 * kld_layers and kld_late[0] <= 1.3 * kld_late[1]
    assert top1_fused >= top1_layers - 0.01 * n


def test_batched_sequences_get_the_bits_of_their_own_passes(fast, windows):
    """Three sequences in forward_batch passes (prompt rows and one-token rows sharing a
    pass) against each run alone, on the real model's fused layers."""
    model = fast.model
    prompts = [windows[1][:n] for n in (40, 17, 29)]
    caches = [model.new_cache(64) for _ in prompts]
    batched = [model.forward_batch([(p, c) for p, c in zip(prompts, caches)])]
    batched.append(model.forward_batch([([p[-1]], c) for p, c in zip(prompts, caches)]))
    for i, prompt in enumerate(prompts):
        cache = model.new_cache(64)
        alone = [model(torch.tensor([prompt]), cache, last_only=True)[0],
                 model(torch.tensor([[prompt[-1]]]), cache)[0]]
        assert all(torch.equal(rows[i], mine) for rows, mine in zip(batched, alone)), i


def test_q8_0_kv_cache_matches_llama_cpp_with_the_same_cache(gemma_f32, windows):
    """A q8_0 KV cache on Gemma (heads of 256: keys rotated by 256 x 256, values by 64 x 64,
    as llama.cpp's), over 256 tokens: ours as far from llama.cpp's q8_0 logits, and from
    its f16 cache's, as llama.cpp's own q8_0 cache is from its f16 one (measured: 4.7e-4
    and 4.5e-4 against 4.4e-4; the bounds' reasoning is test_model_parity_real.py's)."""
    ids = windows[0][:256]
    model = load(gemma_f32, mode="exact", device="cpu", ctx=len(ids)).model
    ref, ours = {}, {}
    for name, ggml_type in (("f16", 1), ("q8_0", 8)):  # GGML_TYPE_*
        llm = llama_cpp.Llama(str(gemma_f32), logits_all=True, n_ctx=len(ids), n_batch=len(ids),
                              n_threads=2, verbose=False, type_k=ggml_type, type_v=ggml_type,
                              flash_attn=True)
        llm.eval(ids)
        ref[name] = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
        del llm
        model.kv_dtypes = (KV_TYPES[name], KV_TYPES[name])
        ours[name] = model(torch.tensor([ids]), model.new_cache(len(ids)))[0]
    n = len(ids)
    same, our_loss, llama_loss = (kl_top1_sums(a, b)[0] / n for a, b in (
        (ref["q8_0"], ours["q8_0"]), (ref["f16"], ours["q8_0"]), (ref["f16"], ref["q8_0"])))
    print(f"\nGemma 3 270M q8_0 cache: ours vs llama.cpp's {same:.3g}; vs llama.cpp's f16: ours "
          f"{our_loss:.3g}, llama.cpp's {llama_loss:.3g}")
    assert kl_top1_sums(ref["f16"], ours["f16"])[0] / n <= 1e-5
    assert same <= 1.5 * llama_loss
    assert 0.5 * llama_loss <= our_loss <= 1.5 * llama_loss

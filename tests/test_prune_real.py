"""End to end on the default model: width-prune SmolLM2-135M with a little calibration text,
write the smaller dense GGUF, and check that llama.cpp loads it and computes the same
next-token distributions as our runtime does on that file."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
import torch

from llmpress.api import load
from llmpress.io.loader import load_source, load_tokenizer
from llmpress.prune.prune import PruneConfig, prune_model, write_pruned

pytestmark = pytest.mark.slow


def test_width_pruned_model_is_smaller_and_llama_cpp_agrees(default_model_path, wikitext_bytes,
                                                             tmp_path):
    source = load_source(default_model_path)
    config = PruneConfig(method="width", ratio=0.2, n_sequences=2, seq_len=64)
    result = prune_model(source, config, load_tokenizer(source))
    out = write_pruned(result, tmp_path / "width20.gguf")

    # 9 heads in 3 KV groups: 20% keeps all groups; the FFN (1536) shrinks in 32-blocks
    assert {w for w in result.widths} == {(9, 3, 1120)}
    decoder = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    removed = (result.params_before - result.params_after) / decoder
    assert 0.19 < removed < 0.22
    assert out.file_bytes < source.file_bytes * 0.88  # the Q8_0 embedding stays whole

    lm = load(out.path, mode="exact")
    assert lm.model.cfg.layers[0].ffn_dim == 1120
    ids = lm.encode(wikitext_bytes[:2000].decode("utf-8", "ignore"))[:64]
    kld, top1 = compare_with_llama_cpp(lm, ids)
    # the yardstick: the same comparison on the dense input (llama.cpp rounds activations
    # to 8 bits for Q4_1 matmuls, our exact mode does not)
    kld_dense, top1_dense = compare_with_llama_cpp(load(default_model_path, mode="exact"), ids)
    print(f"\nwidth 20%: {result.params_after:,} params, {out.file_bytes / 2**20:.1f} MiB; "
          f"ours vs llama.cpp on the pruned file: mean KLD {kld:.2e}, top-1 {top1:.1%} "
          f"(dense file: {kld_dense:.2e}, {top1_dense:.1%})")
    assert kld < 3 * kld_dense + 1e-3 and top1 > 0.9


def compare_with_llama_cpp(lm, ids: list[int]) -> tuple[float, float]:
    """Mean KL(llama.cpp || ours) and top-1 agreement over the positions of `ids`."""
    ours = lm.logits(ids)
    llm = llama_cpp.Llama(str(lm.source.path), logits_all=True, n_ctx=128, n_batch=128,
                          n_threads=2, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    ref = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    log_ref, log_ours = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
    kld = float((log_ref.exp() * (log_ref - log_ours)).sum(-1).mean())
    return kld, float((ref.argmax(-1) == ours.argmax(-1)).float().mean())

"""The fused C decode step (kernels/decode.c) against the layer-by-layer torch model in
exact mode, for every architecture variant it handles: Llama (adjacent-pair RoPE, GQA),
Qwen2 (q/k/v biases, neox RoPE), Qwen3 (q/k RMSNorm), and every kernel block type."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType
from tiny import greedy, quantized, save_tiny_hf_model

from llmpress.io.hf import load_hf_dir
from llmpress.kernels import cpu
from llmpress.models.llama import LlamaModel

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C kernel was not built")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {arch: save_tiny_hf_model(tmp_path_factory.mktemp(arch), arch)
            for arch in ("llama", "qwen2", "qwen3")}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                                       "Q5_K", "Q6_K"])
def test_fused_decode_equals_exact_layers(tiny_dirs, arch, type_name):
    src = quantized(load_hf_dir(tiny_dirs[arch]), GGMLQuantizationType[type_name])
    fast, exact = LlamaModel(src, "fast"), LlamaModel(src, "exact")
    assert fast.decoder is not None and exact.decoder is None
    # 40 prompt tokens: the kernel takes activation rows 16 at a time (16 + 16 + 8)
    prompt = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    fast_cache, exact_cache = fast.new_cache(80), exact.new_cache(80)
    a, b = fast(prompt, fast_cache), exact(prompt, exact_cache)
    assert torch.allclose(a, b, atol=2e-4, rtol=1e-4), (a - b).abs().max()
    for token in torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(4)):
        step = token.view(1, 1)
        a, b = fast(step, fast_cache), exact(step, exact_cache)
        assert torch.allclose(a, b, atol=2e-4, rtol=1e-4), (a - b).abs().max()
    assert greedy(fast, prompt, 12)[1] == greedy(exact, prompt, 12)[1]


def test_types_without_a_kernel_fall_back_to_the_layers(tiny_dirs):
    src = quantized(load_hf_dir(tiny_dirs["llama"]), GGMLQuantizationType.IQ4_NL)
    assert LlamaModel(src, "fast").decoder is None

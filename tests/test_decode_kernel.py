"""The fused C decoder layers (kernels/decode.c) against the layer-by-layer torch model in
exact mode, for every architecture variant it handles: Llama (adjacent-pair RoPE, GQA),
Qwen2 (q/k/v biases, neox RoPE), Qwen3 (q/k norms); and the promise that makes a prompt
cache safe in fast mode: a token's logits are the same bits however the prompt before it
was split into calls, with any thread count and instruction set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from tiny import quantized, save_tiny_hf_model

from llmpress.io.hf import load_hf_dir
from llmpress.kernels import cpu
from llmpress.models.llama import LlamaModel

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C kernel was not built")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {arch: save_tiny_hf_model(tmp_path_factory.mktemp(arch), arch)
            for arch in ("llama", "qwen2", "qwen3")}


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def kl(fast_logits: torch.Tensor, exact_logits: torch.Tensor) -> float:
    return F.kl_div(fast_logits.log_softmax(-1), exact_logits.log_softmax(-1), log_target=True,
                    reduction="batchmean").item()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("type_name", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K",
                                       "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_fused_decode_equals_layers(tiny_dirs, arch, type_name):
    src = quantized(load_hf_dir(tiny_dirs[arch]), GGMLQuantizationType[type_name])
    fused, layers, exact = LlamaModel(src, "fast"), LlamaModel(src, "fast"), LlamaModel(src, "exact")
    assert fused.decoder is not None and exact.decoder is None
    layers.decoder = None  # the same kernels, one torch layer at a time
    prompt = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    caches = [m.new_cache(80) for m in (fused, layers, exact)]
    a, b, c = (m(prompt, cache) for m, cache in zip((fused, layers, exact), caches))
    assert relative_diff(a, c) <= 0.05 and kl(a[0], c[0]) <= 1e-5
    for token in torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(4)):
        step = token.view(1, 1)
        a, b, c = (m(step, cache) for m, cache in zip((fused, layers, exact), caches))
        # same rounding, but torch's float order differs from C's: an activation landing
        # on a rounding boundary flips a code, and the flips add up over 60 tokens of cache
        assert relative_diff(a, b) <= 3e-2, relative_diff(a, b)
        assert relative_diff(a, c) <= 0.05 and kl(a[0], c[0]) <= 1e-5, (relative_diff(a, c), kl(a[0], c[0]))


@pytest.mark.parametrize("isa", cpu.isas_here())
@pytest.mark.parametrize("arch, type_name", [("llama", "Q4_K"), ("qwen2", "Q4_0"), ("qwen3", "Q6_K")])
def test_logits_do_not_depend_on_how_the_prompt_is_split(tiny_dirs, arch, type_name, isa):
    model = LlamaModel(quantized(load_hf_dir(tiny_dirs[arch]), GGMLQuantizationType[type_name]),
                       "fast")
    tokens = torch.randint(0, 512, (1, 37), generator=torch.Generator().manual_seed(5))
    splits = [[37], [1] * 37, [20, 1, 16], [5, 3, 29]]
    previous_threads = torch.get_num_threads()
    cpu.use_isa(isa)
    try:
        results = []
        for threads, split in zip([1, 2, 2, 1], splits):
            torch.set_num_threads(threads)
            cache, start, parts = model.new_cache(40), 0, []
            for n in split:
                parts.append(model(tokens[:, start:start + n], cache))
                start += n
            results.append(torch.cat(parts, dim=1))
    finally:
        cpu.use_isa("auto")
        torch.set_num_threads(previous_threads)
    for split, logits in zip(splits[1:], results[1:]):
        assert torch.equal(logits, results[0]), split


def test_types_without_a_kernel_fall_back_to_the_layers(tiny_dirs):
    src = quantized(load_hf_dir(tiny_dirs["llama"]), GGMLQuantizationType.F32)  # torch's own GEMM
    assert LlamaModel(src, "fast").decoder is None

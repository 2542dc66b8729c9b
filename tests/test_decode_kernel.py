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
from tiny import logits_by_split, quantized, save_tiny_hf_model

from llmpress.io.hf import load_hf_dir
from llmpress.kernels import cpu
from llmpress.models.kv_cache import KV_TYPES, CacheRows
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
@pytest.mark.parametrize("arch, type_name, cache", [
    ("llama", "Q4_K", "f32"), ("qwen2", "Q4_0", "f32"), ("qwen3", "Q6_K", "f32"),
    ("llama", "Q8_0", "q4_0"), ("qwen2", "Q4_K", "q8_0")])
def test_logits_do_not_depend_on_how_the_prompt_is_split(tiny_dirs, arch, type_name, cache, isa):
    model = LlamaModel(quantized(load_hf_dir(tiny_dirs[arch]), GGMLQuantizationType[type_name]),
                       "fast", kv_dtypes=(KV_TYPES[cache],) * 2)
    tokens = torch.randint(0, 512, (1, 37), generator=torch.Generator().manual_seed(5))
    splits = [[37], [1] * 37, [20, 1, 16], [5, 3, 29]]
    previous_threads = torch.get_num_threads()
    cpu.use_isa(isa)
    try:
        results = logits_by_split(model, tokens, splits, [1, 2, 2, 1])
    finally:
        cpu.use_isa("auto")
        torch.set_num_threads(previous_threads)
    for split, logits in zip(splits[1:], results[1:]):
        assert torch.equal(logits, results[0]), split


def test_types_without_a_kernel_fall_back_to_the_layers(tiny_dirs):
    src = quantized(load_hf_dir(tiny_dirs["llama"]), GGMLQuantizationType.F32)  # torch's own GEMM
    assert LlamaModel(src, "fast").decoder is None


@pytest.mark.parametrize("key_type, value_type", [("q8_0", "q8_0"), ("q4_0", "q4_0"),
                                                  ("q8_0", "f16"), ("f32", "q4_0")])
def test_quantized_cache_fused_equals_layers(tiny_dirs, key_type, value_type):
    """The C path stores the same bytes as the torch layers for the same key and value
    rows (layer 0's, which no cache type changes: the f32 cache's run gives them), over a
    prefill and single steps; and the two paths' logits agree as with float caches."""
    src = quantized(load_hf_dir(tiny_dirs["llama"]), GGMLQuantizationType.Q4_K)
    fused, layers, plain = (LlamaModel(src, "fast") for _ in range(3))
    layers.decoder = None
    types = (KV_TYPES[key_type], KV_TYPES[value_type])
    fused.kv_dtypes = layers.kv_dtypes = types
    prompt = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(6))
    steps = torch.randint(0, 512, (6, 1, 1), generator=torch.Generator().manual_seed(7))
    caches = [m.new_cache(40) for m in (fused, layers, plain)]
    for tokens in [prompt, *steps]:
        a, b, _ = (m(tokens, cache) for m, cache in zip((fused, layers, plain), caches))
        assert relative_diff(a, b) <= 3e-2, relative_diff(a, b)
    n = caches[0].length
    for stored, plain_rows in ((caches[0].keys[0], caches[2].keys[0]),
                               (caches[0].values[0], caches[2].values[0])):
        expected = CacheRows(stored.type, 1, plain_rows.data.shape[1], n, plain_rows.head_dim,
                             rotation=stored.rotation)
        expected.write(0, plain_rows.read(0, n))
        assert torch.equal(stored.data[:, :, :n], expected.data)
    assert caches[0].bytes() == caches[1].bytes() < caches[2].bytes()


"""The CUDA path: the same model on the GPU gives the CPU's answers, for float and packed
quantized weights. Skipped on machines without a CUDA GPU (CI has none); run on a GPU
machine with `python -m pytest tests/test_cuda.py`."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType
from tiny import greedy, quantized, save_tiny_hf_model

from llmpress.io.hf import load_hf_dir
from llmpress.models.llama import LlamaModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU; this machine has none")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("tiny"))


def test_float_model_on_cuda_equals_cpu(tiny_dir):
    src = load_hf_dir(tiny_dir)
    prompt = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    cpu_logits, cpu_tokens = greedy(LlamaModel(src, "exact", "cpu"), prompt, 16)
    gpu_logits, gpu_tokens = greedy(LlamaModel(src, "exact", "cuda"), prompt, 16)
    assert torch.allclose(gpu_logits, cpu_logits, atol=1e-4, rtol=1e-4)
    assert gpu_tokens == cpu_tokens


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K",
                                       "Q3_K", "Q2_K", "IQ4_XS"])
def test_packed_weights_on_cuda_equal_cpu(tiny_dir, type_name):
    src = quantized(load_hf_dir(tiny_dir), GGMLQuantizationType[type_name])
    gpu = LlamaModel(src, "fast", "cuda")
    assert gpu.blocks[0].ffn.down.rows.device.type == "cuda"  # packed bytes live on the GPU
    assert gpu.blocks[0].ffn.down.rows.dtype == torch.uint8
    prompt = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    cpu_logits, cpu_tokens = greedy(LlamaModel(src, "fast", "cpu"), prompt, 16)
    gpu_logits, gpu_tokens = greedy(gpu, prompt, 16)
    assert torch.allclose(gpu_logits, cpu_logits, atol=1e-3, rtol=1e-3)
    assert gpu_tokens == cpu_tokens

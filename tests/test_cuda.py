"""The CUDA path: the same model on the GPU gives the CPU's answers, for float and packed
quantized weights. Skipped on machines without a CUDA GPU (CI has none); run on a GPU
machine with `python -m pytest tests/test_cuda.py`."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType

from llmpress.formats import get_format
from llmpress.io.hf import load_hf_dir
from llmpress.io.source import ModelSource, TensorRef
from llmpress.models.llama import LlamaModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU; this machine has none")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import transformers
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=512, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory)
    return directory


def quantized(src: ModelSource, ggml_type: GGMLQuantizationType) -> ModelSource:
    """Every matmul weight of src requantized to ggml_type, in memory."""
    fmt = get_format(ggml_type)
    tensors = dict(src.tensors)
    for name, ref in src.tensors.items():
        if len(ref.shape) != 2 or name == "token_embd.weight":
            continue
        values = get_format(ref.ggml_type).dequantize(ref.read_bytes(), ref.shape).numpy()
        packed = torch.from_numpy(fmt.quantize(values).reshape(-1))
        tensors[name] = TensorRef(name, ggml_type, ref.shape, packed.numel(),
                                  lambda p=packed: p)
    return ModelSource(src.path, src.metadata, tensors, src.file_bytes)


def greedy(model: LlamaModel, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
    cache = model.new_cache(prompt.shape[1] + steps)
    logits = model(prompt, cache)
    first_logits, tokens = logits[0].cpu(), []
    for _ in range(steps):
        tokens.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[tokens[-1]]]), cache)
    return first_logits, tokens


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

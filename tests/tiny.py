"""Tiny random models for fast tests: a transformers checkpoint saved to a directory, and
the same weights requantized in memory to any GGUF block format."""

from __future__ import annotations

from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from llmpress.formats import get_format
from llmpress.io.source import ModelSource, TensorRef

ARCHITECTURES = {  # model_type -> (config class, model class)
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def save_tiny_hf_model(directory: Path, model_type: str = "llama", seed: int = 0,
                       **overrides) -> Path:
    import transformers
    config_cls, model_cls = (getattr(transformers, n) for n in ARCHITECTURES[model_type])
    settings = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                    max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**(settings | overrides)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(directory)
    return directory


def quantized(src: ModelSource, ggml_type: GGMLQuantizationType,
              embedding: bool = False) -> ModelSource:
    """Every matmul weight of src requantized to ggml_type, in memory; the token embedding
    too where asked (a head tied to it then runs a kernel, whose rows do not depend on
    how many are multiplied at once, as torch's float matmul's can)."""
    fmt = get_format(ggml_type)
    tensors = dict(src.tensors)
    for name, ref in src.tensors.items():
        if len(ref.shape) != 2 or (name == "token_embd.weight" and not embedding):
            continue
        values = get_format(ref.ggml_type).dequantize(ref.read_bytes(), ref.shape).numpy()
        packed = torch.from_numpy(fmt.quantize(values).reshape(-1))
        tensors[name] = TensorRef(name, ggml_type, ref.shape, packed.numel(),
                                  lambda p=packed: p)
    return ModelSource(src.path, src.metadata, tensors, src.file_bytes)


def greedy(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
    """-> (prompt logits on the CPU, greedy tokens), decoding one token at a time."""
    cache = model.new_cache(prompt.shape[1] + steps)
    logits = model(prompt, cache)
    first_logits, tokens = logits[0].cpu(), []
    for _ in range(steps):
        tokens.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[tokens[-1]]]), cache)
    return first_logits, tokens


def logits_by_split(model, tokens: torch.Tensor, splits: list[list[int]],
                    threads: list[int]) -> list[torch.Tensor]:
    """The logits (1, T, vocab) of a prompt fed in pieces of the given sizes, each split
    with its own thread count and a fresh cache (the caller restores torch's threads)."""
    results = []
    for n_threads, split in zip(threads, splits):
        torch.set_num_threads(n_threads)
        cache, start, parts = model.new_cache(tokens.shape[1] + 2), 0, []
        for n in split:
            parts.append(model(tokens[:, start:start + n], cache))
            start += n
        results.append(torch.cat(parts, dim=1))
    return results

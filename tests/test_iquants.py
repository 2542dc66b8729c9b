"""Files llama.cpp writes in the grid i-quants (IQ1_S ... IQ3_S) and the ternary TQ1_0 /
TQ2_0: they load, dequantize exactly and run like llama.cpp runs them.

The files are made by llama.cpp's own quantizer (llama_model_quantize, with a random
importance matrix: the very-low-bit types refuse to work without one) from a random
two-layer Llama whose widths are multiples of 256 (iquant_files.py; conftest makes each
file once per session), so that every matmul gets the type asked for (in the default
model only the 1536-wide ffn_down rows could: llama.cpp gives its 576-wide rows other
types). References, all independent of our code:
- gguf-py's dequantize, bit for bit, on every tensor of every file;
- llama.cpp's logits on the F32 file gguf-py dequantizes the quantized file to: our exact
  mode on the quantized file must give the same logits (float rounding only);
- llama.cpp's logits on the quantized file itself (its own 8-bit activation rounding):
  fast mode, which rounds activations as llama.cpp does, must not stray further from
  exact mode than llama.cpp does (every type here has an integer kernel; the kernels'
  own unit tests are in test_kernel_qdot.py).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGMLQuantizationType
from gguf import quants as gguf_quants

from conftest import copy_metadata
from llmpress.formats import get_format
from llmpress.io.gguf import load_gguf
from llmpress.kernels import cpu
from llmpress.models.llama import LlamaModel

T = GGMLQuantizationType
TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0"]
N_TOKENS = 128


def mean_kld(base_logits: torch.Tensor, logits: torch.Tensor) -> float:
    base = base_logits.double().log_softmax(-1)
    other = logits.double().log_softmax(-1)
    return (base.exp() * (base - other)).sum(-1).mean().item()


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).double().mean().item()


def write_dequantized(source: Path, path: Path) -> Path:
    """`source` with every tensor dequantized to F32 by gguf-py."""
    reader = GGUFReader(source)
    writer = gguf.GGUFWriter(path, "llama")
    copy_metadata(reader, writer)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        writer.add_tensor(t.name, gguf_quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(str(path), n_ctx=len(ids), n_batch=len(ids), logits_all=True,
                          type_k=0, type_v=0, n_threads=2, verbose=False)  # F32 KV cache
    llm.eval(ids)
    return torch.from_numpy(llm.scores[:len(ids)].copy())


def our_logits(path: Path, ids: list[int], mode: str) -> torch.Tensor:
    model = LlamaModel(load_gguf(path), mode=mode)
    tokens = torch.tensor([ids])
    return model(tokens, model.new_cache(len(ids)))[0].float()


@pytest.fixture(scope="module")
def token_ids(default_model_path, wikitext_bytes) -> list[int]:
    vocab = llama_cpp.Llama(str(default_model_path), vocab_only=True, verbose=False)
    return vocab.tokenize(wikitext_bytes[:4000], add_bos=False, special=False)[:N_TOKENS]


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: T(t.tensor_type).name for t in GGUFReader(path).tensors}


@pytest.mark.slow
@pytest.mark.parametrize("type_name", TYPES)
def test_llama_cpp_file_dequantizes_like_gguf_py(quantized_file, type_name):
    """Every tensor of llama.cpp's file, bit for bit; the layers' matmuls are of the type
    asked for (llama.cpp's mixes keep some, e.g. attn_v, at more bits)."""
    path = quantized_file(type_name)
    types = tensor_types(path)
    assert types["blk.0.ffn_gate.weight"] == type_name, types
    for t in GGUFReader(path).tensors:
        ggml_type = T(t.tensor_type)
        rows = np.asarray(t.data).view(np.uint8).reshape(-1)
        shape = tuple(int(n) for n in reversed(t.shape))
        ours = get_format(ggml_type).dequantize(torch.from_numpy(rows.copy()), shape)
        expected = gguf_quants.dequantize(t.data, ggml_type).reshape(shape).astype(np.float32)
        assert np.array_equal(ours.numpy().view(np.uint32), expected.view(np.uint32)), t.name


@pytest.mark.slow
@pytest.mark.parametrize("type_name", TYPES)
def test_exact_mode_matches_llama_cpp(quantized_file, token_ids, tmp_path, type_name):
    """Our exact mode on the quantized file against llama.cpp on its F32 dequantization
    (the same weights, no activation rounding): float rounding only. Then llama.cpp on the
    quantized file, which rounds activations to 8 bits for these types: its distance from
    exact mode bounds fast mode's (where our kernels run, the same rounding)."""
    path = quantized_file(type_name)
    exact = our_logits(path, token_ids, "exact")
    on_f32 = llama_cpp_logits(write_dequantized(path, tmp_path / "dequantized.gguf"), token_ids)
    kld_f32 = mean_kld(on_f32, exact)
    theirs = llama_cpp_logits(path, token_ids)
    kld_theirs = mean_kld(exact, theirs)
    fast = our_logits(path, token_ids, "fast")
    kld_fast = mean_kld(exact, fast)
    print(f"\n{type_name}: exact vs llama.cpp on F32 KLD {kld_f32:.3g} (top-1 "
          f"{top1_agreement(exact, on_f32):.3f}); vs llama.cpp on the file {kld_theirs:.3g} "
          f"(top-1 {top1_agreement(exact, theirs):.3f}); fast vs exact {kld_fast:.3g} "
          f"(top-1 {top1_agreement(exact, fast):.3f})")
    assert kld_f32 < 1e-5 and top1_agreement(exact, on_f32) >= 0.99
    assert kld_theirs < 0.05 and top1_agreement(exact, theirs) >= 0.9
    if cpu.available():  # every one of these types has an integer kernel
        assert cpu.supports(T[type_name])
        assert 0 < kld_fast <= 1.5 * kld_theirs

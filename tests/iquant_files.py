"""The i-quant files of test_iquants.py and test_iq3_quantize.py: a random two-layer Llama
(F32, every width a multiple of 256, so every matmul gets the type asked for) and what
llama.cpp's own quantizer (llama_model_quantize) writes from it. conftest.py makes each
file once per session (the `tiny_f32` and `quantized_file` fixtures)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from gguf import GGUFReader

from conftest import copy_metadata

# A two-layer Llama on the default model's tokenizer, every width a multiple of 256.
TINY = {"llama.block_count": 2, "llama.embedding_length": 256, "llama.feed_forward_length": 512,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 64, "llama.context_length": 512}
# llama.cpp's file type for a tensor type: its IQ2_S mix stores IQ2_XS, IQ2_M stores IQ2_S.
FILE_TYPE_FOR = {"IQ2_S": "IQ2_M"}


def write_tiny_llama(default_model_path: Path, path: Path) -> Path:
    """Random weights (seeded), F32, the default model's tokenizer and vocabulary."""
    reader = GGUFReader(default_model_path)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    dim, ffn, kv = 256, 512, 128
    writer = gguf.GGUFWriter(path, "llama")
    copy_metadata(reader, writer, skip=tuple(TINY))
    for key, value in TINY.items():
        writer.add_uint32(key, value)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    rng = np.random.default_rng(0)

    def add(name: str, rows: int, cols: int, std: float) -> None:
        writer.add_tensor(name, (rng.standard_normal((rows, cols)) * std).astype(np.float32))

    add("token_embd.weight", vocab, dim, 0.15)  # tied output: logits of a few units
    writer.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    for i in range(TINY["llama.block_count"]):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight",
                              (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
        for name, rows, cols in (("attn_q", dim, dim), ("attn_k", kv, dim), ("attn_v", kv, dim),
                                 ("attn_output", dim, dim), ("ffn_gate", ffn, dim),
                                 ("ffn_up", ffn, dim), ("ffn_down", dim, ffn)):
            add(f"blk.{i}.{name}.weight", rows, cols, 1 / np.sqrt(cols))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_importance(source: Path) -> dict[str, np.ndarray]:
    """The importance matrix llama_quantize hands llama.cpp (seeded): per matrix but the
    embedding, uniform in [0.1, 2)."""
    rng = np.random.default_rng(1)
    matrices = [t for t in GGUFReader(source).tensors
                if len(t.shape) == 2 and t.name != "token_embd.weight"]
    return {t.name: rng.uniform(0.1, 2.0, int(t.shape[0])).astype(np.float32) for t in matrices}


def llama_quantize(source: Path, out: Path, type_name: str) -> Path:
    """llama.cpp's quantizer in the file type that stores type_name, with random_importance
    (as llama-quantize passes one from llama-imatrix)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FILE_TYPE_FOR.get(type_name, type_name)}")
    params.nthread = 2
    importance = random_importance(source)
    entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
    for entry, (name, values) in zip(entries, importance.items()):
        entry.name = name.encode()
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = values.size
    params.imatrix = entries
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0
    return out

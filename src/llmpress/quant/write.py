"""The one model-writing path: a model, a type per tensor and optional replacement bytes
in, a GGUF file out (or, every tensor in one float type, a Hugging Face directory).

    reports = write_gguf(output, source, choices, metadata,
                         replacements={"blk.0.attn_q.weight": gptq_bytes},
                         importance=lambda choice: imatrix_entry_or_none)

The producers decide; this module only carries out the plan. `quantize` (quant/quantize.py)
gives llama-quantize's type mix and the imatrix, `quant/budget.py` a mix chosen to a size,
GPTQ/AWQ (quant/calibrated.py) the bytes of the Linears it solved, `prune` and `distill`
a source whose changed tensors are float32 and the types to store them in. Each tensor,
in plan order, is then written as given (a replacement), copied byte for byte (its type
stays) or dequantized exactly and quantized into the new type, and streamed to the file
before the next one is read: peak memory is the mapped input plus a few copies of the
largest tensor. The file is written beside the target and renamed (io/files.py).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from llmpress.errors import LlmpressError
from llmpress.formats import dequantize_tensor, get_format
from llmpress.io.files import replacing_directory
from llmpress.io.gguf_write import (
    GGUFLayout,
    GGUFSplitWriter,
    GGUFStreamWriter,
    TensorSlot,
    plan_gguf,
)
from llmpress.io.hf import unpermute_qk
from llmpress.io.names import GGUF_TO_HF_CONFIG, PERMUTED_QK_ARCHS, hf_tensor_name
from llmpress.io.source import ModelSource, TensorRef
from llmpress.io.tokenizer import Tokenizer
from llmpress.kernels.cpu import one_torch_thread
from llmpress.models.config import config_from_source
from llmpress.quant.mix import TensorChoice


@dataclass(frozen=True)
class TensorReport:
    name: str
    shape: tuple[int, ...]
    source_type: str
    type: str
    n_bytes: int
    # sum(w (x - q)^2) / sum(w x^2), w = the importance column weight (1 without one), over
    # up to `error_rows` evenly spaced rows; 0 for a copied tensor, None when not measured
    error: float | None
    used_imatrix: bool
    fell_back: bool
    seconds: float


ProgressCallback = Callable[[int, int, TensorReport], None]  # (done, total, last tensor)
Importance = Callable[[TensorChoice], "np.ndarray | None"]  # the weights for a tensor's columns


def layout_of(metadata: Mapping[str, Any], choices: Sequence[TensorChoice]) -> GGUFLayout:
    """Where each tensor of the plan goes in the file, from names, types and shapes only."""
    return plan_gguf(metadata, [TensorSlot(c.name, c.target_type, c.shape) for c in choices])


def write_gguf(output: Path | str, source: ModelSource, choices: Sequence[TensorChoice],
               metadata: Mapping[str, Any], *,
               replacements: Mapping[str, np.ndarray] | None = None,
               importance: Importance | None = None, error_rows: int = 0,
               protect: Sequence[Path] = (), layout: GGUFLayout | None = None,
               parts: Sequence[GGUFLayout] | None = None,
               progress: ProgressCallback | None = None) -> tuple[TensorReport, ...]:
    """Write `choices` (in order) of `source` to `output` with `metadata`.

    replacements: tensor name -> uint8 bytes already in the choice's target type, written
    as they are. importance: the column weights the quantizer uses for a tensor whose type
    changes (None: none). error_rows: rows per requantized tensor dequantized back to
    report its error (0: not measured). parts: a split model's layouts (io.gguf_write.
    plan_split), written as OUTPUT-0000i-of-0000n.gguf. The source's own files are always
    protected from being overwritten; `protect` adds others."""
    replacements = dict(replacements or {})
    guarded = [source.path, *source.parts, *protect]
    if source.path.is_dir():  # a Hugging Face directory: its files are the input
        guarded += [p for p in source.path.iterdir() if p.is_file()]
    if parts is not None:
        writer_cm = GGUFSplitWriter(output, parts, protect=guarded)
    else:
        writer_cm = GGUFStreamWriter(output, layout or layout_of(metadata, choices), guarded)
    reports = []
    with writer_cm as writer, one_torch_thread():
        for done, choice in enumerate(choices, 1):
            report, data = _tensor(source.tensors[choice.name], choice,
                                   replacements.pop(choice.name, None), importance, error_rows)
            writer.write_tensor(choice.name, data)
            del data
            reports.append(report)
            if progress is not None:
                progress(done, len(choices), report)
    return tuple(reports)


def _tensor(ref: TensorRef, choice: TensorChoice, replacement: np.ndarray | None,
            importance: Importance | None, error_rows: int) -> tuple[TensorReport, Any]:
    """One tensor's bytes: the replacement, a copy when its type stays, else requantized."""
    t0 = time.perf_counter()
    weights = None
    if replacement is not None:
        weights = importance(choice) if importance is not None else None
        data, error = replacement, None
    elif choice.target_type == choice.source_type:
        data, error = ref.read_bytes(), 0.0
    else:
        weights = importance(choice) if importance is not None else None
        values = dequantize_ref(ref)
        try:
            data = quantize_tensor(values, choice.target_type, weights)
        except LlmpressError as exc:  # the formats know rows, not tensor names
            raise LlmpressError(f"tensor {choice.name}: {exc}") from None
        error = (relative_error(values, data, choice.target_type, weights, error_rows)
                 if error_rows > 0 else None)
    report = TensorReport(
        name=choice.name, shape=choice.shape, source_type=choice.source_type.name,
        type=choice.target_type.name,
        n_bytes=int(data.numel() if isinstance(data, torch.Tensor) else np.asarray(data).nbytes),
        error=error, used_imatrix=weights is not None, fell_back=choice.fell_back,
        seconds=time.perf_counter() - t0)
    return report, data


# --- one tensor ------------------------------------------------------------------------
def dequantize_ref(ref: TensorRef) -> np.ndarray:
    """The tensor as float32 numpy, exactly (ggml's to_float)."""
    raw = ref.read_bytes()
    if ref.ggml_type == T.F32:
        return raw.numpy().view(np.float32).reshape(ref.shape)
    return dequantize_tensor(raw, ref.ggml_type, ref.shape).numpy()


def quantize_tensor(values: np.ndarray, target: T, importance: np.ndarray | None = None
                    ) -> np.ndarray:
    """float32 (..., rows, row) -> uint8 GGUF bytes of `target`.

    `importance` is (row,) or, for a stack of experts, (n_expert * row,): each expert's
    rows get their own slice (llama_tensor_quantize_impl's imatrix_for_row).
    """
    fmt = get_format(target)
    row = values.shape[-1]
    matrices = values.reshape(-1, *values.shape[-2:]) if values.ndim >= 2 else values[None, None]
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32).reshape(-1, row)
        if importance.shape[0] != matrices.shape[0]:
            raise LlmpressError(f"importance has {importance.shape[0]} rows of {row}, the tensor "
                                f"{matrices.shape[0]} matrices")
    parts = [fmt.quantize(m, None if importance is None else importance[i])
             for i, m in enumerate(matrices)]
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out.reshape(-1)


def read_float(ref: TensorRef) -> torch.Tensor:
    """A tensor dequantized exactly to float32 (a copy)."""
    values = get_format(ref.ggml_type).dequantize(ref.read_bytes(), ref.shape)
    return values.clone() if ref.ggml_type == T.F32 else values


def relative_error(values: np.ndarray, raw: np.ndarray, target: T,
                   importance: np.ndarray | None, max_rows: int) -> float:
    """sum(w (x - q)^2) / sum(w x^2) over up to `max_rows` evenly spaced rows (all rows
    when there are fewer), w = the row's importance (1 without an imatrix)."""
    row = values.shape[-1]
    x = values.reshape(-1, row)
    picked = np.unique(np.linspace(0, x.shape[0] - 1, min(x.shape[0], max_rows)).astype(np.int64))
    stored = torch.from_numpy(np.ascontiguousarray(raw.reshape(x.shape[0], -1)[picked]))
    restored = dequantize_tensor(stored, target, (len(picked), row)).numpy().astype(np.float64)
    x = x[picked].astype(np.float64)
    w = np.ones((1, row))
    if importance is not None:  # each expert's rows have their own weights
        per_expert = np.asarray(importance, dtype=np.float64).reshape(-1, row)
        rows_per_expert = values.reshape(-1, row).shape[0] // per_expert.shape[0]
        w = per_expert[picked // rows_per_expert]
    signal = float((w * x * x).sum())
    noise = float((w * (x - restored) ** 2).sum())
    return noise / signal if signal > 0 else noise


# --- Hugging Face directory (safetensors) -----------------------------------------------
HF_MODEL_TYPES = {"llama": ("llama", "LlamaForCausalLM"), "mistral": ("llama", "LlamaForCausalLM"),
                  "qwen2": ("qwen2", "Qwen2ForCausalLM"), "qwen3": ("qwen3", "Qwen3ForCausalLM")}
HF_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "generation_config.json", "chat_template.jinja", "tokenizer.model",
                      "vocab.json", "merges.txt", "added_tokens.json")


def hf_config(source: ModelSource, dtype: str) -> dict[str, Any]:
    """config.json for the model: the GGUF keys mapped back (io.names)."""
    cfg = config_from_source(source)
    widths = {(lc.n_heads, lc.n_kv_heads, lc.ffn_dim) for lc in cfg.layers}
    if len(widths) != 1:
        raise LlmpressError("a Hugging Face config holds one width for all layers; prune with "
                            "--uniform for a Hugging Face directory")
    if "rope_freqs.weight" in source.tensors:
        raise LlmpressError("llama3 RoPE frequency factors cannot be written back to a Hugging "
                            "Face config; write GGUF instead")
    model_type, model_class = HF_MODEL_TYPES[cfg.architecture]
    n_heads, n_kv, ffn = widths.pop()
    arch = cfg.architecture
    config: dict[str, Any] = {"architectures": [model_class], "model_type": model_type}
    for gguf_key, hf_key in GGUF_TO_HF_CONFIG.items():
        if f"{arch}.{gguf_key}" in source.metadata:
            config[hf_key] = source.metadata[f"{arch}.{gguf_key}"]
    config.update(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        intermediate_size=ffn, num_attention_heads=n_heads, num_key_value_heads=n_kv,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
        max_position_embeddings=cfg.context_length, hidden_act="silu",
        tie_word_embeddings=cfg.tied_output, attention_bias=cfg.qkv_bias, torch_dtype=dtype)
    if cfg.rope_scale != 1.0:
        config["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scale}
    for key, hf_key in (("tokenizer.ggml.bos_token_id", "bos_token_id"),
                        ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        if key in source.metadata:
            config[hf_key] = int(source.metadata[key])
    return config


def hf_tensors(source: ModelSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor under its HF name, q/k rows back in HF's rotary layout for llama."""
    cfg = config_from_source(source)
    heads = {lc.index: (lc.n_heads, lc.n_kv_heads) for lc in cfg.layers}
    out = {}
    for name, ref in source.tensors.items():
        hf_name = hf_tensor_name(name)
        if hf_name is None:
            raise LlmpressError(f"tensor {name} has no Hugging Face name; write GGUF instead")
        values = read_float(ref)
        if cfg.architecture in PERMUTED_QK_ARCHS and name.startswith("blk."):
            layer, part = int(name.split(".")[1]), name.split(".")[2]
            if part in ("attn_q", "attn_k"):
                values = unpermute_qk(values, heads[layer][0 if part == "attn_q" else 1])
        out[hf_name] = values.to(dtype).contiguous()
    return out


def write_hf_dir(source: ModelSource, out_dir: str | Path, dtype: str = "bfloat16",
                 tokenizer_from: ModelSource | None = None) -> Path:
    """The model as a Hugging Face directory: config.json, model.safetensors (every tensor
    in `dtype`) and the tokenizer of `tokenizer_from` (default: the source itself): copied
    from an HF directory, or tokenizer.json built from the GGUF vocabulary. Uniform
    widths only. Written to a temporary directory, then renamed."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if dtype not in HF_DTYPES:
        raise LlmpressError(f"--hf-dtype {dtype}: use one of {', '.join(HF_DTYPES)}")
    if out_dir.exists():
        raise LlmpressError(f"{out_dir} exists; choose a new directory")
    if not out_dir.parent.is_dir():
        raise LlmpressError(f"cannot write {out_dir}: {out_dir.parent} does not exist")
    config = hf_config(source, dtype)
    tensors = hf_tensors(source, HF_DTYPES[dtype])
    if config["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)
    with replacing_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_hf_tokenizer(tokenizer_from or source, tmp)
    return out_dir


def _write_hf_tokenizer(original: ModelSource, out: Path) -> None:
    if original.path.is_dir():
        for name in HF_TOKENIZER_FILES:
            if (original.path / name).is_file():
                shutil.copy2(original.path / name, out / name)
        return
    if "tokenizer.ggml.tokens" not in original.metadata:
        return  # no vocabulary in the file: weights and config only
    tok = Tokenizer.from_gguf_metadata(original.metadata)
    tok._engine.save(str(out / "tokenizer.json"))
    special = {}
    if tok.bos_id is not None:
        special["bos_token"] = tok.token_to_piece(tok.bos_id)
    if tok.eos_id is not None:
        special["eos_token"] = tok.token_to_piece(tok.eos_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos,
              "add_eos_token": tok.add_eos, **special,
              "model_max_length": int(original.metadata.get(
                  f"{original.architecture}.context_length", 2048))}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


__all__ = ["TensorReport", "dequantize_ref", "layout_of", "quantize_tensor", "read_float",
           "relative_error", "write_gguf", "write_hf_dir"]

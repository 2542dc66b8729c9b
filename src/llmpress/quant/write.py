"""The one model-writing path: a model, a type per tensor and optional replacement bytes
in, a GGUF file out.

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
from llmpress.io.gguf_write import GGUFLayout, GGUFStreamWriter, TensorSlot, plan_gguf
from llmpress.io.source import ModelSource, TensorRef
from llmpress.kernels.cpu import one_torch_thread
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
               progress: ProgressCallback | None = None) -> tuple[TensorReport, ...]:
    """Write `choices` (in order) of `source` to `output` with `metadata`.

    replacements: tensor name -> uint8 bytes already in the choice's target type, written
    as they are. importance: the column weights the quantizer uses for a tensor whose type
    changes (None: none). error_rows: rows per requantized tensor dequantized back to
    report its error (0: not measured). The source's own files are always protected from
    being overwritten; `protect` adds others."""
    replacements = dict(replacements or {})
    layout = layout or layout_of(metadata, choices)
    guarded = [source.path, *protect]
    if source.path.is_dir():  # a Hugging Face directory: its files are the input
        guarded += [p for p in source.path.iterdir() if p.is_file()]
    reports = []
    with GGUFStreamWriter(output, layout, protect=guarded) as writer, one_torch_thread():
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


__all__ = ["TensorReport", "dequantize_ref", "layout_of", "quantize_tensor", "relative_error",
           "write_gguf"]

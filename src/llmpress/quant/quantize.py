"""`quantize_model`: a model in, a GGUF of another type mix out, like llama-quantize.

    report = quantize_model(QuantizeConfig("f32.gguf", "q4km.gguf", "Q4_K_M",
                                           imatrix="imatrix.gguf"))

Follows llama.cpp's llama_model_quantize_impl (src/llama-quant.cpp): the same tensor
order, metadata (input KVs, then general.quantization_version and general.file_type,
then the quantize.imatrix.* keys), type mix (quant/mix.py), importance per tensor and
padding, so for the same input our file is byte-identical to llama-quantize's wherever
the block quantizers are. This module makes the plan (types, metadata, importance);
quant/write.py writes it, one tensor at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType

from llmpress import hub
from llmpress.errors import LlmpressError
from llmpress.formats import FORMATS, get_format
from llmpress.io.gguf_split import SPLIT_KEYS, split_path, split_prefix
from llmpress.io.gguf_write import GGUFLayout, MetadataValue, SplitLimits, TensorSlot, plan_split
from llmpress.io.loader import load_source
from llmpress.io.source import ModelSource
from llmpress.quant.imatrix import read_imatrix_file
from llmpress.quant.mix import (
    FLOAT_TYPES,
    MixOptions,
    TensorChoice,
    choose_types,
    file_type,
    model_facts,
    requires_imatrix,
    tensors_of,
)
from llmpress.quant.write import (  # the tensor quantizer is part of this module's API too
    ProgressCallback,
    TensorReport,
    dequantize_ref,
    layout_of,
    quantize_tensor,
    write_gguf,
)

GGML_QNT_VERSION = 2  # ggml.h: written to general.quantization_version
IMATRIX_STRING_LIMIT = 127  # llama_model_kv_override.val_str holds 128 bytes
_u32 = GGUFValueType.UINT32  # gguf_set_val_u32


# --- configuration and report ----------------------------------------------------------
@dataclass(frozen=True)
class QuantizeConfig:
    """Everything `llmpress quantize` takes; validated on construction."""

    input: Path | str | ModelSource
    output: Path | str
    type: str  # a file type: Q4_K_M, Q8_0, F16 ... (quant.mix.FILE_TYPES)
    imatrix: Path | str | None = None  # llama.cpp imatrix GGUF, or the legacy .dat
    allow_requantize: bool = False
    tensor_types: tuple[tuple[str, str], ...] = ()  # (regex, type): --tensor-type
    output_type: str | None = None
    embedding_type: str | None = None
    pure: bool = False
    error_rows: int = 256  # rows per tensor dequantized back to report the error; 0: none
    # The type of every tensor, chosen elsewhere (quant.budget), instead of the mix's rules;
    # `type` then only names general.file_type.
    choices: tuple[TensorChoice, ...] | None = None
    split: SplitLimits | None = None  # write a split model (--split-max-size / -tensors)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "tensor_types", tuple(tuple(p) for p in self.tensor_types))
        self.mix_options(has_imatrix=False)  # validates type names and patterns
        if self.imatrix is not None and not Path(self.imatrix).is_file():
            raise LlmpressError(f"{self.imatrix}: no such importance matrix file")
        if not isinstance(self.input, ModelSource):  # a file, a directory or a pulled name
            object.__setattr__(self, "input", hub.resolve(self.input))
        if not isinstance(self.input, ModelSource) and (
                Path(self.input).resolve() == self.output.resolve()):
            raise LlmpressError(f"{self.output}: the output would overwrite the input; "
                                "choose another output file")

    def mix_options(self, has_imatrix: bool) -> MixOptions:
        return MixOptions(self.type, has_imatrix=has_imatrix, tensor_types=self.tensor_types,
                          output_type=self.output_type, embedding_type=self.embedding_type,
                          pure=self.pure)


@dataclass(frozen=True)
class QuantizeReport:
    input: str
    output: str
    file_type: str
    tensors: tuple[TensorReport, ...]
    file_bytes: int
    n_params: int
    seconds: float
    imatrix_entries: int

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """File bytes * 8 / parameters, as the reference tables and `llmpress info` count it
        (llama-quantize's own "BPW" line counts tensor bytes only)."""
        return self.file_bytes * 8 / max(self.n_params, 1)


# --- importance matrix -----------------------------------------------------------------
@dataclass(frozen=True)
class ImportanceMatrix:
    """Per-tensor mean squared input activation, as llama-quantize's load_imatrix gives it."""

    label: str  # the path as given: written to quantize.imatrix.file
    entries: Mapping[str, np.ndarray] = field(repr=False)  # name -> float32 (n_expert * row,)
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0


def load_imatrix(path: Path | str) -> ImportanceMatrix:
    """llama-quantize's load_imatrix: the mean squared activation per expert and column,
    sums / lround(count) for GGUF (a zero count gives ones), sums / ncall for the legacy
    .dat (a zero ncall leaves the values as stored)."""
    found = read_imatrix_file(path)
    entries = {}
    for name, sums in found.sums.items():
        count = found.counts[name]
        if found.legacy:
            entries[name] = sums / count[0] if count[0] > 0 else sums
            continue
        per_expert = sums.reshape(count.size, -1)
        n = np.round(count.astype(np.float64)).astype(np.float32)[:, None]  # std::lround
        safe = np.where(n > 0, n, np.float32(1))
        entries[name] = np.where(n > 0, per_expert / safe, np.float32(1)).astype(np.float32).ravel()
    return ImportanceMatrix(str(path), entries, tuple(found.datasets), found.chunk_count)


# --- planning --------------------------------------------------------------------------
def output_metadata(source_metadata: Mapping[str, Any], ftype_number: int,
                    imatrix: ImportanceMatrix | None) -> dict[str, Any]:
    """The output's KVs in llama-quantize's order: the input's (split keys dropped), then
    quantization version and file type, then the imatrix keys (gguf_set_val_* appends)."""
    appended: dict[str, Any] = {
        "general.quantization_version": MetadataValue(_u32, GGML_QNT_VERSION),
        "general.file_type": MetadataValue(_u32, ftype_number),
    }
    if imatrix is not None:
        appended["quantize.imatrix.file"] = _truncated(imatrix.label)
        if imatrix.datasets:
            appended["quantize.imatrix.dataset"] = _truncated(imatrix.datasets[0])
        appended["quantize.imatrix.entries_count"] = MetadataValue(_u32, len(imatrix.entries))
        if imatrix.chunk_count > 0:
            appended["quantize.imatrix.chunks_count"] = MetadataValue(_u32, imatrix.chunk_count)
    kept = {k: v for k, v in source_metadata.items()
            if k not in appended and k not in SPLIT_KEYS}
    return kept | appended


def _truncated(text: str) -> str:
    """What strncpy into llama_model_kv_override.val_str keeps: 127 bytes."""
    return text.encode("utf-8")[:IMATRIX_STRING_LIMIT].decode("utf-8", errors="ignore")


@dataclass(frozen=True)
class QuantizePlan:
    source: ModelSource
    choices: tuple[TensorChoice, ...]  # in output order
    metadata: dict[str, Any]
    split: SplitLimits | None = None

    @cached_property
    def layout(self) -> GGUFLayout:
        return layout_of(self.metadata, self.choices)

    @cached_property
    def parts(self) -> tuple[GGUFLayout, ...] | None:
        """A split model's part layouts (None: one file)."""
        if self.split is None:
            return None
        slots = [TensorSlot(c.name, c.target_type, c.shape) for c in self.choices]
        return plan_split(self.metadata, slots, self.split)

    @property
    def file_bytes(self) -> int:
        return sum(p.file_bytes for p in self.parts) if self.parts else self.layout.file_bytes

    def written_path(self, output: Path) -> Path:
        """The file to load the result from: the output, or a split model's first part."""
        return output if self.parts is None else split_path(split_prefix(output), 0,
                                                            len(self.parts))

    def report(self, tensors: tuple[TensorReport, ...], output: Path, file_type_name: str,
               imatrix: ImportanceMatrix | None, started: float) -> QuantizeReport:
        """What was written, once write_gguf has written the plan."""
        return QuantizeReport(
            input=str(self.source.path), output=str(self.written_path(output)),
            file_type=file_type_name, tensors=tensors, file_bytes=self.file_bytes,
            n_params=sum(math.prod(c.shape) for c in self.choices),
            seconds=time.perf_counter() - started,
            imatrix_entries=len(imatrix.entries) if imatrix else 0)


def plan_quantization(source: ModelSource, config: QuantizeConfig,
                      imatrix: ImportanceMatrix | None = None) -> QuantizePlan:
    """Types, metadata and layout of the output, from names, shapes and metadata only."""
    options = config.mix_options(has_imatrix=imatrix is not None)
    if config.choices is not None:
        choices = list(config.choices)
        if {c.name for c in choices} != set(source.tensors):
            raise LlmpressError(f"{source.path}: the type plan does not name this model's "
                                "tensors; was it made for another model?")
    else:
        choices = choose_types(tensors_of(source.tensors.values()),
                               model_facts(source.metadata), options)
    if source.path.is_dir():  # a Hugging Face directory: converted on the way
        choices = [_converted_type(c) for c in choices]
    if imatrix is None:
        needy = next((c for c in choices if requires_imatrix(c, source.architecture)), None)
        if needy is not None:  # llama-quantize refuses it too: the result would be garbage
            raise LlmpressError(f"tensor {needy.name}: {needy.target_type.name} needs an "
                                "importance matrix; pass --imatrix FILE (`llmpress imatrix`)")
    for c in choices:
        if c.target_type not in FORMATS or not FORMATS[c.target_type].writable:
            raise LlmpressError(f"tensor {c.name}: llmpress cannot write type {c.target_type.name}")
        row = c.shape[-1] if c.shape else 1
        block = get_format(c.target_type).block_size
        if row % block:
            raise LlmpressError(f"tensor {c.name}: rows of {row} values do not fit "
                                f"{c.target_type.name} blocks of {block}; choose another type")
        if (c.source_type != c.target_type and c.source_type not in FLOAT_TYPES
                and not config.allow_requantize):
            raise LlmpressError(
                f"{source.path}: tensor {c.name} is already quantized ({c.source_type.name}); "
                "requantizing loses quality, pass --allow-requantize to do it anyway")
        if c.source_type not in FORMATS:
            raise LlmpressError(f"tensor {c.name}: llmpress cannot read type {c.source_type.name}")
    metadata = output_metadata(source.metadata, options.ftype.number, imatrix)
    return QuantizePlan(source, tuple(choices), metadata, config.split)


def _converted_type(choice: TensorChoice) -> TensorChoice:
    """convert_hf_to_gguf stores 1-D tensors and norms as F32 whatever the output type
    (ModelBase.prepare_tensors); the mix then keeps them, as llama-quantize would."""
    kept = choice.target_type == choice.source_type
    if kept and choice.source_type in (T.F16, T.BF16) and (
            len(choice.shape) <= 1 or choice.name.endswith("_norm.weight")):
        return replace(choice, target_type=T.F32)
    return choice


# --- one tensor ------------------------------------------------------------------------
def _importance_for(choice: TensorChoice, imatrix: ImportanceMatrix | None) -> np.ndarray | None:
    """The entry llama-quantize passes for this tensor, with its size checks."""
    if imatrix is None or choice.name not in imatrix.entries:
        return None
    entry = imatrix.entries[choice.name]
    row = choice.shape[-1]
    n_expert = choice.shape[0] if len(choice.shape) >= 3 else 1
    if entry.size == row * n_expert:
        return entry
    if choice.name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return None  # always mismatched in old files; llama.cpp ignores it
    raise LlmpressError(f"{imatrix.label}: importance for {choice.name} has {entry.size} values, "
                        f"the tensor needs {row * n_expert}; was it made for another model?")


# --- the whole model -------------------------------------------------------------------
def quantize_model(config: QuantizeConfig, progress: ProgressCallback | None = None
                   ) -> QuantizeReport:
    started = time.perf_counter()
    source = load_source(config.input)
    imatrix = load_imatrix(config.imatrix) if config.imatrix is not None else None
    plan = plan_quantization(source, config, imatrix)
    reports = write_gguf(config.output, source, plan.choices, plan.metadata,
                         importance=lambda choice: _importance_for(choice, imatrix),
                         error_rows=config.error_rows, layout=plan.layout, parts=plan.parts,
                         progress=progress)
    return plan.report(reports, config.output, plan_file_type(config), imatrix, started)


def plan_file_type(config: QuantizeConfig) -> str:
    return file_type(config.type).name


__all__ = [
    "ImportanceMatrix", "QuantizeConfig", "QuantizePlan", "QuantizeReport", "TensorReport",
    "dequantize_ref", "load_imatrix", "plan_quantization", "quantize_model", "quantize_tensor",
]

"""Writing GGUF files: typed metadata, a precomputed layout, and a safe streaming writer.

The header (metadata, tensor infos, offsets) depends only on tensor types and shapes, so
it is computed first and written at once; then each tensor's bytes are streamed in as
they are produced, so no more than one tensor is ever held. The file is written to a
temporary name in the target directory, fsynced and renamed: an interrupted or failed
run never leaves a partial output, and the input is never overwritten.

Layout (gguf.cpp's gguf_write_out): "GGUF", version 3, tensor count, KV count, KVs,
tensor infos (name, n_dims, ne[], type, offset), zero padding to the alignment, then the
tensors, each padded to the alignment (llama-quantize pads the last one too).

A split model (gguf-split's layout, io/gguf_split.py) is planned by `plan_split` and
written by `GGUFSplitWriter`: one streamed file per part, all renamed into place at the end.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import GGUFValueType as V

from llmpress.errors import LlmpressError
from llmpress.io.files import replacing
from llmpress.io.gguf_split import (
    MAX_SPLITS,
    SPLIT_COUNT,
    SPLIT_NO,
    SPLIT_TENSORS_COUNT,
    split_path,
    split_prefix,
)

GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32

_SCALAR_FORMATS = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I",
    V.INT32: "<i", V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q",
    V.FLOAT64: "<d",
}  # fmt: skip
_ARRAY_DTYPES = {
    V.UINT8: "<u1", V.INT8: "<i1", V.UINT16: "<u2", V.INT16: "<i2", V.UINT32: "<u4",
    V.INT32: "<i4", V.FLOAT32: "<f4", V.BOOL: "?", V.UINT64: "<u8", V.INT64: "<i8",
    V.FLOAT64: "<f8",
}  # fmt: skip

# Our GGUF loader keeps plain values, not their GGUF types, so types are chosen again the
# way gguf-py's GGUFWriter.add_* writes each key (what llama.cpp's loader checks for):
# integers are uint32 except these; integer arrays are int32 (gguf-py's default) except
# these; floats are float32.
INT32_KEYS = {"general.sampling.top_k", "general.sampling.penalty_last_n",
              "general.sampling.mirostat"}
UINT8_ARRAY_KEYS = {"tokenizer.ggml.precompiled_charsmap"}  # llama-vocab reads u8/i8 only


@dataclass(frozen=True)
class MetadataValue:
    """One GGUF value with its type; item_type is set for arrays."""

    type: V
    value: Any
    item_type: V | None = None


def _scalar_type(key: str, value: Any) -> V:
    if isinstance(value, bool):
        return V.BOOL
    if isinstance(value, (int, np.integer)):
        if key in INT32_KEYS or value < 0:
            return V.INT32 if -(2**31) <= value < 2**31 else V.INT64
        return V.UINT32 if value < 2**32 else V.UINT64
    if isinstance(value, (float, np.floating)):
        return V.FLOAT32
    if isinstance(value, str):
        return V.STRING
    raise LlmpressError(f"metadata {key}: cannot store a {type(value).__name__} in GGUF")


def typed_value(key: str, value: Any) -> MetadataValue:
    """The GGUF type gguf-py would give this key and plain value."""
    if isinstance(value, MetadataValue):
        return value
    if isinstance(value, (list, tuple)):
        items = list(value)
        if any(isinstance(v, (list, tuple)) for v in items):
            raise LlmpressError(f"metadata {key}: nested arrays are not supported")
        if key in UINT8_ARRAY_KEYS:
            return MetadataValue(V.ARRAY, items, V.UINT8)
        if not items:
            return MetadataValue(V.ARRAY, items, V.INT32)
        first = items[0]
        if isinstance(first, str):
            item = V.STRING
        elif isinstance(first, bool):
            item = V.BOOL
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
            low, high = min(items), max(items)
            item = V.INT32 if -(2**31) <= low and high < 2**31 else V.INT64
        else:
            item = V.FLOAT32
        return MetadataValue(V.ARRAY, items, item)
    return MetadataValue(_scalar_type(key, value), value)


# --- encoding --------------------------------------------------------------------------
def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(key: str, mv: MetadataValue) -> bytes:
    if mv.type == V.STRING:
        return _string(str(mv.value))
    if mv.type in _SCALAR_FORMATS:
        return struct.pack(_SCALAR_FORMATS[mv.type], mv.value)
    if mv.type != V.ARRAY or mv.item_type is None:
        raise LlmpressError(f"metadata {key}: unsupported GGUF type {mv.type}")
    head = struct.pack("<IQ", int(mv.item_type), len(mv.value))
    if mv.item_type == V.STRING:
        return head + b"".join(_string(str(v)) for v in mv.value)
    if mv.item_type not in _ARRAY_DTYPES:
        raise LlmpressError(f"metadata {key}: unsupported array item type {mv.item_type}")
    return head + np.asarray(mv.value, dtype=_ARRAY_DTYPES[mv.item_type]).tobytes()


def _encode_kv(key: str, mv: MetadataValue) -> bytes:
    return _string(key) + struct.pack("<I", int(mv.type)) + _encode_value(key, mv)


# --- layout ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSlot:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: (..., rows, row_length)

    @property
    def ne(self) -> tuple[int, ...]:
        """ggml's dims, row length first, trailing 1s dropped (ggml_n_dims)."""
        ne = list(reversed(self.shape)) or [1]
        while len(ne) > 1 and ne[-1] == 1:
            ne.pop()
        return tuple(ne)

    @property
    def n_bytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        ne = self.ne
        if ne[0] % block_size:
            raise LlmpressError(f"tensor {self.name}: row length {ne[0]} is not a multiple of "
                                f"{self.ggml_type.name}'s block size {block_size}")
        return int(np.prod(ne, dtype=np.int64)) // block_size * type_size


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


@dataclass(frozen=True)
class GGUFLayout:
    header: bytes  # everything before the tensor data, padding included
    tensors: tuple[TensorSlot, ...]
    offsets: tuple[int, ...]  # of each tensor, from the start of the data section
    alignment: int

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def file_bytes(self) -> int:
        if not self.tensors:
            return len(self.header)
        return (len(self.header) + self.offsets[-1]
                + _pad(self.tensors[-1].n_bytes, self.alignment))


def plan_gguf(metadata: Mapping[str, Any], tensors: Sequence[TensorSlot]) -> GGUFLayout:
    """The header and tensor offsets of a GGUF file with these KVs (in order) and tensors.

    Values are MetadataValue or plain Python values (typed by `typed_value`).
    """
    alignment = int(_plain(metadata.get("general.alignment", DEFAULT_ALIGNMENT)))
    if alignment <= 0 or alignment & (alignment - 1):
        raise LlmpressError(f"general.alignment {alignment} is not a power of two")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise LlmpressError("duplicate tensor names: "
                            f"{sorted({n for n in names if names.count(n) > 1})}")
    parts = [b"GGUF", struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    parts += [_encode_kv(key, typed_value(key, value)) for key, value in metadata.items()]
    offsets, offset = [], 0
    for slot in tensors:
        ne = slot.ne
        parts.append(_string(slot.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne,
                                                      int(slot.ggml_type), offset))
        offsets.append(offset)
        offset += _pad(slot.n_bytes, alignment)
    header = b"".join(parts)
    header += bytes(_pad(len(header), alignment) - len(header))
    return GGUFLayout(header, tuple(tensors), tuple(offsets), alignment)


@dataclass(frozen=True)
class SplitLimits:
    """gguf-split's --split-max-size (tensor bytes per part, padded, headers not counted)
    and --split-max-tensors; either or both. A part always holds at least one tensor."""

    max_bytes: int | None = None
    max_tensors: int | None = None

    def __post_init__(self) -> None:
        if self.max_bytes is None and self.max_tensors is None:
            raise LlmpressError("give --split-max-size or --split-max-tensors")
        for flag, value in (("--split-max-size", self.max_bytes),
                            ("--split-max-tensors", self.max_tensors)):
            if value is not None and value <= 0:
                raise LlmpressError(f"{flag} {value}: must be positive")


def _split_groups(tensors: Sequence[TensorSlot], limits: SplitLimits,
                  alignment: int) -> list[list[TensorSlot]]:
    """gguf-split's split_strategy: a new part when the next tensor would pass a limit."""
    groups: list[list[TensorSlot]] = [[]]
    size = 0
    for slot in tensors:
        n_bytes = _pad(slot.n_bytes, alignment)
        current = groups[-1]
        full = current and (
            (limits.max_bytes is not None and size + n_bytes > limits.max_bytes)
            or (limits.max_tensors is not None and len(current) >= limits.max_tensors))
        if full:
            groups.append([])
            size = 0
        groups[-1].append(slot)
        size += n_bytes
    return groups


def plan_split(metadata: Mapping[str, Any], tensors: Sequence[TensorSlot],
               limits: SplitLimits) -> tuple[GGUFLayout, ...]:
    """The parts of a split GGUF as gguf-split lays them out: the model's metadata in the
    first part only, split.no / split.count / split.tensors.count in every part."""
    alignment = int(_plain(metadata.get("general.alignment", DEFAULT_ALIGNMENT)))
    groups = _split_groups(tensors, limits, alignment)
    if len(groups) > MAX_SPLITS:
        raise LlmpressError(f"{len(groups)} parts: a split model has at most {MAX_SPLITS}; "
                            "raise --split-max-size / --split-max-tensors")
    layouts = []
    for no, group in enumerate(groups):
        kv = dict(metadata) if no == 0 else {}
        if no and "general.alignment" in metadata:  # every part is laid out alike
            kv["general.alignment"] = metadata["general.alignment"]
        kv[SPLIT_NO] = MetadataValue(V.UINT16, no)
        kv[SPLIT_COUNT] = MetadataValue(V.UINT16, len(groups))
        kv[SPLIT_TENSORS_COUNT] = MetadataValue(V.INT32, len(tensors))
        layouts.append(plan_gguf(kv, group))
    return tuple(layouts)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, MetadataValue) else value


# --- the writer ------------------------------------------------------------------------
def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


class GGUFStreamWriter:
    """Streams a planned GGUF to `path` through a temporary file; a context manager.

        with GGUFStreamWriter(out, layout, protect=[input_path]) as w:
            for slot in layout.tensors:
                w.write_tensor(slot.name, data)

    On a clean exit with every tensor written the file is fsynced and renamed onto
    `path`; on any exception (or missing tensors) the temporary file is removed.
    """

    def __init__(self, path: os.PathLike | str, layout: GGUFLayout,
                 protect: Iterable[os.PathLike | str] = ()):
        self.path = Path(path)
        self.layout = layout
        self.protect = [Path(p) for p in protect]
        self._next = 0
        self._file = None
        self._tmp: Path | None = None

    def __enter__(self) -> GGUFStreamWriter:
        check_output_path(self.path, self.protect)
        self._target = replacing(self.path, suffix=".partial")
        self._tmp = self._target.__enter__()
        try:
            self._file = open(self._tmp, "wb")
            self._file.write(self.layout.header)
        except BaseException as exc:
            self._finish(exc)
            raise
        return self

    def write_tensor(self, name: str, data: np.ndarray | torch.Tensor | bytes) -> None:
        """The next tensor's bytes, in layout order."""
        if self._file is None:
            raise RuntimeError("write_tensor outside the `with` block")
        if self._next >= len(self.layout.tensors):
            raise LlmpressError(f"tensor {name}: more tensors written than planned")
        slot = self.layout.tensors[self._next]
        if name != slot.name:
            raise LlmpressError(f"tensor {name} written where {slot.name} was planned")
        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data)
        raw = memoryview(data).cast("B")
        if raw.nbytes != slot.n_bytes:
            raise LlmpressError(f"tensor {name}: {raw.nbytes} bytes given, "
                                f"{slot.n_bytes} planned for {slot.ggml_type.name}")
        self._file.write(raw)
        self._file.write(bytes(_pad(slot.n_bytes, self.layout.alignment) - slot.n_bytes))
        self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self.layout.tensors)

    @property
    def next_name(self) -> str | None:
        return None if self.complete else self.layout.tensors[self._next].name

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None and self._next != len(self.layout.tensors):
            missing = self.layout.tensors[self._next].name
            exc = LlmpressError(f"{self.path}: not written, tensor {missing} and "
                                f"{len(self.layout.tensors) - self._next - 1} more never came")
            self._finish(exc)
            raise exc
        self._finish(exc)
        return False

    def _finish(self, exc: BaseException | None) -> None:
        """Close the file, then io.files.replacing renames it onto the path (exc None) or
        removes it."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if exc is None:
            self._target.__exit__(None, None, None)
        else:
            self._target.__exit__(type(exc), exc, exc.__traceback__)


class GGUFSplitWriter:
    """Streams the parts of plan_split to PREFIX-0000i-of-0000n.gguf (PREFIX: `path`
    without .gguf); the same interface as GGUFStreamWriter. Every part is written beside
    its target; all are renamed into place once every tensor is written, or all removed."""

    def __init__(self, path: os.PathLike | str, layouts: Sequence[GGUFLayout],
                 protect: Iterable[os.PathLike | str] = ()):
        prefix = split_prefix(path)
        self.paths = tuple(split_path(prefix, i, len(layouts)) for i in range(len(layouts)))
        protect = list(protect)
        self._parts = [GGUFStreamWriter(p, layout, protect)
                       for p, layout in zip(self.paths, layouts)]
        self._part_of = {slot.name: i for i, layout in enumerate(layouts)
                         for slot in layout.tensors}
        self._stack: ExitStack | None = None

    def __enter__(self) -> GGUFSplitWriter:
        with ExitStack() as stack:
            for part in self._parts:
                stack.enter_context(part)
            self._stack = stack.pop_all()
        return self

    def write_tensor(self, name: str, data: np.ndarray | torch.Tensor | bytes) -> None:
        if name not in self._part_of:
            raise LlmpressError(f"tensor {name}: not in the planned parts")
        self._parts[self._part_of[name]].write_tensor(name, data)

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        unfinished = next((p for p in self._parts if not p.complete), None)
        if exc is None and unfinished is not None:  # no part renamed when one is short
            exc = LlmpressError(f"{unfinished.path}: not written, tensor "
                                f"{unfinished.next_name} never came")
            stack.__exit__(type(exc), exc, None)
            raise exc
        return bool(stack.__exit__(exc_type, exc, tb))


def check_output_path(path: Path, protect: Iterable[Path] = ()) -> None:
    """One clear error when `path` cannot or must not be written."""
    path = Path(path)
    for source in protect:
        if path.resolve() == Path(source).resolve() or _same_file(path, Path(source)):
            raise LlmpressError(f"{path}: the output would overwrite the input; "
                                "choose another output file")
    if path.is_dir():
        raise LlmpressError(f"{path} is a directory; give an output file name")
    if not path.parent.is_dir():
        raise LlmpressError(f"{path}: the directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise LlmpressError(f"{path}: the directory {path.parent} is not writable")


def write_gguf(path: os.PathLike | str, metadata: Mapping[str, Any],
               tensors: Iterable[tuple[TensorSlot, np.ndarray | torch.Tensor | bytes]],
               protect: Iterable[os.PathLike | str] = ()) -> GGUFLayout:
    """Write a whole GGUF from (slot, bytes) pairs already in memory (small files, tests)."""
    pairs = list(tensors)
    layout = plan_gguf(metadata, [slot for slot, _ in pairs])
    with GGUFStreamWriter(path, layout, protect) as writer:
        for slot, data in pairs:
            writer.write_tensor(slot.name, data)
    return layout

"""The importance matrix: for every matmul weight, the sum of squared input activations
per input column and how many activation rows went into it.

The file is llama.cpp's imatrix GGUF (tools/imatrix/imatrix.cpp, save_imatrix): one
`<weight>.in_sum2` F32 tensor (the sums) and one `<weight>.counts` F32 tensor (the row
count) per weight, names sorted, and the keys general.type = "imatrix",
imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size. llama-quantize divides the
sums by the count (tools/quantize/quantize.cpp, load_imatrix); so does `importance()`.

Collection follows llama-imatrix: the text is tokenized once (the model's BOS flag,
special tokens read as text), cut into chunks of `ctx` tokens whose first token becomes
BOS, each chunk runs as a fresh sequence, and the input of every `blk.*` matmul is
recorded (output.weight is left out, as llama-imatrix does without --process-output).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from llmpress.errors import LlmpressError
from llmpress.io.files import replacing
from llmpress.io.gguf import read_gguf_header

KEY_DATASETS = "imatrix.datasets"  # common/imatrix-loader.h: LLM_KV_IMATRIX_*
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUMS_SUFFIX, COUNTS_SUFFIX = ".in_sum2", ".counts"
MIN_BATCH_ROWS = 16  # collect_imatrix ignores matmuls over fewer rows than this


@dataclass
class Imatrix:
    """Sums of squared activations per input column, and the rows counted, per weight."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float64 (in_features,)
    counts: dict[str, int] = field(default_factory=dict)
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)

    def add(self, name: str, sum_sq: np.ndarray, count: int) -> None:
        """Add per-column sums of squared activations over `count` rows to entry `name`."""
        sum_sq = np.asarray(sum_sq, dtype=np.float64)
        if name in self.sums and self.sums[name].shape != sum_sq.shape:
            raise LlmpressError(f"imatrix: {name} has {self.sums[name].shape[0]} columns, "
                                f"the new statistics {sum_sq.shape[0]}")
        self.sums[name] = self.sums[name] + sum_sq if name in self.sums else sum_sq.copy()
        self.counts[name] = self.counts.get(name, 0) + int(count)

    def importance(self, name: str) -> np.ndarray | None:
        """Mean squared activation per column (sums / count), float32, as llama-quantize
        passes it to the quantizers; ones where nothing was counted; None if unknown."""
        if name not in self.sums:
            return None
        count = self.counts[name]
        if count <= 0:
            return np.ones_like(self.sums[name], dtype=np.float32)
        return (self.sums[name].astype(np.float32) / np.float32(count)).astype(np.float32)

    def importances(self) -> dict[str, np.ndarray]:
        return {name: self.importance(name) for name in self.sums}


# --- calibration chunks and collection ------------------------------------------------------
def token_chunks(tokens: list[int], ctx: int, max_chunks: int | None,
                 bos_id: int | None) -> torch.Tensor:
    """llama-imatrix's compute_imatrix chunking: whole chunks of `ctx` tokens from the
    start (the remainder is dropped), the first token of each replaced by BOS when the
    model adds one. -> int64 (n_chunks, ctx)."""
    if ctx < MIN_BATCH_ROWS:
        raise LlmpressError(f"--ctx {ctx} is too small: llama.cpp's imatrix ignores "
                            f"batches under {MIN_BATCH_ROWS} tokens")
    if len(tokens) < 2 * ctx:
        raise LlmpressError(f"the calibration text has only {len(tokens)} tokens; a context "
                            f"of {ctx} needs at least {2 * ctx} (give more text or a smaller --ctx)")
    n_chunks = len(tokens) // ctx
    if max_chunks is not None and max_chunks > 0:
        n_chunks = min(n_chunks, max_chunks)
    chunks = torch.tensor(tokens[: n_chunks * ctx], dtype=torch.long).view(n_chunks, ctx)
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def calibration_chunks(tokenizer, text: str, ctx: int, max_chunks: int | None) -> torch.Tensor:
    """Tokenize like llama-imatrix (the model's BOS flag, special tokens read as text) and
    cut into chunks."""
    tokens = tokenizer.encode(text, parse_special=False, add_eos=False)
    return token_chunks(tokens, ctx, max_chunks, tokenizer.bos_id if tokenizer.add_bos else None)


@dataclass(frozen=True)
class SquareSums:
    """Running per-column sums of x² (float64) and the rows seen: one imatrix entry."""

    sum_sq: torch.Tensor
    count: int


def init_square_sums(in_features: int, device: torch.device | str = "cpu") -> SquareSums:
    return SquareSums(torch.zeros(in_features, dtype=torch.float64, device=device), 0)


def accumulate_square_sums(stats: SquareSums, x: torch.Tensor) -> SquareSums:
    """x: (rows, in). A float32 sum per batch (pairwise, accurate, and as fast as the
    matmul needs it to be), added to a float64 total so long runs lose nothing."""
    batch = x.float().square().sum(dim=0).double()
    return SquareSums(stats.sum_sq + batch, stats.count + x.shape[0])


# Linears that read the same input as another: their entries are the same sums.
SHARED_INPUTS = {"attn_k": "attn_q", "attn_v": "attn_q", "ffn_up": "ffn_gate"}


def collect_imatrix(model, chunks: torch.Tensor, datasets: list[str] | None = None,
                    batch_size: int = 4,
                    progress: Callable[[int, int], None] | None = None) -> Imatrix:
    """Run the chunks (N, ctx) through `model` (a LlamaModel) one decoder layer at a time
    (calib.runner: each layer's weights dequantized once, exactly) and record the input
    of each of its matmuls."""
    from llmpress.calib.runner import LINEAR_NAMES, run_layers

    imatrix = Imatrix(chunk_count=chunks.shape[0], chunk_size=chunks.shape[1],
                      datasets=list(datasets or []))
    observed = [n for n in LINEAR_NAMES if n not in SHARED_INPUTS]

    def per_layer(step) -> None:
        sums = step.collect(observed, init_square_sums, accumulate_square_sums)
        for short_name in LINEAR_NAMES:
            stats = sums[SHARED_INPUTS.get(short_name, short_name)]
            imatrix.add(f"blk.{step.gguf_index}.{short_name}.weight",
                        stats.sum_sq.cpu().numpy(), stats.count)

    run_layers(model, chunks, per_layer, batch_size=batch_size, progress=progress)
    return imatrix


# --- the file ----------------------------------------------------------------------------
def write_imatrix(imatrix: Imatrix, path: str | os.PathLike) -> Path:
    """Write llama.cpp's imatrix GGUF: through a temporary file in the target directory,
    renamed at the end, so a failed run leaves nothing behind."""
    path = Path(path)
    if not imatrix.sums:
        raise LlmpressError("imatrix: nothing was collected, so there is nothing to write")
    with replacing(path) as tmp:
        writer = GGUFWriter(tmp, arch="")
        writer.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes none
        writer.add_string("general.type", "imatrix")
        writer.add_array(KEY_DATASETS, list(imatrix.datasets))
        writer.add_uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
        writer.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
        for name in sorted(imatrix.sums):
            writer.add_tensor(name + SUMS_SUFFIX, imatrix.sums[name].astype(np.float32),
                              raw_dtype=GGMLQuantizationType.F32)
            writer.add_tensor(name + COUNTS_SUFFIX,
                              np.array([imatrix.counts[name]], dtype=np.float32),
                              raw_dtype=GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


@dataclass(frozen=True)
class ImatrixFile:
    """An imatrix file as stored, before anyone divides: per weight the squared-activation
    sums and the row count of each expert (one count for a dense model)."""

    sums: dict[str, np.ndarray]  # float32 (n_expert * in_features,)
    counts: dict[str, np.ndarray]  # float32 (n_expert,)
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    legacy: bool  # the .dat format: its sums are mean squares times the count


def read_imatrix_file(path: str | os.PathLike) -> ImatrixFile:
    """Read llama.cpp's imatrix GGUF (ours or llama-imatrix's) or the legacy .dat format."""
    path = Path(path)
    if not path.is_file():
        raise LlmpressError(f"no such importance matrix file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    found = _read_gguf_imatrix(path) if magic == b"GGUF" else _read_legacy_imatrix(path)
    for name, values in found.sums.items():
        if not np.isfinite(values).all():
            raise LlmpressError(f"{path}: importance matrix entry {name} has non-finite values")
    return found


def _read_gguf_imatrix(path: Path) -> ImatrixFile:
    metadata, infos, data_start, mapped = read_gguf_header(path)
    tensors = {}
    for name, ggml_type, dims, offset in infos:
        if ggml_type != GGMLQuantizationType.F32:
            raise LlmpressError(f"{path}: imatrix tensor {name} is {ggml_type.name}, not F32")
        n = int(np.prod(dims))
        start = data_start + offset
        if start + 4 * n > len(mapped):
            raise LlmpressError(f"{path}: imatrix tensor {name} runs past the end of the file")
        tensors[name] = np.frombuffer(mapped[start:start + 4 * n].tobytes(), dtype=np.float32)
    sums, counts = {}, {}
    for key, values in tensors.items():
        if not key.endswith(SUMS_SUFFIX):
            continue
        name = key[: -len(SUMS_SUFFIX)]
        count = tensors.get(name + COUNTS_SUFFIX)
        if count is None:
            raise LlmpressError(f"{path}: {key} has no matching {name + COUNTS_SUFFIX}")
        if count.size == 0 or values.size % count.size:
            raise LlmpressError(f"{path}: importance matrix {name}: {values.size} sums do not "
                                f"split into {count.size} experts")
        sums[name], counts[name] = values, count
    if not sums:
        raise LlmpressError(f"{path}: no imatrix entries (*.in_sum2 tensors) in this GGUF file")
    return ImatrixFile(sums, counts, [str(d) for d in metadata.get(KEY_DATASETS, []) or []],
                       int(metadata.get(KEY_CHUNK_COUNT, 0) or 0),
                       int(metadata.get(KEY_CHUNK_SIZE, 0) or 0), legacy=False)


def _read_legacy_imatrix(path: Path) -> ImatrixFile:
    """The .dat format (common_imatrix_load_legacy): n, then per entry the name, ncall and
    values that are mean squares times ncall; then optionally the chunk count and the
    dataset name."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise LlmpressError(f"{path}: not an imatrix file (GGUF or legacy .dat): "
                                f"truncated at byte {pos}")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if not 0 < n_entries < 1 << 20:
        raise LlmpressError(f"{path}: not an imatrix file (GGUF or legacy .dat)")
    sums, counts = {}, {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < 1 << 16:
            raise LlmpressError(f"{path}: not an imatrix file: bad name length {length}")
        name = bytes(take(f"<{length}s")[0]).decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if not 0 < nval < 1 << 26:
            raise LlmpressError(f"{path}: imatrix entry {name} has {nval} values")
        sums[name] = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        counts[name] = np.array([ncall], dtype=np.float32)
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= len(data) - pos:
                datasets.append(data[pos:pos + length].split(b"\0")[0]
                                .decode("utf-8", errors="replace"))
    return ImatrixFile(sums, counts, datasets, chunk_count, 0, legacy=True)


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """An imatrix file as sums and counts that more statistics can be added to (dense
    models only)."""
    found = read_imatrix_file(path)
    imatrix = Imatrix(chunk_count=found.chunk_count, chunk_size=found.chunk_size,
                      datasets=found.datasets)
    for name, sums in found.sums.items():
        count = found.counts[name]
        if count.size != 1:  # one count per expert: mixtures of experts
            raise LlmpressError(f"{path}: {name} has {count.size} counts (per-expert "
                                "imatrix data); llmpress reads dense models only")
        imatrix.sums[name] = sums.astype(np.float64)
        imatrix.counts[name] = int(count[0])
    return imatrix

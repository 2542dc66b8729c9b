"""What every loader produces: GGUF-style metadata plus lazy references to raw tensor bytes.

A GGUF file maps onto this directly; a Hugging Face directory is converted on the fly
(names, metadata keys and q/k layout as convert_hf_to_gguf would write them), so the
model, the quantizer and the writers see one vocabulary: GGUF's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from gguf import GGMLQuantizationType


@dataclass(frozen=True)
class TensorRef:
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: (rows, row_length), e.g. (out_features, in_features)
    n_bytes: int
    read_bytes: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    # read_bytes() -> uint8 tensor (n_bytes,), memory-mapped where the source allows it


@dataclass
class ModelSource:
    path: Path
    metadata: dict[str, Any]  # GGUF keys and plain Python values
    tensors: dict[str, TensorRef]
    file_bytes: int  # all parts together for a split GGUF
    parts: tuple[Path, ...] = ()  # a split GGUF's files, the first one is `path`

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_key(self, key: str, default: Any = None) -> Any:
        """metadata["<arch>.<key>"], e.g. arch_key("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

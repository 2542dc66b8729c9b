"""`prune_model`: the orchestration behind `llmpress prune` (filled in below)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from gguf import GGMLQuantizationType

from llmpress.io.source import ModelSource, TensorRef


# --- models held in memory ------------------------------------------------------------------
def float_tensor_ref(name: str, values: torch.Tensor) -> TensorRef:
    """A TensorRef of type F32 over an in-memory tensor (its bytes, no copy)."""
    values = values.detach().to("cpu", torch.float32).contiguous()
    raw = values.view(-1).view(torch.uint8)
    return TensorRef(name=name, ggml_type=GGMLQuantizationType.F32, shape=tuple(values.shape),
                     n_bytes=raw.numel(), read_bytes=lambda: raw)


def in_memory_source(path: str | Path, metadata: Mapping[str, Any],
                     tensors: Mapping[str, torch.Tensor | TensorRef]) -> ModelSource:
    """A ModelSource whose tensors are float32 tensors (or refs kept from another source):
    what the pruner hands to the model, the evaluator, the distiller and the writers."""
    refs = {name: t if isinstance(t, TensorRef) else float_tensor_ref(name, t)
            for name, t in tensors.items()}
    return ModelSource(path=Path(path), metadata=dict(metadata), tensors=refs,
                       file_bytes=sum(r.n_bytes for r in refs.values()))

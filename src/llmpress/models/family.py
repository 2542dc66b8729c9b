"""Which model class runs a source: by its GGUF architecture."""

from __future__ import annotations

import torch
from torch import nn

from llmpress.io.source import ModelSource
from llmpress.models.config import GEMMA_ARCHITECTURES, PHI3_ARCHITECTURES
from llmpress.models.gemma import GemmaModel
from llmpress.models.llama import KV_F32, KVDtypes, LlamaModel
from llmpress.models.phi3 import Phi3Model

FAMILIES: dict[str, type[nn.Module]] = (dict.fromkeys(GEMMA_ARCHITECTURES, GemmaModel)
                                        | dict.fromkeys(PHI3_ARCHITECTURES, Phi3Model))


def build_model(src: ModelSource, mode: str = "fast", device: str | torch.device = "cpu",
                kv_dtypes: KVDtypes = KV_F32) -> nn.Module:
    """The model for src's architecture; LlamaModel (which refuses unknown ones) else.
    kv_dtypes: the (k, v) element types of the caches its new_cache makes."""
    return FAMILIES.get(src.architecture, LlamaModel)(src, mode=mode, device=device,
                                                      kv_dtypes=kv_dtypes)

"""Which model class runs a source: by its GGUF architecture."""

from __future__ import annotations

import torch
from torch import nn

from llmpress.io.source import ModelSource
from llmpress.models.config import GEMMA_ARCHITECTURES, PHI3_ARCHITECTURES
from llmpress.models.gemma import GemmaModel
from llmpress.models.llama import LlamaModel
from llmpress.models.phi3 import Phi3Model

FAMILIES: dict[str, type[nn.Module]] = (dict.fromkeys(GEMMA_ARCHITECTURES, GemmaModel)
                                        | dict.fromkeys(PHI3_ARCHITECTURES, Phi3Model))


def build_model(src: ModelSource, mode: str = "fast",
                device: str | torch.device = "cpu") -> nn.Module:
    """The model for src's architecture; LlamaModel (which refuses unknown ones) else."""
    return FAMILIES.get(src.architecture, LlamaModel)(src, mode=mode, device=device)

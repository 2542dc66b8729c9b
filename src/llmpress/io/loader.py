"""Opening a model for the layers above: a GGUF file or a Hugging Face directory becomes
a ModelSource, and its tokenizer comes from the same place."""

from __future__ import annotations

import os
from pathlib import Path

from llmpress.errors import LlmpressError
from llmpress.formats import FORMATS, supported_names
from llmpress.io.gguf import load_gguf, shown
from llmpress.io.source import ModelSource
from llmpress.io.tokenizer import Tokenizer


def load_source(model: str | os.PathLike | ModelSource) -> ModelSource:
    """A GGUF file, or a Hugging Face directory of float or GPTQ/AWQ/compressed-tensors
    weights, as a ModelSource whose every tensor llmpress can read. A ModelSource is
    returned as it is."""
    if isinstance(model, ModelSource):
        return model
    path = Path(model)
    if path.is_dir():
        # float weights, or GPTQ/AWQ/compressed-tensors Linears dequantized on read
        from llmpress.io.gptq_checkpoint import quantized_linears
        from llmpress.io.hf import load_hf_dir
        source = load_hf_dir(path, quantized_linears(path))
    else:
        source = load_gguf(path)
    for ref in source.tensors.values():
        if ref.ggml_type not in FORMATS:
            raise LlmpressError(f"{path}: tensor {shown(ref.name)} has type "
                                f"{ref.ggml_type.name}, which llmpress cannot read "
                                f"(it reads {', '.join(supported_names())})")
    return source


def load_tokenizer(source: ModelSource) -> Tokenizer:
    """A Hugging Face directory's tokenizer.json, else the GGUF file's own vocabulary."""
    if source.path.is_dir():
        return Tokenizer.from_hf_dir(source.path)
    return Tokenizer.from_gguf_metadata(source.metadata)

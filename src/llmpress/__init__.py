"""llmpress: compress large language models, measure what it cost, run them locally."""

from llmpress.errors import LlmpressError

__version__ = "0.1.0"
__all__ = ["LlmpressError", "load"]


def load(*args, **kwargs):
    """Load a model: see llmpress.api.load. (Imported lazily: torch is heavy.)"""
    from llmpress.api import load as _load
    return _load(*args, **kwargs)

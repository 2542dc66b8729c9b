"""Calibration text and how it is cut into token sequences.

The built-in default is Python's own documentation (pydoc_data.topics, present in every
CPython install): varied English prose with code, and never the WikiText text we evaluate
on. It is joined exactly as the reference importance matrix in tests/data/reference was made
(values sorted by key, joined with a blank line), so our statistics and llama-imatrix's
see the same text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmpress.errors import LlmpressError
from llmpress.io.tokenizer import Tokenizer


def default_calibration_text() -> str:
    """Python 3's pydoc topics, sorted by key, joined with "\\n\\n" (~465k characters)."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key] for key in sorted(topics))


def read_calibration_text(path: str | Path | None) -> str:
    """The text of `path` (UTF-8, undecodable bytes replaced), or the built-in default."""
    if path is None:
        return default_calibration_text()
    path = Path(path)
    if not path.is_file():
        raise LlmpressError(f"calibration text {path}: no such file; give a UTF-8 text file "
                            "or leave the option out for the built-in text")
    text = path.read_bytes().decode("utf-8", errors="replace")
    if not text.strip():
        raise LlmpressError(f"calibration text {path} is empty")
    return text


def split_sequences(ids: list[int] | torch.Tensor, n_sequences: int, seq_len: int,
                    bos_id: int | None = None) -> torch.Tensor:
    """Cut a token stream into `n_sequences` non-overlapping windows of `seq_len` tokens,
    spread evenly over the stream (the start, middle and end of the text all count). With
    bos_id each window starts with BOS, as llama-imatrix and llama-perplexity begin every
    chunk. Returns int64 (n_sequences, seq_len).
    """
    if n_sequences < 1 or seq_len < 2:
        raise LlmpressError(f"calibration needs at least 1 sequence of at least 2 tokens "
                            f"(got {n_sequences} x {seq_len})")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    body = seq_len - (bos_id is not None)
    available = ids.numel() // body
    if available < n_sequences:
        raise LlmpressError(f"calibration text has {ids.numel()} tokens: too few for "
                            f"{n_sequences} sequences of {seq_len}; give a longer text, "
                            "fewer sequences or a shorter length")
    # evenly spaced window indices over all available windows
    picks = torch.linspace(0, available - 1, n_sequences).round().long()
    windows = ids[: available * body].view(available, body)[picks]
    if bos_id is not None:
        windows = torch.cat([torch.full((n_sequences, 1), bos_id), windows], dim=1)
    return windows


def calibration_tokens(tokenizer: Tokenizer, text: str | None = None, n_sequences: int = 32,
                       seq_len: int = 256) -> torch.Tensor:
    """Tokenized calibration text (default: the built-in text) as (n_sequences, seq_len)."""
    text = default_calibration_text() if text is None else text
    ids = tokenizer.encode(text, add_bos=False, parse_special=False)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    return split_sequences(ids, n_sequences, seq_len, bos)

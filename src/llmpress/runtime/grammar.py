"""Constrained decoding: only tokens that keep the output inside a grammar (a JSON schema)
may be sampled, so the text always parses and validates.

The grammar engine is llguidance (Microsoft's, also used by llama.cpp and vLLM). Chosen
over xgrammar and outlines-core because it takes a vocabulary as raw token bytes, which
is what both our GGUF vocabularies (gpt2 byte-level BPE, SentencePiece with byte
fallback) decode to, has no Python dependencies (xgrammar pulls transformers, triton and
pydantic), computes each mask lazily from the current parser state (about 1 ms a token
for a 49k vocabulary) where outlines-core builds a full token index per schema up front,
and implements JSON Schema broadly, refusing what it does not implement instead of
ignoring it.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import numpy as np
import torch

from llmpress.errors import LlmpressError

try:
    import llguidance
except ImportError:  # only structured output needs it
    llguidance = None

# No free whitespace between tokens: a small model could otherwise loop on newlines.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT: dict = {"type": "object"}
SPECIAL_PREFIX = b"\xff"  # how llguidance tells a control token from text of the same bytes


def _require_engine():
    if llguidance is None:
        raise LlmpressError("structured output needs llguidance: pip install llguidance")
    return llguidance


class _Vocabulary:
    """Our tokenizer as llguidance's TokenizerWrapper reads it."""

    def __init__(self, tokenizer):
        special = tokenizer._special_ids
        self.tokens = [SPECIAL_PREFIX + tokenizer.token_bytes(i) if i in special
                       else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(special)
        self.eos_ids = sorted(tokenizer.eos_ids)
        if not self.eos_ids:  # the engine needs one: a token past the vocabulary, never drawn
            self.eos_ids = [len(self.tokens)]
            self.tokens.append(SPECIAL_PREFIX + b"<end>")
        self.eos_token_id, self.bos_token_id = self.eos_ids[0], tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_bos=False, parse_special=False)


_engine_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_engine_lock = threading.Lock()


def engine_tokenizer(tokenizer):
    """llguidance's view of a tokenizer; built once per tokenizer (about a second)."""
    engine = _require_engine()
    with _engine_lock:
        built = _engine_tokenizers.get(tokenizer)
        if built is None:
            vocabulary = _Vocabulary(tokenizer)
            built = engine.LLTokenizer(engine.TokenizerWrapper(vocabulary),
                                       eos_token=vocabulary.eos_ids)
            _engine_tokenizers[tokenizer] = built
    return built


def json_schema_grammar(schema: Any, tokenizer) -> str:
    """A JSON schema (a dict) -> a checked grammar for Constraint. An invalid or
    unsupported schema is one LlmpressError line."""
    engine = _require_engine()
    if not isinstance(schema, dict):
        raise LlmpressError(f"a JSON schema must be an object, not {type(schema).__name__}")
    try:
        grammar = engine.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                            defaults=JSON_LAYOUT)
    except (ValueError, TypeError) as exc:
        raise LlmpressError(f"invalid JSON schema: {exc}") from None
    error = engine.LLMatcher.validate_grammar(grammar, engine_tokenizer(tokenizer))
    if error:
        raise LlmpressError(f"invalid JSON schema: {error}")
    return grammar


def lark_grammar(lark: str, tokenizer) -> str:
    """A grammar in llguidance's Lark dialect (JSON schemas inline with %json) -> a
    checked grammar for Constraint."""
    engine = _require_engine()
    grammar = engine.LLMatcher.grammar_from_lark(lark)
    error = engine.LLMatcher.validate_grammar(grammar, engine_tokenizer(tokenizer))
    if error:
        raise LlmpressError(f"invalid grammar: {error}")
    return grammar


class Constraint:
    """One generation's grammar state: which tokens may come next; feed it each token."""

    def __init__(self, grammar: str, tokenizer):
        engine = _require_engine()
        self.matcher = engine.LLMatcher(engine_tokenizer(tokenizer), grammar, log_level=0)
        self._check()

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """bool (vocab_size,): True where a token keeps the output inside the grammar."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        self._check()
        mask = np.unpackbits(bits, bitorder="little")[:vocab_size].astype(bool)
        if mask.size < vocab_size:  # the model's output rows past the vocabulary
            mask = np.concatenate([mask, np.zeros(vocab_size - mask.size, dtype=bool)])
        return torch.from_numpy(mask)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)
        self._check()

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but end-of-text may follow."""
        return self.matcher.is_stopped()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise LlmpressError(f"constrained decoding failed: {self.matcher.get_error()}")

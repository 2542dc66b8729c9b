"""The public Python API: `llmpress.load(...)` and what it returns.

    import llmpress
    lm = llmpress.load("smollm2")                       # a path or a pulled name
    print(lm.generate("The capital of France is", max_tokens=16).text)
    for piece in lm.stream(lm.chat_prompt([{"role": "user", "content": "Hi!"}])):
        print(piece.text, end="", flush=True)
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch

from llmpress import hub
from llmpress.errors import LlmpressError
from llmpress.io.loader import load_source, load_tokenizer
from llmpress.io.source import ModelSource
from llmpress.kernels.device import default_device
from llmpress.kernels.linear import matmul_path
from llmpress.models.family import build_model
from llmpress.models.kv_cache import check_head_dim, kv_dtype
from llmpress.models.moe import active_parameters
from llmpress.runtime.embedding import POOLINGS, embed_tokens
from llmpress.runtime.generate import PREFILL_CHUNK, Chunk, GenerationConfig, stream
from llmpress.runtime.grammar import json_schema_grammar
from llmpress.runtime.prompt_cache import PromptCache
from llmpress.runtime.sampling import SamplingConfig
from llmpress.runtime.speculative import (DraftModel, Speculation, SpeculativeConfig,
                                          check_same_vocabulary)

DEFAULT_CONTEXT = 4096  # like llama.cpp and Ollama: the file's limit is often far larger


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens the prompt cache spared from running again
    drafted_tokens: int = 0  # speculative decoding: tokens guessed ...
    accepted_tokens: int = 0  # ... and kept (the acceptance rate is their ratio)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class TensorTypeSummary:
    type_name: str
    count: int
    n_bytes: int


@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    name: str
    parameters: int
    layers: int
    heads: int
    kv_heads: int
    embedding: int
    ffn: int
    vocab: int
    context_length: int
    file_bytes: int
    tensor_bytes: int
    tensor_types: tuple[TensorTypeSummary, ...]
    has_chat_template: bool
    matmul: str = ""  # how the matmuls run: mode, kernel instruction set
    experts: int = 0  # a mixture of experts: experts per layer (0: dense)
    experts_used: int = 0  # experts each token is routed to
    active_parameters: int = 0  # parameters one token computes with
    parts: int = 1  # files of a split GGUF (path is the first)

    @property
    def bits_per_weight(self) -> float:
        return self.file_bytes * 8 / self.parameters  # as llama.cpp's tables count it


class LanguageModel:
    """A loaded model with its tokenizer and chat template."""

    def __init__(self, source: ModelSource, *, mode: str = "fast", device: str | None = None,
                 ctx: int | None = None, chat_template: str | None = None,
                 cache_type_k: str | None = None, cache_type_v: str | None = None,
                 draft: ModelSource | None = None,
                 speculative: SpeculativeConfig = SpeculativeConfig()):
        """cache_type_k/_v: "f16" (fast mode's default, as llama.cpp's), "f32" (exact
        mode's: float32 everywhere), or llama.cpp's quantized "q8_0" / "q4_0". draft: a smaller model with the same vocabulary for
        speculative decoding; speculative: its options and prompt lookup's."""
        if mode not in ("fast", "exact"):
            raise LlmpressError(f"mode must be 'fast' or 'exact', not {mode!r}")
        default_cache = "f16" if mode == "fast" else "f32"
        kv_dtypes = (kv_dtype(cache_type_k or default_cache), kv_dtype(cache_type_v or default_cache))
        self.source = source
        self.mode = mode
        self.device = device or default_device()
        self.model = build_model(source, mode=mode, device=self.device, kv_dtypes=kv_dtypes)
        check_head_dim(kv_dtypes, self.model.cfg.head_dim)  # refused at load, not first use
        self.tokenizer = load_tokenizer(source)
        if chat_template is not None:  # the caller's template replaces the model's
            self.tokenizer.chat_template = chat_template
        if self.tokenizer.vocab_size > self.model.cfg.vocab_size:  # ids index the embedding
            raise LlmpressError(f"{source.path}: the tokenizer has {self.tokenizer.vocab_size} "
                                f"tokens but the embedding only {self.model.cfg.vocab_size} rows")
        draft_model = self._draft_model(draft, mode, kv_dtypes) if draft is not None else None
        self.tokenizer.pad_to(self.model.cfg.vocab_size)  # the model may pick any row
        self.context_length = ctx or min(DEFAULT_CONTEXT, self.model.cfg.context_length)
        if self.context_length < 2:
            raise LlmpressError("the context must hold at least 2 tokens")
        # the previous call's tokens stay cached: a chat's next turn runs only its new part
        self.prompt_cache = PromptCache(self.model.new_cache, self.context_length)
        self.speculation = Speculation(speculative, None if draft_model is None else
                                       DraftModel(draft_model, PromptCache(
                                           draft_model.new_cache, self.context_length)))

    def _draft_model(self, draft: ModelSource, mode: str, kv_dtypes):
        check_same_vocabulary(self.tokenizer, load_tokenizer(draft), self.model.cfg.vocab_size,
                              int(draft.tensors["token_embd.weight"].shape[0]), draft.path.name)
        model = build_model(draft, mode=mode, device=self.device)
        check_head_dim(kv_dtypes, model.cfg.head_dim)
        model.kv_dtypes = kv_dtypes
        return model

    # --- text in, text out ---------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    **extra) -> str:
        """messages rendered with the model's chat template (ChatML when it has none);
        extra (tools=[...] ...) reaches the template as variables."""
        return self.tokenizer.chat_prompt(messages, add_generation_prompt, **extra)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's token ids; one far longer than the context is refused early, without
        tokenizing all of it (a chat template may render megabytes)."""
        return self.tokenizer.encode(text, max_tokens=self.context_length)

    def stream(self, prompt: str | list[int], max_tokens: int = 256, stop: tuple[str, ...] = (),
               *, prompt_cache: bool = True, json_schema: dict | None = None,
               speculative: bool = True, **sampling) -> Iterator[Chunk]:
        """Yield text chunks as they are generated; the last carries finish_reason.
        prompt_cache=False runs the whole prompt (and leaves the cache as it was).
        json_schema: the output is JSON valid against it ({"type": "object"}: any object).
        speculative=False decodes one token per pass even when load() set up drafting."""
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        grammar = None if json_schema is None else self.json_grammar(json_schema)
        cfg = GenerationConfig(max_tokens=max_tokens, stop=tuple(stop), grammar=grammar,
                               sampling=SamplingConfig(**sampling))
        return stream(self.model, self.tokenizer, ids, cfg, self.context_length,
                      self.prompt_cache if prompt_cache else None,
                      self.speculation if speculative else None)

    def generate(self, prompt: str | list[int], max_tokens: int = 256,
                 stop: tuple[str, ...] = (), *, prompt_cache: bool = True,
                 json_schema: dict | None = None, speculative: bool = True,
                 **sampling) -> Completion:
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        text, tokens, last = [], [], None
        for chunk in self.stream(ids, max_tokens, stop, prompt_cache=prompt_cache,
                                 json_schema=json_schema, speculative=speculative, **sampling):
            text.append(chunk.text)
            tokens.extend(chunk.token_ids)
            last = chunk
        reason = last.finish_reason or "length"
        if reason == "stop" and tokens and tokens[-1] in self.tokenizer.eos_ids:
            tokens = tokens[:-1]  # the end-of-turn token is not part of the answer
        return Completion("".join(text), tokens, reason, len(ids), last.cached_tokens,
                          last.drafted_tokens, last.accepted_tokens)

    def json_grammar(self, schema: dict) -> str:
        """A JSON schema checked and compiled for this model's vocabulary (LlmpressError
        when it is invalid or uses what the grammar engine does not implement)."""
        return json_schema_grammar(schema, self.tokenizer)

    # --- numbers -------------------------------------------------------------------------
    def embed(self, input: str | list[str] | list[int], pooling: str = "mean") -> list[list[float]]:
        """One unit-length embedding per input text (a string, a list of them, or one list of
        token ids), as llama.cpp's embedding mode: the final hidden states pooled by
        "mean", "last" (token) or "cls" (first token), then L2-normalized."""
        if pooling not in POOLINGS:
            raise LlmpressError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        if isinstance(input, str):
            inputs = [self.encode(input)]
        elif input and all(isinstance(t, int) for t in input):
            inputs = [list(input)]
        else:
            inputs = [self.encode(text) for text in input]
        for ids in inputs:
            if any(not 0 <= t < self.model.cfg.vocab_size for t in ids):
                raise LlmpressError(f"a token id is outside the vocabulary "
                                    f"(0..{self.model.cfg.vocab_size - 1})")
            if len(ids) > self.context_length:
                raise LlmpressError(f"an input of {len(ids)} tokens does not fit the context "
                                    f"of {self.context_length}; shorten it or raise --ctx")
        return [embed_tokens(self.model, ids, pooling, PREFILL_CHUNK).tolist() for ids in inputs]

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 (len(token_ids), vocab): the model's next-token logits at every position."""
        cache = self.model.new_cache(len(token_ids))
        return self.model(torch.tensor([token_ids]), cache)[0].float()

    def info(self) -> ModelInfo:
        src, cfg = self.source, self.model.cfg
        count, size = Counter(), Counter()
        for ref in src.tensors.values():
            count[ref.ggml_type.name] += 1
            size[ref.ggml_type.name] += ref.n_bytes
        params = sum(math.prod(ref.shape) for ref in src.tensors.values())
        return ModelInfo(
            path=str(src.path), architecture=cfg.architecture,
            name=str(src.metadata.get("general.name", src.path.stem)), parameters=params,
            layers=cfg.n_layers, heads=cfg.layers[0].n_heads, kv_heads=cfg.layers[0].n_kv_heads,
            embedding=cfg.dim, ffn=cfg.layers[0].ffn_dim, vocab=cfg.vocab_size,
            context_length=cfg.context_length, file_bytes=src.file_bytes,
            tensor_bytes=sum(size.values()),
            tensor_types=tuple(TensorTypeSummary(t, count[t], size[t]) for t in sorted(count)),
            has_chat_template=bool(self.tokenizer.chat_template),
            matmul=matmul_path(self.model, self.mode),
            experts=cfg.n_experts, experts_used=cfg.n_experts_used,
            active_parameters=active_parameters(
                ((ref.name, ref.shape) for ref in src.tensors.values()), cfg.n_experts_used),
            parts=max(1, len(src.parts)),
        )


def load(model: str | os.PathLike, *, mode: str = "fast", device: str | None = None,
         ctx: int | None = None, chat_template: str | None = None,
         cache_type_k: str | None = None, cache_type_v: str | None = None,
         draft: str | os.PathLike | None = None, draft_max: int = 16, draft_min: int = 0,
         draft_p_min: float = 0.75, lookup_ngram: int = 0) -> LanguageModel:
    """Load a GGUF file, a Hugging Face directory, or a pulled name ("smollm2").
    chat_template: Jinja text used instead of the model's own template. cache_type_k/_v:
    the KV cache's element types, "f16", "f32", "q8_0" or "q4_0" (default: f16 in fast
    mode, f32 in exact mode).
    Speculative decoding (same output, fewer forward passes): draft, a smaller model with
    the same vocabulary, and/or lookup_ngram=N, guesses copied from earlier text that
    follows the last N tokens; draft_max/_min/_p_min as llama.cpp's --draft-* options."""
    speculative = SpeculativeConfig(draft_max, draft_min, draft_p_min, lookup_ngram)
    return LanguageModel(load_source(hub.resolve(model)), mode=mode, device=device, ctx=ctx,
                         chat_template=chat_template, cache_type_k=cache_type_k,
                         cache_type_v=cache_type_v,
                         draft=None if draft is None else load_source(hub.resolve(draft)),
                         speculative=speculative)

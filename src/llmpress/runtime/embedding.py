"""Text embeddings from a generative model, as llama.cpp's embedding mode makes them: the
final normalized hidden states (before the output head) of every token, pooled into one
vector, then scaled to unit Euclidean length (llama-server's default normalization)."""

from __future__ import annotations

import torch

from llmpress.errors import LlmpressError

POOLINGS = ("mean", "last", "cls")  # llama.cpp's --pooling names


def pool(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden: (T, dim) -> (dim,). mean: average over tokens; last: the last token's (a
    causal model's summary); cls: the first token's."""
    if pooling == "mean":
        return hidden.mean(dim=0)
    if pooling == "last":
        return hidden[-1]
    if pooling == "cls":
        return hidden[0]
    raise LlmpressError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")


def normalized(vector: torch.Tensor) -> torch.Tensor:
    norm = float(vector.norm())
    return vector / norm if norm > 0 else vector


@torch.inference_mode()
def embed_tokens(model, ids: list[int], pooling: str, chunk: int) -> torch.Tensor:
    """float32 (dim,): the pooled, unit-length embedding of ids, run in chunks of `chunk`
    tokens on a fresh cache (each token attends to those before it, as in generation)."""
    if not ids:
        raise LlmpressError("cannot embed an empty input (no tokens)")
    cache = model.new_cache(len(ids))
    hidden = torch.cat([model(torch.tensor([ids[i:i + chunk]]), cache, hidden=True)[0].float()
                        for i in range(0, len(ids), chunk)])
    return normalized(pool(hidden, pooling))

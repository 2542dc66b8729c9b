"""Continuous batching: generations running in their own threads share forward passes.

Decoding on a CPU is bound by reading the weights, so one pass that carries the new rows
of several sequences (each with its own KV cache and position) costs little more than a
pass for one. A BatchedModel stands in for the model in `generate.stream`: each call
waits until every generation in flight has asked for its next pass (or has finished),
then one of them runs all the waiting rows through `model.forward_batch` and hands each
its logits. A request that arrives joins at the next pass; one that ends leaves the
group. Each row's result is the same bits as in a pass of its own (the fused decoder
computes every row alike), so batching never changes an answer.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class _Request:
    tokens: list[int]
    cache: object
    all_rows: bool
    logits: torch.Tensor | None = None
    error: BaseException | None = None


class BatchedModel:
    """The model, as generation sees it, with forward passes shared between threads.
    Each generating thread holds `member()` while it generates."""

    def __init__(self, model):
        self.model = model
        self._lock = threading.Condition()
        self._members = 0
        self._waiting: list[_Request] = []
        self.passes = 0  # forward passes run, and the sequences they carried
        self.sequences = 0

    def __getattr__(self, name):  # cfg, new_cache, ...: the model's own
        return getattr(self.model, name)

    @contextmanager
    def member(self):
        with self._lock:
            self._members += 1
        try:
            yield self
        finally:
            with self._lock:
                self._members -= 1
                self._run_if_complete()

    def __call__(self, tokens: torch.Tensor, cache, last_only: bool = False, **kwargs):
        """model(tokens, cache, last_only): tokens (1, T) -> logits (1, T or 1, vocab)."""
        if kwargs or tokens.shape[0] != 1 or self._members == 0:
            return self.model(tokens, cache, last_only=last_only, **kwargs)
        request = _Request(tokens[0].tolist(), cache, not last_only)
        with self._lock:
            self._waiting.append(request)
            self._run_if_complete()
            while request.logits is None and request.error is None:
                self._lock.wait()
        if request.error is not None:
            raise request.error
        return request.logits.unsqueeze(0)

    def _run_if_complete(self) -> None:
        """With the lock held: run the waiting rows once every member is waiting."""
        if not self._waiting or len(self._waiting) < self._members:
            return
        batch, self._waiting = self._waiting, []
        try:
            self._run(batch)
        finally:
            self._lock.notify_all()

    def _run(self, batch: list[_Request]) -> None:
        try:
            results = self.model.forward_batch([(r.tokens, r.cache) for r in batch],
                                               [r.all_rows for r in batch])
        except Exception:  # one sequence's error (a full cache) must not fail the others
            for r in batch:
                try:
                    r.logits = self.model.forward_batch([(r.tokens, r.cache)], [r.all_rows])[0]
                except Exception as exc:
                    r.error = exc
            return
        for r, logits in zip(batch, results):
            r.logits = logits
        self.passes += 1
        self.sequences += len(batch)

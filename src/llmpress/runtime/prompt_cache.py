"""Prompt cache: keep the KV cache of earlier requests so that a request sharing a prefix
with one of them (the next turn of a chat: the whole conversation so far) only runs its
new tokens through the model.

A PromptCache holds `slots` sequences, each a KV cache and the tokens whose keys and
values it stores. A request takes the free slot with the longest common token prefix
(ties and misses: the least recently used one), rewinds it to that prefix and goes on
from there. Rewinding is only moving `cache.length` back: positions past it are
overwritten by the next tokens. Acquiring and releasing are thread-safe (the server's
worker threads share one PromptCache); a slot in use is skipped.

With max_bytes (serve --cache-ram), the kept slots' memory is bounded: a released slot
makes the least recently used others go, and goes itself if it alone is too big. A slot's
memory is what its cache touched: every position up to the furthest one ever written (a
KV buffer is reserved for the whole context, but its pages become resident as positions
are written, and rewinding does not give them back; dropping the slot does).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class Slot:
    """One cached sequence: cache.length == len(tokens) whenever the slot is not in use."""

    cache: object  # models.llama.KVCache
    tokens: list[int] = field(default_factory=list)
    last_used: int = 0
    in_use: bool = False
    high_water: int = 0  # the furthest position its cache has written

    def resident_bytes(self) -> int:
        """The bytes of the positions its cache has touched (the whole buffer's bytes
        over its positions: keys and values of every layer)."""
        self.high_water = max(self.high_water, self.cache.length)
        return self.cache.bytes() * self.high_water // self.cache.max_tokens

    def rewind(self, n: int) -> None:
        """Keep only the first n tokens (their keys and values stay valid)."""
        del self.tokens[n:]
        self.cache.length = n

    def clear(self) -> None:
        self.rewind(0)


class PromptCache:
    def __init__(self, new_cache, max_tokens: int, slots: int = 1, max_bytes: int | None = None):
        """new_cache(max_tokens) -> an empty KV cache (the model's new_cache). Caches are
        allocated on first use; untouched positions cost address space only. max_bytes:
        the most memory the kept slots' caches may hold (None: no bound)."""
        if slots < 1:
            raise ValueError("a prompt cache needs at least one slot")
        self._new_cache, self.max_tokens, self.n_slots = new_cache, max_tokens, slots
        self.max_bytes = max_bytes
        self.slots: list[Slot] = []
        self._clock = itertools.count(1)
        self._lock = threading.Lock()
        self.hits = 0  # requests that reused at least one token
        self.reused_tokens = 0
        self.evictions = 0  # slots dropped to stay under max_bytes

    def acquire(self, prompt_ids: list[int]) -> tuple[Slot, int]:
        """-> (a slot rewound to the prefix it shares with prompt_ids, that prefix's length).
        At least the last prompt token is left to run: its logits pick the first token.
        Release the slot when done."""
        with self._lock:
            return self._acquire(prompt_ids)

    def _acquire(self, prompt_ids: list[int]) -> tuple[Slot, int]:
        limit = len(prompt_ids) - 1
        free = [s for s in self.slots if not s.in_use]
        shared = {id(s): min(common_prefix(s.tokens, prompt_ids), limit) for s in free}
        best = max(free, key=lambda s: (shared[id(s)], s.last_used), default=None)
        if best is None or shared[id(best)] <= 0:  # a miss: a new slot, else the LRU one
            if len(self.slots) < self.n_slots:
                best = Slot(self._new_cache(self.max_tokens))
                self.slots.append(best)
            elif free:
                best = min(free, key=lambda s: s.last_used)
            else:  # every slot is mid-generation: a private cache, not kept
                return Slot(self._new_cache(self.max_tokens), in_use=True), 0
        reused = max(0, shared.get(id(best), 0))
        best.rewind(reused)
        best.in_use, best.last_used = True, next(self._clock)
        self.hits += reused > 0
        self.reused_tokens += reused
        return best, reused

    def release(self, slot: Slot) -> None:
        with self._lock:
            slot.in_use = False
            if self.max_bytes is not None:
                self._evict(keep=slot)

    def resident_bytes(self) -> int:
        return sum(s.resident_bytes() for s in self.slots)

    def _evict(self, keep: Slot) -> None:
        """Drop least recently used free slots (`keep`, the one just used, last) until the
        kept caches fit max_bytes; a dropped slot's buffers are freed with it."""
        free = sorted((s for s in self.slots if not s.in_use and s is not keep),
                      key=lambda s: s.last_used)
        for victim in [*free, keep]:
            if self.resident_bytes() <= self.max_bytes:
                return
            if victim in self.slots:
                self.slots.remove(victim)
                self.evictions += 1

    def clear(self) -> None:
        for slot in self.slots:
            slot.clear()

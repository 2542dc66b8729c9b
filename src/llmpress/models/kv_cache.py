"""The KV cache: per layer, the keys and the values of every position, each kept in its
own element type, named as llama.cpp's --cache-type-k/-v: f32, f16, or ggml's Q8_0 and
Q4_0 blocks (32 values of a head in 34 / 18 bytes: 8.5 / 4.5 bits a value).

A quantized row is quantized when it is stored, by the block formats of llmpress.formats
(byte-identical with ggml's reference quantizers), and dequantized when attention reads
it. As llama.cpp (llama-kv-cache.cpp, attn_rot_k/_v), a quantized cache keeps its rows
rotated by an orthonormal Walsh-Hadamard matrix, which spreads a head's outliers over its
block and so shrinks the rounding error: keys and queries alike (their dots unchanged),
values on the way in and the attention output back on the way out (the matrix is its own
inverse). With quantized keys, llama.cpp's flash attention also rounds the query to Q8_0
(K's vec-dot type) before dotting it with them: `CacheRows.query` does the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from gguf import GGMLQuantizationType

from llmpress.errors import LlmpressError
from llmpress.formats import get_format
from llmpress.formats.base import BlockFormat


@dataclass(frozen=True)
class CacheType:
    name: str  # llama.cpp's --cache-type name
    ggml_type: GGMLQuantizationType
    dtype: torch.dtype  # of the buffer: the values (f32, f16) or the bytes of their blocks

    @property
    def quantized(self) -> bool:
        return self.dtype == torch.uint8

    @property
    def format(self) -> BlockFormat:
        return get_format(self.ggml_type)

    def row_bytes(self, head_dim: int) -> int:
        return self.format.row_bytes(head_dim)


KV_TYPES = {t.name: t for t in (
    CacheType("f32", GGMLQuantizationType.F32, torch.float32),
    CacheType("f16", GGMLQuantizationType.F16, torch.float16),
    CacheType("q8_0", GGMLQuantizationType.Q8_0, torch.uint8),
    CacheType("q4_0", GGMLQuantizationType.Q4_0, torch.uint8),
)}

KVDtypes = tuple[CacheType, CacheType]  # (k cache, v cache)
KV_F32: KVDtypes = (KV_TYPES["f32"], KV_TYPES["f32"])
BLOCK = 32  # values per Q8_0 / Q4_0 block
VALUE_ROTATION = 64  # llama.cpp rotates values by 64 x 64 (it measured smaller to be better)


def kv_dtype(name: str) -> CacheType:
    if name not in KV_TYPES:
        raise LlmpressError(f"unknown KV cache type {name!r}; valid: {', '.join(KV_TYPES)}")
    return KV_TYPES[name]


def check_head_dim(types: KVDtypes, head_dim: int) -> None:
    """A quantized cache holds whole blocks of one head's values (as llama.cpp's)."""
    for t in types:
        if t.quantized and head_dim % BLOCK:
            raise LlmpressError(f"a {t.name} KV cache needs heads of a multiple of {BLOCK} "
                                f"values; this model's have {head_dim}: use f16 or f32")


def key_rotation(cache_type: CacheType, head_dim: int) -> int:
    """The size of the rotation of quantized keys (0: none): llama.cpp's, the largest
    power of two from 64 up that divides head_dim, where 64 does."""
    if not cache_type.quantized or head_dim % 64:
        return 0
    n = 64
    while head_dim % (2 * n) == 0:
        n *= 2
    return n


def value_rotation(cache_type: CacheType, head_dim: int) -> int:
    return VALUE_ROTATION if cache_type.quantized and head_dim % VALUE_ROTATION == 0 else 0


@lru_cache(maxsize=8)
def hadamard(n: int, device: torch.device) -> torch.Tensor:
    """The orthonormal n x n Walsh-Hadamard matrix in Sylvester's order (H2n = [[H, H],
    [H, -H]]), entries +-1 / sqrtf(n) in float32 as ggml's fast transform scales them."""
    signs = torch.ones(1, 1)
    while signs.shape[0] < n:
        signs = torch.cat([torch.cat([signs, signs], 1), torch.cat([signs, -signs], 1)])
    return (signs * (1 / torch.tensor(float(n)).sqrt())).to(device)


class CacheRows:
    """One layer's keys or values at every position: (batch, n_kv, max_tokens, head_dim)
    values, or for a quantized type each row's blocks, (batch, n_kv, max_tokens, row_bytes).

    torch.empty only reserves address space: pages become resident as positions are
    written, so memory grows with the tokens actually used, not with the context limit.
    """

    def __init__(self, cache_type: CacheType, batch: int, n_kv: int, max_tokens: int,
                 head_dim: int, device=None, rotation: int = 0):
        self.type, self.head_dim, self.rotation = cache_type, head_dim, rotation
        width = cache_type.row_bytes(head_dim) if cache_type.quantized else head_dim
        self.data = torch.empty(batch, n_kv, max_tokens, width, dtype=cache_type.dtype,
                                device=device)

    def bytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def write(self, start: int, rows: torch.Tensor) -> None:
        """rows (batch, n_kv, T, head_dim) go to positions start .. start + T."""
        end = start + rows.shape[2]
        if not self.type.quantized:
            self.data[:, :, start:end] = rows
            return
        blocks = self.type.format.quantize(self.rotate(rows).detach().float().cpu().numpy())
        self.data[:, :, start:end] = torch.from_numpy(blocks).to(self.data.device)

    def read(self, first: int, end: int) -> torch.Tensor:
        """Positions first .. end as values, (batch, n_kv, end - first, head_dim): float32
        for a quantized type, else the stored type; rotated as stored."""
        rows = self.data[:, :, first:end]
        if not self.type.quantized:
            return rows
        shape = (*rows.shape[:-1], self.head_dim)
        return self.type.format.dequantize(rows.contiguous().view(-1), shape)


    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., head_dim) into the rows' rotated basis, or back out of it (the rotation
        is its own inverse): each run of `rotation` values times the Hadamard matrix."""
        if not self.rotation:
            return x
        chunks = x.reshape(*x.shape[:-1], -1, self.rotation)
        return (chunks @ hadamard(self.rotation, x.device)).reshape(x.shape)

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """q (..., head_dim) as attention dots it with these keys: for quantized keys,
        rotated as they are and rounded to Q8_0 blocks (ggml's vec-dot type of Q8_0 and
        Q4_0, as llama.cpp's flash attention does); else as it is."""
        if not self.type.quantized:
            return q
        q8_0 = get_format(GGMLQuantizationType.Q8_0)
        blocks = q8_0.quantize(self.rotate(q).detach().float().cpu().numpy())
        rounded = q8_0.dequantize(torch.from_numpy(blocks).view(-1), tuple(q.shape))
        return rounded.to(q.device, q.dtype)


class KVCache:
    """Per-layer key/value buffers (CacheRows), allocated for the whole context up front.
    Keys and values each keep their own type; attention computes in float32."""

    def __init__(self, cfg, max_tokens: int, batch: int = 1, dtypes: KVDtypes = KV_F32,
                 device=None):
        check_head_dim(dtypes, cfg.head_dim)
        self.max_tokens, self.dtypes = max_tokens, dtypes
        rotations = (key_rotation(dtypes[0], cfg.head_dim), value_rotation(dtypes[1], cfg.head_dim))
        self.keys, self.values = ([CacheRows(t, batch, lc.n_kv_heads, max_tokens, cfg.head_dim,
                                             device, rotation) for lc in cfg.layers]
                                  for t, rotation in zip(dtypes, rotations))
        self.length = 0  # tokens stored so far

    def bytes(self) -> int:
        return sum(rows.bytes() for rows in self.keys + self.values)

    def first_free(self, n_tokens: int) -> int:
        """The position of the first of n_tokens new tokens, refused when they do not fit."""
        if self.length + n_tokens > self.max_tokens:
            raise ValueError(f"{self.length + n_tokens} tokens exceed the cache of "
                             f"{self.max_tokens}")
        return self.length

"""The decoder layers in C (decode.c): one call per forward pass, for the new tokens of
one sequence or of several decoded together.

Built from plain layer descriptions that the model hands over (every matmul weight with
a CPU kernel); the C structs hold pointers into the model's own tensors (packed weights,
norms, the KV caches), which the model keeps alive.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

import torch

from gguf import GGMLQuantizationType

from llmpress.formats import cquant
from llmpress.kernels import cpu
from llmpress.kernels.linear import QuantLinear, kernel_weights

N_WEIGHTS = 7  # q k v o gate up down


class DecodeLayer(ctypes.Structure):
    _fields_ = [("n_heads", ctypes.c_int64), ("n_kv", ctypes.c_int64), ("ffn_dim", ctypes.c_int64),
                ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("q_bias", ctypes.c_void_p), ("k_bias", ctypes.c_void_p),
                ("v_bias", ctypes.c_void_p),
                ("types", ctypes.c_int * N_WEIGHTS), ("weights", ctypes.c_void_p * N_WEIGHTS),
                ("weight_bytes", ctypes.c_int64 * N_WEIGHTS),
                ("attn_post_norm", ctypes.c_void_p), ("ffn_post_norm", ctypes.c_void_p),
                ("window", ctypes.c_int64), ("rotation", ctypes.c_int64)]


class LayerCache(ctypes.Structure):
    _fields_ = [("keys", ctypes.c_void_p), ("values", ctypes.c_void_p),
                ("max_tokens", ctypes.c_int64), ("key_bytes", ctypes.c_int64),
                ("value_bytes", ctypes.c_int64)]


class DecodeShape(ctypes.Structure):
    _fields_ = [("dim", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("rope_dim", ctypes.c_int64), ("neox", ctypes.c_int64), ("eps", ctypes.c_float),
                ("key_type", ctypes.c_int64), ("value_type", ctypes.c_int64),
                ("quantize_q8_0", ctypes.c_void_p), ("quantize_q4_0", ctypes.c_void_p),
                ("key_rotation", ctypes.c_int64), ("value_rotation", ctypes.c_int64),
                ("query_scale", ctypes.c_float), ("softcap", ctypes.c_float),
                ("gelu", ctypes.c_int64)]


# The KV cache types decode.c keeps (ggml ids); the block ones are quantized on store by
# formats/quantize.c's row functions, whose addresses the decoder hands over.
CACHE_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0,
               GGMLQuantizationType.Q4_0)


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _library():
    lib = cpu._library()
    if lib is None or not hasattr(lib, "llmpress_forward"):
        return None
    lib.llmpress_forward.restype = ctypes.c_int
    lib.llmpress_forward.argtypes = [
        ctypes.POINTER(DecodeShape), ctypes.POINTER(DecodeLayer), ctypes.c_int64,
        ctypes.POINTER(LayerCache), ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return lib


@dataclass(frozen=True)
class ShapeDescription:
    """What the decoder needs of the model's hyperparameters."""

    dim: int
    head_dim: int
    rope_dim: int
    neox: bool  # RoPE pairs (i, i + d/2) instead of (2i, 2i + 1)
    eps: float
    query_scale: float = 0.0  # multiplies q.k; 0: 1 / sqrt(head_dim)
    softcap: float = 0.0  # attention scores become cap * tanh(score / cap); 0: none
    gelu: bool = False  # the FFN gate's activation: GELU (tanh approximation), else SiLU


@dataclass(frozen=True)
class LayerDescription:
    """One decoder layer as plain tensors: the model hands these over (the kernels never
    walk a model's modules). weights: q k v o gate up down."""

    n_heads: int
    n_kv: int
    ffn_dim: int
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    weights: list[QuantLinear]
    q_norm: torch.Tensor | None = None  # Qwen3
    k_norm: torch.Tensor | None = None
    biases: tuple[torch.Tensor | None, ...] = (None, None, None)  # Qwen2: q, k, v
    attn_post_norm: torch.Tensor | None = None  # Gemma: norms attention's output
    ffn_post_norm: torch.Tensor | None = None  # Gemma: norms the FFN's output
    window: int = 0  # sliding window: a query sees its last `window` positions; 0: all
    rotation: int = 0  # which of the forward pass's RoPE tables the layer rotates by


def can_decode(layers: list[LayerDescription]) -> bool:
    """Every matmul of every layer has a CPU kernel (fast mode, supported types)."""
    return _library() is not None and all(w.kernel is not None for layer in layers
                                          for w in layer.weights)


class FusedDecoder:
    def __init__(self, shape: ShapeDescription, layers: list[LayerDescription]):
        self.layers = (DecodeLayer * len(layers))()
        for c_layer, layer in zip(self.layers, layers):
            c_layer.n_heads, c_layer.n_kv, c_layer.ffn_dim = layer.n_heads, layer.n_kv, layer.ffn_dim
            c_layer.attn_norm, c_layer.ffn_norm = _pointer(layer.attn_norm), _pointer(layer.ffn_norm)
            c_layer.q_norm, c_layer.k_norm = _pointer(layer.q_norm), _pointer(layer.k_norm)
            c_layer.q_bias, c_layer.k_bias, c_layer.v_bias = (_pointer(b) for b in layer.biases)
            c_layer.attn_post_norm = _pointer(layer.attn_post_norm)
            c_layer.ffn_post_norm = _pointer(layer.ffn_post_norm)
            c_layer.window, c_layer.rotation = layer.window, layer.rotation
            # q k v | o | gate up | down: the weights of one matmul call each
            kernel = [w for first, end in ((0, 3), (3, 4), (4, 6), (6, 7))
                      for w in kernel_weights(layer.weights[first:end])]
            for i, (rows, kernel_type) in enumerate(kernel):
                c_layer.types[i], c_layer.weights[i] = kernel_type, rows.data_ptr()
                c_layer.weight_bytes[i] = rows.numel() * rows.element_size()
        self.shape = DecodeShape(dim=shape.dim, head_dim=shape.head_dim, rope_dim=shape.rope_dim,
                                 neox=int(shape.neox), eps=shape.eps,
                                 query_scale=shape.query_scale, softcap=shape.softcap,
                                 gelu=int(shape.gelu))
        self.shape.quantize_q8_0 = cquant.row_function(GGMLQuantizationType.Q8_0)
        self.shape.quantize_q4_0 = cquant.row_function(GGMLQuantizationType.Q4_0)
        self.views = weakref.WeakKeyDictionary()  # cache -> its LayerCache array

    def _views(self, cache) -> ctypes.Array:
        """The C description of a cache's buffers (built once per cache)."""
        views = self.views.get(cache)
        if views is None:
            views = (LayerCache * len(self.layers))()
            for view, keys, values in zip(views, cache.keys, cache.values):
                keys, values = keys.data, values.data  # CacheRows: values, or blocks' bytes
                assert keys.is_contiguous() and values.is_contiguous() and keys.shape[0] == 1
                view.keys, view.values = keys.data_ptr(), values.data_ptr()
                view.max_tokens = cache.max_tokens
                view.key_bytes = keys.numel() * keys.element_size()
                view.value_bytes = values.numel() * values.element_size()
            self.views[cache] = views
        return views

    def handles(self, cache_types) -> bool:
        """Whether the C path keeps caches of these (k, v) types (models.kv_cache's
        CacheType): f32 and f16, and Q8_0 / Q4_0 when the C quantizers were built."""
        quantizers = bool(self.shape.quantize_q8_0 and self.shape.quantize_q4_0)
        floats = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
        return all(t.ggml_type in floats or (t.ggml_type in CACHE_TYPES and quantizers)
                   for t in cache_types)

    def forward(self, x: torch.Tensor, segments: list[tuple[object, int]],
                rotations: list[torch.Tensor]) -> torch.Tensor:
        """x: (T, dim) float32 embeddings of new tokens, segments: (cache, n) for each
        sequence in row order, whose n rows go at positions cache.length onwards;
        rotations: RoPE tables, each (T, rope_dim/2) complex, the rows' angles (a layer
        rotates by the one its description names). -> (T, dim) the last layer's output.
        The caches' lengths are the caller's to advance."""
        dtypes = {cache.dtypes for cache, _ in segments}
        if len(dtypes) != 1:
            raise ValueError("the caches decoded together must share their element types")
        self.shape.key_type, self.shape.value_type = (int(t.ggml_type) for t in dtypes.pop())
        # the rows' rotations (models/kv_cache.py), the same for every cache of these types
        first = segments[0][0]
        self.shape.key_rotation = first.keys[0].rotation
        self.shape.value_rotation = first.values[0].rotation
        n_layers = len(self.layers)
        caches = (LayerCache * (n_layers * len(segments)))()
        row_seq, row_pos = [], []
        for i, (cache, n) in enumerate(segments):
            ctypes.memmove(ctypes.byref(caches, i * n_layers * ctypes.sizeof(LayerCache)),
                           self._views(cache), n_layers * ctypes.sizeof(LayerCache))
            row_seq += [i] * n
            row_pos += range(cache.length, cache.length + n)
        seq, pos = torch.tensor(row_seq, dtype=torch.int64), torch.tensor(row_pos, dtype=torch.int64)
        x = x.contiguous().clone()
        tables = torch.stack(rotations)  # (tables, T, rope_dim/2)
        cos, sin = tables.real.contiguous(), tables.imag.contiguous()
        status = _library().llmpress_forward(
            ctypes.byref(self.shape), self.layers, n_layers, caches, len(segments),
            x.data_ptr(), x.numel(), x.shape[0], seq.data_ptr(), pos.data_ptr(),
            cos.data_ptr(), sin.data_ptr(), len(rotations), cos.numel(), torch.get_num_threads())
        cpu.check(status, "fused decoder layers")
        return x

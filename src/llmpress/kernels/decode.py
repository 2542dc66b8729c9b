"""The decoder layers in C (decode.c): one call per prompt chunk or generated token.

Built from a LlamaModel whose every matmul weight has a CPU kernel; the C structs hold
pointers into the model's own tensors (packed weights, norms, the KV cache), which the
model keeps alive.
"""

from __future__ import annotations

import ctypes

import torch

from llmpress.kernels import cpu

N_WEIGHTS = 7  # q k v o gate up down


class DecodeLayer(ctypes.Structure):
    _fields_ = [("n_heads", ctypes.c_int64), ("n_kv", ctypes.c_int64), ("ffn_dim", ctypes.c_int64),
                ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("q_bias", ctypes.c_void_p), ("k_bias", ctypes.c_void_p),
                ("v_bias", ctypes.c_void_p),
                ("types", ctypes.c_int * N_WEIGHTS), ("weights", ctypes.c_void_p * N_WEIGHTS),
                ("weight_bytes", ctypes.c_int64 * N_WEIGHTS),
                ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p),
                ("cache_values", ctypes.c_int64)]


class DecodeShape(ctypes.Structure):
    _fields_ = [("dim", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("rope_dim", ctypes.c_int64), ("max_tokens", ctypes.c_int64),
                ("neox", ctypes.c_int64), ("eps", ctypes.c_float),
                ("key_half", ctypes.c_int64), ("value_half", ctypes.c_int64)]


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _library():
    lib = cpu._library()
    if lib is None or not hasattr(lib, "llmpress_forward"):
        return None
    lib.llmpress_forward.restype = ctypes.c_int
    lib.llmpress_forward.argtypes = [
        ctypes.POINTER(DecodeShape), ctypes.POINTER(DecodeLayer), ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return lib


def can_decode(model) -> bool:
    """Every matmul of every block has a CPU kernel (fast mode, supported types)."""
    return (_library() is not None and all(
        b.attn.qkv.kernel is not None and b.attn.wo.kernel is not None
        and b.ffn.gate_up.kernel is not None and b.ffn.down.kernel is not None
        for b in model.blocks))


class FusedDecoder:
    def __init__(self, model):
        cfg = model.cfg
        self.layers = (DecodeLayer * len(model.blocks))()
        for layer, block, lc in zip(self.layers, model.blocks, cfg.layers):
            attn, ffn = block.attn, block.ffn
            linears = [*attn.qkv.linears, attn.wo, *ffn.gate_up.linears, ffn.down]
            biases = attn.biases or [None, None, None]
            layer.n_heads, layer.n_kv, layer.ffn_dim = lc.n_heads, lc.n_kv_heads, lc.ffn_dim
            layer.attn_norm, layer.ffn_norm = _pointer(block.attn_norm), _pointer(block.ffn_norm)
            layer.q_norm, layer.k_norm = _pointer(attn.q_norm), _pointer(attn.k_norm)
            layer.q_bias, layer.k_bias, layer.v_bias = (_pointer(b) for b in biases)
            for i, lin in enumerate(linears):
                layer.types[i], layer.weights[i] = int(lin.ggml_type), lin.rows.data_ptr()
                layer.weight_bytes[i] = lin.rows.numel() * lin.rows.element_size()
        self.shape = DecodeShape(cfg.dim, cfg.head_dim, cfg.rope_dim, 0,
                                 int(cfg.rope_style == "neox"), cfg.norm_eps)
        self.cache = None

    def _bind(self, cache) -> None:
        """Point the layers at this cache's buffers (once per cache)."""
        if self.cache is cache:
            return
        for layer, keys, values in zip(self.layers, cache.keys, cache.values):
            assert keys.is_contiguous() and values.is_contiguous() and keys.shape[0] == 1
            layer.keys, layer.values = keys.data_ptr(), values.data_ptr()
            layer.cache_values = keys[0].numel()
        self.shape.max_tokens = cache.max_tokens
        self.shape.key_half, self.shape.value_half = (int(t == torch.float16) for t in cache.dtypes)
        self.cache = cache

    def forward(self, x: torch.Tensor, cache, rotation: torch.Tensor) -> torch.Tensor:
        """x: (T, dim) float32 embeddings of the tokens at positions cache.length onwards;
        rotation: (T, rope_dim/2) their RoPE angles. -> (T, dim) the last layer's output."""
        self._bind(cache)
        x = x.contiguous().clone()
        cos, sin = rotation.real.contiguous(), rotation.imag.contiguous()
        status = _library().llmpress_forward(
            ctypes.byref(self.shape), self.layers, len(self.layers), x.data_ptr(), x.numel(),
            cache.length, x.shape[0], cos.data_ptr(), sin.data_ptr(), cos.numel(),
            torch.get_num_threads())
        cpu.check(status, "fused decoder layers")
        return x

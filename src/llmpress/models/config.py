"""Model configuration read from GGUF-style metadata and the tensors' own shapes.

Per-layer widths come from the weight shapes, not from the header, so a model whose heads
or FFN channels were pruned layer by layer runs without special cases.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmpress.errors import LlmpressError
from llmpress.io.source import ModelSource
from llmpress.io.names import MOE_NORMALIZES_TOP_K
from llmpress.models.validate import check_model

# Architectures of the Llama family and how each applies RoPE. llama.cpp's "norm" style
# rotates adjacent pairs (x[2i], x[2i+1]); "neox" rotates (x[i], x[i + d/2]).
ROPE_STYLE = {"llama": "norm", "mistral": "norm", "qwen2": "neox", "qwen3": "neox",
              "qwen2moe": "neox", "qwen3moe": "neox", "gemma2": "neox", "gemma3": "neox",
              "phi3": "neox", "olmoe": "neox"}
SUPPORTED_ARCHITECTURES = tuple(ROPE_STYLE)
# Which model class runs which (models/family.py): models/llama.py, gemma.py, phi3.py.
# The Llama family's mixtures of experts (Mixtral is "llama" with experts; OLMoE) run
# their FFN in models/moe.py.
LLAMA_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "olmoe")
GEMMA_ARCHITECTURES = ("gemma2", "gemma3")
PHI3_ARCHITECTURES = ("phi3",)  # models/phi3.py


@dataclass(frozen=True)
class LayerConfig:
    index: int  # blk.N in the file
    n_heads: int
    n_kv_heads: int
    ffn_dim: int  # of one expert in a mixture of experts


@dataclass(frozen=True)
class LlamaConfig:
    architecture: str
    vocab_size: int
    dim: int
    head_dim: int
    rope_dim: int
    rope_base: float
    rope_style: str  # "norm" | "neox"
    rope_scale: float  # linear position scaling (1.0 = none)
    rope_attn_factor: float  # multiplies RoPE's cos and sin (LongRoPE's attention factor)
    norm_eps: float
    context_length: int
    layers: tuple[LayerConfig, ...]
    tied_output: bool
    qkv_bias: bool
    qk_norm: bool
    n_experts: int  # 0: a dense FFN; else routed experts (models/moe.py)
    n_experts_used: int  # experts each token is routed to
    normalize_top_k: bool  # the routed weights renormalized to sum to 1

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def _per_layer(value, n_layers: int) -> list[int]:
    """GGUF allows per-layer arrays for head counts and FFN sizes."""
    if isinstance(value, list):
        return [int(v) for v in value]
    return [int(value)] * n_layers


def layer_config(src: ModelSource, i: int, head_dim: int) -> LayerConfig:
    """Layer i's widths from its weights' shapes (check_model has made them consistent):
    q from attn_output's columns; kv from attn_k's rows, or from what a fused attn_qkv
    holds beyond q (Phi-3); the FFN from ffn_down's columns (one expert's, in a mixture)."""
    def weight(name: str):
        return src.tensors.get(f"blk.{i}.{name}.weight")
    out, k, qkv = weight("attn_output"), weight("attn_k"), weight("attn_qkv")
    down = weight("ffn_down") or weight("ffn_down_exps")
    if out is None or down is None or (k is None and qkv is None):
        raise LlmpressError(f"{src.path}: layer {i} is missing attention or FFN weights")
    q = out.shape[1]
    kv = k.shape[0] if k is not None else (qkv.shape[0] - q) // 2
    return LayerConfig(i, q // head_dim, kv // head_dim, down.shape[-1])


def config_from_source(src: ModelSource,
                       architectures: tuple[str, ...] = LLAMA_ARCHITECTURES) -> LlamaConfig:
    """The shapes every family shares; `architectures`: those the caller can run."""
    arch = src.architecture
    if arch not in ROPE_STYLE:
        raise LlmpressError(f"{src.path}: architecture {arch!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if arch not in architectures:  # e.g. a Llama-only calibration path given a Gemma file
        raise LlmpressError(f"{src.path}: architecture {arch!r} is not supported here "
                            f"(this path runs {', '.join(architectures)})")
    check_model(src)  # every value used below is now of its type, in range and consistent

    def need(key: str):
        value = src.arch_key(key)
        if value is None:
            raise LlmpressError(f"{src.path}: metadata key {arch}.{key} is missing")
        return value

    dim = int(need("embedding_length"))
    n_blocks = int(need("block_count"))
    heads = _per_layer(need("attention.head_count"), n_blocks)
    head_dim = int(src.arch_key("attention.key_length") or dim // heads[0])
    if "token_embd.weight" not in src.tensors:
        raise LlmpressError(f"{src.path}: tensor token_embd.weight is missing")
    vocab = src.tensors["token_embd.weight"].shape[0]

    n_experts = int(src.arch_key("expert_count", 0) or 0)
    layers = [layer_config(src, i, head_dim) for i in range(n_blocks)]

    scaling = src.arch_key("rope.scaling.type")
    rope_scale = 1.0
    if scaling == "linear":
        rope_scale = float(src.arch_key("rope.scaling.factor", 1.0))
    elif scaling not in (None, "none"):
        raise LlmpressError(f"{src.path}: RoPE scaling {scaling!r} is not supported")
    return LlamaConfig(
        architecture=arch,
        vocab_size=vocab,
        dim=dim,
        head_dim=head_dim,
        rope_dim=int(src.arch_key("rope.dimension_count") or head_dim),
        rope_base=float(src.arch_key("rope.freq_base", 10000.0)),
        rope_style=ROPE_STYLE[arch],
        rope_scale=rope_scale,
        rope_attn_factor=float(src.arch_key("rope.scaling.attn_factor", 1.0)),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        context_length=int(src.arch_key("context_length", 2048)),
        layers=tuple(layers),
        tied_output="output.weight" not in src.tensors,
        qkv_bias="blk.0.attn_q.bias" in src.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in src.tensors,
        n_experts=n_experts,
        n_experts_used=int(src.arch_key("expert_used_count", 0) or 0) if n_experts else 0,
        normalize_top_k=MOE_NORMALIZES_TOP_K.get(arch, False),
    )

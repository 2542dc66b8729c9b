"""The one check between reading a model and running it.

A model file is untrusted input: its metadata drives loop bounds, buffer sizes and divisions
in the kernels, and its tensors' shapes decide what those buffers hold. `check_model` holds
every value the runtime will use against a type, a sane range and the tensors themselves, so
what reaches the kernels, an allocation or the tokenizer is a self-consistent description;
anything else is one LlmpressError naming the key or the tensor.

Both tables below are data: an architecture is a list of tensors whose shapes are written in
symbols (dim, vocab, the per-layer widths q/kv/ffn measured from the weights, ...), and each
metadata key has one kind. Adding an architecture is adding a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from llmpress.errors import LlmpressError
from llmpress.io.source import ModelSource
from llmpress.io.names import MAX_EXPERTS

MAX_COUNT = 1 << 31  # any count or width field; the tensors then bound the real sizes


# --- metadata kinds ------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(frozen=True)
class Kind:
    """What a metadata value must be; `ok(value)` and a phrase for the error line."""
    describe: str

    def ok(self, v: Any) -> bool:  # overridden per kind
        raise NotImplementedError


class Count(Kind):
    def ok(self, v):
        return _is_int(v) and 1 <= v <= MAX_COUNT


class PerLayerCount(Kind):  # GGUF allows one value per layer for head counts and FFN widths
    def ok(self, v):
        return (_is_int(v) and 0 <= v <= MAX_COUNT) or (
            isinstance(v, list) and bool(v) and all(_is_int(x) and 0 <= x <= MAX_COUNT for x in v))


class Experts(Kind):
    def ok(self, v):
        return _is_int(v) and 0 <= v <= MAX_EXPERTS


class Positive(Kind):
    def ok(self, v):
        return _is_number(v) and v > 0


class Text(Kind):
    def ok(self, v):
        return isinstance(v, str)


class Flag(Kind):
    def ok(self, v):
        return isinstance(v, bool) or (_is_int(v) and v in (0, 1))


class TokenId(Kind):
    def ok(self, v):
        return _is_int(v) and 0 <= v < MAX_COUNT


# The list kinds test exact types (which also rules out bool, a subclass of int) with
# set(map(type, ...)), in C: a vocabulary holds 10^5 entries and loading must stay fast.
class TextList(Kind):
    def ok(self, v):
        return isinstance(v, list) and set(map(type, v)) <= {str}


class IntList(Kind):
    def ok(self, v):
        return isinstance(v, list) and set(map(type, v)) <= {int}


class ScoreList(Kind):  # -inf is a legal score; NaN would make merge order undefined
    def ok(self, v):
        return (isinstance(v, list) and set(map(type, v)) <= {int, float}
                and not any(map(math.isnan, v)))


COUNT, PER_LAYER = Count("a positive integer"), PerLayerCount("an integer or one per layer")
POSITIVE, TEXT, FLAG = Positive("a finite positive number"), Text("a string"), Flag("a boolean")
TOKEN_ID = TokenId("a token id (an integer >= 0)")
EXPERTS = Experts(f"an integer from 0 to {MAX_EXPERTS}")

# "<arch>." + key -> kind, for every key the runtime reads from the architecture's namespace.
ARCH_KEYS: dict[str, Kind] = {
    "embedding_length": COUNT, "block_count": COUNT, "context_length": COUNT,
    "vocab_size": COUNT, "feed_forward_length": PER_LAYER,
    "attention.head_count": PER_LAYER, "attention.head_count_kv": PER_LAYER,
    "attention.key_length": COUNT, "attention.value_length": COUNT,
    "attention.layer_norm_rms_epsilon": POSITIVE,
    "rope.dimension_count": COUNT, "rope.freq_base": POSITIVE,
    "rope.scaling.type": TEXT, "rope.scaling.factor": POSITIVE,
    # mixtures of experts (models/moe.py)
    "expert_count": EXPERTS, "expert_used_count": EXPERTS,
    "expert_feed_forward_length": PER_LAYER, "expert_shared_feed_forward_length": COUNT,
    # Gemma 2/3 (models/gemma.py)
    "attention.sliding_window": COUNT, "rope.freq_base_swa": POSITIVE,
    "attn_logit_softcapping": POSITIVE, "final_logit_softcapping": POSITIVE,
}
REQUIRED_ARCH_KEYS = ("embedding_length", "block_count", "attention.head_count",
                      "attention.layer_norm_rms_epsilon")

OTHER_KEYS: dict[str, Kind] = {
    "general.architecture": TEXT, "general.alignment": COUNT,
    "tokenizer.ggml.model": TEXT, "tokenizer.ggml.pre": TEXT,
    "tokenizer.ggml.tokens": TextList("a list of strings"),
    "tokenizer.ggml.merges": TextList("a list of strings"),
    "tokenizer.ggml.scores": ScoreList("a list of numbers"),
    "tokenizer.ggml.token_type": IntList("a list of integers"),
    "tokenizer.ggml.add_bos_token": FLAG, "tokenizer.ggml.add_eos_token": FLAG,
    "tokenizer.ggml.add_space_prefix": FLAG,
    "tokenizer.chat_template": TEXT,
    **{f"tokenizer.ggml.{name}_token_id": TOKEN_ID for name in (
        "bos", "eos", "unknown", "padding", "separator", "eot", "eom",
        "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")},
}


def check_metadata(src: ModelSource) -> None:
    """Every known key present has its kind; the required architecture keys are there."""
    arch = src.architecture
    for key in REQUIRED_ARCH_KEYS:
        if src.arch_key(key) is None:
            raise LlmpressError(f"{src.path}: metadata key {arch}.{key} is missing")
    wanted = {f"{arch}.{k}": kind for k, kind in ARCH_KEYS.items()} | OTHER_KEYS
    for key, kind in wanted.items():
        value = src.metadata.get(key)
        if value is not None and not kind.ok(value):
            raise LlmpressError(f"{src.path}: metadata key {key} must be {kind.describe}, "
                                f"not {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- tensors -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str  # GGUF name; block tensors without their "blk.N." prefix
    shape: tuple[str, ...]  # torch order, in the symbols of `_symbols`/`_layer_symbols`
    required: bool = True


@dataclass(frozen=True)
class Width:
    """A per-layer width read from one block tensor's shape: its size along `axis` (0: the
    rows of a matrix; 1: its columns, or the rows of a stack of experts), in multiples of
    the `unit` symbol."""
    symbol: str
    tensor: str
    unit: str
    axis: int = 0
    ndim: int = 2


@dataclass(frozen=True)
class Derived:
    """A per-layer width computed from the measured ones, e.g. Phi-3's attn_qkv holding
    q + 2 kv rows: kv = (qkv - q) / 2; it must be a positive multiple of `unit`."""
    symbol: str
    formula: str  # shown in the error line
    compute: Callable[[dict[str, int]], float]
    unit: str


@dataclass(frozen=True)
class ArchSpec:
    globals: tuple[TensorSpec, ...]
    block: tuple[TensorSpec, ...]
    # block tensors whose rows give the layer's widths
    widths: tuple[Width, ...]
    # widths that follow from the others' (fused tensors)
    derived: tuple[Derived, ...] = ()
    # optional block tensors the runtime uses as a group: one present means all required
    together: tuple[tuple[str, ...], ...] = ()


LLAMA_FAMILY = ArchSpec(
    globals=(
        TensorSpec("token_embd.weight", ("vocab", "dim")),
        TensorSpec("output_norm.weight", ("dim",)),
        TensorSpec("output.weight", ("vocab", "dim"), required=False),
        TensorSpec("rope_freqs.weight", ("rope_half",), required=False),
    ),
    block=(
        TensorSpec("attn_norm.weight", ("dim",)),
        TensorSpec("attn_q.weight", ("q", "dim")),
        TensorSpec("attn_k.weight", ("kv", "dim")),
        TensorSpec("attn_v.weight", ("kv", "dim")),
        TensorSpec("attn_output.weight", ("dim", "q")),
        TensorSpec("ffn_norm.weight", ("dim",)),
        TensorSpec("ffn_gate.weight", ("ffn", "dim")),
        TensorSpec("ffn_up.weight", ("ffn", "dim")),
        TensorSpec("ffn_down.weight", ("dim", "ffn")),
        # optional: when layer 0 has one, every layer must (the runtime decides by layer 0)
        TensorSpec("attn_q.bias", ("q",), required=False),
        TensorSpec("attn_k.bias", ("kv",), required=False),
        TensorSpec("attn_v.bias", ("kv",), required=False),
        TensorSpec("attn_q_norm.weight", ("head_dim",), required=False),
        TensorSpec("attn_k_norm.weight", ("head_dim",), required=False),
    ),
    widths=(Width("q", "attn_q.weight", "head_dim"), Width("kv", "attn_k.weight", "head_dim"),
            Width("ffn", "ffn_up.weight", "one")),
    together=(("attn_q.bias", "attn_k.bias", "attn_v.bias"),
              ("attn_q_norm.weight", "attn_k_norm.weight")),
)
# Gemma 2/3: a norm after attention and after the FFN too; q/k norms in Gemma 3 only.
GEMMA_FAMILY = ArchSpec(
    globals=LLAMA_FAMILY.globals[:3],
    block=(
        *(t for t in LLAMA_FAMILY.block if not t.name.endswith(".bias")),
        TensorSpec("post_attention_norm.weight", ("dim",)),
        TensorSpec("post_ffw_norm.weight", ("dim",)),
    ),
    widths=LLAMA_FAMILY.widths,
    together=(("attn_q_norm.weight", "attn_k_norm.weight"),),
)
# Mixtral, Qwen3-MoE: the Llama block with the FFN made of routed experts, 3-D tensors of
# one (rows, row_length) matrix per expert; "experts" is the file's expert_count.
_DENSE_FFN = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
LLAMA_MOE_FAMILY = ArchSpec(
    globals=LLAMA_FAMILY.globals,
    block=(
        *(t for t in LLAMA_FAMILY.block if t.name not in _DENSE_FFN),
        TensorSpec("ffn_gate_inp.weight", ("experts", "dim")),
        TensorSpec("ffn_gate_exps.weight", ("experts", "ffn", "dim")),
        TensorSpec("ffn_up_exps.weight", ("experts", "ffn", "dim")),
        TensorSpec("ffn_down_exps.weight", ("experts", "dim", "ffn")),
    ),
    widths=(*LLAMA_FAMILY.widths[:2],
            Width("ffn", "ffn_up_exps.weight", "one", axis=1, ndim=3)),
    together=LLAMA_FAMILY.together,
)
# Qwen2-MoE: a shared expert every token goes through, with a gate of its own.
QWEN2_MOE_FAMILY = ArchSpec(
    globals=LLAMA_MOE_FAMILY.globals,
    block=(
        *LLAMA_MOE_FAMILY.block,
        TensorSpec("ffn_gate_inp_shexp.weight", ("dim",)),
        TensorSpec("ffn_gate_shexp.weight", ("shexp", "dim")),
        TensorSpec("ffn_up_shexp.weight", ("shexp", "dim")),
        TensorSpec("ffn_down_shexp.weight", ("dim", "shexp")),
    ),
    widths=(*LLAMA_MOE_FAMILY.widths, Width("shexp", "ffn_up_shexp.weight", "one")),
    together=LLAMA_MOE_FAMILY.together,
)
# Phi-3: q, k and v in one matrix (attn_qkv), the FFN's gate and up in one (ffn_up, gate
# rows first); LongRoPE's frequency factors for short and long contexts.
PHI3_FAMILY = ArchSpec(
    globals=(
        *LLAMA_FAMILY.globals[:3],
        TensorSpec("rope_factors_long.weight", ("rope_half",), required=False),
        TensorSpec("rope_factors_short.weight", ("rope_half",), required=False),
    ),
    block=(
        TensorSpec("attn_norm.weight", ("dim",)),
        TensorSpec("attn_qkv.weight", ("qkv", "dim")),
        TensorSpec("attn_output.weight", ("dim", "q")),
        TensorSpec("ffn_norm.weight", ("dim",)),
        TensorSpec("ffn_up.weight", ("gate_up", "dim")),
        TensorSpec("ffn_down.weight", ("dim", "ffn")),
    ),
    widths=(Width("q", "attn_output.weight", "head_dim", axis=1),
            Width("qkv", "attn_qkv.weight", "head_dim"),
            Width("ffn", "ffn_down.weight", "one", axis=1)),
    derived=(Derived("kv", "(qkv - q) / 2", lambda s: (s["qkv"] - s["q"]) / 2, "head_dim"),
             Derived("gate_up", "2 ffn", lambda s: 2 * s["ffn"], "one")),
)
# OLMoE: RMSNorm over the whole q and k projections (not per head) before RoPE.
OLMOE_FAMILY = ArchSpec(
    globals=LLAMA_MOE_FAMILY.globals,
    block=(
        *(t for t in LLAMA_MOE_FAMILY.block
          if t.name not in ("attn_q_norm.weight", "attn_k_norm.weight")),
        TensorSpec("attn_q_norm.weight", ("q",)),
        TensorSpec("attn_k_norm.weight", ("kv",)),
    ),
    widths=LLAMA_MOE_FAMILY.widths,
    together=(("attn_q.bias", "attn_k.bias", "attn_v.bias"),),
)
ARCHITECTURES: dict[str, ArchSpec] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), LLAMA_FAMILY),
    "phi3": PHI3_FAMILY,
    **dict.fromkeys(("gemma2", "gemma3"), GEMMA_FAMILY),
    "qwen3moe": LLAMA_MOE_FAMILY, "qwen2moe": QWEN2_MOE_FAMILY, "olmoe": OLMOE_FAMILY,
}
# The spec of a file whose expert_count is not 0, where it differs from the above.
WITH_EXPERTS: dict[str, ArchSpec] = {"llama": LLAMA_MOE_FAMILY}
MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe", "olmoe")  # those that have experts or are refused


def _first(value: Any) -> int:
    return value[0] if isinstance(value, list) else value


def _symbols(src: ModelSource) -> dict[str, int]:
    """The whole-model sizes, each checked against the one tensor that shows it."""
    where = src.path
    embd = src.tensors.get("token_embd.weight")
    if embd is None:
        raise LlmpressError(f"{where}: tensor token_embd.weight is missing")
    if len(embd.shape) != 2:
        raise LlmpressError(f"{where}: tensor token_embd.weight has shape {list(embd.shape)}, "
                            "expected [vocab, embedding_length]")
    vocab, width = embd.shape
    if vocab < 1:
        raise LlmpressError(f"{where}: tensor token_embd.weight has no rows")
    arch = src.architecture
    dim = src.arch_key("embedding_length")
    if dim != width:
        raise LlmpressError(f"{where}: metadata key {arch}.embedding_length is {dim}, but "
                            f"tensor token_embd.weight is {width} wide")
    heads = _first(src.arch_key("attention.head_count"))
    if heads < 1:
        raise LlmpressError(f"{where}: metadata key {arch}.attention.head_count is {heads}; "
                            "a model needs at least one attention head")
    head_dim = src.arch_key("attention.key_length") or dim // heads
    if head_dim < 1:
        raise LlmpressError(f"{where}: metadata key {arch}.attention.head_count {heads} is "
                            f"larger than embedding_length {dim}")
    value_dim = src.arch_key("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise LlmpressError(f"{where}: metadata key {arch}.attention.value_length {value_dim} "
                            f"differs from key_length {head_dim}, which llmpress cannot run")
    rope_dim = src.arch_key("rope.dimension_count") or head_dim
    if rope_dim % 2 or rope_dim > head_dim:
        raise LlmpressError(f"{where}: metadata key {arch}.rope.dimension_count {rope_dim} must "
                            f"be even and at most the head size {head_dim}")
    n_tokens = len(src.metadata.get("tokenizer.ggml.tokens") or ())
    if n_tokens > vocab:
        raise LlmpressError(f"{where}: the vocabulary has {n_tokens} tokens but tensor "
                            f"token_embd.weight has only {vocab} rows")
    return {"dim": dim, "vocab": vocab, "head_dim": head_dim, "rope_half": rope_dim // 2,
            "one": 1, "experts": src.arch_key("expert_count", 0)}


def _block_count(src: ModelSource, spec: ArchSpec) -> int:
    """block_count, refused before anything loops over it when the tensors cannot hold it."""
    n = src.arch_key("block_count")
    required = sum(t.required for t in spec.block)
    if n * required > len(src.tensors):
        raise LlmpressError(f"{src.path}: metadata key {src.architecture}.block_count is {n}, "
                            f"but the file has only {len(src.tensors)} tensors")
    return n


def _layer_symbols(src: ModelSource, spec: ArchSpec, prefix: str, base: dict[str, int]
                   ) -> dict[str, int]:
    """Per-layer widths from the rows of this layer's weights (pruned layers differ)."""
    symbols = dict(base)
    for width in spec.widths:
        name = prefix + width.tensor
        ref = src.tensors.get(name)
        if ref is None:
            raise LlmpressError(f"{src.path}: tensor {name} is missing")
        if len(ref.shape) != width.ndim:
            raise LlmpressError(f"{src.path}: tensor {name} has {len(ref.shape)} dimensions, "
                                f"expected {width.ndim}")
        rows, size = ref.shape[width.axis], base[width.unit]
        if rows < 1 or rows % size:
            raise LlmpressError(f"{src.path}: tensor {name} has {rows} rows, not a "
                                f"multiple of the head size {size}")
        symbols[width.symbol] = rows
    for d in spec.derived:
        value = d.compute(symbols)
        if value <= 0 or value != int(value) or value % symbols[d.unit]:
            measured = ", ".join(f"{k}={v}" for k, v in symbols.items() if k in d.formula)
            raise LlmpressError(f"{src.path}: layer {prefix[4:-1]}: {d.symbol} = {d.formula} "
                                f"= {value:g} ({measured}) is not a positive multiple of "
                                f"{d.unit} {symbols[d.unit]}")
        symbols[d.symbol] = int(value)
    heads, kv_heads = symbols["q"] // base["head_dim"], symbols["kv"] // base["head_dim"]
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise LlmpressError(f"{src.path}: layer {prefix[4:-1]} has {heads} query heads and "
                            f"{kv_heads} key/value heads; needs at least one of each, and "
                            "a whole number of query heads per key/value head")
    return symbols


def _check_shape(src: ModelSource, name: str, spec: TensorSpec, symbols: dict[str, int]
                 ) -> None:
    want = tuple(symbols[s] for s in spec.shape)
    have = src.tensors[name].shape
    if tuple(have) != want:
        described = ", ".join(f"{s}={symbols[s]}" for s in spec.shape)
        raise LlmpressError(f"{src.path}: tensor {name} has shape {list(have)}, but the model "
                            f"implies {list(want)} ({described})")


def check_tensors(src: ModelSource, spec: ArchSpec) -> None:
    base = _symbols(src)
    for t in spec.globals:
        if t.name in src.tensors:
            _check_shape(src, t.name, t, base)
        elif t.required:
            raise LlmpressError(f"{src.path}: tensor {t.name} is missing")
    layer0_has = {t.name for t in spec.block if f"blk.0.{t.name}" in src.tensors}
    for group in spec.together:
        if layer0_has.intersection(group):
            layer0_has.update(group)
    for i in range(_block_count(src, spec)):
        prefix = f"blk.{i}."
        symbols = _layer_symbols(src, spec, prefix, base)
        for t in spec.block:
            name = prefix + t.name
            if name in src.tensors:
                _check_shape(src, name, t, symbols)
            elif t.required or t.name in layer0_has:
                raise LlmpressError(f"{src.path}: tensor {name} is missing")


def check_experts(src: ModelSource) -> ArchSpec:
    """The spec of src's architecture, with experts or without as its metadata says (whose
    kinds check_metadata has checked); the expert counts consistent."""
    arch, where = src.architecture, src.path
    n_experts = src.arch_key("expert_count", 0)
    used = src.arch_key("expert_used_count", 0)
    if not n_experts:
        if arch in MOE_ARCHITECTURES:
            raise LlmpressError(f"{where}: metadata key {arch}.expert_count is missing or 0; "
                                f"{arch} is a mixture of experts")
        return ARCHITECTURES[arch]
    spec = WITH_EXPERTS.get(arch) or (ARCHITECTURES[arch] if arch in MOE_ARCHITECTURES
                                      else None)
    if spec is None:
        raise LlmpressError(f"{where}: {arch} with experts (expert_count {n_experts}) is not "
                            "supported")
    if not 1 <= used <= n_experts:
        raise LlmpressError(f"{where}: metadata key {arch}.expert_used_count is {used}; it "
                            f"must be from 1 to expert_count {n_experts}")
    return spec


# --- the pass ------------------------------------------------------------------------------
def check_model(src: ModelSource) -> None:
    """Raise one LlmpressError unless src is a model the runtime can run safely."""
    if src.architecture not in ARCHITECTURES:
        raise LlmpressError(f"{src.path}: architecture {src.architecture!r} is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")
    check_metadata(src)
    check_tensors(src, check_experts(src))

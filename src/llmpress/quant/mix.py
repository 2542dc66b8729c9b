"""Type mixes: which GGML type each tensor gets for a target like Q4_K_M.

A pure function of tensor names, shapes and model metadata (no weights), so the memory
planner can predict sizes with it. It mirrors llama.cpp's src/llama-quant.cpp:

    tensor_allows_quantization   which tensors may change type at all
    llama_tensor_get_type        overrides (--tensor-type, --output-type, --embedding-type)
    llama_tensor_get_type_impl   the per-ftype rules (output, attn_v, ffn_down "more bits" ...)
    tensor_type_fallback         rows that are not a multiple of the block size

The rules for ftypes whose formats llmpress does not implement (IQ1/IQ2/IQ3, TQ, MXFP4)
are left out. The per-ftype rules count tensors as they go (the i-th attn_v), so the
tensors are walked in llama.cpp's order (llama_model_loader's weights_map, see
`llama_tensor_order`); the result does not depend on the order of the input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from llmpress.errors import LlmpressError

FLOAT_TYPES = (T.F32, T.F16, T.BF16)


@dataclass(frozen=True)
class FileType:
    name: str
    number: int  # llama_ftype, written to general.file_type
    default_type: T  # llama_ftype_get_default_type


# llama.h's llama_ftype and tools/quantize's QUANT_OPTIONS, for the types llmpress writes.
FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("F32", 0, T.F32), FileType("F16", 1, T.F16), FileType("BF16", 32, T.BF16),
        FileType("Q8_0", 7, T.Q8_0), FileType("Q6_K", 18, T.Q6_K),
        FileType("Q5_K_M", 17, T.Q5_K), FileType("Q5_K_S", 16, T.Q5_K),
        FileType("Q5_1", 9, T.Q5_1), FileType("Q5_0", 8, T.Q5_0),
        FileType("Q4_K_M", 15, T.Q4_K), FileType("Q4_K_S", 14, T.Q4_K),
        FileType("Q4_1", 3, T.Q4_1), FileType("Q4_0", 2, T.Q4_0),
        FileType("IQ4_XS", 30, T.IQ4_XS), FileType("IQ4_NL", 25, T.IQ4_NL),
        FileType("Q3_K_L", 13, T.Q3_K), FileType("Q3_K_M", 12, T.Q3_K),
        FileType("Q3_K_S", 11, T.Q3_K), FileType("Q2_K", 10, T.Q2_K),
    )
}  # fmt: skip
# llama-quantize's short names for the _M mixes.
FILE_TYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# Tensor types a user may name in an override: the formats llmpress can write.
TENSOR_TYPES = (
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q6_K, T.Q5_K, T.Q5_1, T.Q5_0, T.Q4_K, T.Q4_1, T.Q4_0,
    T.IQ4_XS, T.IQ4_NL, T.Q3_K, T.Q2_K, T.IQ3_S, T.IQ3_XXS, T.TQ2_0, T.TQ1_0,
)

# tensor_type_fallback: a 256-block type whose row length does not divide falls back to a
# 32-block type of about the same size.
FALLBACK = {
    T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
}  # fmt: skip

# llama_model's LLM_TYPE_70B, the one model size the rules look at: (architecture, layers).
# For llama itself it also needs grouped-query attention (80 layers with n_head == n_kv is 65B).
SEVENTY_B = {("llama", 80), ("deci", 80), ("olmo", 80), ("qwen2", 80), ("jais2", 68)}

# tensor_allows_quantization: substrings of tensors that always keep their type.
KEEP_TYPE_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight",
    "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
    "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
    "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
KEEP_TYPE_NAMES = ("position_embd.weight", "token_types.weight")  # BERT (LLM_TN names)
GLM5_NEXT_KEEP_SUBSTRINGS = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
    "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
    "attn_v_b.weight",
)


# --- inputs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFacts:
    """The hyperparameters the rules read (llama_hparams / llama_model::type)."""

    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    n_experts: int = 0

    @property
    def n_gqa(self) -> int:  # llama_hparams::n_gqa
        return self.n_heads // self.n_kv_heads if self.n_kv_heads else 0

    @property
    def is_70b(self) -> bool:
        if (self.architecture, self.n_layers) not in SEVENTY_B:
            return False
        return self.architecture != "llama" or self.n_heads != self.n_kv_heads


def _first(value: Any, default: int) -> int:
    """A per-layer array stores one value per layer; the rules read layer 0's."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else default
    return default if value is None else int(value)


def model_facts(metadata: Mapping[str, Any]) -> ModelFacts:
    """ModelFacts from GGUF metadata (llama_model::load_hparams)."""
    arch = str(metadata.get("general.architecture", ""))
    n_layers = metadata.get(f"{arch}.block_count")
    if n_layers is None:
        raise LlmpressError(f"model metadata has no {arch}.block_count: cannot choose a type mix")
    n_heads = _first(metadata.get(f"{arch}.attention.head_count"), 0)
    n_kv = _first(metadata.get(f"{arch}.attention.head_count_kv"), n_heads)
    n_experts = int(metadata.get(f"{arch}.expert_count", 0) or 0)
    return ModelFacts(arch, int(n_layers), n_heads, n_kv, n_experts)


@dataclass(frozen=True)
class MixOptions:
    """What the user asked for: the target and llama-quantize's overrides."""

    file_type: str  # a FILE_TYPES name or alias, any case
    has_imatrix: bool = False
    tensor_types: tuple[tuple[str, str], ...] = ()  # (regex, type name): --tensor-type R=T
    output_type: str | None = None  # --output-tensor-type
    embedding_type: str | None = None  # --token-embedding-type
    pure: bool = False
    quantize_output: bool = True  # False is llama-quantize's --leave-output-tensor
    _patterns: tuple[tuple[re.Pattern, T], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        file_type(self.file_type)  # validates
        patterns = []
        for regex, type_name in self.tensor_types:
            if not regex:
                raise LlmpressError(f"--tensor-type {regex}={type_name}: the tensor name "
                                    "pattern is empty; write it as REGEX=TYPE")
            try:
                # llama-quantize lower-cases the pattern before compiling it (parse_tensor_type)
                compiled = re.compile(regex.lower())
            except re.error as exc:
                raise LlmpressError(f"--tensor-type {regex}={type_name}: bad regular "
                                    f"expression ({exc})") from None
            patterns.append((compiled, tensor_type(type_name, f"--tensor-type {regex}=")))
        if self.output_type is not None:
            tensor_type(self.output_type, "--output-type ")
        if self.embedding_type is not None:
            tensor_type(self.embedding_type, "--embedding-type ")
        object.__setattr__(self, "_patterns", tuple(patterns))

    @property
    def ftype(self) -> FileType:
        return file_type(self.file_type)


def file_type(name: str) -> FileType:
    key = name.strip().upper()
    key = FILE_TYPE_ALIASES.get(key, key)
    if key not in FILE_TYPES:
        raise LlmpressError(f"unknown quantization type {name!r}; valid types: "
                            f"{', '.join(FILE_TYPES)} (aliases: {', '.join(FILE_TYPE_ALIASES)})")
    return FILE_TYPES[key]


def tensor_type(name: str, where: str = "") -> T:
    """A GGML tensor type name (any case) that llmpress can write."""
    for t in TENSOR_TYPES:
        if t.name == name.strip().upper():
            return t
    raise LlmpressError(f"{where}{name}: unknown tensor type; valid tensor types: "
                        f"{', '.join(t.name for t in TENSOR_TYPES)}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: (..., rows, row_length)
    ggml_type: T  # its type in the source


@dataclass(frozen=True)
class TensorChoice:
    name: str
    shape: tuple[int, ...]
    source_type: T
    target_type: T
    fell_back: bool = False  # the mix's choice did not fit the row length


# --- the walk --------------------------------------------------------------------------
def llama_tensor_order(name: str) -> tuple[int, str]:
    """Sort key of llama_model_loader's weights_map (weight_name_comparer): layer number
    from "blk.N." (-1 for other tensors), then the name. llama-quantize writes in this order."""
    match = re.match(r"blk\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def choose_types(tensors: Iterable[TensorInfo], facts: ModelFacts,
                 options: MixOptions) -> list[TensorChoice]:
    """The type of every tensor, in llama-quantize's output order."""
    ordered = sorted(tensors, key=lambda t: llama_tensor_order(t.name))
    names = [t.name for t in ordered]
    state = _WalkState(
        n_attention_wv=sum(_category(n) == "attn_v" for n in names),
        n_ffn_down=facts.n_layers,  # init_quantize_state_counters: n_layer, not a count
        tied_embeddings="output.weight" not in names,
    )
    return [_choose_one(t, facts, options, state) for t in ordered]


@dataclass
class _WalkState:  # quantize_state_impl's counters
    n_attention_wv: int
    n_ffn_down: int
    tied_embeddings: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0


def _category(name: str) -> str:
    """tensor_get_category, first match wins."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for needle, category in (
        ("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),  # category_is_attn_v
        ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
    ):  # fmt: skip
        if needle in name:
            return category
    return "other"


def _ne(shape: tuple[int, ...]) -> tuple[int, ...]:
    """ggml's ne (row length first) with trailing 1s dropped, as ggml_n_dims counts."""
    ne = list(reversed(shape))
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return tuple(ne)


def allows_quantization(name: str, shape: tuple[int, ...], architecture: str,
                        quantize_output: bool = True) -> bool:
    """tensor_allows_quantization: 2-D and 3-D weights, except norms, routers and the like."""
    if len(_ne(shape)) < 2 or not name.endswith("weight"):
        return False
    if name == "output.weight" and not quantize_output:
        return False
    if any(s in name for s in KEEP_TYPE_SUBSTRINGS) or name in KEEP_TYPE_NAMES:
        return False
    return not (architecture == "glm5-next" and any(s in name for s in GLM5_NEXT_KEEP_SUBSTRINGS))


def _block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def _is_quantized(t: T) -> bool:
    return t not in FLOAT_TYPES


def _choose_one(tensor: TensorInfo, facts: ModelFacts, options: MixOptions,
                state: _WalkState) -> TensorChoice:
    """llama_tensor_get_type: overrides first, then the mix's rules, then the fallback."""
    def choice(t: T, fell_back: bool = False) -> TensorChoice:
        return TensorChoice(tensor.name, tensor.shape, tensor.ggml_type, t, fell_back)

    if not allows_quantization(tensor.name, tensor.shape, facts.architecture,
                               options.quantize_output):
        return choice(tensor.ggml_type)
    category = _category(tensor.name)
    # An explicit embedding / output type is taken as given, without the fallback.
    if options.embedding_type is not None and category == "token_embd":
        named = tensor.name == "per_layer_token_embd.weight" and any(
            p.search(tensor.name) for p, _ in options._patterns)
        if not named:
            return choice(tensor_type(options.embedding_type))
    if options.output_type is not None and category == "output":
        return choice(tensor_type(options.output_type))

    ftype = options.ftype
    new_type = ftype.default_type
    if not _is_quantized(new_type):
        return choice(new_type)  # F32 / F16 / BF16 files: every quantizable tensor, no mix
    manual = False
    for pattern, override in options._patterns:
        if pattern.search(tensor.name):
            new_type, manual = override, True
            break
    if not manual and not options.pure:
        new_type = _mix_rule(tensor, category, new_type, facts, options, state)
    # tensor_type_fallback
    row_length = _ne(tensor.shape)[0]
    if row_length % _block_size(new_type) == 0:
        return choice(new_type)
    if new_type in FALLBACK:
        fallback = FALLBACK[new_type]
    elif _block_size(new_type) <= 32:
        fallback = new_type
    else:
        raise LlmpressError(f"{tensor.name}: no fallback type for {new_type.name} with rows of "
                            f"{row_length}")
    if row_length % _block_size(fallback):
        fallback = T.F16  # "must use F16 due to unusual shape"
    return choice(fallback, fell_back=True)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth, and every third between."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def _layer_of(name: str, counter: int, facts: ModelFacts) -> int:
    """layer_info: the counter, except in mixtures of experts, where the name says."""
    if facts.n_experts <= 1:
        return counter
    match = re.match(r"blk\.(\d+)\.", name)
    if not match or not 0 <= int(match.group(1)) < facts.n_layers:
        raise LlmpressError(f"cannot tell the layer of tensor {name} "
                            f"(expected blk.N. with N < {facts.n_layers})")
    return int(match.group(1))


def _mix_rule(tensor: TensorInfo, category: str, new_type: T, facts: ModelFacts,
              options: MixOptions, state: _WalkState) -> T:
    """llama_tensor_get_type_impl for the ftypes llmpress implements."""
    ftype = options.ftype.name
    falcon = facts.architecture == "falcon"
    if category == "output" or (state.tied_embeddings and category == "token_embd"):
        # The output matrix (or the token embedding that doubles as it) gets 6 bits.
        if options.output_type is not None:
            return tensor_type(options.output_type)
        if falcon or _ne(tensor.shape)[0] % _block_size(new_type):
            return T.Q8_0
        return new_type if new_type == T.Q8_0 else T.Q6_K
    if category == "token_embd":
        return new_type  # the IQ1/IQ2/IQ3 and TQ rules only
    if category == "attn_v":
        i, n = state.i_attention_wv, state.n_attention_wv
        state.i_attention_wv += 1
        if ftype == "Q2_K":
            new_type = T.Q4_K if facts.n_gqa >= 4 else T.Q3_K
        elif ftype == "Q3_K_M":
            new_type = T.Q5_K if i < 2 else T.Q4_K
        elif ftype == "Q3_K_L" or ftype in ("IQ4_NL", "IQ4_XS") and facts.n_gqa >= 4:
            new_type = T.Q5_K
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            new_type = T.Q6_K
        elif ftype == "Q4_K_S" and i < 4:
            new_type = T.Q5_K
        if facts.is_70b and new_type in (T.Q3_K, T.Q4_K):
            new_type = T.Q5_K  # 8 heads share each attn_v row: more bits cost little
        if facts.n_experts == 8:
            new_type = T.Q8_0
        return new_type
    if category == "attn_k":
        return T.Q8_0 if facts.n_experts == 8 else new_type
    if category == "ffn_down":
        i = _layer_of(tensor.name, state.i_ffn_down, facts)
        n = state.n_ffn_down
        state.i_ffn_down += 1
        if ftype == "Q2_K":
            return T.Q3_K
        if ftype == "Q3_K_M":
            if i < n // 16:
                return T.Q5_K
            return T.Q4_K if not falcon or _use_more_bits(i, n) else T.Q3_K
        if ftype == "Q3_K_L":
            return T.Q4_K if falcon else T.Q5_K
        if ftype == "Q4_K_M":
            if falcon:
                return T.Q6_K if i < n // 16 else T.Q5_K if _use_more_bits(i, n) else T.Q4_K
            return T.Q6_K if _use_more_bits(i, n) else new_type
        if i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not options.has_imatrix:
            return T.Q5_K
        if ftype == "Q5_K_M" and _use_more_bits(i, n):
            return T.Q6_K
        if ftype == "Q4_K_S" and not falcon and i < n // 8:
            return T.Q5_K
        if ftype in ("Q4_0", "Q5_0") and options.has_imatrix and i < n // 8:
            # guard the first ffn_down layers, only with an imatrix (llama.cpp's comment)
            return T.Q4_1 if ftype == "Q4_0" else T.Q5_1
        return new_type
    if category == "attn_output":
        if falcon:
            return T.Q4_K if ftype == "Q3_K_L" else new_type
        if facts.n_experts == 8:
            bumped = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS")
            return T.Q5_K if ftype in bumped else new_type
        return {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(ftype, new_type)
    return new_type  # attn_q, ffn_gate, ffn_up: rules for IQ3 ftypes only


def tensors_of(source_tensors: Iterable[Any]) -> list[TensorInfo]:
    """TensorInfo for each TensorRef (anything with name, shape, ggml_type)."""
    return [TensorInfo(t.name, tuple(t.shape), T(t.ggml_type)) for t in source_tensors]

"""Memory estimates from metadata alone: no weight is read.

A model is described by a `ModelSpec`: GGUF-style metadata plus every tensor's name and
shape, from a GGUF header, a Hugging Face config.json or the built-in catalog. For a
quantization type the tensor types come from the quantizer's own rules
(quant.mix.choose_types, llama.cpp's llama_tensor_get_type) and the file layout from the
quantizer's own writer (io.gguf_write.plan_gguf), so the predicted file is the file
`llmpress quantize` / llama-quantize would write. Runtime memory is modelled for two
runtimes:

- llama.cpp: the model buffer (the mapped tensor data), the KV cache (llama_kv_cache:
  K and V rows of n_embd_k_gqa values per cell, cells = n_ctx padded to 256), the compute
  buffer of the worst-case graph that llama_context::sched_reserve reserves, the output
  buffer and a fixed process overhead;
- llmpress: torch's import baseline, the loader (metadata, tokenizer), the memory-mapped
  file, a float32 KV cache resident for the tokens used, and the prefill workspace
  (512-token chunks, weights dequantized at most CHUNK_VALUES at a time).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from llmpress.errors import LlmpressError
from llmpress.kernels.linear import CHUNK_VALUES  # weights dequantized at once
from llmpress.models.kv_cache import KV_TYPES
from llmpress.models.moe import active_parameters, active_share
from llmpress.quant.mix import (
    FILE_TYPES,
    MixOptions,
    TensorChoice,
    TensorInfo,
    choose_types,
    file_type,
    model_facts,
)
from llmpress.runtime.generate import PREFILL_CHUNK  # prompt tokens per forward pass

MIB = 2**20
GGUF_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: every tensor's data is padded to it

# --- the two runtimes' constants ---------------------------------------------------------
LLAMA_CPP_N_UBATCH = 512  # llama_context_default_params: n_batch 2048 / n_ubatch 512
LLAMA_CPP_N_BATCH = 512  # llama-cpp-python's default n_batch (the pp graph's outputs)
LLAMA_CPP_KV_PAD = 256  # llama_context: n_ctx = GGML_PAD(n_ctx, 256)
# Process overhead besides the buffers llama.cpp logs (binary, vocabulary, graph metadata):
# measured as peak RSS minus the logged buffers with llama-cpp-python on SmolLM2-135M.
LLAMA_CPP_OVERHEAD = 64 * MIB
CACHE_TYPES = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "f32": T.F32, "bf16": T.BF16}

# llmpress: measured on this project's machines (torch 2.13 CPU), see docs/fit.md.
TORCH_BASELINE = 230 * MIB  # VmHWM of `import llmpress.api` (torch and its libraries)
LOADER_FIXED = 16 * MIB  # model objects, kernels library, first-use allocations
LOADER_PER_VOCAB_ENTRY = 875  # bytes: parsed vocabulary and merges + the BPE tokenizer
SDPA_SCRATCH = 3 * MIB  # torch's CPU flash-attention buffers (measured, 2 threads)
# GPU: the CUDA context a process holds once torch initialises CUDA (measured: 687 MiB on
# an H200, torch 2.11 + CUDA 13; llama.cpp's is of the same order), and the float32 copies
# alive while llmpress dequantizes a weight chunk on the GPU (measured: ~5.5 chunks).
CUDA_CONTEXT = 700 * MIB
GPU_DEQUANT_COPIES = 5.5

# Header bytes a tokenizer adds to a GGUF that config.json cannot tell: tokens, token types
# and merges, ~36 bytes per vocabulary entry (SmolLM2's 49152-entry BPE vocabulary: 1.74 MB),
# plus an allowance for the chat template and the other tokenizer keys.
HEADER_BYTES_PER_VOCAB_ENTRY = 36
HEADER_TOKENIZER_EXTRA = 16 * 1024

# --- architectures -----------------------------------------------------------------------
LLAMA_BLOCK = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
               "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
               "ffn_down.weight")
# A mixture of experts' FFN: the router and one 3-D tensor per projection (Mixtral is
# "llama" with these; models/moe.py)
LLAMA_MOE_BLOCK = LLAMA_BLOCK[:6] + ("ffn_gate_inp.weight", "ffn_gate_exps.weight",
                                     "ffn_up_exps.weight", "ffn_down_exps.weight")
# The block tensors convert_hf_to_gguf writes for each architecture (llama.cpp's
# LLM_TENSOR_NAMES); shapes come from io.hf.expected_shapes plus EXTRA_SHAPES.
ARCH_BLOCK_TENSORS = {
    "llama": LLAMA_BLOCK,
    "qwen2": LLAMA_BLOCK + ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "qwen3": LLAMA_BLOCK + ("attn_q_norm.weight", "attn_k_norm.weight"),
    "gemma2": LLAMA_BLOCK + ("post_attention_norm.weight", "post_ffw_norm.weight"),
    "qwen2moe": LLAMA_MOE_BLOCK + ("attn_q.bias", "attn_k.bias", "attn_v.bias",
                                   "ffn_gate_inp_shexp.weight", "ffn_gate_shexp.weight",
                                   "ffn_up_shexp.weight", "ffn_down_shexp.weight"),
    "qwen3moe": LLAMA_MOE_BLOCK + ("attn_q_norm.weight", "attn_k_norm.weight"),
    "olmoe": LLAMA_MOE_BLOCK + ("attn_q_norm.weight", "attn_k_norm.weight"),
    "phi3": ("attn_norm.weight", "attn_qkv.weight", "attn_output.weight", "ffn_norm.weight",
             "ffn_up.weight", "ffn_down.weight"),
}
# Hugging Face model types the planner knows but the llmpress runtime does not run:
# GGUF architecture and the transformers config defaults for keys a config.json may omit.
PLANNER_ONLY_MODEL_TYPES = {
    "gemma2": ("gemma2", {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "head_dim": 256,
                          "max_position_embeddings": 8192, "tie_word_embeddings": True,
                          "sliding_window": 4096}),
}
# llama.cpp architectures whose every other layer uses a sliding-window cache
# (llama_kv_cache_iswa; gemma2: load_swa_pattern(ml, 2), n_swa 4096 by default).
SWA_EVERY_OTHER_LAYER = {"gemma2": 4096}
# Architectures `llmpress run` executes (models/config.py ROPE_STYLE).
LLMPRESS_RUNTIME_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "olmoe",
                          "phi3")
TORCH_DTYPES = {"bfloat16": T.BF16, "float16": T.F16, "float32": T.F32}


# --- the model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """What the estimates need: metadata and tensor shapes, never weights."""

    name: str
    origin: str  # "gguf", "config" or "catalog"
    where: str  # the path, or the catalog entry's source
    metadata: dict[str, Any]  # GGUF keys (tokenizer arrays included for GGUF files)
    tensors: tuple[TensorInfo, ...]
    header_bytes: int  # the GGUF header of a (re)quantized file, padding included
    header_exact: bool  # False: the tokenizer's share is estimated
    file_type: str | None = None  # the GGUF's own general.file_type, by name

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def key(self, name: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{name}", default)

    @property
    def n_layers(self) -> int:
        return int(self.key("block_count"))

    @property
    def dim(self) -> int:
        return int(self.key("embedding_length"))

    @property
    def vocab(self) -> int:
        shapes = {t.name: t.shape for t in self.tensors}
        if "token_embd.weight" in shapes:
            return shapes["token_embd.weight"][0]
        return int(self.key("vocab_size"))

    @property
    def context_length(self) -> int:
        return int(self.key("context_length", 2048))

    def per_layer(self, name: str, default: int) -> list[int]:
        """A hyperparameter that GGUF may store per layer (head counts, FFN sizes)."""
        value = self.key(name, default)
        if isinstance(value, (list, tuple)):
            return [int(v) for v in value]
        return [int(value)] * self.n_layers

    @property
    def n_heads(self) -> list[int]:
        return self.per_layer("attention.head_count", 0)

    @property
    def n_kv_heads(self) -> list[int]:
        heads = self.n_heads
        kv = self.key("attention.head_count_kv")
        return heads if kv is None else self.per_layer("attention.head_count_kv", 0)

    @property
    def head_dim_k(self) -> int:
        return int(self.key("attention.key_length") or self.dim // max(self.n_heads))

    @property
    def head_dim_v(self) -> int:
        return int(self.key("attention.value_length") or self.head_dim_k)

    @property
    def ffn(self) -> int:
        return max(self.per_layer("feed_forward_length", 0))

    @property
    def tied_output(self) -> bool:
        return all(t.name != "output.weight" for t in self.tensors)

    @property
    def parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors if t.name != "rope_freqs.weight")

    @property
    def experts_used(self) -> int:
        """Experts each token is routed to; 0 for a dense model."""
        return int(self.key("expert_used_count", 0) or 0) if self.key("expert_count") else 0

    @property
    def active_parameters(self) -> int:
        """Parameters one token computes with: of a mixture of experts' expert tensors,
        only the used experts' share."""
        return active_parameters(((t.name, t.shape) for t in self.tensors
                                  if t.name != "rope_freqs.weight"), self.experts_used)

    @property
    def runs_in_llmpress(self) -> bool:
        return self.architecture in LLMPRESS_RUNTIME_ARCHS

    def swa_window(self) -> int:
        """Sliding window of the SWA layers (0: every layer caches the whole context)."""
        if self.architecture not in SWA_EVERY_OTHER_LAYER:
            return 0
        return int(self.key("attention.sliding_window", SWA_EVERY_OTHER_LAYER[self.architecture]))


def _layout_bytes(metadata: Mapping[str, Any], choices: Sequence[TensorChoice]) -> int:
    """Header bytes of the GGUF the quantizer would write (io.gguf_write.plan_gguf)."""
    from llmpress.io.gguf_write import TensorSlot, plan_gguf
    from llmpress.quant.quantize import output_metadata
    meta = output_metadata(metadata, FILE_TYPES["F16"].number, None)
    slots = [TensorSlot(c.name, c.target_type, c.shape) for c in choices]
    return plan_gguf(meta, slots).data_start


def _keep_types(tensors: Sequence[TensorInfo]) -> list[TensorChoice]:
    return [TensorChoice(t.name, t.shape, t.ggml_type, t.ggml_type) for t in tensors]


def _file_type_name(number: Any) -> str | None:
    for ft in FILE_TYPES.values():
        if number is not None and ft.number == int(number):
            return ft.name
    return None


def spec_from_gguf(path: str | Path) -> ModelSpec:
    """A GGUF file's metadata and tensor shapes (load_gguf maps it; no weight is read)."""
    from llmpress.io.gguf import load_gguf
    source = load_gguf(Path(path))
    tensors = tuple(TensorInfo(r.name, tuple(r.shape), T(r.ggml_type))
                    for r in source.tensors.values())
    arch = source.architecture
    if source.metadata.get(f"{arch}.block_count") is None:
        raise LlmpressError(f"{path}: metadata key {arch}.block_count is missing")
    if source.metadata.get(f"{arch}.embedding_length") is None:
        raise LlmpressError(f"{path}: metadata key {arch}.embedding_length is missing")
    name = str(source.metadata.get("general.name") or Path(path).stem)
    header = _layout_bytes(source.metadata, _keep_types(tensors))
    return ModelSpec(name, "gguf", str(path), dict(source.metadata), tensors, header, True,
                     _file_type_name(source.metadata.get("general.file_type")))


def _config_hyperparameters(config: dict[str, Any], where: Path) -> tuple[str, dict[str, Any]]:
    """(GGUF architecture, config.json with defaults filled in): io.hf's rules for the model
    types the runtime loads, the same checks with each model type's defaults for the rest."""
    from llmpress.io import hf
    from llmpress.io import names
    model_type = config.get("model_type")
    if model_type in names.HF_MODEL_TYPE_TO_ARCH:
        return names.HF_MODEL_TYPE_TO_ARCH[model_type], hf.hyperparameters(config, where)
    if model_type not in PLANNER_ONLY_MODEL_TYPES:
        known = ", ".join([*names.HF_MODEL_TYPE_TO_ARCH, *PLANNER_ONLY_MODEL_TYPES])
        raise LlmpressError(f"{where}: model_type {model_type!r} is not supported by the "
                            f"planner (supported: {known})")
    arch, defaults = PLANNER_ONLY_MODEL_TYPES[model_type]
    missing = [k for k in names.HF_REQUIRED_CONFIG_KEYS if config.get(k) is None]
    if missing:
        raise LlmpressError(f"{where}: config.json lacks {', '.join(missing)}")
    hp = dict(defaults)
    hp.update({k: v for k, v in config.items() if v is not None})
    hp.setdefault("num_key_value_heads", hp["num_attention_heads"])
    hp.setdefault("head_dim", hp["hidden_size"] // hp["num_attention_heads"])
    for key in (*names.HF_REQUIRED_CONFIG_KEYS, "num_key_value_heads", "head_dim"):
        if not isinstance(hp[key], int) or isinstance(hp[key], bool) or hp[key] <= 0:
            raise LlmpressError(f"{where}: config.json {key} must be a positive integer, "
                                f"not {hp[key]!r}")
    hp["rope"] = hf.rope_parameters(hp)
    return arch, hp


def _config_tensors(arch: str, hp: dict[str, Any]) -> list[TensorInfo]:
    """The tensors convert_hf_to_gguf writes for this config, in GGUF names and shapes."""
    from llmpress.io import hf
    shapes = hf.expected_shapes(hp)
    hd = hp["head_dim"]
    weight_type = TORCH_DTYPES.get(str(hp.get("torch_dtype")), T.F16)

    def info(name: str, shape: tuple[int, ...]) -> TensorInfo:
        # convert_hf_to_gguf keeps 1-D tensors (norms, biases) in F32
        return TensorInfo(name, shape, T.F32 if len(shape) == 1 else weight_type)

    tensors = [info("token_embd.weight", shapes["token_embd.weight"]),
               info("output_norm.weight", shapes["output_norm.weight"])]
    if not hp.get("tie_word_embeddings") and arch != "gemma2":  # gemma2 always ties
        tensors.append(info("output.weight", shapes["output.weight"]))
    if hp["rope"]["rope_type"] == "llama3":  # the rope_freqs tensor io.hf adds
        tensors.append(TensorInfo("rope_freqs.weight", (hd // 2,), T.F32))
    block = ARCH_BLOCK_TENSORS[arch]
    if hp["model_type"] == "mixtral":  # a Llama with experts
        block = LLAMA_MOE_BLOCK
    for i in range(hp["num_hidden_layers"]):
        tensors += [info(f"blk.{i}.{n}", shapes[f"blk.*.{n}"]) for n in block]
    return tensors


def spec_from_config(config: dict[str, Any], where: str | Path, name: str,
                     origin: str = "config") -> ModelSpec:
    """A Hugging Face config.json (as a dict) -> the GGUF that convert_hf_to_gguf writes."""
    from llmpress.io import hf
    if not isinstance(config, dict):
        raise LlmpressError(f"{where}: config.json must be a JSON object")
    arch, hp = _config_hyperparameters(config, Path(str(where)))
    if arch in ("gemma2", "phi3") and hp["rope"]["rope_type"] not in ("default", "linear"):
        # gguf_metadata knows the Llama family's RoPE scalings; memory does not depend on it
        hp = dict(hp, rope={"rope_type": "default"})
    metadata = hf.gguf_metadata(hp, arch, name, Path(str(where)))
    if arch in SWA_EVERY_OTHER_LAYER and hp.get("sliding_window"):
        metadata[f"{arch}.attention.sliding_window"] = int(hp["sliding_window"])
    tensors = tuple(_config_tensors(arch, hp))
    header = _layout_bytes(metadata, _keep_types(tensors))
    header += hp["vocab_size"] * HEADER_BYTES_PER_VOCAB_ENTRY + HEADER_TOKENIZER_EXTRA
    return ModelSpec(name, origin, str(where), metadata, tensors, header, False)


def read_config_file(path: Path) -> dict[str, Any]:
    """config.json from a Hugging Face directory or the file itself."""
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise LlmpressError(f"{path}: no config.json; a Hugging Face model directory needs one")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LlmpressError(f"{config_path}: not valid JSON ({exc})") from None


def spec_from_catalog(name: str) -> ModelSpec:
    from llmpress.plan.catalog import find_entry
    entry = find_entry(name)
    return spec_from_config(dict(entry.config), entry.source, entry.name, origin="catalog")


def load_spec(target: str | Path) -> ModelSpec:
    """A GGUF file, a Hugging Face directory or config.json, or a catalog model name."""
    path = Path(target)
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        config = read_config_file(path)
        name = path.resolve().name if path.is_dir() else path.resolve().parent.name
        return spec_from_config(config, path, name)
    if path.is_file():
        return spec_from_gguf(path)
    from llmpress import hub
    if str(target) in hub.CATALOG:  # a pulled name: its file
        return spec_from_gguf(hub.pull(str(target)))
    if str(target).endswith((".gguf", ".json")) or "/" in str(target):
        raise LlmpressError(f"{target}: no such file or directory")
    return spec_from_catalog(str(target))


# --- weights -----------------------------------------------------------------------------
def tensor_bytes(shape: Sequence[int], ggml_type: T) -> int:
    """ggml_nbytes of a tensor: whole blocks of GGML_QUANT_SIZES per row."""
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    n = math.prod(shape)
    if shape and shape[-1] % block:
        raise LlmpressError(f"rows of {shape[-1]} values do not fit {ggml_type.name} blocks "
                            f"of {block}")
    return n // block * type_size


def padded(n: int, alignment: int = GGUF_ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def mix_types(spec: ModelSpec, ftype: str, has_imatrix: bool = False) -> list[TensorChoice]:
    """Each tensor's type in a `ftype` file, by the quantizer's rules; "file" keeps the
    GGUF's own types."""
    if ftype == "file":
        return _keep_types(spec.tensors)
    options = MixOptions(ftype, has_imatrix=has_imatrix)
    return choose_types(spec.tensors, model_facts(spec.metadata), options)


@dataclass(frozen=True)
class Weights:
    """Where the bytes of one type mix are."""

    file_bytes: int
    data_bytes: int  # the tensor data section: llama.cpp's model buffer
    layer_bytes: tuple[int, ...]  # per block, padded
    token_embd_bytes: int
    output_bytes: int  # the output matrix; 0 when tied to token_embd
    types: dict[str, int]  # type name -> bytes
    unused_expert_bytes: int = 0  # a mixture of experts: what a token's router skips

    @property
    def non_layer_bytes(self) -> int:
        return self.data_bytes - sum(self.layer_bytes)

    @property
    def read_per_token(self) -> int:
        """Weight bytes one generated token reads: everything but the embedding table,
        of which one row is read (a tied table is read whole as the output matrix), and of
        the experts only those the token is routed to."""
        if self.output_bytes:
            return self.data_bytes - self.token_embd_bytes - self.unused_expert_bytes
        return self.data_bytes - self.unused_expert_bytes


def weights(spec: ModelSpec, choices: Sequence[TensorChoice]) -> Weights:
    sizes = {c.name: padded(tensor_bytes(c.shape, c.target_type)) for c in choices}
    layers = [0] * spec.n_layers
    types: dict[str, int] = {}
    for c in choices:
        types[c.target_type.name] = types.get(c.target_type.name, 0) + sizes[c.name]
        if c.name.startswith("blk."):
            layers[int(c.name.split(".")[1])] += sizes[c.name]
    data = sum(sizes.values())
    unused = sum(round(sizes[c.name] * (1 - active_share(c.name, c.shape, spec.experts_used)))
                 for c in choices)
    return Weights(spec.header_bytes + data, data, tuple(layers),
                   sizes.get("token_embd.weight", 0), sizes.get("output.weight", 0), types,
                   unused)


# --- KV cache ----------------------------------------------------------------------------
def cache_type(name: str) -> T:
    key = name.strip().lower()
    if key not in CACHE_TYPES:
        raise LlmpressError(f"unknown KV cache type {name!r}; valid: {', '.join(CACHE_TYPES)}")
    return CACHE_TYPES[key]


def row_bytes(ggml_type: T, n_values: int) -> int:
    """ggml_row_size: bytes of n_values of this type (whole blocks)."""
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if n_values % block:
        raise LlmpressError(f"KV rows of {n_values} values do not fit {ggml_type.name} blocks "
                            f"of {block}; use an f16 cache")
    return n_values // block * type_size


def llama_cpp_cells(spec: ModelSpec, ctx: int) -> list[int]:
    """KV cells per layer: n_ctx padded to 256; sliding-window layers keep
    GGML_PAD(min(n_ctx, n_swa + n_ubatch), 256) (llama_kv_cache_iswa, swa_full off)."""
    n_ctx = padded(ctx, LLAMA_CPP_KV_PAD)
    window = spec.swa_window()
    if not window:
        return [n_ctx] * spec.n_layers
    swa = padded(min(n_ctx, window + LLAMA_CPP_N_UBATCH), LLAMA_CPP_KV_PAD)
    # load_swa_pattern(ml, 2): layer il uses the window unless il % 2 == 1
    return [swa if il % 2 == 0 else n_ctx for il in range(spec.n_layers)]


def kv_cache_layers(spec: ModelSpec, cells: Sequence[int], ktype: T, vtype: T | None = None
                    ) -> list[int]:
    """Bytes per layer: K and V of n_kv_heads * head_dim values per cell."""
    vtype = ktype if vtype is None else vtype
    kv_heads = spec.n_kv_heads
    return [n * (row_bytes(ktype, h * spec.head_dim_k) + row_bytes(vtype, h * spec.head_dim_v))
            for n, h in zip(cells, kv_heads)]


def kv_cache_bytes(spec: ModelSpec, ctx: int, cache: str = "f16") -> int:
    """llama.cpp's KV buffer: 2 x layers x cells x kv_heads x head_dim x bytes per value."""
    return sum(kv_cache_layers(spec, llama_cpp_cells(spec, ctx), cache_type(cache)))


def llmpress_kv_bytes(spec: ModelSpec, tokens: int, cache: str = "f16") -> int:
    """models/llama.py KVCache: resident for the tokens written."""
    return sum(kv_cache_layers(spec, [tokens] * spec.n_layers, llmpress_cache_type(cache)))


# --- compute buffers ---------------------------------------------------------------------
def llama_cpp_compute_bytes(spec: ModelSpec, ctx: int, flash_attn: bool = False) -> int:
    """The CPU compute buffer llama_context::sched_reserve logs.

    It reserves the prompt graph of n_tokens = min(n_ctx, n_ubatch) tokens with one output
    per token, and ggml-alloc reuses memory between nodes, so the buffer is the largest
    set of tensors alive at once: the logits with the last hidden states, or the attention
    scores (f32 KQ per head plus the mask, n_kv x n_tokens each) with the layer's
    activations, or the FFN activations. Calibrated against llama-cpp-python's log for
    SmolLM2-135M: without flash attention within 1.2% at 256..16384 cells (exact at 256,
    512, 1024, 8192 and 16384); with it within 5% (its scratch is not modelled).
    """
    n_ctx = padded(ctx, LLAMA_CPP_KV_PAD)
    n_tokens = min(n_ctx, LLAMA_CPP_N_UBATCH)
    n_outputs = min(n_tokens, LLAMA_CPP_N_BATCH)
    dim, n_head = spec.dim, max(spec.n_heads)
    n_embd_kv = max(spec.n_kv_heads) * spec.head_dim_k
    activations = 5 * dim + 2 * n_embd_kv  # residual, normed, Q, KQV out, output; K and V
    logits = 4 * (spec.vocab * n_outputs + 2 * dim * n_tokens)
    if flash_attn:  # no KQ matrix; an f16 mask of n_kv x n_tokens
        attention = 4 * n_tokens * activations + 2 * n_tokens * n_ctx
    else:
        attention = 4 * n_tokens * (n_ctx * (n_head + 1) + activations)
    ffn = 4 * n_tokens * (3 * spec.ffn + 2 * dim)
    return max(logits, attention, ffn)


def llama_cpp_output_bytes(spec: ModelSpec) -> int:
    """llama_context's output buffer: the logits of one sequence's last token."""
    return 4 * spec.vocab


def llmpress_workspace_bytes(spec: ModelSpec, ctx: int) -> int:
    """Peak temporaries of one prefill chunk (runtime/generate.py) in models/llama.py.

    FFN: gate, up, their product and SiLU (T x ffn each) while a weight is dequantized
    (at most CHUNK_VALUES floats, kernels/linear.py). Attention: q/k/v and their rotated
    copies, the chunk's boolean mask and its float form (T x ctx), SDPA's scratch.
    """
    tokens = min(ctx, PREFILL_CHUNK)
    matrices = [math.prod(t.shape) for t in spec.tensors
                if t.name.startswith("blk.") and len(t.shape) == 2]
    dequantized = 4 * min(CHUNK_VALUES, max(matrices, default=0))
    ffn = 4 * tokens * 4 * spec.ffn + dequantized
    qkv = (max(spec.n_heads) * spec.head_dim_k + 2 * max(spec.n_kv_heads) * spec.head_dim_k)
    attention = 4 * tokens * qkv * 2 + 5 * tokens * ctx + SDPA_SCRATCH
    return ffn + attention


def llmpress_gpu_workspace_bytes(spec: ModelSpec, ctx: int) -> int:
    """GPU memory of `llmpress run --device cuda` beyond weights and cache, at its peak
    (torch.cuda.max_memory_allocated). There every matmul dequantizes its weight chunk by
    chunk (the packed kernels are CPU code), and the prefill's masked SDPA with grouped KV
    heads takes the math path: (heads, T, ctx) float32 scores and their softmax for the
    last 512-token chunk. (torch's caching allocator keeps the smaller score blocks of
    earlier chunks reserved, 3 GiB at 8192 tokens for SmolLM2, but hands them back before
    it would fail, so the allocated peak is what must fit.) Calibrated on an H200 with
    SmolLM2-135M at 512, 2048 and 8192 tokens: within 10% of the measured peak.
    """
    tokens = min(ctx, PREFILL_CHUNK)
    matrices = [math.prod(t.shape) for t in spec.tensors if len(t.shape) == 2]
    dequantized = GPU_DEQUANT_COPIES * 4 * min(CHUNK_VALUES, max(matrices, default=0))
    scores = 2 * 4 * max(spec.n_heads) * tokens * ctx
    return int(dequantized + scores)


def llmpress_loader_bytes(spec: ModelSpec) -> int:
    return LOADER_FIXED + LOADER_PER_VOCAB_ENTRY * spec.vocab


# --- one option, both runtimes -----------------------------------------------------------
@dataclass(frozen=True)
class RuntimeMemory:
    """Bytes one runtime needs at a context: the total is what must fit."""

    runtime: str
    weights: int
    kv_cache: int
    compute: int
    overhead: int
    layer_weights: tuple[int, ...]  # per block, for splitting layers over devices
    layer_kv: tuple[int, ...]
    kv_read_per_token: int  # KV bytes one token at the end of the context reads
    extra_read_per_token: int = 0  # traffic beyond weights and cache (dequantized copies)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead


@dataclass(frozen=True)
class Estimate:
    ftype: str  # a file type ("Q4_K_M"), or "file": the GGUF as it is
    ctx: int
    cache_type: str  # the KV type (llmpress: f16 for bf16)
    weights: Weights
    llama_cpp: RuntimeMemory  # on the CPU: what must fit in RAM
    llmpress: RuntimeMemory
    llama_cpp_gpu: RuntimeMemory  # everything on the GPU: what must fit in VRAM
    llmpress_gpu: RuntimeMemory
    parameters: int

    @property
    def bits_per_weight(self) -> float:
        return self.weights.file_bytes * 8 / max(self.parameters, 1)

    def runtime(self, name: str, gpu: bool = False) -> RuntimeMemory:
        if name == "llmpress":
            return self.llmpress_gpu if gpu else self.llmpress
        return self.llama_cpp_gpu if gpu else self.llama_cpp


def llama_cpp_memory(spec: ModelSpec, w: Weights, ctx: int, cache: str = "f16",
                     flash_attn: bool = True) -> RuntimeMemory:
    """llama.cpp's own tools default to flash attention (-fa auto, on where the device has
    it: CPU and CUDA); llama-cpp-python defaults to none. A quantized V cache needs it."""
    if not flash_attn and cache_type(cache) not in (T.F16, T.F32, T.BF16):
        raise LlmpressError(f"a {cache} KV cache needs flash attention in llama.cpp")
    fa = flash_attn
    layer_kv = kv_cache_layers(spec, llama_cpp_cells(spec, ctx), cache_type(cache))
    compute = llama_cpp_compute_bytes(spec, ctx, fa) + llama_cpp_output_bytes(spec)
    read_kv = sum(kv_cache_layers(spec, [min(c, ctx) for c in llama_cpp_cells(spec, ctx)],
                                  cache_type(cache)))
    return RuntimeMemory("llama.cpp", w.data_bytes, sum(layer_kv), compute, LLAMA_CPP_OVERHEAD,
                         w.layer_bytes, tuple(layer_kv), read_kv)


def llmpress_cache_type(cache: str) -> T:
    """llmpress keeps its KV cache as llama.cpp does in f32, f16 (the default), q8_0 and
    q4_0 (models/kv_cache.py); bf16, which it does not keep, as f16."""
    ggml_type = cache_type(cache)
    return ggml_type if cache.strip().lower() in KV_TYPES else T.F16


def llmpress_memory(spec: ModelSpec, w: Weights, ctx: int, cache: str = "f16") -> RuntimeMemory:
    """Peak RSS of `llmpress run` with the context full: the whole file is mapped and
    touched, the cache holds ctx tokens."""
    layer_kv = kv_cache_layers(spec, [ctx] * spec.n_layers, llmpress_cache_type(cache))
    overhead = TORCH_BASELINE + llmpress_loader_bytes(spec)
    return RuntimeMemory("llmpress", w.file_bytes, sum(layer_kv),
                         llmpress_workspace_bytes(spec, ctx), overhead, w.layer_bytes,
                         tuple(layer_kv), sum(layer_kv))


def llama_cpp_gpu_memory(spec: ModelSpec, w: Weights, ctx: int, cache: str = "f16",
                         flash_attn: bool = True) -> RuntimeMemory:
    """Every layer and the output offloaded (-ngl all): the same buffers in VRAM (the CUDA
    compute buffer is taken as the CPU one), plus the CUDA context."""
    return replace(llama_cpp_memory(spec, w, ctx, cache, flash_attn), overhead=CUDA_CONTEXT)


def llmpress_gpu_memory(spec: ModelSpec, w: Weights, ctx: int, cache: str = "f16"
                        ) -> RuntimeMemory:
    """`llmpress run --device cuda`: packed weights copied to the GPU, the cache allocated
    there for the whole context, the GPU workspace and the CUDA context. Each token also
    writes and reads every weight dequantized to float32 (8 bytes a value)."""
    layer_kv = kv_cache_layers(spec, [ctx] * spec.n_layers, llmpress_cache_type(cache))
    values = sum(math.prod(t.shape) for t in spec.tensors
                 if len(t.shape) == 2 and (t.name != "token_embd.weight" or spec.tied_output))
    return RuntimeMemory("llmpress", w.data_bytes, sum(layer_kv),
                         llmpress_gpu_workspace_bytes(spec, ctx), CUDA_CONTEXT, w.layer_bytes,
                         tuple(layer_kv), sum(layer_kv), extra_read_per_token=8 * values)


def estimate(spec: ModelSpec, ftype: str, ctx: int, cache: str = "f16",
             has_imatrix: bool = False, flash_attn: bool = True) -> Estimate:
    """Both runtimes' memory for `spec` quantized to `ftype`, at a context of ctx tokens."""
    if ctx < 1:
        raise LlmpressError(f"context {ctx}: must be at least 1 token")
    name = "file" if ftype == "file" else file_type(ftype).name
    w = weights(spec, mix_types(spec, name, has_imatrix))
    return Estimate(name, ctx, cache, w, llama_cpp_memory(spec, w, ctx, cache, flash_attn),
                    llmpress_memory(spec, w, ctx, cache),
                    llama_cpp_gpu_memory(spec, w, ctx, cache, flash_attn),
                    llmpress_gpu_memory(spec, w, ctx, cache), spec.parameters)

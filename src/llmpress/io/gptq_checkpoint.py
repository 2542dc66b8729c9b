"""Integer-quantized Hugging Face checkpoints in and out: GPTQ (AutoGPTQ / GPTQModel /
transformers), AWQ (AutoAWQ's GEMM packing) and compressed-tensors `pack-quantized`
(llm-compressor / vLLM).

Every format stores, per quantized Linear (out, in), integer codes q, a scale and a zero
point per (row, group of input columns), and which group each input column belongs to;
the weight is scale * (q - zero). They differ in how the integers are packed:

  GPTQ   `qweight` int32 (in*bits/32, out): input j of word w at bits (j % (32/bits))*bits;
         `qzeros` int32 (groups, out*bits/32) packed along outputs, stored as zero - 1
         ("gptq" checkpoint format, v1; "gptq_v2" stores the zero itself); `scales` fp16
         (groups, out); `g_idx` int32 (in,): each input's group (act-order permutes it).
  AWQ    `qweight` int32 (in, out/8) and `qzeros` int32 (groups, out/8), 4-bit, packed
         along outputs with the nibble order 0 2 4 6 1 3 5 7; `scales` fp16 (groups, out);
         groups are consecutive inputs.
  compressed-tensors pack-quantized
         `weight_packed` int32 (out, in*bits/32) packed along inputs, codes stored as
         q + 2^(bits-1) (q signed); `weight_scale` (out, groups); asymmetric schemes add
         `weight_zero_point` packed along outputs (groups as columns), signed the same
         way; `weight_shape`; optionally `weight_g_idx`.

Reading (io.hf.load_hf_dir with QuantizedLinears) gives a ModelSource whose quantized
Linears are float32 tensors dequantized on read (exactly: a float16 scale times a small
integer is exact in float32), so the runtime runs these checkpoints and `llmpress
quantize`/`convert` turn them into GGUF, tokenizer keys included.
Writing takes our GPTQ results (quant.gptq, integer grid) and a float HF directory.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmpress.errors import LlmpressError
from llmpress.io.files import read_json_file, replacing_directory

PACKABLE_BITS = (2, 4, 8)  # bits whose codes tile an int32 word exactly
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's GEMM packing: nibble i holds column AWQ_ORDER[i]
METHODS = ("gptq", "awq", "compressed-tensors")


# --- the integer form of one Linear -------------------------------------------------------------
@dataclass(frozen=True)
class IntLinear:
    """codes (out, in) in 0..2^bits-1; scales (out, groups); zeros (out, groups) in code
    units; group_index (in,): each input column's group."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_index: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in): scale * (q - zero), exact."""
        g = self.group_index.long()
        return self.scales.float()[:, g] * (self.codes.float() - self.zeros.float()[:, g])

    def permute_rows(self, permute: Callable[[torch.Tensor], torch.Tensor]) -> IntLinear:
        return IntLinear(permute(self.codes), permute(self.scales), permute(self.zeros),
                         self.group_index, self.bits)


def int_linear_from_gptq(result, bits: int) -> IntLinear:
    """An IntLinear from quant.gptq's integer-grid result."""
    scales = torch.stack([p.scale for p in result.group_params], dim=1)
    zeros = torch.stack([p.zero for p in result.group_params], dim=1)
    return IntLinear(result.codes.to(torch.int32), scales, zeros.to(torch.int32),
                     result.group_index.to(torch.int32), bits)


# --- bit packing ---------------------------------------------------------------------------------
def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Codes (any int dtype, 0..2^bits-1) packed along `dim`, 32/bits per int32 word,
    element k of a word at bits k*bits (little end first)."""
    per_word = 32 // bits
    values = values.to(torch.int64).movedim(dim, -1)
    if values.shape[-1] % per_word:
        raise LlmpressError(f"cannot pack {values.shape[-1]} values of {bits} bits into int32 "
                            f"words ({per_word} per word)")
    words = values.reshape(*values.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=values.device) * bits
    packed = (words << shifts).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of pack_int32: int32 words -> int32 codes along `dim`."""
    per_word = 32 // bits
    words = packed.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=packed.device) * bits
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = values.reshape(*words.shape[:-1], -1).to(torch.int32)
    return values.movedim(-1, dim).contiguous()


# --- quantization configs ------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointQuantization:
    method: str  # "gptq" | "awq" | "compressed-tensors"
    bits: int
    group_size: int  # -1: one group per row
    symmetric: bool
    act_order: bool = False  # GPTQ desc_act / compressed-tensors actorder: g_idx required
    zeros_minus_one: bool = True  # GPTQ checkpoint_format "gptq" (v1) stores zero - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)


def _bits(value: Any, where: str) -> int:
    if value not in PACKABLE_BITS:
        raise LlmpressError(f"{where}: {value}-bit weights are not supported (llmpress reads "
                            f"and writes {', '.join(map(str, PACKABLE_BITS))}-bit checkpoints)")
    return int(value)


def _group_size(value: Any, where: str) -> int:
    if value is None:
        return -1
    if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
        raise LlmpressError(f"{where}: group_size {value!r} must be a positive integer or -1")
    return value


def quantization_of(path: Path, config: dict[str, Any]) -> CheckpointQuantization | None:
    """The checkpoint's quantization from config.json's quantization_config (or a GPTQ
    quantize_config.json beside it); None for a float checkpoint."""
    qc = config.get("quantization_config")
    where = f"{path / 'config.json'}: quantization_config"
    if qc is None and (path / "quantize_config.json").is_file():
        where = str(path / "quantize_config.json")
        qc = read_json_file(path / "quantize_config.json")
        if isinstance(qc, dict):
            qc.setdefault("quant_method", "gptq")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise LlmpressError(f"{where}: expected a JSON object")
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise LlmpressError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported "
                                "(gptq and gptq_v2 are)")
        return CheckpointQuantization("gptq", _bits(qc.get("bits"), where),
                                      _group_size(qc.get("group_size", 128), where),
                                      bool(qc.get("sym", True)), bool(qc.get("desc_act", False)),
                                      zeros_minus_one=fmt == "gptq")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise LlmpressError(f"{where}: AWQ version {version!r} is not supported (gemm is)")
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise LlmpressError(f"{where}: AWQ GEMM checkpoints are 4-bit, not {bits}")
        return CheckpointQuantization("awq", 4, _group_size(qc.get("group_size",
                                                                   qc.get("q_group_size", 128)),
                                                            where),
                                      not qc.get("zero_point", True))
    if method == "compressed-tensors":
        return _compressed_tensors_quantization(qc, where)
    raise LlmpressError(f"{where}: quant_method {method!r} is not supported "
                        f"(supported: {', '.join(METHODS)})")


def _compressed_tensors_quantization(qc: dict, where: str) -> CheckpointQuantization:
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or len(groups) != 1:
        raise LlmpressError(f"{where}: llmpress reads compressed-tensors checkpoints with one "
                            f"config group, this one has {len(groups)}")
    (group,) = groups.values()
    fmt = group.get("format") or qc.get("format")
    if fmt != "pack-quantized":
        raise LlmpressError(f"{where}: compressed-tensors format {fmt!r} is not supported "
                            "(pack-quantized is)")
    weights = group.get("weights") or {}
    if weights.get("type", "int") != "int":
        raise LlmpressError(f"{where}: {weights.get('type')} weights are not supported (int are)")
    strategy = weights.get("strategy", "group")
    if strategy not in ("group", "channel"):
        raise LlmpressError(f"{where}: weight strategy {strategy!r} is not supported "
                            "(group and channel are)")
    group_size = _group_size(weights.get("group_size"), where) if strategy == "group" else -1
    actorder = weights.get("actorder")
    return CheckpointQuantization("compressed-tensors", _bits(weights.get("num_bits"), where),
                                  group_size, bool(weights.get("symmetric", True)),
                                  act_order=actorder in ("group", True))


# --- one Linear from its checkpoint tensors ---------------------------------------------------
def _need(tensors: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in tensors:
        raise LlmpressError(f"{where}: tensor {key} is missing")
    return tensors[key]


def _check_shape(tensor: torch.Tensor, shape: tuple[int, ...], what: str, where: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise LlmpressError(f"{where}: {what} has shape {list(tensor.shape)}, expected "
                            f"{list(shape)} for this Linear and quantization config")


def _group_index(tensors, q: CheckpointQuantization, key: str, in_features: int,
                 where: str) -> torch.Tensor:
    n_groups = q.groups(in_features)
    if key in tensors:
        g_idx = tensors[key].to(torch.int64)
        _check_shape(g_idx, (in_features,), key, where)
        if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= n_groups):
            raise LlmpressError(f"{where}: {key} names groups outside 0..{n_groups - 1}")
        return g_idx
    if q.act_order:
        raise LlmpressError(f"{where}: {key} is missing, but the config says act-order "
                            "(desc_act / actorder), which needs each column's group")
    size = in_features if q.group_size == -1 else q.group_size
    return torch.arange(in_features) // size


def read_gptq_linear(tensors: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int],
                     q: CheckpointQuantization, where: str) -> IntLinear:
    out_features, in_features = shape
    per_word, n_groups = 32 // q.bits, q.groups(in_features)
    qweight = _need(tensors, prefix + "qweight", where)
    qzeros = _need(tensors, prefix + "qzeros", where)
    scales = _need(tensors, prefix + "scales", where)
    _check_shape(qweight, (in_features // per_word, out_features), prefix + "qweight", where)
    _check_shape(qzeros, (n_groups, out_features // per_word), prefix + "qzeros", where)
    _check_shape(scales, (n_groups, out_features), prefix + "scales", where)
    codes = unpack_int32(qweight, q.bits, dim=0).T  # (out, in)
    zeros = unpack_int32(qzeros, q.bits, dim=1)
    if q.zeros_minus_one:  # v1: stored zero - 1; readers add 1 within the bit width
        zeros = (zeros + 1) & ((1 << q.bits) - 1)
    g_idx = _group_index(tensors, q, prefix + "g_idx", in_features, where)
    return IntLinear(codes, scales.float().T, zeros.T, g_idx, q.bits)


def read_awq_linear(tensors: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int],
                    q: CheckpointQuantization, where: str) -> IntLinear:
    out_features, in_features = shape
    n_groups = q.groups(in_features)
    qweight = _need(tensors, prefix + "qweight", where)
    qzeros = _need(tensors, prefix + "qzeros", where)
    scales = _need(tensors, prefix + "scales", where)
    _check_shape(qweight, (in_features, out_features // 8), prefix + "qweight", where)
    _check_shape(qzeros, (n_groups, out_features // 8), prefix + "qzeros", where)
    _check_shape(scales, (n_groups, out_features), prefix + "scales", where)
    order = awq_column_order(out_features)
    codes = unpack_int32(qweight, 4, dim=1)[:, order].T  # (out, in)
    zeros = unpack_int32(qzeros, 4, dim=1)[:, order].T  # (out, groups)
    size = in_features if q.group_size == -1 else q.group_size
    return IntLinear(codes, scales.float().T, zeros, torch.arange(in_features) // size, 4)


def awq_column_order(out_features: int) -> torch.Tensor:
    """Unpacked position -> column: position 8w + i holds column 8w + AWQ_ORDER[i]; this
    returns, for each column, the position holding it (AutoAWQ's reverse order)."""
    inverse = torch.tensor([AWQ_ORDER.index(c) for c in range(8)])
    return (torch.arange(out_features).view(-1, 8)[:, inverse]).reshape(-1)


def read_compressed_linear(tensors: dict[str, torch.Tensor], prefix: str,
                           shape: tuple[int, int], q: CheckpointQuantization,
                           where: str) -> IntLinear:
    out_features, in_features = shape
    per_word, n_groups = 32 // q.bits, q.groups(in_features)
    packed = _need(tensors, prefix + "weight_packed", where)
    scales = _need(tensors, prefix + "weight_scale", where)
    _check_shape(packed, (out_features, in_features // per_word), prefix + "weight_packed",
                 where)
    _check_shape(scales, (out_features, n_groups), prefix + "weight_scale", where)
    if prefix + "weight_shape" in tensors:
        stored = [int(v) for v in tensors[prefix + "weight_shape"].reshape(-1)]
        if stored != [out_features, in_features]:
            raise LlmpressError(f"{where}: {prefix}weight_shape is {stored}, expected "
                                f"{[out_features, in_features]}")
    codes = unpack_int32(packed, q.bits, dim=1)  # stored as q + 2^(bits-1): our codes
    if q.symmetric:
        zeros = torch.full((out_features, n_groups), 1 << (q.bits - 1), dtype=torch.int32)
    else:
        zero_points = _need(tensors, prefix + "weight_zero_point", where)
        _check_shape(zero_points, (out_features // per_word, n_groups),
                     prefix + "weight_zero_point", where)
        zeros = unpack_int32(zero_points, q.bits, dim=0)
    g_idx = _group_index(tensors, q, prefix + "weight_g_idx", in_features, where)
    return IntLinear(codes, scales.float(), zeros, g_idx, q.bits)


READERS = {"gptq": read_gptq_linear, "awq": read_awq_linear,
           "compressed-tensors": read_compressed_linear}
MARKERS = {"gptq": "qweight", "awq": "qweight", "compressed-tensors": "weight_packed"}


# --- a whole directory ---------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedLinears:
    """What io.hf.load_hf_dir needs to read a checkpoint's integer Linears: the tensor that
    marks one (`<prefix>qweight`, ...) and how to read it."""

    quant: CheckpointQuantization

    @property
    def marker(self) -> str:
        return MARKERS[self.quant.method]

    def read(self, handles, located, prefix: str, shape, where: Path,
             shapes_only: bool = False) -> IntLinear:
        return read_linear(handles, located, prefix, shape, self.quant, where, shapes_only)


def quantized_linears(path: str | Path) -> QuantizedLinears | None:
    """The reader of a GPTQ / AWQ / compressed-tensors directory's Linears, None for a float
    directory: `io.hf.load_hf_dir(path, quantized_linears(path))` reads either."""
    from llmpress.io.hf import read_config

    path = Path(path)
    quant = quantization_of(path, read_config(path))
    return None if quant is None else QuantizedLinears(quant)


def read_linear(handles, located, prefix: str, shape, quant: CheckpointQuantization,
                where: Path, shapes_only: bool = False) -> IntLinear:
    """One quantized Linear's integer form. shapes_only: check the tensors' shapes (and
    g_idx) from the headers, on the meta device, without reading the weights."""
    keys = [k for k in located if k.startswith(prefix) and "." not in k[len(prefix):]]
    tensors = {}
    for k in keys:
        if shapes_only and not k.endswith(("g_idx", "weight_shape")):  # small: read
            tensors[k] = torch.empty(handles[located[k]].get_slice(k).get_shape(),
                                     dtype=torch.int32, device="meta")
        else:
            tensors[k] = handles[located[k]].get_tensor(k)
    return READERS[quant.method](tensors, prefix, shape, quant, str(where))


# --- writing -------------------------------------------------------------------------------------
def gptq_tensors(prefix: str, linear: IntLinear, zeros_minus_one: bool = True
                 ) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one Linear (AutoGPTQ v1 layout unless zeros_minus_one=False)."""
    zeros = linear.zeros.T.to(torch.int64)  # (groups, out)
    if zeros_minus_one:
        zeros = (zeros - 1) & ((1 << linear.bits) - 1)
    return {prefix + "qweight": pack_int32(linear.codes.T, linear.bits, dim=0),
            prefix + "qzeros": pack_int32(zeros, linear.bits, dim=1),
            prefix + "scales": linear.scales.T.to(torch.float16).contiguous(),
            prefix + "g_idx": linear.group_index.to(torch.int32).clone()}


def compressed_tensors_tensors(prefix: str, linear: IntLinear, symmetric: bool,
                               scale_dtype: torch.dtype = torch.float16
                               ) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one Linear; codes are q + 2^(bits-1) as stored."""
    out = {prefix + "weight_packed": pack_int32(linear.codes, linear.bits, dim=1),
           prefix + "weight_scale": linear.scales.to(scale_dtype).contiguous(),
           prefix + "weight_shape": torch.tensor(list(linear.codes.shape), dtype=torch.int64)}
    if not symmetric:
        out[prefix + "weight_zero_point"] = pack_int32(linear.zeros, linear.bits, dim=0)
    return out


def gptq_config(bits: int, group_size: int, symmetric: bool, act_order: bool,
                damp: float) -> dict[str, Any]:
    """quantization_config / quantize_config.json as AutoGPTQ and GPTQModel write them.
    Act-order here keeps static groups (g_idx = column // group_size), so desc_act is
    false: the layout needs no reordering."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size,
            "desc_act": False, "static_groups": act_order, "sym": symmetric,
            "true_sequential": False, "damp_percent": damp, "checkpoint_format": "gptq",
            "model_file_base_name": "model"}


def compressed_tensors_config(bits: int, group_size: int, symmetric: bool,
                              ignore: list[str]) -> dict[str, Any]:
    """quantization_config of a pack-quantized checkpoint (llm-compressor's W4A16 shape).
    Static act-order keeps natural groups, so it is not recorded."""
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size, "dynamic": False,
               "actorder": None, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": ignore,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None,
                                          "output_activations": None,
                                          "format": "pack-quantized"}}}


def write_quantized_dir(source_dir: str | Path, out_dir: str | Path,
                        linears: dict[str, IntLinear], fmt: str,
                        quantization_config: dict[str, Any]) -> Path:
    """A copy of the float HF directory `source_dir` whose Linears named in `linears`
    (HF names without ".weight", HF row order) are stored quantized in `fmt` ("gptq" or
    "compressed-tensors"). Written to a temporary directory, renamed at the end."""
    from safetensors.torch import save_file

    from llmpress.io import hf

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if fmt not in ("gptq", "compressed-tensors"):
        raise LlmpressError(f"unknown checkpoint format {fmt!r} (gptq or compressed-tensors)")
    if out_dir.exists():
        raise LlmpressError(f"{out_dir} exists; choose a new directory for the checkpoint")
    if not out_dir.parent.is_dir():
        raise LlmpressError(f"cannot write {out_dir}: {out_dir.parent} does not exist")
    config = hf.read_config(source_dir)
    if config.get("quantization_config"):
        raise LlmpressError(f"{source_dir} is already quantized; start from float weights")
    located, handles = hf.safetensors_files(source_dir)
    tensors: dict[str, torch.Tensor] = {}
    symmetric = bool(quantization_config.get("sym", quantization_config.get(
        "config_groups", {}).get("group_0", {}).get("weights", {}).get("symmetric", True)))
    for name, file in located.items():
        prefix = name[: -len("weight")] if name.endswith(".weight") else None
        if prefix is not None and prefix[:-1] in linears:
            linear = linears[prefix[:-1]]
            dtype = handles[file].get_slice(name).get_dtype()
            if fmt == "gptq":
                tensors.update(gptq_tensors(prefix, linear))
            else:
                scale_dtype = torch.bfloat16 if dtype == "BF16" else torch.float16
                tensors.update(compressed_tensors_tensors(prefix, linear, symmetric,
                                                          scale_dtype))
        else:
            tensors[name] = handles[file].get_tensor(name)
    missing = set(linears) - {n[: -len(".weight")] for n in located if n.endswith(".weight")}
    if missing:
        raise LlmpressError(f"{source_dir}: no weights for {', '.join(sorted(missing))}")
    config["quantization_config"] = quantization_config
    with replacing_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if fmt == "gptq":
            (tmp / "quantize_config.json").write_text(json.dumps(quantization_config, indent=2)
                                                      + "\n")
        for extra in source_dir.iterdir():  # tokenizer, generation config, chat template ...
            if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (
                    "config.json", "model.safetensors.index.json", "quantize_config.json"):
                shutil.copy2(extra, tmp / extra.name)
    return out_dir

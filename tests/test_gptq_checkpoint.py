"""GPTQ, AWQ and compressed-tensors checkpoints in and out.

In: checkpoints made here by reference packers written from the formats' documentation
(AutoGPTQ's QuantLinear.pack, AutoAWQ's GEMM pack) and by the compressed-tensors library
itself are read by us exactly. Out: our GPTQ export unpacked by the reference code, and
our pack-quantized export decompressed by compressed-tensors, give our weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hf_parity import CASES, build_hf_model

from llmpress.errors import LlmpressError
from llmpress.formats import get_format
from llmpress.io import gptq_checkpoint as ckpt
from llmpress.io.hf import permute_qk
from llmpress.io.loader import load_source
from llmpress.io.names import gguf_tensor_name
from llmpress.quant.calibrated import gptq_checkpoint
from llmpress.quant.gptq import IntGrid

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
N_HEADS, N_KV = 4, 2


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    _, path = build_hf_model(CASES["llama"], tmp_path_factory.mktemp("float") / "model")
    return path


def linear_names(path) -> list[str]:
    config = json.loads((path / "config.json").read_text())
    return [f"model.layers.{i}.{n}" for i in range(config["num_hidden_layers"]) for n in LINEARS]


def read_weights(path) -> dict[str, torch.Tensor]:
    """Our loader's tensors (GGUF names and layout), as float32."""
    source = load_source(path)
    return {name: get_format(ref.ggml_type).dequantize(ref.read_bytes(), ref.shape)
            for name, ref in source.tensors.items()}


def gguf_layout(hf_name: str, weight: torch.Tensor) -> torch.Tensor:
    """HF rows -> llama.cpp rows for q/k, as convert_hf_to_gguf permutes them."""
    if hf_name.endswith("q_proj"):
        return permute_qk(weight, N_HEADS)
    if hf_name.endswith("k_proj"):
        return permute_qk(weight, N_KV)
    return weight


def random_int_linear(out_features, in_features, bits, group_size, seed, act_order=False):
    """Codes, zeros, float16 scales and (with act-order) a shuffled column-to-group map."""
    g = torch.Generator().manual_seed(seed)
    n_groups = in_features // group_size
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=g)
    zeros = torch.randint(1, 1 << bits, (out_features, n_groups), generator=g)
    scales = (torch.rand(out_features, n_groups, generator=g) * 0.02 + 0.001).half().float()
    g_idx = torch.arange(in_features) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=g)]
    return codes, zeros, scales, g_idx


def reference_dequantize(codes, zeros, scales, g_idx) -> torch.Tensor:
    return scales[:, g_idx] * (codes - zeros[:, g_idx]).float()


# --- reference packers, from the formats' documentation ------------------------------------------
def autogptq_pack(codes, zeros, scales, g_idx, bits) -> dict[str, torch.Tensor]:
    """AutoGPTQ QuantLinear.pack: intweight (in, out); qweight row r holds inputs
    r*per..r*per+per-1, input r*per+k at bits k*bits; qzeros the same along outputs,
    storing zero - 1."""
    per = 32 // bits
    intweight = codes.T.numpy().astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for k in range(per):
            qweight[row] |= intweight[row * per + k] << (bits * k)
    zeros_stored = (zeros.T.numpy().astype(np.int64) - 1).astype(np.uint32)
    qzeros = np.zeros((zeros_stored.shape[0], zeros_stored.shape[1] // per), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for k in range(per):
            qzeros[:, col] |= zeros_stored[:, col * per + k] << (bits * k)
    return {"qweight": torch.from_numpy(qweight.view(np.int32)),
            "qzeros": torch.from_numpy(qzeros.view(np.int32)),
            "scales": scales.T.half().contiguous(), "g_idx": g_idx.to(torch.int32),
            "bias": torch.zeros(codes.shape[0], dtype=torch.float16)}


def autogptq_unpack(tensors: dict, prefix: str, bits: int) -> torch.Tensor:
    """AutoGPTQ's torch dequantization of a v1 checkpoint: (out, in) float32."""
    per, mask = 32 // bits, (1 << bits) - 1
    qweight = tensors[prefix + "qweight"].numpy().view(np.uint32)
    qzeros = tensors[prefix + "qzeros"].numpy().view(np.uint32)
    intweight = np.stack([(qweight >> (bits * k)) & mask for k in range(per)], axis=1)
    intweight = intweight.reshape(-1, qweight.shape[1])  # (in, out)
    zeros = np.stack([(qzeros >> (bits * k)) & mask for k in range(per)], axis=2)
    zeros = (zeros.reshape(qzeros.shape[0], -1) + 1) & mask  # (groups, out)
    scales = tensors[prefix + "scales"].float().numpy()
    g_idx = tensors[prefix + "g_idx"].numpy().astype(np.int64)
    weight = scales[g_idx] * (intweight.astype(np.float32) - zeros[g_idx])
    return torch.from_numpy(weight.T.copy())


def autoawq_pack(codes, zeros, scales) -> dict[str, torch.Tensor]:
    """AutoAWQ WQLinear_GEMM.from_linear: intweight (in, out); column group c of 8, nibble
    i holds column 8c + order_map[i], order_map = [0, 2, 4, 6, 1, 3, 5, 7]."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    intweight = codes.T.numpy().astype(np.uint32)
    intzeros = zeros.T.numpy().astype(np.uint32)
    qweight = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    qzeros = np.zeros((intzeros.shape[0], intzeros.shape[1] // 8), dtype=np.uint32)
    for col in range(qweight.shape[1]):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)
            qzeros[:, col] |= intzeros[:, col * 8 + order_map[i]] << (i * 4)
    return {"qweight": torch.from_numpy(qweight.view(np.int32)),
            "qzeros": torch.from_numpy(qzeros.view(np.int32)),
            "scales": scales.T.half().contiguous()}


def quantized_copy(float_dir, out, pack, quantization_config, **random_kw):
    """float_dir with every decoder Linear replaced by random integer weights packed by
    `pack`; -> (out, {GGUF name: expected float32 weight in GGUF layout})."""
    out.mkdir()
    tensors = load_file(str(float_dir / "model.safetensors"))
    expected = {}
    for i, prefix in enumerate(linear_names(float_dir)):
        out_features, in_features = tensors.pop(prefix + ".weight").shape
        codes, zeros, scales, g_idx = random_int_linear(out_features, in_features, seed=i,
                                                        **random_kw)
        for key, value in pack(codes, zeros, scales, g_idx).items():
            tensors[f"{prefix}.{key}"] = value
        weight = reference_dequantize(codes, zeros, scales, g_idx)
        expected[gguf_tensor_name(prefix + ".weight")] = gguf_layout(prefix, weight)
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config))
    return out, expected


def assert_reads_exactly(path, expected, float_dir):
    weights = read_weights(path)
    for name, weight in expected.items():
        assert torch.equal(weights[name], weight), name
    floats = read_weights(float_dir)  # everything else as the float checkpoint has it
    for name in set(floats) - set(expected):
        assert torch.equal(weights[name], floats[name]), name


# --- in ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (8, False), (2, True)])
def test_gptq_checkpoint_from_a_reference_packer_reads_exactly(float_dir, tmp_path, bits,
                                                               act_order):
    config = {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": act_order,
              "sym": False}
    path, expected = quantized_copy(
        float_dir, tmp_path / "gptq",
        lambda c, z, s, g: autogptq_pack(c, z, s, g, bits), config,
        bits=bits, group_size=32, act_order=act_order)
    assert_reads_exactly(path, expected, float_dir)


@pytest.mark.slow
def test_gptq_quantize_config_json_and_runtime(float_dir, tmp_path):
    """The older layout: quantize_config.json beside a config.json without
    quantization_config. The runtime runs the checkpoint like its dequantized twin."""
    from llmpress.models.llama import LlamaModel

    path, expected = quantized_copy(float_dir, tmp_path / "gptq",
                                    lambda c, z, s, g: autogptq_pack(c, z, s, g, 4),
                                    None, bits=4, group_size=32)
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    (path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32,
                                                           "desc_act": False, "sym": False}))
    assert_reads_exactly(path, expected, float_dir)
    model = LlamaModel(load_source(path), mode="exact")
    tokens = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = model(tokens, model.new_cache(12))
    assert torch.isfinite(logits).all() and logits.shape == (1, 12, 300)


@pytest.mark.slow
def test_awq_gemm_checkpoint_from_a_reference_packer_reads_exactly(float_dir, tmp_path):
    config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
              "version": "gemm"}
    path, expected = quantized_copy(float_dir, tmp_path / "awq",
                                    lambda c, z, s, g: autoawq_pack(c, z, s), config,
                                    bits=4, group_size=32)
    assert_reads_exactly(path, expected, float_dir)


def compressed_tensors_scheme(config: dict):
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(config)  # the library accepts our config
    return parsed.config_groups["group_0"]


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_library_packing_reads_exactly(symmetric):
    """compressed-tensors' own compressor packs a weight; we read its integers exactly
    (the library's decompress equals ours rounded to its float16 scale dtype)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    scheme = compressed_tensors_scheme(ckpt.compressed_tensors_config(4, 32, symmetric, []))
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 128, generator=g) * 0.05
    scales = (weight.view(48, 4, 32).abs().amax(-1) / 7).half()
    state = {"weight": weight.half(), "weight_scale": scales}
    if not symmetric:
        state["weight_zero_point"] = torch.randint(-3, 3, (48, 4), generator=g).to(torch.int8)
    packed = PackedQuantizationCompressor.compress(state, scheme)
    quant = ckpt._compressed_tensors_quantization(ckpt.compressed_tensors_config(
        4, 32, symmetric, []), "test")
    ours = ckpt.read_compressed_linear(dict(packed), "", (48, 128), quant, "test").dequantize()
    theirs = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    assert theirs.dtype == torch.float16
    assert torch.equal(ours.half(), theirs)


# --- out -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def export(float_dir, calibration, tmp_path_factory):
    """export(grid, fmt) -> (directory, report), each made once per module."""
    made = {}

    def make(grid, fmt="gptq"):
        if (grid, fmt) not in made:
            out = tmp_path_factory.mktemp("export") / "model"
            made[grid, fmt] = out, gptq_checkpoint(float_dir, out, grid, fmt,
                                                   calibration=calibration)
        return made[grid, fmt]
    return make


@pytest.mark.slow
@pytest.mark.parametrize("grid", [IntGrid(4, 32, symmetric=True), IntGrid(4, 32),
                                  IntGrid(8, 64, symmetric=True)],
                         ids=["4b-sym", "4b-zp", "8b-sym"])
def test_gptq_export_unpacks_to_our_weights(float_dir, export, grid):
    out, report = export(grid)
    assert len(report.linears) == 21
    assert np.mean([e.error / e.rtn_error for e in report.linears]) < 1.0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == json.loads((out / "quantize_config.json").read_text())
    assert (config["bits"], config["group_size"], config["sym"]) == \
        (grid.bits, grid.group_size, grid.symmetric)
    files = load_file(str(out / "model.safetensors"))
    ours = read_weights(out)
    for prefix in linear_names(float_dir):
        reference = autogptq_unpack(files, prefix + ".", grid.bits)
        assert torch.equal(ours[gguf_tensor_name(prefix + ".weight")],
                           gguf_layout(prefix, reference)), prefix
    assert (out / "tokenizer_config.json").exists() == \
        (float_dir / "tokenizer_config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_export_decompresses_to_our_weights(float_dir, export, symmetric):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    out, _ = export(IntGrid(4, 32, symmetric=symmetric), "compressed-tensors")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = compressed_tensors_scheme(config)
    files = load_file(str(out / "model.safetensors"))
    ours = read_weights(out)
    for prefix in linear_names(float_dir):
        state = {k[len(prefix) + 1:]: v for k, v in files.items() if k.startswith(prefix + ".")}
        theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        mine = ours[gguf_tensor_name(prefix + ".weight")]
        assert torch.equal(gguf_layout(prefix, theirs.float()), mine.half().float()), prefix


def test_gptq_checkpoint_converts_to_gguf(export, tmp_path):
    """`llmpress quantize DIR OUT F32` on a GPTQ directory: the GGUF holds the dequantized
    weights exactly."""
    from llmpress.io.gguf import load_gguf
    from llmpress.quant.quantize import QuantizeConfig, quantize_model

    out, _ = export(IntGrid(4, 32))
    quantize_model(QuantizeConfig(out, tmp_path / "model.gguf", "F32"))
    written = load_gguf(tmp_path / "model.gguf")
    for name, weight in read_weights(out).items():
        ref = written.tensors[name]
        assert torch.equal(get_format(ref.ggml_type).dequantize(ref.read_bytes(), ref.shape),
                           weight), name


def test_quantized_checkpoint_has_the_float_checkpoints_metadata(float_dir, tmp_path):
    """One HF reader for float and quantized directories: a GPTQ checkpoint converts with
    the same GGUF metadata as its float twin, tokenizer.* keys included (the quantized
    path once left them out, so its GGUF had no vocabulary for llama.cpp)."""
    from test_hf_parity import write_byte_level_tokenizer

    float_copy = tmp_path / "float"
    shutil.copytree(float_dir, float_copy)
    write_byte_level_tokenizer(float_copy)
    path, _ = quantized_copy(float_copy, tmp_path / "gptq",
                             lambda c, z, s, g: autogptq_pack(c, z, s, g, 4),
                             {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False},
                             bits=4, group_size=32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(float_copy / name, path / name)
    quantized, original = load_source(path), load_source(float_copy)
    assert len(quantized.metadata["tokenizer.ggml.tokens"]) == 300
    assert {k: v for k, v in quantized.metadata.items() if k != "general.name"} == \
        {k: v for k, v in original.metadata.items() if k != "general.name"}


# --- bad input -----------------------------------------------------------------------------------
def gptq_dir(float_dir, tmp_path, config, mutate=None):
    path, _ = quantized_copy(float_dir, tmp_path / "bad",
                             lambda c, z, s, g: autogptq_pack(c, z, s, g, 4),
                             {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
                              **config}, bits=4, group_size=32)
    if mutate:
        tensors = load_file(str(path / "model.safetensors"))
        mutate(tensors)
        save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("config,mutate,message", [
    ({"bits": 3}, None, "3-bit"),
    ({"bits": 5}, None, "5-bit"),
    ({"desc_act": True}, lambda t: t.pop("model.layers.0.mlp.up_proj.g_idx"), "act-order"),
    ({}, lambda t: t.__setitem__("model.layers.1.self_attn.q_proj.qweight",
                                 t["model.layers.1.self_attn.q_proj.qweight"][:-1].clone()),
      "shape"),
    ({}, lambda t: t.__setitem__("model.layers.0.mlp.down_proj.scales",
                                 t["model.layers.0.mlp.down_proj.scales"][:, :10].clone()),
      "shape"),
    ({"quant_method": "bitsandbytes"}, None, "not supported"),
    ({"group_size": 0}, None, "group_size"),
], ids=["3-bit", "5-bit", "no-g_idx", "qweight-shape", "scales-shape", "method", "group"])
def test_bad_checkpoints_fail_in_one_line(float_dir, tmp_path, config, mutate, message):
    path = gptq_dir(float_dir, tmp_path, config, mutate)
    with pytest.raises(LlmpressError, match=message):
        load_source(path)


def test_export_refuses_bad_requests(float_dir, tmp_path, calibration, export):
    with pytest.raises(LlmpressError, match="3-bit"):
        gptq_checkpoint(float_dir, tmp_path / "x", IntGrid(3, 32), "gptq", calibration=calibration)
    with pytest.raises(LlmpressError, match="format"):
        gptq_checkpoint(float_dir, tmp_path / "x", IntGrid(4, 32), "exl2", calibration=calibration)
    (tmp_path / "exists").mkdir()
    with pytest.raises(LlmpressError, match="exists"):
        gptq_checkpoint(float_dir, tmp_path / "exists", IntGrid(4, 32), calibration=calibration)
    quantized, _ = export(IntGrid(4, 32))
    with pytest.raises(LlmpressError, match="already quantized"):
        ckpt.write_quantized_dir(quantized, tmp_path / "y", {}, "gptq", {})


def test_pack_round_trip_and_awq_order():
    codes = torch.randint(0, 16, (16, 64))
    for bits in (2, 4, 8):
        values = codes % (1 << bits)
        for dim in (0, 1):
            packed = ckpt.pack_int32(values, bits, dim)
            assert packed.dtype == torch.int32
            assert torch.equal(ckpt.unpack_int32(packed, bits, dim), values.to(torch.int32))
    assert ckpt.awq_column_order(8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


# --- the commands ----------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_gptq_convert_and_quantize_method(float_dir, tmp_path, capsys):
    """`llmpress gptq`, `llmpress convert` and `llmpress quantize --method awq+gptq` on a
    tiny directory with a tokenizer; calibration text from a file."""
    from test_hf_parity import write_byte_level_tokenizer

    from llmpress.cli import main
    from llmpress.io.gguf import load_gguf

    model = tmp_path / "model"
    shutil.copytree(float_dir, model)
    write_byte_level_tokenizer(model)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "gptq"
    assert main(["gptq", str(model), str(out), "--group-size", "32", "--calib", str(text),
                 "--calib-tokens", "128", "--calib-ctx", "32"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert (out / "tokenizer.json").is_file()
    assert main(["convert", str(out), str(tmp_path / "gptq.gguf"), "--type", "F32"]) == 0
    assert load_gguf(tmp_path / "gptq.gguf").tensors["blk.0.ffn_down.weight"].shape == (64, 128)
    assert main(["quantize", str(model), str(tmp_path / "q8.gguf"), "Q8_0", "--method",
                 "awq+gptq", "--calib", str(text), "--calib-tokens", "128", "--calib-ctx",
                 "32", "--awq-grid", "4"]) == 0
    assert "mean error ratio awq+gptq/rounding" in capsys.readouterr().err
    assert main(["gptq", str(model), str(out)]) == 1  # exists: one error line

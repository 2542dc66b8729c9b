"""AWQ: folding per-channel scales leaves the model's outputs unchanged (before
quantization), the scale search never does worse than plain rounding on its own data,
and the layer-by-layer pipeline writes a file whose folded model is better than plain
rounding where activations have outlier channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_calib import random_tokens, tiny_llama

from llmpress.errors import LlmpressError
from llmpress.formats import get_format
from llmpress.io.gguf import load_gguf
from llmpress.models.llama import LlamaModel
from llmpress.prune.prune import in_memory_source
from llmpress.quant import awq
from llmpress.quant.calibrated import CalibrationConfig, calibrated_quantize, round_to_nearest
from llmpress.quant.quantize import QuantizeConfig

N_HEADS, N_KV = 4, 2


def float_tensors(source) -> dict[str, torch.Tensor]:
    return {name: get_format(ref.ggml_type).dequantize(ref.read_bytes(), ref.shape).clone()
            for name, ref in source.tensors.items()}


def logits(source, tokens) -> torch.Tensor:
    model = LlamaModel(source, mode="exact")
    return model(tokens, model.new_cache(tokens.shape[1], batch=tokens.shape[0]))


def fold_everything(tensors: dict[str, torch.Tensor], n_layers: int, seed: int = 5
                    ) -> dict[str, torch.Tensor]:
    """Random positive scales folded at all four AWQ places of every layer."""
    g = torch.Generator().manual_seed(seed)
    out = dict(tensors)

    def rand_scales(n):
        return torch.exp(torch.randn(n, generator=g))  # spread over ~e^±2

    for i in range(n_layers):
        p = f"blk.{i}."
        dim = out[p + "attn_norm.weight"].shape[0]
        s = rand_scales(dim)
        norm, ws = awq.fold_into_norm(out[p + "attn_norm.weight"],
                                      [out[p + n + ".weight"] for n in ("attn_q", "attn_k", "attn_v")], s)
        out[p + "attn_norm.weight"] = norm
        for n, w in zip(("attn_q", "attn_k", "attn_v"), ws):
            out[p + n + ".weight"] = w
        s = rand_scales(dim)
        norm, ws = awq.fold_into_norm(out[p + "ffn_norm.weight"],
                                      [out[p + n + ".weight"] for n in ("ffn_gate", "ffn_up")], s)
        out[p + "ffn_norm.weight"] = norm
        out[p + "ffn_gate.weight"], out[p + "ffn_up.weight"] = ws
        # v -> o: scales tied across the query heads sharing a KV head
        o_scales = awq.kv_tied_abs_mean(rand_scales(out[p + "attn_output.weight"].shape[1]),
                                        N_HEADS, N_KV)
        v_scales = awq.kv_scales(o_scales, N_HEADS, N_KV)
        bias = out.get(p + "attn_v.bias")
        v, bias, o = awq.fold_into_linear(out[p + "attn_v.weight"], bias,
                                          out[p + "attn_output.weight"], v_scales, o_scales)
        out[p + "attn_v.weight"], out[p + "attn_output.weight"] = v, o
        if bias is not None:
            out[p + "attn_v.bias"] = bias
        s = rand_scales(out[p + "ffn_down.weight"].shape[1])
        up, _, down = awq.fold_into_linear(out[p + "ffn_up.weight"], None,
                                           out[p + "ffn_down.weight"], s, s)
        out[p + "ffn_up.weight"], out[p + "ffn_down.weight"] = up, down
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_folded_model_equals_the_original(arch):
    """Before quantization the folded model computes the same logits (float rounding
    only), with grouped-query attention (4 heads, 2 KV heads) and, for Qwen2, v's bias."""
    source = tiny_llama(n_layers=2, n_heads=N_HEADS, n_kv=N_KV, arch=arch)
    tensors = float_tensors(source)
    if arch == "qwen2":  # q/k/v biases
        g = torch.Generator().manual_seed(9)
        for i in range(2):
            for n in ("attn_q", "attn_k", "attn_v"):
                rows = tensors[f"blk.{i}.{n}.weight"].shape[0]
                tensors[f"blk.{i}.{n}.bias"] = 0.1 * torch.randn(rows, generator=g)
    original = in_memory_source("orig.gguf", source.metadata, tensors)
    folded_tensors = fold_everything(tensors, 2)
    assert not torch.equal(folded_tensors["blk.0.attn_norm.weight"], tensors["blk.0.attn_norm.weight"])
    folded = in_memory_source("folded.gguf", source.metadata, folded_tensors)
    tokens = random_tokens(2, 16)
    torch.testing.assert_close(logits(folded, tokens), logits(original, tokens),
                               rtol=1e-4, atol=1e-4)


def test_scales_are_normalized_and_tied():
    abs_mean = torch.rand(64) * 5
    s = awq.scales_for(abs_mean, 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(awq.scales_for(abs_mean, 0.0), torch.ones(64))
    tied = awq.kv_tied_abs_mean(abs_mean, N_HEADS, N_KV).view(N_HEADS, -1)
    assert torch.equal(tied[0], tied[1]) and torch.equal(tied[2], tied[3])
    assert awq.kv_scales(awq.scales_for(tied.reshape(-1), 0.5), N_HEADS, N_KV).shape == (32,)


def outlier_inputs(in_features=256, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=g)
    x[:, :8] *= 30  # a few outlier channels, as in real LLM activations
    return x


def test_search_prefers_scaling_when_inputs_have_outliers():
    x = outlier_inputs()
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    stats = awq.accumulate_activation_stats(awq.init_activation_stats(256), x)
    q4 = lambda scaled, s: round_to_nearest(scaled, get_format("Q4_0").ggml_type, None)[1]
    result = awq.search_scales([w], stats.hessian(), stats.abs_mean(), q4, n_grid=10)
    assert result.losses[0] == pytest.approx(awq.output_loss([w], [q4(w, None)], stats.hessian()))
    assert min(result.losses) == result.losses[result.alphas.index(result.alpha)]
    assert result.alpha > 0 and min(result.losses) < 0.8 * result.losses[0]
    direct = lambda w_hat: float(((x @ (w - w_hat).T) ** 2).sum())
    best = q4(w * result.scales, None) / result.scales
    assert direct(best) < direct(q4(w, None))  # on the actual outputs too


def test_bad_input_is_refused():
    w, h = torch.zeros(4, 8), torch.eye(8)
    with pytest.raises(LlmpressError, match="disagree"):
        awq.search_scales([w], torch.eye(6), torch.ones(8), lambda a, s: a)
    with pytest.raises(LlmpressError, match="grid size"):
        awq.search_scales([w], h, torch.ones(8), lambda a, s: a, n_grid=0)
    with pytest.raises(LlmpressError, match="unknown method"):
        CalibrationConfig(method="smoothquant")
    with pytest.raises(LlmpressError, match="calib-tokens"):
        CalibrationConfig(tokens=100, seq_len=512)


@pytest.mark.slow
def test_awq_pipeline_writes_a_better_model_than_rounding(tmp_path):
    """Layer by layer on a tiny model whose norms create outlier channels: the written
    file (folded norms, scaled weights, Q4_0) is closer to the float model than plain
    rounding's, on held-out tokens."""
    source = tiny_llama(n_layers=2, dim=64, ffn=128, n_heads=N_HEADS, n_kv=N_KV)
    tensors = float_tensors(source)
    for i in range(2):
        for norm in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{i}.{norm}.weight"][:4] *= 20
    source = in_memory_source("outliers.gguf", source.metadata, tensors)
    calibration, held_out = random_tokens(16, 32, seed=2), random_tokens(4, 32, seed=3)
    reference = logits(source, held_out)
    errors = {}
    for method in ("rtn", "awq"):
        out = tmp_path / f"{method}.gguf"
        report = calibrated_quantize(QuantizeConfig(source, out, "Q4_0"),
                                     CalibrationConfig(method=method, tokens=512, seq_len=32,
                                                       awq_grid=10), calibration=calibration)
        errors[method] = float(((logits(load_gguf(out), held_out) - reference) ** 2).mean())
        if method == "awq":
            assert all(e.error <= e.rtn_error * 1.0001 for e in report.linears)
            written = load_gguf(out).tensors["blk.0.attn_norm.weight"]
            assert not np.array_equal(written.read_bytes().numpy(),
                                      source.tensors["blk.0.attn_norm.weight"].read_bytes().numpy())
    assert errors["awq"] < errors["rtn"]

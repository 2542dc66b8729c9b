"""The layer-by-layer calibration runner and calibration data, on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmpress.calib.data import default_calibration_text, split_sequences
from llmpress.calib.runner import (
    accumulate_gram, accumulate_moments, final_logits, init_gram, init_moments, run_layers,
)
from llmpress.errors import LlmpressError
from llmpress.formats import get_format
from llmpress.io.source import TensorRef
from llmpress.models.llama import LlamaModel
from llmpress.prune.prune import in_memory_source

LAYER_TENSORS = ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                 "ffn_gate", "ffn_up", "ffn_down")


def tiny_llama(n_layers=3, dim=64, n_heads=4, n_kv=2, ffn=96, vocab=128, seed=0,
               quant_type: str | None = None, arch="llama"):
    """A random Llama-family ModelSource held in memory (F32, or quantized to quant_type)."""
    g = torch.Generator().manual_seed(seed)
    hd = dim // n_heads

    def rand(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return torch.randn(*shape, generator=g) * scale

    tensors = {"token_embd.weight": rand(vocab, dim, scale=1.0),
               "output_norm.weight": 1 + 0.1 * rand(dim, scale=1.0),
               "output.weight": rand(vocab, dim)}
    for i in range(n_layers):
        p = f"blk.{i}."
        shapes = {"attn_norm": (dim,), "ffn_norm": (dim,), "attn_q": (n_heads * hd, dim),
                  "attn_k": (n_kv * hd, dim), "attn_v": (n_kv * hd, dim),
                  "attn_output": (dim, n_heads * hd), "ffn_gate": (ffn, dim),
                  "ffn_up": (ffn, dim), "ffn_down": (dim, ffn)}
        for name, shape in shapes.items():
            if len(shape) == 1:
                tensors[p + name + ".weight"] = 1 + 0.1 * rand(*shape, scale=1.0)
            else:
                tensors[p + name + ".weight"] = rand(*shape)
    if quant_type is not None:
        fmt = get_format(quant_type)
        for name, t in list(tensors.items()):
            if t.dim() == 2:
                raw = torch.from_numpy(fmt.quantize(t.numpy()).reshape(-1))
                tensors[name] = TensorRef(name, fmt.ggml_type, tuple(t.shape), raw.numel(),
                                          lambda r=raw: r)
    metadata = {
        "general.architecture": arch, f"{arch}.embedding_length": dim,
        f"{arch}.block_count": n_layers, f"{arch}.attention.head_count": n_heads,
        f"{arch}.attention.head_count_kv": n_kv, f"{arch}.feed_forward_length": ffn,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.context_length": 256,
        f"{arch}.rope.freq_base": 10000.0, f"{arch}.rope.dimension_count": hd,
    }
    return in_memory_source(f"tiny-{arch}.gguf", metadata, tensors)


def random_tokens(n, t, vocab=128, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def full_forward(model, tokens):
    cache = model.new_cache(tokens.shape[1], batch=tokens.shape[0])
    return model(tokens, cache)


@pytest.mark.slow
@pytest.mark.parametrize("quant_type", [None, "Q8_0"])
def test_layer_by_layer_equals_full_forward(quant_type):
    model = LlamaModel(tiny_llama(quant_type=quant_type), mode="exact")
    tokens = random_tokens(5, 24)
    expected = full_forward(model, tokens)
    hidden = run_layers(model, tokens, batch_size=2)  # 2 + 2 + 1 sequences
    torch.testing.assert_close(final_logits(model, hidden), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fast_mode_model_is_restored_after_a_run():
    model = LlamaModel(tiny_llama(quant_type="Q8_0"), mode="fast")
    tokens = random_tokens(2, 20)
    before = full_forward(model, tokens)

    def zero_down(step):
        step.set_weight("ffn_down", torch.zeros_like(step.weight("ffn_down")))

    run_layers(model, tokens, zero_down)
    torch.testing.assert_close(full_forward(model, tokens), before)
    # and one decode step (the fused kernel path) gives the bits of an untouched model
    fresh = LlamaModel(tiny_llama(quant_type="Q8_0"), mode="fast")
    assert torch.equal(full_forward(model, tokens[:1, :1]), full_forward(fresh, tokens[:1, :1]))


@pytest.mark.slow
def test_statistics_match_inputs_captured_directly():
    """Hook statistics equal those computed from the layer's inputs recomputed by hand."""
    model = LlamaModel(tiny_llama(), mode="exact")
    tokens = random_tokens(3, 16)
    seen = {}

    def per_layer(step):
        grams = step.collect(["attn_q", "ffn_down"], init_gram, accumulate_gram)
        moments = step.collect(["attn_q"], init_moments, accumulate_moments)
        blk = step.block
        normed = torch.nn.functional.rms_norm(step.inputs, (64,), blk.attn_norm, 1e-5)
        x = normed.reshape(-1, 64)
        seen[step.index] = (grams, moments, x)

    run_layers(model, tokens, per_layer, batch_size=2)
    for grams, moments, x in seen.values():
        assert grams["attn_q"].count == 48 and moments["attn_q"].count == 48
        torch.testing.assert_close(grams["attn_q"].xtx, x.T @ x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(moments["attn_q"].column_norms(), x.norm(dim=0))
        torch.testing.assert_close(moments["attn_q"].mean_squares(), (x * x).mean(0))
        torch.testing.assert_close(moments["attn_q"].column_variance(),
                                   x.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
        assert grams["ffn_down"].xtx.shape == (96, 96)


def test_weights_set_by_the_callback_feed_the_next_layer():
    """Sequential: zeroing layer 0's weights changes the inputs layer 1 sees, exactly as
    a model whose layer 0 is the identity (both projections zero) would."""
    src = tiny_llama()
    model = LlamaModel(src, mode="exact")
    tokens = random_tokens(2, 12)
    inputs_of_layer1 = {}

    def per_layer(step):
        if step.index == 0:
            for name in ("attn_output", "ffn_down"):
                step.set_weight(name, torch.zeros_like(step.weight(name)))
            torch.testing.assert_close(step.outputs(), step.inputs)
        if step.index == 1:
            inputs_of_layer1["x"] = step.inputs

    run_layers(model, tokens, per_layer)
    embedded = model.embed(tokens)
    torch.testing.assert_close(inputs_of_layer1["x"], embedded)


def test_keep_changes_leaves_new_weights_in_the_model():
    model = LlamaModel(tiny_llama(), mode="exact")
    tokens = random_tokens(2, 12)
    run_layers(model, tokens, lambda s: s.set_weight("ffn_down", 2 * s.weight("ffn_down")),
               keep_changes=True)
    ref = LlamaModel(tiny_llama(), mode="exact")
    w = ref.blocks[1].ffn.down.dequantized()
    torch.testing.assert_close(model.blocks[1].ffn.down.dense, 2 * w)


def test_split_sequences_even_windows_with_bos():
    ids = np.arange(1000)
    seqs = split_sequences(ids, n_sequences=3, seq_len=11, bos_id=-1)
    assert seqs.shape == (3, 11) and (seqs[:, 0] == -1).all()
    assert seqs[0, 1:].tolist() == list(range(10))  # first window
    assert seqs[-1, 1:].tolist() == list(range(990, 1000))  # last window
    with pytest.raises(LlmpressError, match="too few"):
        split_sequences(ids, n_sequences=200, seq_len=11)


def test_default_text_is_python_docs_not_wikitext():
    text = default_calibration_text()
    assert len(text) > 100_000 and "Robert Boulter" not in text and "def " in text

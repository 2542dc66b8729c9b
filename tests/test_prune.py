"""Pruning on tiny random weights and models: exact masks, error ordering, structural edits."""

from __future__ import annotations

import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.prune.unstructured import (
    Pattern, check_sparsity, nm_mask, owl_sparsities, parse_pattern, prune_magnitude,
    prune_sparsegpt, prune_wanda, relative_error, row_mask,
)


def layer_data(out=48, inp=64, tokens=512, seed=0):
    """A weight and inputs with uneven feature scales (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    scales = torch.exp(torch.randn(inp, generator=g))  # log-normal per-feature scale
    mixing = torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g) / inp ** 0.5
    x = (torch.randn(tokens, inp, generator=g) @ mixing) * scales  # correlated features
    return w, x


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_unstructured_masks_have_exact_sparsity(sparsity):
    w, x = layer_data()
    for pruned in (prune_magnitude(w, sparsity), prune_wanda(w, x.norm(dim=0), sparsity),
                   prune_sparsegpt(w, x.T @ x, x.shape[0], sparsity)):
        zeros = (pruned.weight == 0).float().mean().item()
        assert zeros == sparsity and (~pruned.mask).float().mean().item() == sparsity
        assert (pruned.weight[~pruned.mask] == 0).all()


@pytest.mark.parametrize("text", ["2:4", "4:8"])
def test_nm_masks_keep_exactly_n_of_every_m(text):
    pattern = parse_pattern(text)
    w, x = layer_data()
    for pruned in (prune_magnitude(w, 0.5, pattern), prune_wanda(w, x.norm(dim=0), 0.5, pattern),
                   prune_sparsegpt(w, x.T @ x, x.shape[0], 0.5, pattern)):
        groups = (pruned.weight != 0).reshape(w.shape[0], -1, pattern.group).sum(-1)
        assert (groups == pattern.keep).all()


def test_magnitude_keeps_the_largest_and_wanda_uses_activation_norms():
    w = torch.tensor([[1.0, -4.0, 2.0, 3.0]])
    assert row_mask(w.abs(), 0.5).tolist() == [[False, True, False, True]]
    norms = torch.tensor([10.0, 0.1, 1.0, 1.0])  # |w|*norm: 10, 0.4, 2, 3
    assert prune_wanda(w, norms, 0.5).mask.tolist() == [[True, False, False, True]]
    assert nm_mask(torch.tensor([[4.0, 1, 3, 2, 0, 9, 8, 7]]), Pattern(2, 4)).tolist() == \
        [[True, False, True, False, False, True, True, False]]


@pytest.mark.slow
@pytest.mark.parametrize("pattern", [None, Pattern(2, 4)])
def test_error_ordering_sparsegpt_wanda_magnitude(pattern):
    """On the same layer and data: SparseGPT ≤ Wanda ≤ magnitude in ‖(W−W')X‖²/‖WX‖²."""
    w, x = layer_data(out=64, inp=256, tokens=1024)
    xtx = x.T @ x
    errors = [prune_sparsegpt(w, xtx, x.shape[0], 0.5, pattern).error,
              prune_wanda(w, x.norm(dim=0), 0.5, pattern, xtx).error,
              prune_magnitude(w, 0.5, pattern, xtx).error]
    assert errors == sorted(errors), errors
    # the reported error is the output error measured directly
    pruned = prune_sparsegpt(w, xtx, x.shape[0], 0.5, pattern)
    direct = ((x @ (w - pruned.weight).T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    assert pruned.error == pytest.approx(direct.item(), rel=1e-3)


def test_sparsegpt_singular_hessian_warns_and_still_prunes():
    w, x = layer_data(inp=32, tokens=8)  # 8 tokens: XᵀX has rank 8 of 32
    x[:, 5] = x[:, 4]
    with pytest.warns(UserWarning, match="damping raised"):
        pruned = prune_sparsegpt(w, x.T @ x, 8, 0.5, damp=0.0)
    assert (pruned.weight == 0).float().mean().item() == 0.5


def test_relative_error_without_statistics_is_weight_error():
    w = torch.tensor([[3.0, 4.0]])
    assert relative_error(w, torch.tensor([[3.0, 0.0]])) == pytest.approx(16 / 25)


def test_owl_keeps_the_mean_and_spares_outlier_layers():
    s = owl_sparsities([0.01, 0.05, 0.03], 0.6, lam=0.08)
    assert sum(s) / 3 == pytest.approx(0.6)
    assert s[1] < s[2] < s[0] and max(s) - min(s) == pytest.approx(0.16)


@pytest.mark.parametrize("value", [0, 1, -0.1, 1.5])
def test_sparsity_outside_open_interval_is_an_error(value):
    with pytest.raises(LlmpressError, match="between 0 and 1"):
        check_sparsity(value)


@pytest.mark.parametrize("text", ["2-4", "4:2", "0:4", "a:b"])
def test_bad_pattern_text_is_an_error(text):
    with pytest.raises(LlmpressError, match="pattern"):
        parse_pattern(text)


def test_pattern_that_does_not_divide_the_row_is_an_error():
    w = torch.randn(4, 12)
    with pytest.raises(LlmpressError, match="do not divide"):
        prune_magnitude(w, 0.5, Pattern(4, 8))


# --- whole tiny models ---------------------------------------------------------------------------
from test_calib import full_forward, random_tokens, tiny_llama  # noqa: E402

from llmpress.kernels import cpu  # noqa: E402
from llmpress.models.llama import LlamaModel  # noqa: E402
from llmpress.prune import structured  # noqa: E402
from llmpress.prune.prune import (  # noqa: E402
    PruneConfig, in_memory_source, prune_model, read_float,
)


class FakeTokenizer:
    """Calibration text -> ids for the tiny models (vocab 128): bytes mod 128."""
    bos_id, add_bos = 1, True

    def encode(self, text, add_bos=None, parse_special=True):
        return [b % 128 for b in text.encode()[:20000]]


def logits_of(source, tokens):
    return full_forward(LlamaModel(source, mode="exact"), tokens)


def with_zeroed(source, names_and_slices):
    """The source with some weight entries set to zero (the 'masked original')."""
    tensors = dict(source.tensors)
    for name, index in names_and_slices:
        w = read_float(tensors[name])
        w[index] = 0
        tensors[name] = w
    return in_memory_source(source.path, source.metadata, tensors)


@pytest.mark.slow
def test_removing_a_layer_equals_the_original_with_that_layer_zeroed():
    src = tiny_llama(n_layers=4)
    tokens = random_tokens(2, 16)
    # a layer whose two output projections are zero adds nothing to the residual stream
    masked = with_zeroed(src, [("blk.1.attn_output.weight", ...), ("blk.1.ffn_down.weight", ...)])
    tensors, meta = structured.remove_layers(src.tensors, src.metadata, 4, [1])
    removed = in_memory_source(src.path, meta, tensors)
    assert meta["llama.block_count"] == 3 and "blk.3.attn_q.weight" not in tensors
    # the layers after the removed one move down a place, their bytes unchanged
    assert torch.equal(tensors["blk.1.attn_q.weight"].read_bytes(),
                       src.tensors["blk.2.attn_q.weight"].read_bytes())
    torch.testing.assert_close(logits_of(removed, tokens), logits_of(masked, tokens))


def test_removing_a_head_group_and_channels_equals_the_masked_original():
    src = tiny_llama(n_layers=2, n_heads=4, n_kv=2, ffn=96)
    tokens = random_tokens(2, 16)
    hd = 16
    # drop KV group 0 (query heads 0, 1) in layer 0 and FFN channels 3 and 50 in layer 1
    masked = with_zeroed(src, [("blk.0.attn_output.weight", (slice(None), slice(0, 2 * hd))),
                               ("blk.1.ffn_down.weight", (slice(None), [3, 50]))])
    tensors = dict(src.tensors)
    for layer, groups, channels in ((0, [1], list(range(96))),
                                    (1, [0, 1], [c for c in range(96) if c not in (3, 50)])):
        p = f"blk.{layer}."
        names = [n[len(p):] for n in tensors if n.startswith(p) and "norm" not in n]
        sliced = structured.slice_layer({n: read_float(tensors[p + n]) for n in names},
                                        4, 2, hd, groups, channels)
        tensors.update({p + n: t for n, t in sliced.items()})
    meta = structured.width_metadata(src.metadata, [2, 4], [1, 2], [96, 94], hd)
    smaller = in_memory_source(src.path, meta, tensors)
    assert meta["llama.attention.head_count"] == [2, 4]
    torch.testing.assert_close(logits_of(smaller, tokens), logits_of(masked, tokens))


def test_group_and_channel_contributions_are_output_norms():
    g = torch.Generator().manual_seed(3)
    w_out, x = torch.randn(8, 12, generator=g), torch.randn(50, 12, generator=g)
    scores = structured.group_contribution(w_out, x.T @ x, n_groups=3)
    for k in range(3):
        cols = slice(4 * k, 4 * k + 4)
        direct = (x[:, cols] @ w_out[:, cols].T).norm()
        assert scores[k].item() == pytest.approx(direct.item(), rel=1e-5)
    ch = structured.channel_contribution(w_out, (x * x).sum(0))
    assert ch[5].item() == pytest.approx(torch.outer(x[:, 5], w_out[:, 5]).norm().item(), rel=1e-5)


def test_block_influence_and_angular_distance():
    x = torch.randn(10, 6)
    assert structured.block_influence(x, 2 * x) == pytest.approx(0, abs=1e-12)
    assert structured.block_influence(x, -x) == pytest.approx(2)
    assert structured.angular_distance(x, -x) == pytest.approx(1)
    states = [x, x + 0.5, x + 0.51, x + 3]  # layer 1 changes least
    assert structured.closest_block(states, 1)[0] == [1]
    assert structured.lowest_influence_layers([0.3, 0.1, 0.2, 0.05], 2) == [1, 3]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_model_unstructured_on_a_tiny_model(method):
    src = tiny_llama(n_layers=2)
    cfg = PruneConfig(method=method, sparsity=0.5, n_sequences=4, seq_len=32)
    result = prune_model(src, cfg, FakeTokenizer())
    by_type = result.sparsity_by_type()
    assert all(v == 0.5 for v in by_type.values()), by_type
    assert result.nonzero_after == result.params_before - sum(
        int(torch.tensor(r.shape).prod()) // 2 for n, r in src.tensors.items()
        if n.startswith("blk.") and "norm" not in n)
    assert len(result.linears) == 14 and all(r.error > 0 for r in result.linears)


@pytest.mark.slow
def test_prune_model_owl_and_pattern():
    src = tiny_llama(n_layers=3)
    owl = prune_model(src, PruneConfig(method="wanda", sparsity=0.5, owl=True, n_sequences=4,
                                       seq_len=32), FakeTokenizer())
    assert len(owl.layer_sparsity) == 3
    assert sum(owl.layer_sparsity) / 3 == pytest.approx(0.5)
    nm = prune_model(src, PruneConfig(method="sparsegpt", pattern="2:4", n_sequences=4,
                                      seq_len=32), FakeTokenizer())
    w = read_float(nm.source.tensors["blk.2.ffn_down.weight"])
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["influence", "angular"])
def test_prune_model_layers_gives_a_smaller_model_that_runs(metric):
    src = tiny_llama(n_layers=4)
    result = prune_model(src, PruneConfig(method="layers", n_layers=2, layer_metric=metric,
                                          n_sequences=4, seq_len=32), FakeTokenizer())
    assert len(result.removed_layers) == 2
    assert result.source.metadata["llama.block_count"] == 2
    assert result.params_after < result.params_before
    kept = [i for i in range(4) if i not in result.removed_layers]
    # the new blk.0 is the old first kept layer, byte for byte
    assert torch.equal(result.source.tensors["blk.0.ffn_up.weight"].read_bytes(),
                       src.tensors[f"blk.{kept[0]}.ffn_up.weight"].read_bytes())
    if metric == "angular":  # Gromov et al. remove one contiguous block of layers
        first = result.removed_layers[0]
        assert result.removed_layers == [first, first + 1]
    logits = logits_of(result.source, random_tokens(1, 8))
    assert logits.shape[-2] == 8 and torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("uniform", [True, False])
def test_prune_model_width(uniform, tmp_path):
    src = tiny_llama(n_layers=4, n_heads=4, n_kv=2, ffn=256)
    result = prune_model(src, PruneConfig(method="width", ratio=0.3, uniform=uniform,
                                          n_sequences=4, seq_len=32), FakeTokenizer())
    widths = result.widths
    assert all(h == 2 * kv for h, kv, _ in widths) and all(f % 32 == 0 for *_, f in widths)
    ffn_key = result.source.metadata["llama.feed_forward_length"]
    if uniform:
        assert widths == [widths[0]] * 4 and ffn_key == widths[0][2]
    else:  # this model's scores give the last layer a narrower FFN: a per-layer array
        assert ffn_key == [w[2] for w in widths] and len(set(ffn_key)) > 1
    removed = 1 - result.params_after / result.params_before
    assert 0.1 < removed < 0.5
    # written (per-layer widths as GGUF arrays when they differ) and read back
    write_pruned(result, tmp_path / "w.gguf")
    tokens = random_tokens(1, 8)
    torch.testing.assert_close(logits_of(load_gguf(tmp_path / "w.gguf"), tokens),
                               logits_of(result.source, tokens))
    # per-layer widths through the fused C decode step (fast mode) against exact mode
    write_pruned(result, tmp_path / "q.gguf", then_quantize="Q8_0")
    quantized_source = load_gguf(tmp_path / "q.gguf")
    fast, exact = LlamaModel(quantized_source, "fast"), LlamaModel(quantized_source, "exact")
    assert fast.decoder is not None or not cpu.available()
    fast_cache, exact_cache = fast.new_cache(16), exact.new_cache(16)
    for i in range(tokens.shape[1]):
        a, b = fast(tokens[:, i:i + 1], fast_cache), exact(tokens[:, i:i + 1], exact_cache)
        # fast mode rounds activations to 8 bits: within a few % of the logits' scale
        assert (a - b).abs().max() <= 0.05 * b.abs().max()


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="layers", n_layers=4), "cannot remove 4 of 4 layers"),
    (dict(method="layers", n_layers=9), "cannot remove 9 of 4 layers"),
    (dict(method="wanda", pattern="64:128"), "do not divide"),
])
def test_bad_structured_requests_are_errors(kwargs, message):
    src = tiny_llama(n_layers=4)
    cfg = PruneConfig(**kwargs, n_sequences=2, seq_len=16)
    with pytest.raises(LlmpressError, match=message):
        prune_model(src, cfg, FakeTokenizer())


@pytest.mark.slow
def test_a_pattern_that_divides_every_row_is_applied_to_every_linear():
    src = tiny_llama(n_layers=4)  # rows of 64 and 96 values: both divide by 8
    result = prune_model(src, PruneConfig(method="wanda", pattern="4:8", n_sequences=2,
                                          seq_len=16), FakeTokenizer())
    assert len(result.linears) == 4 * 7
    for linear in result.linears:
        name = f"blk.{linear.layer}.{linear.name}.weight"
        w = read_float(result.source.tensors[name])
        assert ((w != 0).reshape(w.shape[0], -1, 8).sum(-1) == 4).all(), name


@pytest.mark.parametrize("kwargs", [dict(method="prune"), dict(method="wanda", sparsity=1.0),
                                    dict(method="layers"), dict(method="width"),
                                    dict(method="width", ratio=1.2),
                                    dict(method="wanda", pattern="2:4", owl=True),
                                    dict(method="layers", ratio=0.2, pattern="2:4"),
                                    dict(method="sparsegpt", damp=-1.0)])
def test_bad_configs_are_errors(kwargs):
    with pytest.raises(LlmpressError):
        PruneConfig(**kwargs)


# --- distillation ---------------------------------------------------------------------------------
from llmpress.prune.distill import (  # noqa: E402
    DistillConfig, Student, batch_indices, distill, kd_loss, save_loss_curve,
)


def test_student_forward_equals_the_runtime_model():
    src = tiny_llama(n_layers=2)
    tokens = random_tokens(2, 12)
    student = Student(src, "cpu")
    with torch.no_grad():
        got = student(tokens)
    torch.testing.assert_close(got, logits_of(src, tokens), rtol=1e-5, atol=1e-5)


def test_kd_loss_is_kl_divergence():
    t, s = torch.randn(3, 7), torch.randn(3, 7)
    expected = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1),
                                          log_target=True, reduction="batchmean")
    assert kd_loss(s, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(t, t).item() == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_distillation_lowers_the_loss_keeps_zeros_and_resumes(tmp_path):
    teacher_src = tiny_llama(n_layers=3)
    teacher = LlamaModel(teacher_src, mode="exact")
    pruned = prune_model(teacher_src, PruneConfig(method="magnitude", sparsity=0.5))
    tokens = random_tokens(8, 24)
    ckpt = tmp_path / "kd.pt"
    cfg = DistillConfig(steps=6, lr=5e-3, batch_size=4, warmup=1, checkpoint=ckpt,
                        save_every=2)
    full = distill(pruned.source, teacher, tokens, cfg, masks=pruned.masks)
    assert full.losses[-1] < 0.7 * full.losses[0]
    w = full.weights["blk.1.ffn_up.weight"]
    assert ((w == 0) == ~pruned.masks["blk.1.ffn_up.weight"]).all()
    # interrupted after 5 steps (last checkpoint: step 4), then resumed: the same weights
    ckpt.unlink()

    def interrupt(step, steps, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(pruned.source, teacher, tokens, cfg, masks=pruned.masks, progress=interrupt)
    resumed = distill(pruned.source, teacher, tokens, cfg, masks=pruned.masks)
    assert resumed.resumed_from == 4 and len(resumed.losses) == 6
    torch.testing.assert_close(resumed.weights["blk.2.attn_q.weight"],
                               full.weights["blk.2.attn_q.weight"], rtol=1e-5, atol=1e-6)
    png = save_loss_curve(resumed.losses, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(tmp_path):
    teacher = LlamaModel(tiny_llama(n_layers=2), mode="exact")
    tokens = random_tokens(4, 16)
    ckpt = tmp_path / "kd.pt"
    cfg = DistillConfig(steps=1, checkpoint=ckpt)
    distill(tiny_llama(n_layers=2, seed=5), teacher, tokens, cfg)
    with pytest.raises(LlmpressError, match="another model"):
        distill(tiny_llama(n_layers=2, seed=6), teacher, tokens, cfg)
    ckpt.write_bytes(b"junk")
    with pytest.raises(LlmpressError, match="not a readable"):
        distill(tiny_llama(n_layers=2, seed=6), teacher, tokens, cfg)


def test_batches_cover_every_sequence_each_epoch():
    picks = torch.cat([batch_indices(s, 6, 2, seed=0) for s in range(3)])
    assert sorted(picks.tolist()) == list(range(6))


# --- output ---------------------------------------------------------------------------------------
from gguf import GGUFReader  # noqa: E402

from llmpress.io.gguf import load_gguf  # noqa: E402
from llmpress.prune.prune import write_pruned  # noqa: E402


@pytest.mark.slow
def test_width_pruned_model_written_in_input_types_reads_back(tmp_path):
    src = tiny_llama(n_layers=2, ffn=128, quant_type="Q8_0")
    result = prune_model(src, PruneConfig(method="width", ratio=0.5, n_sequences=4, seq_len=32),
                         FakeTokenizer())
    out = tmp_path / "pruned.gguf"
    report = write_pruned(result, out)
    reader = GGUFReader(out)  # gguf-py, the independent reader
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    assert shapes["blk.0.ffn_down.weight"] == (64, result.widths[0][2])
    assert shapes["blk.1.attn_q.weight"] == (result.widths[1][0] * 16, 64)
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("_q.weight")} == {"Q8_0"}
    assert int(reader.fields["llama.attention.key_length"].parts[-1][0]) == 16
    assert report.file_bytes == out.stat().st_size and report.zeros_kept is None
    written = load_gguf(out)
    tokens = random_tokens(1, 10)
    # Q8_0 of the sliced float weights: close to the in-memory pruned model
    torch.testing.assert_close(logits_of(written, tokens), logits_of(result.source, tokens),
                               rtol=0.05, atol=0.05)


@pytest.mark.parametrize("quant_type, exact", [("Q8_0", True), ("Q4_0", True), ("Q4_1", False)])
def test_sparse_zeros_after_requantizing(tmp_path, quant_type, exact):
    src = tiny_llama(n_layers=1, quant_type=quant_type)
    result = prune_model(src, PruneConfig(method="magnitude", sparsity=0.5))
    report = write_pruned(result, tmp_path / "sparse.gguf")
    assert report.types[quant_type] >= 7
    if exact:  # symmetric blocks store 0 exactly
        assert report.zeros_kept == 1.0
    else:  # a block minimum offsets every value: zeros survive only approximately
        assert 0 <= report.zeros_kept < 1.0


def test_layer_removed_then_quantized(tmp_path):
    src = tiny_llama(n_layers=3)
    result = prune_model(src, PruneConfig(method="layers", n_layers=1, n_sequences=2,
                                          seq_len=16), FakeTokenizer())
    report = write_pruned(result, tmp_path / "q.gguf", then_quantize="Q8_0")
    written = load_gguf(tmp_path / "q.gguf")
    assert written.metadata["llama.block_count"] == 2
    assert "blk.2.attn_q.weight" not in written.tensors
    assert report.types["Q8_0"] == 2 * 7 + 2  # and token_embd, output
    with pytest.raises(LlmpressError, match="overwrite the input"):
        write_pruned(result, src.path)


# --- the command ---------------------------------------------------------------------------------
from llmpress.cli import main  # noqa: E402


@pytest.fixture
def tiny_gguf(tmp_path):
    """A tiny random model as a Q8_0 GGUF file (magnitude pruning needs no tokenizer)."""
    src = tiny_llama(n_layers=2, quant_type="Q8_0")
    path = tmp_path / "tiny.gguf"
    dense = prune_model(src, PruneConfig(method="magnitude", sparsity=0.01))
    write_pruned(dense, path)
    return path


def test_cli_prune_prints_the_summary(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "sparse.gguf"
    assert main(["prune", str(tiny_gguf), "-o", str(out), "--method", "magnitude",
                 "--pattern", "2:4"]) == 0
    printed = capsys.readouterr().out
    assert "50.00%" in printed and "ffn_down" in printed and "still 0" in printed
    w = read_float(load_gguf(out).tensors["blk.1.attn_v.weight"])
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()


@pytest.mark.parametrize("args, words", [
    (["--method", "magnitude", "--sparsity", "1.5"], "between 0 and 1"),
    (["--method", "magnitude", "--pattern", "3:7"], "do not divide"),
    (["--method", "width"], "needs --ratio"),
])
def test_cli_bad_input_is_one_error_line(tiny_gguf, tmp_path, capsys, args, words):
    assert main(["prune", str(tiny_gguf), "-o", str(tmp_path / "x.gguf"), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


# --- Hugging Face directory output ------------------------------------------------------------
from llmpress.prune.prune import write_pruned_hf  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_width_pruned_hf_directory_matches_transformers(tmp_path, arch):
    """transformers, the independent reference, computes the same logits from the written
    directory as our runtime does from the pruned model."""
    from transformers import AutoModelForCausalLM

    src = tiny_llama(n_layers=3, n_heads=4, n_kv=2, ffn=128, arch=arch)
    result = prune_model(src, PruneConfig(method="width", ratio=0.3, n_sequences=4, seq_len=32),
                         FakeTokenizer())
    out = write_pruned_hf(result, tmp_path / "hf", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.intermediate_size == result.widths[0][2]
    tokens = random_tokens(2, 12)
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, logits_of(result.source, tokens), rtol=1e-4, atol=1e-4)
    with pytest.raises(LlmpressError, match="exists"):
        write_pruned_hf(result, out)


def test_per_layer_widths_cannot_go_to_a_hf_config(tmp_path):
    src = tiny_llama(n_layers=4, n_heads=4, n_kv=2, ffn=256)
    result = prune_model(src, PruneConfig(method="width", ratio=0.3, uniform=False,
                                          n_sequences=4, seq_len=32), FakeTokenizer())
    with pytest.raises(LlmpressError, match="--uniform"):
        write_pruned_hf(result, tmp_path / "hf")


def test_cli_writes_a_hf_directory(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "sparse-hf"
    assert main(["prune", str(tiny_gguf), "-o", str(out), "--method", "magnitude",
                 "--hf-dtype", "float32"]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert "directory size" in capsys.readouterr().out

"""Tiny random Gemma 3 and Gemma 2 models built in transformers, converted by our own HF
loader (io/hf.py: Gemma's name map, its (1 + w) norms, layer types, RoPE bases) and run
by models/gemma.py, against transformers' Gemma3ForCausalLM / Gemma2ForCausalLM.

The sliding window (8) is far shorter than the sequences, the local layers have their own
RoPE base, and Gemma 2 soft-caps attention scores and final logits, so each of those
paths decides the numbers. The same models in fast mode check the fused C decoder layers
(kernels/decode.c) against Gemma's torch layers running the same kernels, and that a
token's logits there are the same bits however the prompt is split or batched.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from tiny import greedy, logits_by_split, quantized

from llmpress.io.hf import load_hf_dir
from llmpress.kernels import cpu
from llmpress.models.gemma import GemmaModel

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, PROMPT, GREEDY_STEPS = 300, 48, 10, 64
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              query_pre_attn_scalar=16, sliding_window=8, layer_types=LAYER_TYPES,
              max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=None,
              eos_token_id=None, pad_token_id=None, tie_word_embeddings=True)
CASES = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    "gemma3-softcap": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        final_logit_softcapping=5.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 100_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}})),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})),
}


def build(case: str, directory):
    config_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # Gemma's norms start at w = 0 (a factor 1): make each matter
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(0.3 * noise if "norm" in name else 0.15 * noise)
    model.save_pretrained(directory)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_gemma_matches_transformers(case, tmp_path):
    hf = build(case, tmp_path)
    source = load_hf_dir(tmp_path)
    ours = GemmaModel(source, mode="exact")
    assert ours.cfg.local_layers == (True, True, False, True)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits[0]
    logits = ours(ids, ours.new_cache(SEQ))[0]
    diff, scale = (logits - ref).abs().max().item(), ref.abs().max().item()
    print(f"\n{case}: max |diff| {diff:.3g} (logit scale {scale:.3g})")
    assert diff <= 1e-4 * scale

    prompt = ids[:, :PROMPT]
    with torch.no_grad():
        hf_tokens = hf.generate(prompt, max_new_tokens=GREEDY_STEPS, min_new_tokens=GREEDY_STEPS,
                                do_sample=False)[0, PROMPT:].tolist()
    _, our_tokens = greedy(ours, prompt, GREEDY_STEPS)  # one token a step, the KV cache
    assert our_tokens == hf_tokens

    # fast mode: the packed Q8_0 kernels (8-bit activations, as llama.cpp's) against exact
    # mode on the same Q8_0 weights, both reading exact mode's greedy continuation
    q8 = quantized(source, GGMLQuantizationType.Q8_0)
    exact = GemmaModel(q8, mode="exact")
    _, exact_tokens = greedy(exact, prompt, GREEDY_STEPS)
    sequence = torch.cat([prompt, torch.tensor([exact_tokens])], dim=1)
    exact_logits = exact(sequence, exact.new_cache(sequence.shape[1]))[0]
    fast = GemmaModel(q8, mode="fast")
    fast_logits = fast(sequence, fast.new_cache(sequence.shape[1]))[0]
    relative = ((fast_logits - exact_logits).abs().max() / scale).item()
    same_top1 = (fast_logits.argmax(-1) == exact_logits.argmax(-1)).float().mean().item()
    print(f"fast vs exact: max |diff| {relative:.3g} of the logit scale, same top-1 {same_top1:.1%}")
    assert relative <= 0.06 and same_top1 >= 0.95  # measured: 0.020-0.039, 100%


# --- the fused C decoder layers -------------------------------------------------------

@pytest.fixture(scope="module")
def q8_sources(tmp_path_factory):
    """Per case, the tiny model with its weights in Q8_0 (built on first use)."""
    built = {}

    def source(case):
        if case not in built:
            directory = tmp_path_factory.mktemp(case)
            build(case, directory)
            built[case] = quantized(load_hf_dir(directory), GGMLQuantizationType.Q8_0,
                                    embedding=True)
        return built[case]
    return source


def kl(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                    reduction="batchmean").item()


@pytest.mark.skipif(not cpu.available(), reason="the C kernel was not built")
@pytest.mark.parametrize("case", ["gemma3", "gemma2", "gemma2-query-scale"])
def test_fused_layers_match_gemmas_torch_layers(q8_sources, case):
    """Fused (one C call per pass) against the torch layers on the same Q8_0 kernels, and
    both against exact mode: a 20-token prompt (the window is 8), then 20 one-token steps.
    gemma2-query-scale: both paths given a query scale other than 1/sqrt(head_dim)."""
    src = q8_sources(case.removesuffix("-query-scale"))
    fused, layers, exact = (GemmaModel(src, mode) for mode in ("fast", "fast", "exact"))
    assert fused.decoder is not None and exact.decoder is None
    layers.decoder = None  # the same kernels, one torch layer at a time
    if case.endswith("query-scale"):
        for model in (fused, layers, exact):
            for block in model.blocks:
                block.attn.scale = 0.2
        fused.decoder.shape.query_scale = 0.2
    models = (fused, layers, exact)
    caches = [m.new_cache(40) for m in models]
    prompt = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    steps = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(4))
    worst = [0.0, 0.0, 0.0]
    for tokens in [prompt] + [t.view(1, 1) for t in steps]:
        a, b, c = (m(tokens, cache)[0] for m, cache in zip(models, caches))
        scale = c.abs().max()
        worst = [max(worst[0], ((a - b).abs().max() / scale).item()),
                 max(worst[1], kl(a, c)), max(worst[2], kl(b, c))]
    print(f"\n{case}: fused vs torch layers max |diff| {worst[0]:.3g} of the logit scale; "
          f"KL to exact: fused {worst[1]:.3g}, torch layers {worst[2]:.3g}")
    assert worst[0] <= 1e-3  # measured: 2e-7 to 3e-7 (float order only)
    assert worst[1] <= 2 * worst[2] + 1e-5


@pytest.mark.skipif(not cpu.available(), reason="the C kernel was not built")
@pytest.mark.parametrize("isa", cpu.isas_here())
def test_fused_logits_do_not_depend_on_how_the_prompt_is_split_or_batched(q8_sources, isa):
    """Gemma 2 (soft-capping, window 8, two RoPE tables) through the fused layers: a
    30-token prompt whole, one token a call and in uneven pieces, with 1 or 2 threads,
    gives the same bits; so do sequences batched in one forward_batch pass, with prompt
    rows and one-token rows sharing a pass, against each alone."""
    model = GemmaModel(q8_sources("gemma2"), "fast")
    assert model.decoder is not None
    tokens = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(5))
    splits = [[30], [1] * 30, [12, 1, 17], [5, 3, 22]]
    previous_threads = torch.get_num_threads()
    cpu.use_isa(isa)
    try:
        results = [logits[0] for logits in logits_by_split(model, tokens, splits, [1, 2, 2, 1])]
        # three sequences: the first alone, then batched, each joining one pass later
        prompts = [tokens[0, :n].tolist() for n in (30, 11, 17)]
        caches = [model.new_cache(32) for _ in prompts]
        batched = [[] for _ in prompts]
        for step in range(3):
            active = list(range(step + 1))
            rows = model.forward_batch([(prompts[i] if len(batched[i]) == 0 else [7], caches[i])
                                        for i in active], [i == 0 and step == 0 for i in active])
            for i, logits in zip(active, rows):
                batched[i].append(logits)
        alone = []
        for prompt, rows in zip(prompts, batched):
            cache = model.new_cache(32)
            alone.append([model(torch.tensor([prompt]), cache, last_only=True)[0]]
                         + [model(torch.tensor([[7]]), cache)[0] for _ in rows[1:]])
    finally:
        cpu.use_isa("auto")
        torch.set_num_threads(previous_threads)
    for split, logits in zip(splits[1:], results[1:]):
        assert torch.equal(logits, results[0]), split
    assert torch.equal(batched[0][0], results[0])  # every row of the first prompt
    for i, (ours, theirs) in enumerate(zip(batched, alone)):
        assert len(ours) == 3 - i and all(torch.equal(a[-1:], b) for a, b in zip(ours, theirs)), i

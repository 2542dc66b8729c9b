"""The sequential calibration runner: calibration sequences go through the model one
decoder layer at a time, so memory is one layer plus the activations, never a second model.

    tokens = calibration_tokens(tokenizer, text, n_sequences=32, seq_len=256)   # calib.data
    def per_layer(step: LayerStep) -> None:
        grams = step.collect(["attn_q", "ffn_down"], init_gram, accumulate_gram)
        step.set_weight("ffn_down", new_weight(step.weight("ffn_down"), grams["ffn_down"]))
    hidden = run_layers(model, tokens, per_layer)          # (N, T, dim) after the last layer

For layer i the runner (1) holds its inputs X_i (N, T, dim) — the embeddings for layer 0,
(2) turns the layer's Linears into dense float32 weights, (3) calls `per_layer(step)`,
which may collect statistics from hooks on the layer's Linears (as many passes as it
likes: GPTQ's "true sequential" order re-collects after each group) and may replace
weights, (4) computes X_{i+1} = layer_i(X_i) with the weights as they are now — the
sequential scheme of SparseGPT/GPTQ (Frantar et al., "OPTQ", section 4: later layers see
the error of earlier ones) — and (5) puts the layer back as it was unless
`keep_changes=True`. The callback must therefore keep whatever new weights it wants.

Statistics are pure accumulators, `stats = accumulate(stats, x)` with x the Linear's input
flattened to (tokens, in_features) (DESIGN.md point 4):
- Gram: XᵀX and the token count — the Hessian 2XᵀX/n of SparseGPT and GPTQ;
- Moments: per-column sums of x and x² — Wanda's ‖x_j‖₂ (`column_norms`), the importance
  matrix's mean squares (`mean_squares`, as llama-imatrix accumulates them), FLAP's
  per-channel variance (`column_variance`).

Linear names are GGUF's tensor names without "blk.N." and ".weight": attn_q, attn_k,
attn_v, attn_output, ffn_gate, ffn_up, ffn_down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from llmpress.errors import LlmpressError
from llmpress.kernels.linear import QuantLinear
from llmpress.models.llama import Block, LlamaModel
from llmpress.models.kv_cache import KV_F32, CacheRows
from llmpress.models.moe import MoeFeedForward

LINEAR_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# --- statistics: pure accumulators ---------------------------------------------------------
@dataclass(frozen=True)
class Gram:
    xtx: torch.Tensor  # (in, in) float32: sum over tokens of x xᵀ
    count: int  # tokens seen

    def hessian(self) -> torch.Tensor:
        """2 XᵀX / n, the Hessian of the layer-wise squared error (SparseGPT eq. 1)."""
        return self.xtx * (2.0 / max(self.count, 1))


@dataclass(frozen=True)
class Moments:
    sum: torch.Tensor  # (in,) float64: sum over tokens of x_j
    sum_sq: torch.Tensor  # (in,) float64: sum over tokens of x_j²
    count: int

    def column_norms(self) -> torch.Tensor:
        """‖X_j‖₂ over all tokens (Wanda's activation norm), float32 (in,)."""
        return self.sum_sq.sqrt().float()

    def mean_squares(self) -> torch.Tensor:
        """E[x_j²] (llama-imatrix's per-column importance), float32 (in,)."""
        return (self.sum_sq / max(self.count, 1)).float()

    def column_variance(self) -> torch.Tensor:
        """Var[x_j] over tokens (FLAP's fluctuation), float32 (in,)."""
        n = max(self.count, 1)
        mean = self.sum / n
        return (self.sum_sq / n - mean * mean).clamp_min(0).float()


def init_gram(in_features: int, device: torch.device | str = "cpu") -> Gram:
    return Gram(torch.zeros(in_features, in_features, device=device), 0)


def accumulate_gram(stats: Gram, x: torch.Tensor) -> Gram:
    """x: (tokens, in). Returns stats with XᵀX of these tokens added."""
    x = x.float()
    return Gram(torch.addmm(stats.xtx, x.T, x), stats.count + x.shape[0])


def init_moments(in_features: int, device: torch.device | str = "cpu") -> Moments:
    zeros = torch.zeros(in_features, dtype=torch.float64, device=device)
    return Moments(zeros, zeros.clone(), 0)


def accumulate_moments(stats: Moments, x: torch.Tensor) -> Moments:
    """x: (tokens, in). Sums in float64 so long calibration runs lose no precision."""
    x = x.double()
    return Moments(stats.sum + x.sum(0), stats.sum_sq + (x * x).sum(0), stats.count + x.shape[0])


Init = Callable[[int, torch.device], object]
Accumulate = Callable[[object, torch.Tensor], object]


# --- one layer ----------------------------------------------------------------------------
def block_linears(block: Block) -> dict[str, QuantLinear]:
    """The Linears of a decoder layer by GGUF short name."""
    if isinstance(block.ffn, MoeFeedForward):  # statistics per expert: not yet
        raise LlmpressError("calibration (imatrix, GPTQ, AWQ, pruning by activations) does "
                            "not cover mixtures of experts yet")
    q, k, v = block.attn.qkv.linears
    gate, up = block.ffn.gate_up.linears
    return {"attn_q": q, "attn_k": k, "attn_v": v, "attn_output": block.attn.wo,
            "ffn_gate": gate, "ffn_up": up, "ffn_down": block.ffn.down}


class LayerStep:
    """What the per-layer callback sees: layer `index` (position in model.blocks; blk.N in
    the file is `gguf_index`), its inputs, dense float32 weights it may read and replace,
    statistics passes, and the layer's outputs with the current weights."""

    def __init__(self, model: LlamaModel, index: int, inputs: torch.Tensor, batch_size: int):
        self.model, self.index = model, index
        self.block: Block = model.blocks[index]
        self.gguf_index = model.cfg.layers[index].index
        self.inputs = inputs  # (N, T, dim), float32
        self.linears = block_linears(self.block)
        self.batch_size = batch_size
        self._outputs: torch.Tensor | None = None

    def weight(self, name: str) -> torch.Tensor:
        """float32 (out, in) weight of Linear `name` as it is now."""
        return self.linears[name].dense

    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        """Replace a weight for the rest of this step (and the layer's outputs)."""
        lin = self.linears[name]
        if tuple(weight.shape) != (lin.out_features, lin.in_features):
            raise ValueError(f"{name}: new weight {tuple(weight.shape)} != "
                             f"{(lin.out_features, lin.in_features)}")
        lin.dense = weight.to(lin.dense.device, torch.float32).contiguous()
        self._outputs = None

    def collect(self, names: Iterable[str] | Mapping[str, tuple[Init, Accumulate]],
                init: Init | None = None, accumulate: Accumulate | None = None) -> dict:
        """One pass over all inputs with hooks on the named Linears; returns {name: stats}
        where stats = accumulate(...accumulate(init(in_features, device), x1)..., xn) over
        the Linear's inputs (tokens, in_features). `names` may instead map each name to its
        own (init, accumulate) pair, e.g. {"attn_output": (init_gram, accumulate_gram),
        "ffn_down": (init_moments, accumulate_moments)}. The pass also yields the outputs."""
        pairs = (dict(names) if isinstance(names, Mapping)
                 else {n: (init, accumulate) for n in names})
        stats = {n: make(self.linears[n].in_features, self.inputs.device)
                 for n, (make, _) in pairs.items()}

        def hook_for(name):
            add = pairs[name][1]

            def hook(module, args, output):
                x = args[0]
                stats[name] = add(stats[name], x.reshape(-1, x.shape[-1]))
            return hook

        handles = [self.linears[n].register_forward_hook(hook_for(n)) for n in stats]
        try:
            self._outputs = self._forward()
        finally:
            for h in handles:
                h.remove()
        return stats

    def outputs(self) -> torch.Tensor:
        """(N, T, dim) outputs of the layer with the current weights (computed once)."""
        if self._outputs is None:
            self._outputs = self._forward()
        return self._outputs

    def _forward(self) -> torch.Tensor:
        return forward_block(self.model, self.index, self.inputs, self.batch_size)


@torch.inference_mode()
def forward_block(model: LlamaModel, index: int, inputs: torch.Tensor,
                  batch_size: int) -> torch.Tensor:
    """Layer `index` applied to full sequences (N, T, dim), batch_size sequences at a time,
    each with a fresh KV cache of its own length (no positions before them)."""
    block, cfg = model.blocks[index], model.cfg
    n_seq, seq_len, _ = inputs.shape
    rotation = model.rope.rotation(torch.arange(seq_len, device=model.device))
    outputs = torch.empty_like(inputs)
    lc = cfg.layers[index]
    for s in range(0, n_seq, batch_size):
        x = inputs[s:s + batch_size].to(model.device)
        keys, values = (CacheRows(KV_F32[0], x.shape[0], lc.n_kv_heads, seq_len, cfg.head_dim,
                                  model.device) for _ in range(2))
        y = block(x, model.rope, rotation, keys, values, 0)
        outputs[s:s + batch_size] = y.to(outputs.device)
    return outputs


# --- the whole model ---------------------------------------------------------------------
@torch.inference_mode()
def embed_tokens(model: LlamaModel, tokens: torch.Tensor, device=None) -> torch.Tensor:
    """(N, T) token ids -> (N, T, dim) float32 embeddings on `device` (default: the model's)."""
    return model.embed(tokens.to(model.device)).float().to(device or model.device)


def _make_dense(block: Block) -> list[tuple[QuantLinear, torch.Tensor | None, object]]:
    """Give every Linear of the block a dense float32 weight; return what to restore."""
    saved = []
    for lin in block_linears(block).values():
        saved.append((lin, lin.dense, lin.kernel))
        # a fresh copy: an F32 tensor's dense view aliases the read-only file mapping
        lin.dense = lin.dequantized().to(lin.rows.device).clone()
        lin.kernel = None
    for fused in (block.attn.qkv, block.ffn.gate_up):
        saved.append((fused, None, fused.kernel))
        fused.kernel = None  # the fused kernel reads the packed rows, not the new weights
    return saved


def _restore(saved) -> None:
    for module, dense, kernel in saved:
        if isinstance(module, QuantLinear):
            module.dense = dense
        module.kernel = kernel


def run_layers(model: LlamaModel, tokens: torch.Tensor,
               per_layer: Callable[[LayerStep], None] | None = None, *,
               batch_size: int = 8, activations_device: torch.device | str | None = None,
               keep_changes: bool = False,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run calibration sequences `tokens` (N, T) through `model` one decoder layer at a time.

    per_layer(step) is called once per layer, before its outputs are computed (see the
    module docstring). Activations live on `activations_device` (default: the model's
    device; "cpu" offloads them when the model is on a GPU). With keep_changes=False the
    model is left exactly as it was (packed weights and kernels); with True the weights set
    by the callback stay in the model as dense float32 (Linear.forward uses them; a fast
    model's fused one-token decoder still reads the packed rows, so build a new model from
    the new weights to generate with them). progress(done, total) is called
    after each layer. Returns the hidden states after the last layer, (N, T, dim) float32,
    before the final norm.
    """
    if tokens.dim() != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be (sequences, length), got {tuple(tokens.shape)}")
    hidden = embed_tokens(model, tokens, activations_device)
    n_layers = len(model.blocks)
    for i in range(n_layers):
        saved = _make_dense(model.blocks[i])
        try:
            step = LayerStep(model, i, hidden, batch_size)
            if per_layer is not None:
                per_layer(step)
            hidden = step.outputs()
        finally:
            if not keep_changes:
                _restore(saved)
        if progress is not None:
            progress(i + 1, n_layers)
    return hidden


@torch.inference_mode()
def final_logits(model: LlamaModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (N, T, vocab) from the runner's last hidden states (final norm + head)."""
    from llmpress.models.llama import rms_norm
    return model.output(rms_norm(hidden.to(model.device), model.norm, model.cfg.norm_eps))

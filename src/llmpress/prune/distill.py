"""Recovery after pruning: a short knowledge-distillation run.

The pruned model (the student) learns to match the original model's (the teacher's)
next-token distributions on calibration text: loss = KL(p_teacher ‖ p_student) per token,
averaged (Hinton et al. 2015; the recovery step of Sheared-LLaMA / Minitron-style
pruning). The runtime model is inference-only, so the student is a float32 copy of the
pruned model whose decoder Linear weights and RMSNorm weights are torch Parameters; the
embedding and output head stay frozen. Pruned zeros stay zero (gradients and weights are
masked). The run checkpoints every few steps to one file (written to a temporary name,
then renamed) and resumes from it.

    result = distill(pruned_source, teacher_model, tokens, DistillConfig(steps=50))
    new_source = in_memory_source(path, metadata, {**pruned_source.tensors, **result.weights})
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from llmpress.calib.runner import block_linears
from llmpress.errors import LlmpressError
from llmpress.io.files import replacing
from llmpress.io.source import ModelSource
from llmpress.models.kv_cache import KV_F32, CacheRows
from llmpress.models.llama import LlamaModel, rms_norm


@dataclass(frozen=True)
class DistillConfig:
    steps: int
    lr: float = 2e-4  # bench_prune: 60 steps at 2e-4 took 25% layer removal from PPL 105 to 95
    batch_size: int = 2
    temperature: float = 1.0
    warmup: int = 5  # steps of linear learning-rate warm-up, then cosine decay to 10%
    checkpoint: Path | None = None  # resumes from it when it exists
    save_every: int = 10
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise LlmpressError(f"--distill {self.steps}: give at least 1 step")
        if not 0 < self.lr < 1:
            raise LlmpressError(f"--lr {self.lr}: use a small positive rate such as 2e-4")
        if self.batch_size < 1 or self.temperature <= 0:
            raise LlmpressError("distillation needs a batch of at least 1 and a positive "
                                "temperature")


@dataclass
class DistillResult:
    weights: dict[str, torch.Tensor]  # GGUF name -> trained float32 tensor
    losses: list[float]  # KD loss of every step from the first (resumed runs included)
    steps_done: int
    resumed_from: int  # 0 for a fresh run


# --- the loss ----------------------------------------------------------------------------------
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(softmax(t/T) ‖ softmax(s/T)) · T² (Hinton et al.'s scaling
    keeps gradient sizes independent of T)."""
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() * temperature ** 2


def learning_rate(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of cfg.lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(step: int, n_sequences: int, batch_size: int, seed: int) -> torch.Tensor:
    """Sequences of step `step`: epochs are seeded permutations, so a resumed run sees the
    same batches as an uninterrupted one."""
    first = step * batch_size
    picks = []
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, n_sequences)
        order = torch.randperm(n_sequences, generator=torch.Generator().manual_seed(seed + epoch))
        picks.append(int(order[offset]))
    return torch.tensor(picks)


# --- the trainable student ------------------------------------------------------------------------
class Student(nn.Module):
    """A float32, autograd-capable copy of a (pruned) Llama-family model."""

    def __init__(self, source: ModelSource, device: torch.device | str):
        super().__init__()
        model = LlamaModel(source, mode="exact", device=device)
        self.model = model
        self.trainable: dict[str, nn.Parameter] = {}
        for lc, block in zip(model.cfg.layers, model.blocks):
            prefix = f"blk.{lc.index}."
            for name, lin in block_linears(block).items():
                lin.dense = nn.Parameter(lin.dequantized().to(model.device).clone())
                lin.kernel = None
                self.trainable[prefix + name + ".weight"] = lin.dense
            for fused in (block.attn.qkv, block.ffn.gate_up):
                fused.kernel = None
            block.attn_norm = nn.Parameter(block.attn_norm.clone())
            block.ffn_norm = nn.Parameter(block.ffn_norm.clone())
            self.trainable[prefix + "attn_norm.weight"] = block.attn_norm
            self.trainable[prefix + "ffn_norm.weight"] = block.ffn_norm
        if model.output.dense is None:  # frozen head: dequantize once, not every step
            model.output.dense = model.output.dequantized().to(model.device)
        model.decoder = None  # the fused decoder reads packed rows, not these parameters

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) -> logits (B, T, vocab), with gradients to the trainable weights."""
        m, cfg = self.model, self.model.cfg
        B, T = tokens.shape
        with torch.no_grad():
            x = m.embed(tokens.to(m.device))
        rotation = m.rope.rotation(torch.arange(T, device=m.device))
        for lc, block in zip(cfg.layers, m.blocks):
            # separate float32 buffers: the block writes k and v into them in place
            cache_k, cache_v = (CacheRows(KV_F32[0], B, lc.n_kv_heads, T, cfg.head_dim, m.device)
                                for _ in range(2))
            x = block(x, m.rope, rotation, cache_k, cache_v, 0)
        return m.output(rms_norm(x, m.norm, cfg.norm_eps))


@torch.inference_mode()
def teacher_logits(teacher: LlamaModel, tokens: torch.Tensor) -> torch.Tensor:
    cache = teacher.new_cache(tokens.shape[1], batch=tokens.shape[0])
    return teacher(tokens.to(teacher.device), cache)


# --- checkpoints ----------------------------------------------------------------------------------
def _fingerprint(student: Student, cfg: DistillConfig, n_sequences: int) -> dict:
    """What must match for a checkpoint to be resumed: settings and the starting weights."""
    settings = {k: v for k, v in asdict(cfg).items()
                if k in ("lr", "batch_size", "temperature", "warmup", "seed")}
    weights = {name: [list(p.shape), float(p.detach().double().sum())]
               for name, p in student.trainable.items()}
    return {"settings": settings, "n_sequences": n_sequences, "weights": weights}


def _same_fingerprint(a: dict, b: dict) -> bool:
    if a["settings"] != b["settings"] or a["n_sequences"] != b["n_sequences"]:
        return False
    if a["weights"].keys() != b["weights"].keys():
        return False
    return all(a["weights"][k][0] == b["weights"][k][0]
               and math.isclose(a["weights"][k][1], b["weights"][k][1], rel_tol=1e-6, abs_tol=1e-6)
               for k in a["weights"])


def save_checkpoint(path: Path, state: dict) -> None:
    with replacing(path, suffix=".partial") as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: one clear line
        raise LlmpressError(f"{path}: not a readable distillation checkpoint ({exc}); delete it "
                            "or choose another --checkpoint") from None


# --- the run --------------------------------------------------------------------------------------
def distill(student_source: ModelSource, teacher: LlamaModel, tokens: torch.Tensor,
            cfg: DistillConfig, masks: dict[str, torch.Tensor] | None = None,
            progress: Callable[[int, int, float], None] | None = None) -> DistillResult:
    """Train the student (built from student_source) toward `teacher` on `tokens` (N, T)
    for cfg.steps steps. masks: GGUF name -> bool keep-mask of pruned weights to hold at
    zero. progress(step, steps, loss) after each step."""
    device = torch.device(cfg.device or teacher.device)
    torch.manual_seed(cfg.seed)
    student = Student(student_source, device)
    if student.model.cfg.vocab_size != teacher.cfg.vocab_size:
        raise LlmpressError("the pruned model and the original have different vocabularies")
    params = list(student.trainable.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    masks = {n: m.to(device) for n, m in (masks or {}).items() if n in student.trainable}
    fingerprint = _fingerprint(student, cfg, tokens.shape[0])
    losses: list[float] = []
    start = 0
    if cfg.checkpoint is not None and Path(cfg.checkpoint).exists():
        state = load_checkpoint(Path(cfg.checkpoint))
        saved = state.get("fingerprint") if isinstance(state, dict) else None
        if saved is None or not _same_fingerprint(saved, fingerprint):
            raise LlmpressError(f"{cfg.checkpoint}: checkpoint of another model, pruning or "
                                "settings; delete it or choose another --checkpoint")
        with torch.no_grad():
            for name, p in student.trainable.items():
                p.copy_(state["weights"][name].to(device))
        optimizer.load_state_dict(state["optimizer"])
        losses, start = list(state["losses"]), int(state["step"])
    resumed_from = start

    def checkpoint(step: int) -> None:
        if cfg.checkpoint is None:
            return
        save_checkpoint(Path(cfg.checkpoint), {
            "step": step, "losses": losses, "fingerprint": fingerprint,
            "optimizer": optimizer.state_dict(),
            "weights": {n: p.detach().cpu() for n, p in student.trainable.items()}})

    student.train()
    for step in range(start, cfg.steps):
        batch = tokens[batch_indices(step, tokens.shape[0], cfg.batch_size, cfg.seed)]
        target = teacher_logits(teacher, batch).to(device).clone()  # a normal tensor again
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        loss = kd_loss(student(batch), target, cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if masks:
            with torch.no_grad():
                for name, keep in masks.items():
                    student.trainable[name].mul_(keep)
        losses.append(loss.item())
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            checkpoint(step + 1)
        if progress is not None:
            progress(step + 1, cfg.steps, losses[-1])
    weights = {n: p.detach().cpu().clone() for n, p in student.trainable.items()}
    return DistillResult(weights, losses, max(cfg.steps, start), resumed_from)


def save_loss_curve(losses: list[float], path: str | Path, title: str = "distillation") -> Path:
    """KD loss per step (and its 10-step moving average) as a PNG."""
    from llmpress.eval.report import pyplot

    plt = pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="KD loss")
    if len(losses) >= 10:
        kernel = torch.ones(10) / 10
        smooth = torch.conv1d(torch.tensor(losses)[None, None], kernel[None, None])[0, 0]
        ax.plot(range(10, len(losses) + 1), smooth.tolist(), lw=1.6, label="10-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher ‖ student), nats/token")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path

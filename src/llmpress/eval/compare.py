"""One base model against candidates on one text: PPL and KL divergence of each against the
base (the base's log-probs computed once, or read from a `--save-base` file), then the
speed and peak RSS of each in a process of its own. `llmpress compare` and `sweep` show
and write what this returns."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

from llmpress.errors import LlmpressError
from llmpress.eval import kld as K
from llmpress.eval.perplexity import perplexity_with_error, text_windows
from llmpress.eval.report import ModelRow
from llmpress.eval.speed import BenchSettings, measure_speed_isolated

DEFAULT_CTX = 512  # llama-perplexity's default

WindowUpdate = Callable[[int, int, str], None]  # (windows done, total, running estimate)


class CompareProgress(Protocol):
    """How a caller shows the long steps; `SILENT` shows nothing."""

    def status(self, text: str) -> AbstractContextManager: ...

    def windows(self, label: str) -> AbstractContextManager[WindowUpdate]: ...


class _Silent:
    def status(self, text: str) -> AbstractContextManager:
        return nullcontext()

    def windows(self, label: str) -> AbstractContextManager[WindowUpdate]:
        return nullcontext(lambda done, total, estimate: None)


SILENT: CompareProgress = _Silent()


@dataclass(frozen=True)
class CompareConfig:
    base: str
    candidates: tuple[str, ...]
    text: str | None
    ctx: int = DEFAULT_CTX
    chunks: int | None = None
    mode: str = "exact"
    device: str | None = None
    base_logits: str | None = None  # reuse a --save-base file instead of running the base
    bench: BenchSettings | None = BenchSettings()
    labels: tuple[str, ...] = ()  # one per candidate; default: the file names

    def __post_init__(self) -> None:
        from llmpress import hub
        if not self.candidates:
            raise LlmpressError("compare needs at least one candidate model after the base")
        if self.text is None and self.base_logits is None:
            raise LlmpressError("give the evaluation text with --text FILE (or --base-logits)")
        for path in (self.base, *self.candidates):
            hub.resolve(path)  # a clear error for a missing file, before any work
        if self.labels and len(self.labels) != len(self.candidates):
            raise LlmpressError("give one --label per candidate")


def _row_from_kld(label: str, lm, kld) -> ModelRow:
    info, s = lm.info(), kld.summary
    return ModelRow(label=label, path=info.path, file_bytes=info.file_bytes,
                    bits_per_weight=info.bits_per_weight, ppl=s.ppl, ppl_error=s.ppl_error,
                    delta_ppl=s.ppl - s.ppl_base, kld_mean=s.kld_mean, kld_error=s.kld_error,
                    kld_p99=s.kld_percentiles["99"], same_top=s.same_top)


def compare_models(cfg: CompareConfig, progress: CompareProgress = SILENT
                   ) -> tuple[list[ModelRow], dict]:
    """Rows for the base and each candidate, and the settings they were measured with."""
    from llmpress.api import load

    def load_model(model: str, ctx: int):
        with progress.status(f"loading {model} ..."):
            return load(model, mode=cfg.mode, device=cfg.device, ctx=ctx)

    base_lm = load_model(cfg.base, cfg.ctx)
    if cfg.base_logits:
        base = K.load_base(cfg.base_logits).first_windows(cfg.chunks)
        K.check_vocabulary(base_lm, base.n_vocab, cfg.base_logits)
        base_nll = -base.rows.target_log_prob
    else:
        with progress.status("tokenizing ..."):
            tokens, plan = text_windows(base_lm.tokenizer, cfg.text, cfg.ctx, cfg.chunks)
        with progress.windows(f"base {Path(cfg.base).name}") as update:
            base, base_nll = K.record_base(base_lm, tokens, plan, update)
    estimate = perplexity_with_error(base_nll)
    info = base_lm.info()
    rows = [ModelRow(label=Path(info.path).name, path=info.path, file_bytes=info.file_bytes,
                     bits_per_weight=info.bits_per_weight, ppl=estimate.ppl,
                     ppl_error=estimate.error, delta_ppl=0.0, kld_mean=0.0, kld_error=0.0,
                     kld_p99=0.0, same_top=1.0, is_base=True)]
    del base_lm
    labels = cfg.labels or tuple(Path(c).name for c in cfg.candidates)
    for label, candidate in zip(labels, cfg.candidates):
        lm = load_model(candidate, base.n_ctx)
        with progress.windows(label) as update:
            # the candidate's own tokenizer is checked against the base's tokens
            rows.append(_row_from_kld(label, lm, K.kld_on_text(lm, base, cfg.text,
                                                               progress=update)))
        del lm
    if cfg.bench is not None:
        for i, row in enumerate(rows):
            with progress.status(f"speed of {row.label} ..."):
                speed = measure_speed_isolated(row.path, cfg.device, cfg.bench)
            rows[i] = replace(row, prompt_tok_s=speed["prompt_tok_s"],
                              gen_tok_s=speed["gen_tok_s"], peak_rss_bytes=speed["peak_rss_bytes"])
    settings = {"base": cfg.base, "text": cfg.text, "base_logits": cfg.base_logits,
                "ctx": base.n_ctx, "windows": base.n_windows,
                "scored_tokens": base.plan.n_scored, "quality_mode": cfg.mode,
                "speed": None if cfg.bench is None else asdict(cfg.bench) | {"mode": "fast"}}
    return rows, settings

"""What `compare` and `sweep` show: one row of numbers per model, a rich table, JSON and
CSV of the same rows, a size-against-KLD plot with the Pareto front, a recommendation."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rich.table import Table

from llmpress.errors import LlmpressError
from llmpress.io.files import write_bytes_atomically

MIB = 2 ** 20


@dataclass(frozen=True)
class ModelRow:
    """One model measured against the base (the base's own row has KLD 0)."""

    label: str
    path: str
    file_bytes: int
    bits_per_weight: float
    ppl: float
    ppl_error: float
    delta_ppl: float  # PPL - PPL(base)
    kld_mean: float
    kld_error: float
    kld_p99: float
    same_top: float  # fraction of tokens whose most likely token is the base's
    is_base: bool = False
    prompt_tok_s: float | None = None  # fast mode, like `llmpress bench`
    gen_tok_s: float | None = None
    peak_rss_bytes: int | None = None


def pareto_front(sizes: list[float], costs: list[float]) -> list[bool]:
    """True where no other point is at least as small and as good and better in one."""
    front = []
    for i, (s, c) in enumerate(zip(sizes, costs)):
        dominated = any(s2 <= s and c2 <= c and (s2 < s or c2 < c)
                        for j, (s2, c2) in enumerate(zip(sizes, costs)) if j != i)
        front.append(not dominated)
    return front


def recommend(rows: list[ModelRow], kld_budget: float) -> ModelRow | None:
    """The smallest file whose mean KLD is within the budget (ties: lower KLD). The base
    counts too (KLD 0): when it is already the smallest, the advice is to keep it."""
    fits = [r for r in rows if r.kld_mean <= kld_budget]
    return min(fits, key=lambda r: (r.file_bytes, r.kld_mean, not r.is_base), default=None)


def recommendation_line(rows: list[ModelRow], kld_budget: float) -> str:
    best = recommend(rows, kld_budget)
    if best is None:
        return (f"no model stays within a mean KLD of {kld_budget:g}; raise the budget or "
                "try larger types")
    if best.is_base:
        return (f"recommended: keep the base {best.label} ({best.file_bytes / MIB:.1f} MiB): "
                f"no candidate is smaller within a mean KLD of {kld_budget:g}")
    return (f"recommended: {best.label} ({best.file_bytes / MIB:.1f} MiB, "
            f"{best.bits_per_weight:.2f} bpw), the smallest within a mean KLD of {kld_budget:g} "
            f"(KLD {best.kld_mean:.4f}, PPL {best.ppl:.3f}, same top-1 {100 * best.same_top:.1f}%)")


# --- presentation ----------------------------------------------------------------------
def _optional(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def comparison_table(rows: list[ModelRow], title: str = "") -> Table:
    table = Table(title=title or None)
    for name in ("model", "size", "bpw", "PPL", "ΔPPL", "mean KLD", "same top-1",
                 "gen tok/s", "peak RSS"):
        table.add_column(name, justify="left" if name == "model" else "right")
    front = pareto_front([r.file_bytes for r in rows], [r.kld_mean for r in rows])
    for row, on_front in zip(rows, front):
        label = row.label + (" (base)" if row.is_base else "") + (" *" if on_front else "")
        table.add_row(
            label, f"{row.file_bytes / MIB:.1f} MiB", f"{row.bits_per_weight:.2f}",
            f"{row.ppl:.3f}", f"{row.delta_ppl:+.3f}",
            "0" if row.is_base else f"{row.kld_mean:.5f}",
            f"{100 * row.same_top:.2f}%", _optional(row.gen_tok_s, ".1f"),
            "-" if row.peak_rss_bytes is None else f"{row.peak_rss_bytes / MIB:.0f} MiB",
        )
    return table


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def report_dict(rows: list[ModelRow], settings: dict[str, Any], kld_budget: float) -> dict:
    best = recommend(rows, kld_budget)
    front = pareto_front([r.file_bytes for r in rows], [r.kld_mean for r in rows])
    return {
        "settings": settings,
        "models": [{k: _finite(v) for k, v in asdict(r).items()} | {"pareto": f}
                   for r, f in zip(rows, front)],
        "kld_budget": kld_budget,
        "recommended": None if best is None else best.label,
    }


def write_json(report: dict, path: str | Path) -> None:
    write_bytes_atomically(Path(path), (json.dumps(report, indent=2) + "\n").encode())


def write_csv(rows: list[ModelRow], path: str | Path) -> None:
    names = [f.name for f in fields(ModelRow)]
    front = pareto_front([r.file_bytes for r in rows], [r.kld_mean for r in rows])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names + ["pareto"])
    for row, on_front in zip(rows, front):
        writer.writerow(["" if getattr(row, n) is None else getattr(row, n) for n in names]
                        + [on_front])
    write_bytes_atomically(Path(path), out.getvalue().encode())


def pyplot():
    """matplotlib's pyplot, drawing to files only; a clear error when the optional
    dependency is missing."""
    try:
        import matplotlib
    except ImportError:
        raise LlmpressError("plots need matplotlib: pip install 'llmpress[plot]'") from None
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def front_line(rows: list[ModelRow]) -> list[ModelRow]:
    """The rows on the Pareto front of size and mean KLD, by size: what the plot joins.
    The base (KLD 0) is one of its points: every larger file is worse than keeping it."""
    front = pareto_front([r.file_bytes for r in rows], [r.kld_mean for r in rows])
    return sorted((r for r, f in zip(rows, front) if f), key=lambda r: r.file_bytes)


def plot_size_vs_kld(rows: list[ModelRow], path: str | Path, title: str = "",
                     kld_budget: float | None = None) -> None:
    """PNG: file size (MiB) against mean KLD. The axis is logarithmic above the smallest
    nonzero KLD and linear below it, so the base (KLD 0) is drawn where it is, as a point
    of the Pareto front (red, joined); the budget, when given, is a horizontal line and the
    recommendation a star."""
    plt = pyplot()
    on_front = {id(r) for r in front_line(rows)}
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for row in rows:
        ax.scatter(row.file_bytes / MIB, row.kld_mean, s=60 if row.is_base else 36, zorder=3,
                   marker="s" if row.is_base else "o",
                   color="tab:red" if id(row) in on_front else "tab:gray")
        label = f"{row.label} (base)" if row.is_base else row.label
        ax.annotate(label, (row.file_bytes / MIB, row.kld_mean), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    line = [(r.file_bytes / MIB, r.kld_mean) for r in front_line(rows)]
    if len(line) > 1:
        ax.plot(*zip(*line), color="tab:red", lw=1.2, zorder=2, label="Pareto front")
    if kld_budget is not None:
        ax.axhline(kld_budget, color="tab:green", ls=":", lw=1, label=f"budget {kld_budget:g}")
        best = recommend(rows, kld_budget)
        if best is not None:
            ax.scatter(best.file_bytes / MIB, best.kld_mean, s=220, marker="*", zorder=4,
                       color="gold", edgecolors="black", label=f"recommended: {best.label}")
    positive = [r.kld_mean for r in rows if r.kld_mean > 0]
    if positive:
        ax.set_yscale("symlog", linthresh=min(positive))
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL divergence from the base (nats)")
    ax.set_title(title or "size against quality loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes_atomically(Path(path), buffer.getvalue())

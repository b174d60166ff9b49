"""Figures from collected results (PNG, matplotlib, no display needed): one line per setting,
points at the mean over seeds, error bars one sample std."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.identity import DEFAULT_STAGE, STAGES  # noqa: E402
from analysis.tables import select  # noqa: E402


def _label(setting: pd.Series, *parts: str) -> str:
    extra = [setting["detail"]] if setting["detail"] else []
    return " ".join([*(str(setting[p]) for p in parts), *extra])


def _stage_order(setting: pd.DataFrame) -> tuple:
    row = setting.iloc[0]
    stage = STAGES.index(row["stage"]) if row["stage"] in STAGES else len(STAGES)
    return row["model"], stage, row["detail"]


def _line(ax, part: pd.DataFrame, x: str, y: str, label: str) -> None:
    part = part.sort_values(f"{x}_mean")
    ax.errorbar(part[f"{x}_mean"], part[f"{y}_mean"], yerr=part[f"{y}_std"].fillna(0),
                xerr=part[f"{x}_std"].fillna(0), marker="o", capsize=2, label=label)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_vs_flops(runs: pd.DataFrame, out: Path) -> list[Path]:
    """One figure per task: pruned metric against the FLOPs kept, one line per model and stage
    (FLOPs constraints, variant ``default``)."""
    paths = []
    sel = select(runs, variants=["default"])
    for task, part in (sel.groupby("task") if not sel.empty else []):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for _, g in sorted(part.groupby("setting"), key=lambda kv: _stage_order(kv[1])):
            _line(ax, g, "flops_ratio", "pruned", _label(g.iloc[0], "model", "stage"))
        for _, g in part.groupby("model"):
            ax.axhline(g["baseline_mean"].mean(), ls="--", lw=0.8, color="gray")
        ax.set_xlabel("FLOPs kept (fraction)")
        ax.set_ylabel(f"{part['metric'].iloc[0]} (%)")
        ax.set_title(f"{task}: accuracy vs FLOPs (dashed: unpruned)")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / f"accuracy_vs_flops_{task}.png"))
    return paths


def accuracy_vs_latency(runs: pd.DataFrame, out: Path) -> list[Path]:
    """One figure per task: pruned metric against the measured latency ratio, latency- and
    FLOPs-constrained runs (default pipeline): at equal latency, which is more accurate."""
    sel = select(runs, kind=None, stages=[DEFAULT_STAGE], variants=["default"])
    sel = sel[sel["latency_ratio_n"] > 0] if not sel.empty else sel
    paths = []
    for task, part in (sel.groupby("task") if not sel.empty else []):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for _, g in part.groupby("setting"):
            _line(ax, g, "latency_ratio", "pruned", _label(g.iloc[0], "model", "kind"))
        ax.set_xlabel("measured latency ratio (pruned / unpruned)")
        ax.set_ylabel(f"{part['metric'].iloc[0]} (%)")
        ax.set_title(f"{task}: accuracy vs measured latency")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / f"accuracy_vs_latency_{task}.png"))
    return paths


def speedup_vs_flops(runs: pd.DataFrame, out: Path) -> Path | None:
    """Measured speedup against the FLOPs kept, one line per model, task, constraint kind."""
    sel = select(runs, kind=None, stages=[DEFAULT_STAGE], variants=["default"])
    sel = sel[sel["speedup_n"] > 0] if not sel.empty else sel
    if sel.empty:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for _, g in sel.groupby("setting"):
        _line(ax, g, "flops_ratio", "speedup", _label(g.iloc[0], "model", "task", "kind"))
    ax.set_xlabel("FLOPs kept (fraction)")
    ax.set_ylabel("measured speedup (baseline / pruned latency)")
    ax.legend(fontsize=7)
    return _save(fig, out / "speedup_vs_flops.png")


def time_breakdown(runs: pd.DataFrame, out: Path) -> Path | None:
    """Seconds per stage of the default pipeline, mean over the runs that computed their
    Fisher information (a cache hit hides it)."""
    stages = ["t_fisher", "t_search", "t_rearrange", "t_tune", "t_physical"]
    if runs.empty or "seed" not in runs.columns:
        return None
    keep = set(select(runs, stages=[DEFAULT_STAGE], variants=["default"])["setting"])
    data = runs[runs["setting"].isin(keep) & (runs["fisher_cache_hit"] != True)]  # noqa: E712
    data = data.dropna(subset=["t_tune"])
    if data.empty:
        return None
    data = data.assign(run=[_label(r, "model", "task") for _, r in data.iterrows()])
    agg = data.groupby("run")[stages].mean().fillna(0.0)
    ax = agg.plot.barh(stacked=True, figsize=(7.5, 0.6 * len(agg) + 1.5))
    ax.set_xlabel("seconds")
    ax.set_title("pruning time by stage (mean over runs)")
    ax.legend([s[2:] for s in stages], fontsize=7)
    return _save(ax.get_figure(), out / "time_breakdown.png")


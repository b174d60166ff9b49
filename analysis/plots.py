"""Figures from collected results (PNG, matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def accuracy_vs_flops(df: pd.DataFrame, out: Path) -> list[Path]:
    """One figure per task: pruned metric against the FLOPs kept, one line per model/stage."""
    paths = []
    for task, part in df.groupby("task"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for (model, stage), g in part.groupby(["model", "stage"]):
            g = g.groupby("flops_ratio", as_index=False)["pruned"].mean()
            ax.plot(g["flops_ratio"], g["pruned"], marker="o", label=f"{model} {stage}")
        for _, g in part.groupby("model"):
            ax.axhline(g["baseline"].mean(), ls="--", lw=0.8, color="gray")
        ax.set_xlabel("FLOPs kept (fraction)")
        ax.set_ylabel(f"{part['metric'].iloc[0]} (%)")
        ax.set_title(f"{task}: accuracy vs FLOPs (dashed: unpruned)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"accuracy_vs_flops_{task}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def speedup_vs_flops(df: pd.DataFrame, out: Path) -> Path | None:
    data = df.dropna(subset=["speedup"])
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (model, task), g in data.groupby(["model", "task"]):
        g = g.sort_values("flops_ratio")
        ax.plot(g["flops_ratio"], g["speedup"], marker="o", label=f"{model} {task}")
    ax.set_xlabel("FLOPs kept (fraction)")
    ax.set_ylabel("measured speedup (baseline / pruned latency)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "speedup_vs_flops.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def time_breakdown(df: pd.DataFrame, out: Path) -> Path | None:
    stages = ["t_fisher", "t_search", "t_rearrange", "t_tune", "t_physical"]
    data = df[df["stage"] == "+tune"].dropna(subset=["t_tune"])
    data = data[data["fisher_cache_hit"] != True]  # noqa: E712 - a cache hit hides the Fisher
    if data.empty:
        return None
    agg = data.groupby(["model", "task"])[stages].mean().fillna(0.0)
    ax = agg.plot.barh(stacked=True, figsize=(6, 0.6 * len(agg) + 1.5))
    ax.set_xlabel("seconds")
    ax.set_title("pruning time by stage")
    ax.legend([s[2:] for s in stages], fontsize=7)
    fig = ax.get_figure()
    fig.tight_layout()
    path = out / "time_breakdown.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

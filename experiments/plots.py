"""The figure a family run leaves beside its records (PNG, matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def family_plot(records: list, path: Path) -> Path:
    """Pruned metric (left axis) and measured latency ratio (right axis) against FLOPs kept
    (``experiments.records.Record`` items)."""
    records = sorted(records, key=lambda r: r.flops["ratio"])
    key = records[0].metric
    x = [r.flops["ratio"] for r in records]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, [100 * r.pruned[key] for r in records], marker="o", label=f"pruned {key}")
    ax.axhline(100 * records[0].baseline[key], ls="--", lw=0.8, color="gray",
               label="unpruned")
    ax.set_xlabel("FLOPs kept (fraction)")
    ax.set_ylabel(f"{key} (%)")
    lat = [(xi, r.latency["ratio"]) for xi, r in zip(x, records, strict=True) if r.latency]
    if lat:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in lat], [p[1] for p in lat], marker="s", color="tab:red",
                 label="latency ratio")
        ax2.set_ylabel("measured latency (fraction of unpruned)")
        ax2.legend(loc="lower right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(f"{records[0].model} / {records[0].task}: one Fisher pass")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

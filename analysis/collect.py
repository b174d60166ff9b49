"""Collect every run's ``results.json`` into one pandas table (one row per run)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

COLUMNS = ["model", "task", "kind", "constraint", "stage", "seed", "num_samples", "tune_samples",
           "metric", "baseline", "pruned", "drop", "flops_ratio", "latency_ratio", "speedup",
           "heads_kept", "neurons_kept", "t_fisher", "t_search", "t_rearrange", "t_tune",
           "t_physical", "t_pruning", "fisher_cache_hit", "path"]


def stage_of(prune_cfg: dict) -> str:
    """The ablation label of a run: how far its pipeline went."""
    if prune_cfg.get("tune"):
        label = "+tune" if prune_cfg.get("rearrange") else "search+tune"
        return label + (" (TA)" if prune_cfg.get("tune_teacher") == "ta" else "")
    return "+rearrange" if prune_cfg.get("rearrange") else "search"


def tuned_on(cap: int | None, num_samples: int | None) -> int | None:
    """How many samples mask tuning used: ``prune.tune_samples`` capped at the sample count;
    unset (results made before the option, or ``null``) means all of them."""
    return min(cap, num_samples) if cap and num_samples else num_samples


def tune_samples_of(record: dict) -> int | None:
    cap = record.get("config", {}).get("prune", {}).get("tune_samples")
    return tuned_on(cap, record.get("num_samples"))


def row_of(record: dict, path: Path) -> dict:
    key, t = record["metric"], record.get("timings", {})
    latency = record.get("latency") or {}
    return {
        "model": record["model"], "task": record["task"],
        "kind": record.get("constraint_kind", "flops"),
        "constraint": float(record["constraint"]),
        "stage": stage_of(record.get("config", {}).get("prune", {})),
        "seed": record.get("seed", 0), "num_samples": record.get("num_samples"),
        "tune_samples": tune_samples_of(record), "metric": key,
        "baseline": 100 * record["baseline"][key],
        "pruned": 100 * record["pruned"][key], "drop": record["drop"],
        "flops_ratio": record["flops"]["ratio"],
        "latency_ratio": latency.get("ratio"),
        "speedup": 1 / latency["ratio"] if latency.get("ratio") else None,
        "heads_kept": record["masks"]["heads_kept"],
        "neurons_kept": record["masks"]["neurons_kept"],
        "t_fisher": t.get("fisher"), "t_search": t.get("search"),
        "t_rearrange": t.get("rearrange"), "t_tune": t.get("tune"),
        "t_physical": t.get("physical"), "t_pruning": t.get("pruning_total"),
        "fisher_cache_hit": (record.get("fisher_cache") or {}).get("hit"),
        "path": str(path.parent),
    }


def collect(*roots: str | Path) -> pd.DataFrame:
    """All results under ``roots``; a run repeated with the same settings counts once (the
    newest file wins)."""
    rows = []
    for root in roots:
        for path in sorted(Path(root).rglob("results.json")):
            try:
                record = json.loads(path.read_text())
                rows.append({**row_of(record, path), "_mtime": path.stat().st_mtime})
            except (json.JSONDecodeError, KeyError) as err:
                print(f"skipping {path}: {err}")
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.DataFrame(rows).sort_values("_mtime")
    key = ["model", "task", "kind", "constraint", "stage", "seed", "num_samples", "tune_samples"]
    df = df.drop_duplicates(subset=key, keep="last").drop(columns="_mtime")
    return df.sort_values(key).reset_index(drop=True)[COLUMNS]

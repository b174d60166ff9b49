"""Collect every run's ``results.json`` into pandas tables.

``collect`` gives one row per distinct run (an exact repeat, same identity and seed, counts
once: the newest file wins); ``summarize`` one row per setting and constraint, with the mean,
sample standard deviation and count over seeds of every number.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from analysis.identity import (
    departures_of,
    differences,
    identity_of,
    setting_of,
    short_hash,
    stage_of,
    variant_of,
)

log = logging.getLogger(__name__)

LABELS = ["model", "task", "metric", "kind", "constraint", "stage", "variant", "detail",
          "setting"]
VALUES = ["baseline", "pruned", "drop", "flops_ratio", "latency_ratio", "speedup", "heads_kept",
          "neurons_kept", "t_fisher", "t_search", "t_rearrange", "t_tune", "t_physical",
          "t_pruning", "fisher_seconds", "fisher_samples", "adaptive_samples", "num_samples"]
EXTRA = ["importance", "num_samples_setting", "tune_samples", "fisher_key", "fisher_cache_hit",
         "sweeps",
         "repeats", "complete", "path"]
COLUMNS = LABELS + ["seed"] + VALUES + EXTRA
HIDDEN = ["_identity", "_departures"]  # the setting's identity and departures, for the tables


def tuned_on(cap: int | None, num_samples: int | None) -> int | None:
    """How many samples mask tuning used: ``prune.tune_samples`` capped at the sample count;
    unset (results made before the option, or ``null``) means all of them."""
    return min(cap, num_samples) if cap and num_samples else num_samples


def fisher_seconds(record: dict) -> float | None:
    """Seconds the Fisher pass took, when this run computed it (``None`` on a cache hit)."""
    cache = record.get("fisher_cache") or {}
    if cache.get("hit"):
        return None
    return cache.get("seconds", (record.get("timings") or {}).get("fisher"))


def row_of(record: dict, path: Path) -> dict:
    """One run as a flat row: labels, numbers, and its identity (hidden columns)."""
    identity = identity_of(record)
    setting = setting_of(identity)
    settings = identity.get("settings") or {}
    prune = settings.get("prune") or {}
    key, t = record["metric"], record.get("timings") or {}
    latency, cache = record.get("latency") or {}, record.get("fisher_cache") or {}
    return {
        "model": record["model"], "task": record["task"], "metric": key,
        "kind": record.get("constraint_kind", "flops"),
        "constraint": float(record["constraint"]), "stage": stage_of(settings),
        "variant": variant_of(settings), "detail": "", "setting": short_hash(setting),
        "seed": record.get("seed", settings.get("seed", 0)),
        "baseline": 100 * record["baseline"][key], "pruned": 100 * record["pruned"][key],
        "drop": record.get("drop"), "flops_ratio": record["flops"]["ratio"],
        "latency_ratio": latency.get("ratio"),
        "speedup": 1 / latency["ratio"] if latency.get("ratio") else None,
        "heads_kept": (record.get("masks") or {}).get("heads_kept"),
        "neurons_kept": (record.get("masks") or {}).get("neurons_kept"),
        "t_fisher": t.get("fisher"), "t_search": t.get("search"),
        "t_rearrange": t.get("rearrange"), "t_tune": t.get("tune"),
        "t_physical": t.get("physical"), "t_pruning": t.get("pruning_total"),
        "fisher_seconds": fisher_seconds(record),
        "fisher_samples": cache.get("samples", record.get("num_samples")),
        "adaptive_samples": (cache.get("adaptive") or {}).get("samples"),
        "num_samples": record.get("num_samples"),
        "importance": prune.get("importance", "fisher"),
        "num_samples_setting": str(prune.get("num_samples", record.get("num_samples"))),
        "tune_samples": tuned_on(prune.get("tune_samples"), record.get("num_samples")),
        "fisher_key": cache.get("key"), "fisher_cache_hit": cache.get("hit"),
        "sweeps": (record.get("config") or {}).get("sweep_name") or "",
        "complete": record.get("complete", True),  # false: masks or model not (yet) saved
        "path": str(path.parent),
        "_identity": setting, "_departures": departures_of(settings),
        "_run": short_hash({**setting, "seed": record.get("seed", settings.get("seed", 0)),
                            "constraint": float(record["constraint"])}, 16),
    }


def read_rows(*roots: str | Path) -> list[dict]:
    rows = []
    for root in roots:
        for path in sorted(Path(root).rglob("results.json")):
            try:
                record = json.loads(path.read_text())
                rows.append({**row_of(record, path), "_mtime": path.stat().st_mtime})
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                log.warning("skipping %s: %r", path, err)
    return rows


def _newest(group: pd.DataFrame) -> pd.Series:
    """One run from its repeats: the newest file; the Fisher time from the newest repeat that
    computed it (the same computation, whichever repeat paid for it)."""
    row = group.iloc[-1].copy()
    computed = group["fisher_seconds"].dropna()
    if pd.isna(row["fisher_seconds"]) and len(computed):
        row["fisher_seconds"] = computed.iloc[-1]
    row["sweeps"] = ",".join(sorted({s for s in group["sweeps"] if s}))
    row["repeats"] = len(group)
    return row


def collect(*roots: str | Path) -> pd.DataFrame:
    """All results under ``roots``, one row per distinct run (identity and seed)."""
    rows = read_rows(*roots)
    if not rows:
        return pd.DataFrame(columns=COLUMNS + HIDDEN)
    df = pd.DataFrame(rows).sort_values(["_mtime", "path"], kind="stable")
    df = pd.DataFrame([_newest(g) for _, g in df.groupby("_run", sort=False)])
    df = label_details(df)
    order = ["model", "task", "kind", "stage", "variant", "detail", "constraint", "seed"]
    return df.sort_values(order).reset_index(drop=True)[COLUMNS + HIDDEN]


def label_details(df: pd.DataFrame) -> pd.DataFrame:
    """``detail``: what tells apart settings that share every label (e.g. another checkpoint,
    other data, latency measured or not)."""
    df = df.copy()
    labels = ["model", "task", "kind", "stage", "variant"]
    for _, part in df.groupby(labels):
        idents = {s: g["_identity"].iloc[0] for s, g in part.groupby("setting")}
        for setting, text in differences(idents).items():
            df.loc[df["setting"] == setting, "detail"] = text
    return df


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per setting and constraint: ``<value>_mean``, ``_std`` (sample, ddof=1) and
    ``_n`` over seeds for every number, the seeds, and the labels."""
    if "pruned_mean" in runs.columns:
        return runs
    keys = ["setting", "constraint"]
    per_run = ("path", "fisher_key", "fisher_cache_hit", "complete")  # a run's, not a setting's
    first = [c for c in LABELS + EXTRA + HIDDEN
             if c not in keys + list(per_run) and c in runs.columns]
    if runs.empty:
        stats = [f"{v}_{s}" for v in VALUES for s in ("mean", "std", "n")]
        return pd.DataFrame(columns=keys + first + ["seeds"] + stats)
    grouped = runs.groupby(keys, sort=False)
    out = grouped[first].first()
    out["tune_samples"] = grouped["tune_samples"].agg(
        lambda s: s.mode().iloc[0] if s.notna().any() else None)
    out["repeats"] = grouped["repeats"].sum()
    out["sweeps"] = grouped["sweeps"].agg(
        lambda s: ",".join(sorted({x for v in s for x in str(v).split(",") if x})))
    out["seeds"] = grouped["seed"].agg(lambda s: ",".join(str(x) for x in sorted(s)))
    numbers = runs[keys + VALUES].copy()
    numbers[VALUES] = numbers[VALUES].apply(pd.to_numeric, errors="coerce")
    agg = numbers.groupby(keys, sort=False)[VALUES].agg(["mean", "std", "count"])
    agg.columns = [f"{v}_{'n' if s == 'count' else s}" for v, s in agg.columns]
    out = out.join(agg).reset_index()
    return out.sort_values(["model", "task", "kind", "stage", "variant", "detail",
                            "constraint"]).reset_index(drop=True)

"""Collect every run's ``results.json`` into pandas tables.

``collect`` gives one row per distinct run (an exact repeat, same identity and seed, counts
once: the newest file wins); ``summarize`` one row per setting and constraint, with the mean,
sample standard deviation and count over seeds of every number.
"""

from __future__ import annotations

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
from experiments.identity import code_of
from experiments.records import PRUNING_STAGES, Record

log = logging.getLogger(__name__)

LABELS = ["model", "task", "metric", "metric2", "kind", "constraint", "stage", "variant", "detail",
          "setting", "code"]
VALUES = ["baseline", "pruned", "baseline2", "pruned2", "drop", "flops_ratio", "latency_ratio",
          "speedup", "heads_kept", "neurons_kept", "t_fisher", "t_search", "t_rearrange", "t_tune",
          "t_physical", "t_pruning", "fisher_seconds", "fisher_samples", "adaptive_samples",
          "num_samples"]
EXTRA = ["importance", "num_samples_setting", "tune_samples", "fisher_key", "fisher_cache_hit",
         "fisher_got", "sweeps",
         "repeats", "complete", "path"]
COLUMNS = LABELS + ["seed"] + VALUES + EXTRA
PAIRED = ["pruned", "t_tune"]  # values whose per-seed numbers a summary keeps (``_by_seed``)
HIDDEN = ["_identity", "_departures"]  # the setting's identity and departures, for the tables


def tuned_on(cap: int | None, num_samples: int | None) -> int | None:
    """How many samples mask tuning used: ``prune.tune_samples`` capped at the sample count;
    unset (results made before the option, or ``null``) means all of them."""
    return min(cap, num_samples) if cap and num_samples else num_samples


def pruning_time(timings: dict) -> float | None:
    """The sum of the pruning stages' times (``PRUNING_STAGES``), whatever the record's own
    total counted (records made before the ``obs`` stage existed left it out of theirs)."""
    parts = [timings[k] for k in PRUNING_STAGES if timings.get(k) is not None]
    return sum(parts) if parts else timings.get("pruning_total")


def fisher_seconds(record: Record) -> float | None:
    """Seconds the Fisher pass took, when this run computed it (``None`` on a cache hit)."""
    cache = record.fisher_cache or {}
    if cache.get("hit"):
        return None
    return cache.get("seconds", record.timings.get("fisher"))


def row_of(data: dict, path: Path) -> dict:
    """One run (a ``results.json`` of any schema) as a flat row: labels, numbers, and its
    identity (hidden columns). ``code`` is the digest of the source that made it (``unknown``
    for records made before digests existed)."""
    from analysis.store import sweeps_of

    r = Record.from_dict(data)
    identity = identity_of(data)
    setting = setting_of(identity)
    settings = identity.get("settings") or {}
    prune = settings.get("prune") or {}
    key, t = r.metric, r.timings
    latency, cache, masks = r.latency or {}, r.fisher_cache or {}, r.masks or {}
    seed = data.get("seed", settings.get("seed", 0))
    second = next((k for k, v in r.pruned.items() if k != key and "/" not in k
                   and isinstance(v, (int, float)) and k in r.baseline), None)
    return {
        "model": r.model, "task": r.task, "metric": key, "kind": r.constraint_kind,
        "constraint": r.constraint, "stage": stage_of(settings),
        "variant": variant_of(settings), "detail": "", "setting": short_hash(setting),
        "code": (code_of(identity) or "unknown")[:7], "seed": seed,
        "baseline": 100 * r.baseline[key], "pruned": 100 * r.pruned[key],
        "metric2": second or "",  # the task's second metric (MRPC F1, STS-B Pearson)
        "baseline2": 100 * r.baseline[second] if second else None,
        "pruned2": 100 * r.pruned[second] if second else None,
        "drop": r.drop, "flops_ratio": r.flops["ratio"], "latency_ratio": latency.get("ratio"),
        "speedup": 1 / latency["ratio"] if latency.get("ratio") else None,
        "heads_kept": masks.get("heads_kept"), "neurons_kept": masks.get("neurons_kept"),
        "t_fisher": t.get("fisher"), "t_search": t.get("search"),
        "t_rearrange": t.get("rearrange"), "t_tune": t.get("tune"),
        "t_physical": t.get("physical"), "t_pruning": pruning_time(t),
        "fisher_seconds": fisher_seconds(r),
        "fisher_samples": cache.get("samples", r.num_samples),
        "adaptive_samples": (cache.get("adaptive") or {}).get("samples"),
        "num_samples": r.num_samples,
        "importance": prune.get("importance", "fisher"),
        "num_samples_setting": str(prune.get("num_samples", r.num_samples)),
        "tune_samples": tuned_on(prune.get("tune_samples"), r.num_samples),
        "fisher_key": cache.get("key"), "fisher_cache_hit": cache.get("hit"),
        "fisher_got": cache.get("seconds"),  # computing it, or loading it on a cache hit
        "sweeps": ",".join(sweeps_of(data)),
        "complete": r.complete,  # false: masks or model not (yet) saved
        "path": str(path.parent),
        "_identity": setting, "_departures": departures_of(settings),
        "_run": short_hash({**setting, "seed": seed, "constraint": r.constraint}, 16),
    }


def read_rows(*roots: str | Path) -> list[dict]:
    """The rows of the records under run directories."""
    from analysis.store import from_runs

    return rows_of(list(from_runs(*roots)))


def rows_of(records: list[dict]) -> list[dict]:
    """One row per record (``analysis.store`` form: ``_source`` and ``_written`` say where
    and when it was written); a record that does not fit the schema warns and is skipped."""
    rows = []
    for record in records:
        source = record.get("_source", "")
        try:
            rows.append({**row_of(record, Path(source) / "results.json"),
                         "_mtime": record.get("_written", 0.0)})
        except (KeyError, TypeError, ValueError) as err:
            log.warning("skipping %s: %r", source, err)
    return rows


def _newest(group: pd.DataFrame) -> pd.Series:
    """One run from its repeats: the newest file; the Fisher time from the newest repeat that
    computed it (the same computation, whichever repeat paid for it)."""
    row = group.iloc[-1].copy()
    computed = group["fisher_seconds"].dropna()
    if pd.isna(row["fisher_seconds"]) and len(computed):
        row["fisher_seconds"] = computed.iloc[-1]
    row["sweeps"] = ",".join(sorted({s for v in group["sweeps"] for s in str(v).split(",") if s}))
    row["repeats"] = len(group)
    return row


def collect(*roots: str | Path, records: list[dict] | None = None) -> pd.DataFrame:
    """All results under ``roots`` (or the given store ``records``), one row per distinct run
    (identity and seed)."""
    rows = read_rows(*roots) if records is None else rows_of(records)
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
    for value in PAIRED:  # per-seed values, for paired comparisons
        out[f"{value}_by_seed"] = grouped[["seed", value]].apply(
            lambda g, v=value: {int(k): float(x) for k, x in zip(g["seed"], g[v], strict=True)
                                if pd.notna(x)})
    numbers = runs[keys + VALUES].copy()
    numbers[VALUES] = numbers[VALUES].apply(pd.to_numeric, errors="coerce")
    agg = numbers.groupby(keys, sort=False)[VALUES].agg(["mean", "std", "count"])
    agg.columns = [f"{v}_{'n' if s == 'count' else s}" for v, s in agg.columns]
    out = out.join(agg).reset_index()
    return out.sort_values(["model", "task", "kind", "stage", "variant", "detail",
                            "constraint"]).reset_index(drop=True)

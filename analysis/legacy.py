"""Version 1 of the results: the runs made on the shared data's version 1 (2026-11-29), kept as
the ``make tables`` rows they gave (``analysis/results/v1/results.csv``; their records did not
survive the machine). They are never pooled with new runs: they serve to restate the earlier
conclusions from paired differences and to say what moved on the canonical data (version 2).

Version 1's STS-B "dev" file was training data, its SST-2 dev file another order and
tokenisation of the 872 sentences, its RTE text carried CSV quoting (``../shared/data``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.stats import Stat, paired
from analysis.tables import STEPS  # each stage against the one it builds on

V1 = Path(__file__).with_name("results") / "v1" / "results.csv"
LABELS = ["model", "task", "kind", "stage", "variant", "detail", "constraint"]


def runs(path: str | Path = V1) -> pd.DataFrame:
    """Version 1's runs, one row per run (``setting`` tells apart settings that share labels)."""
    if not Path(path).exists():
        return pd.DataFrame(columns=[*LABELS, "setting", "seed", "pruned", "sweeps"])
    df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    df["detail"] = df["detail"].fillna("")
    df["sweeps"] = df["sweeps"].fillna("")
    return df


def by_seed(part: pd.DataFrame) -> dict[int, float]:
    return {int(s): float(v) for s, v in zip(part["seed"], part["pruned"], strict=True)}


def _settings(df: pd.DataFrame, **labels) -> list[pd.DataFrame]:
    sel = df
    for key, value in labels.items():
        sel = sel[sel[key] == value]
    return [g for _, g in sel.groupby("setting")]


def _one(df: pd.DataFrame, **labels) -> pd.DataFrame | None:
    """The runs of the one setting with these labels (the one with most seeds if several)."""
    found = _settings(df, **labels)
    return max(found, key=len) if found else None


def departures(df: pd.DataFrame, sweep: str = "departures_cpu") -> pd.DataFrame:
    """Each departure of the version-1 departures sweep against the default, paired on the
    seeds both ran (the default ran seeds 0-4, most variants 0-2)."""
    sel = df[df["sweeps"].str.split(",").map(lambda s: sweep in s) & (df["kind"] == "flops")]
    rows = []
    for (variant, stage), part in sel.groupby(["variant", "stage"], sort=False):
        if (variant, stage) == ("default", "+mask"):
            continue
        row = {"variant": variant, "stage": stage}
        for c in sorted(sel["constraint"].unique()):
            own = part[part["constraint"] == c]
            ref = _one(sel, variant="default", stage="+mask", constraint=c)
            row[f"@{c:g}"] = Stat.of_values(own["pruned"]).fmt()
            row[f"vs default @{c:g}"] = "--" if ref is None else paired(by_seed(ref),
                                                                        by_seed(own))
        rows.append(row)
    return pd.DataFrame(rows).set_index(["variant", "stage"]) if rows else pd.DataFrame()


def ablation(df: pd.DataFrame) -> pd.DataFrame:
    """Each stage of the ablation sweeps against the paper's pipeline (``+mask``; ``+mask``
    against ``+rearrange``, ``+rearrange`` against ``search``), paired on common seeds, per
    model, task, constraint."""
    sel = df[(df["variant"] == "default") & (df["kind"] == "flops")]
    in_sweep = sel["sweeps"].str.contains("ablation")
    rows = []
    for (model, task, c), part in sel[in_sweep].groupby(["model", "task", "constraint"]):
        if part["stage"].nunique() < 2:
            continue
        row = {"model": model, "task": task, "constraint": c}
        for stage, ref in STEPS.items():  # the ablation sweep's own runs of each stage
            a, b = _one(part, stage=ref), _one(part, stage=stage)
            row[f"{stage} vs {ref}"] = "--" if a is None or b is None else \
                paired(by_seed(a), by_seed(b))
        rows.append(row)
    return pd.DataFrame(rows).set_index(["model", "task", "constraint"]) if rows \
        else pd.DataFrame()


def moved(v1: pd.DataFrame, v2: pd.DataFrame) -> pd.DataFrame:
    """What moved from version 1 to version 2: the pruned metric of each default-pipeline
    setting measured on both (other checkpoints, other data: unpaired, mean ± std each)."""
    keys = ["model", "task", "kind", "stage", "variant", "constraint"]
    if v2.empty:
        return pd.DataFrame()
    rows = []
    for key, part in v2.groupby(keys):
        labels = dict(zip(keys, key, strict=True))
        old = _one(v1, **labels)  # the setting with most seeds of each (latency timed or not)
        if old is None:
            continue
        new = max((g for _, g in part.groupby("setting")), key=len)
        a, b = Stat.of_values(old["pruned"]), Stat.of_values(new["pruned"])
        base_a, base_b = Stat.of_values(old["baseline"]), Stat.of_values(new["baseline"])
        rows.append({**labels, "baseline v1": f"{base_a.mean:.2f}",
                     "baseline v2": f"{base_b.mean:.2f}", "pruned v1": a.fmt(),
                     "pruned v2": b.fmt(), "pruned v2 - v1": f"{b.mean - a.mean:+.2f}"})
    return pd.DataFrame(rows).set_index(keys) if rows else pd.DataFrame()

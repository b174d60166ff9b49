"""The paper's tables from collected results: main table and ablation, markdown and LaTeX."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.collect import tuned_on
from prune.pipeline import PruneOptions

PAPER_CSV = Path(__file__).with_name("paper_results.csv")


def paper_results() -> pd.DataFrame:
    """Published numbers, each with the table/figure (or rerun) it was transcribed from."""
    return pd.read_csv(PAPER_CSV, comment="#")


def default_samples(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with the most common sample count, tuned on the default number of samples (or, if no
    run was, the most common one): sample-count and tuning-sample studies do not leak into the
    main and ablation tables."""
    df = df[df["kind"] == "flops"]  # latency-constrained runs are not FLOPs-table cells
    if df.empty:
        return df
    df = df[df["num_samples"] == df["num_samples"].mode().iloc[0]]
    default = PruneOptions.__dataclass_fields__["tune_samples"].default
    tuned = df["tune_samples"]
    preferred = tuned == tuned_on(default, df["num_samples"].iloc[0])
    if preferred.any():
        return df[preferred]
    return df[tuned == tuned.mode().iloc[0]] if tuned.notna().any() else df


def main_table(df: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Baseline and pruned metric per model and task (rows) and FLOPs constraint (columns),
    full pipeline, the default sample count, mean over seeds; published numbers beside ours
    where they exist."""
    full = default_samples(df[df["stage"] == "+tune"])
    if full.empty:
        return pd.DataFrame()
    keys = ["model", "task", "metric"]
    agg = full.groupby(keys + ["constraint"], as_index=False)[["baseline", "pruned"]].mean()
    table = agg.pivot_table(index=keys, columns="constraint", values="pruned")
    table.columns = [f"ours @{c:g}" for c in table.columns]
    table.insert(0, "baseline", agg.groupby(keys)["baseline"].mean())
    if paper is not None and not paper.empty:
        p = paper.dropna(subset=["constraint"])
        p = p[p.set_index(["model", "task"]).index.isin(table.reset_index().set_index(
            ["model", "task"]).index)]
        if not p.empty:
            pw = p.pivot_table(index=["model", "task"], columns="constraint", values="pruned")
            pw.columns = [f"paper @{c:g}" for c in pw.columns]
            table = table.reset_index().merge(pw.reset_index(), on=["model", "task"], how="left")
            return table.set_index(keys)
    return table


def ablation_table(df: pd.DataFrame) -> pd.DataFrame:
    """Pruned metric per stage of the pipeline (columns) for each model, task, constraint."""
    if df.empty:
        return pd.DataFrame()
    order = ["search", "+rearrange", "+tune", "+tune (TA)", "search+tune"]
    table = default_samples(df).pivot_table(index=["model", "task", "constraint"], columns="stage",
                           values="pruned", aggfunc="mean")
    return table[[c for c in order if c in table.columns]]


def samples_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over seeds of the pruned metric per sample count; the study tunes the
    masks on all the samples, so runs that tuned on a subset stay out."""
    if df.empty:
        return pd.DataFrame()
    full = df[(df["stage"] == "+tune") & (df["kind"] == "flops")
              & (df["tune_samples"] == df["num_samples"])]
    return full.groupby(["model", "task", "constraint", "num_samples"])["pruned"].agg(
        ["mean", "std", "count"])


def to_markdown(table: pd.DataFrame, digits: int = 2) -> str:
    if table.empty:
        return "(no results)\n"
    return table.round(digits).reset_index().to_markdown(index=False) + "\n"


def to_latex(table: pd.DataFrame, digits: int = 2) -> str:
    if table.empty:
        return "% no results\n"
    return table.round(digits).reset_index().to_latex(index=False, float_format=f"%.{digits}f",
                                                       na_rep="--")

"""Regenerate every table and figure from the logged results.

    python -m analysis.make_tables [--results outputs] [--out analysis/out]

Writes ``results.csv`` (one row per distinct run), ``summary.csv`` (one row per setting and
constraint, mean/std/n over seeds), ``settings.json`` (each setting hash and its identity), the
tables in markdown and LaTeX and the figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from analysis.collect import HIDDEN, collect, summarize
from analysis.plots import accuracy_vs_flops, accuracy_vs_latency, speedup_vs_flops, time_breakdown
from analysis.studies import (
    adaptive_table,
    departures_table,
    latency_table,
    samples_table,
    tune_samples_table,
    unlabeled_table,
)
from analysis.tables import ablation_steps, ablation_table, main_table, paper_results, write_tables

TABLES = ["main", "ablation", "departures", "latency", "unlabeled", "adaptive", "samples",
          "tune_samples"]


def tables(runs: pd.DataFrame) -> dict[str, list[tuple[str, pd.DataFrame]]]:
    """Every table, by file name: its titled sections."""
    return {
        "main": [("main", main_table(runs, paper_results()))],
        "ablation": [("ablation: pruned metric by stage", ablation_table(runs)),
                     ("ablation: each stage against the one it builds on",
                      ablation_steps(runs))],
        "departures": [("departures", departures_table(runs))],
        "latency": [("latency", latency_table(runs))],
        "unlabeled": [("unlabeled", unlabeled_table(runs))],
        "adaptive": [("adaptive", adaptive_table(runs))],
        "samples": [("samples", samples_table(runs))],
        "tune_samples": [("tune_samples", tune_samples_table(runs))],
    }


def write_data(runs: pd.DataFrame, out: Path) -> dict[str, Path]:
    summary = summarize(runs)
    written = {"results": out / "results.csv", "summary": out / "summary.csv",
               "settings": out / "settings.json"}
    runs.drop(columns=HIDDEN).to_csv(written["results"], index=False)
    summary.drop(columns=HIDDEN).to_csv(written["summary"], index=False)
    identities = dict(zip(runs["setting"], runs["_identity"], strict=True))
    written["settings"].write_text(json.dumps(identities, indent=1, sort_keys=True,
                                              default=str))
    return written


def make_all(results: list[str | Path], out: str | Path) -> dict[str, Path]:
    """Write the data files, the tables (.md, .tex) and figures (.png) to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = collect(*results)
    written = write_data(runs, out)
    for name, sections in tables(runs).items():
        written[f"{name}.md"], written[f"{name}.tex"] = write_tables(out, name, sections)
    for i, path in enumerate(accuracy_vs_flops(runs, out)):
        written[f"accuracy_vs_flops_{i}"] = path
    for i, path in enumerate(accuracy_vs_latency(runs, out)):
        written[f"accuracy_vs_latency_{i}"] = path
    for name, path in (("speedup", speedup_vs_flops(runs, out)),
                       ("time", time_breakdown(runs, out))):
        if path is not None:
            written[name] = path
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="+", default=["outputs"])
    parser.add_argument("--out", default="analysis/out")
    args = parser.parse_args()
    written = make_all(args.results, args.out)
    for name in TABLES:
        print(f"## {name}\n{written[f'{name}.md'].read_text()}")
    print(f"wrote {len(written)} files to {args.out}")


if __name__ == "__main__":
    main()

"""Regenerate every table and figure, and the README's result blocks, from committed data.

    python -m analysis.make_tables [--results outputs] [--out analysis/out] [--readme README.md]

1. The records under ``--results`` are added to the store ``analysis/results/records.jsonl``
   (``analysis.store``: a newer record of the same run replaces the older one).
2. Everything is made from the store alone (and the committed bench JSON and version-1 rows),
   into a temporary folder that replaces ``--out`` only when complete (all or nothing):
   ``results.csv`` (one row per distinct run), ``summary.csv`` (one row per setting and
   constraint), ``settings.json`` (each setting's identity), the tables in markdown and LaTeX,
   and the figures.
3. Each README block between ``<!-- make-tables:NAME -->`` and ``<!-- /make-tables:NAME -->``
   is replaced by the table ``NAME``; ``tests/test_readme.py`` fails when one differs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

from analysis import legacy, store
from analysis.collect import HIDDEN, collect, summarize
from analysis.plots import accuracy_vs_flops, accuracy_vs_latency, speedup_vs_flops, time_breakdown
from analysis.studies import (
    adaptive_table,
    departures_table,
    frontier_best,
    frontier_table,
    grid_table,
    kprune_table,
    latency_table,
    methods_table,
    samples_table,
    tune_samples_table,
    unlabeled_table,
)
from analysis.tables import (
    ablation_steps,
    ablation_table,
    demo_table,
    goals_table,
    main_table,
    paper_results,
    second_table,
    to_markdown,
    write_tables,
)

TABLES = ["demo", "main", "second", "goals", "ablation", "departures", "latency", "unlabeled",
          "adaptive", "weights_damp", "samples", "tune_samples", "frontier", "grid", "kprune",
          "methods"]
RESULTS = Path(__file__).with_name("results")
README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- make-tables:([\w-]+) -->\n)(.*?)(<!-- /make-tables:\2 -->)", re.S)


def tables(runs: pd.DataFrame) -> dict[str, list[tuple[str, pd.DataFrame]]]:
    """Every table, by file name: its titled sections."""
    return {
        "demo": [("demo", demo_table(runs))],
        "main": [("main", main_table(runs, paper_results()))],
        "second": [("second metric", second_table(runs))],
        "goals": [("goals", goals_table(runs))],
        "ablation": [("ablation: pruned metric by stage", ablation_table(runs)),
                     ("ablation: each stage against the one it builds on",
                      ablation_steps(runs))],
        "departures": [("departures", departures_table(runs))],
        "latency": [("latency", latency_table(runs))],
        "unlabeled": [("unlabeled", unlabeled_table(runs))],
        "adaptive": [("adaptive", adaptive_table(runs))],
        "weights_damp": [("ridge of the weight reconstruction",
                          departures_table(runs, "weights_damp_cpu", "+weights"))],
        "samples": [("samples", samples_table(runs))],
        "tune_samples": [("tune_samples", tune_samples_table(runs))],
        "frontier": [("frontier", frontier_table(runs)),
                     ("largest speedup within 3 points per task", frontier_best(runs))],
        "grid": [("issue 25's grid: the pruned metric (and measured speedup) by FLOPs",
                  grid_table(runs))],
        "kprune": [("K-prune on BERT-base beside ours", kprune_table(runs))],
        "methods": [("high-compression methods", methods_table(runs)),
                    ("high-compression methods beside the frontier (MiniLM, timed)",
                     methods_table(runs, "frontier_cpu")),
                    ("high-compression methods on MPNet-base",
                     methods_table(runs, "frontier_mpnet")),
                    ("a floor per layer on MPNet-base (prune.layer_floor)",
                     methods_table(runs, "base_mpnet")),
                    ("a floor per layer with weight reconstruction on MPNet-base",
                     methods_table(runs, "ablation_mpnet"))],
    }


def v1_tables(runs: pd.DataFrame, data: Path) -> dict[str, list[tuple[str, pd.DataFrame]]]:
    """Version 1, restated paired, and what moved from it (``analysis.legacy``)."""
    v1 = legacy.runs(data / "v1" / "results.csv")
    return {
        "v1_departures": [("v1 departures, paired", legacy.departures(v1))],
        "v1_ablation": [("v1 ablation, paired", legacy.ablation(v1))],
        "moved": [("moved from v1 to v2", legacy.moved(v1, runs))],
    }


def bench_blocks(data: Path) -> dict[str, str]:
    """``bench-<name>``: the bench's own table of each committed ``bench-<name>.json``."""
    from experiments.bench import table

    out = {}
    for path in sorted(data.glob("bench-*.json")):
        saved = json.loads(path.read_text())
        out[path.stem] = table(saved.get("models") or [], saved.get("family"))
    return out


def align_block(data: Path) -> dict[str, str]:
    """``align-cpu``: the CPU latency of aligned against unaligned widths
    (``python -m experiments.align_bench``, ``analysis/results/align-cpu.json``)."""
    path = data / "align-cpu.json"
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    lines = ["| model | FLOPs kept | g=1 median s | g=8 median s | g=8 / g=1 | per-round median "
             "g=8 / g=1 | importance kept g=8 / g=1 |", "|---|---|---|---|---|---|---|"]
    for m in saved["models"]:
        for c, r in m["constraints"].items():
            lines.append(f"| {m['model']} | {c} | {r['g1']['median']:.2f} | "
                         f"{r['g8']['median']:.2f} | {r['ratio_g8_g1']:.3f} | "
                         f"{r['ratio_g8_g1_per_round_median']:.3f} | "
                         f"{r['g8']['retained'] / r['g1']['retained']:.4f} |")
    load = saved.get("load_average_at_start") or [float("nan")]
    lines += ["", f"float32, batch {saved['batch_size']} x {saved['seq_len']} tokens, "
              f"{saved['threads']} threads, {saved['rounds']} interleaved rounds; load average "
              f"{load[0]:.1f} at the start (other jobs shared the cores)."]
    return {"align-cpu": "\n".join(lines) + "\n"}


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


def blocks(runs: pd.DataFrame, data: Path = RESULTS) -> dict[str, str]:
    """Every README block, by name: the markdown tables and the bench tables."""
    out = {}
    for name, sections in {**tables(runs), **v1_tables(runs, data)}.items():
        out[name] = "\n".join(to_markdown(table) for _, table in sections)
    return {**out, **bench_blocks(data), **align_block(data)}


def make_all(results: list[str | Path], out: str | Path,
             data: str | Path | None = None) -> dict[str, Path]:
    """Write the data files, tables (.md, .tex) and figures (.png) to ``out`` as one unit.
    With ``data`` (the committed data folder), the records under ``results`` are first added
    to its store and everything is made from the store; without, from ``results`` alone."""
    from experiments.records import atomic_dir

    out = Path(out)
    records = list(store.from_runs(*results))
    if data is not None:
        data = Path(data)
        records = store.merge(store.read(data / "records.jsonl"), records)
        store.write(records, data / "records.jsonl")
    runs = collect(records=records)
    written: dict[str, Path] = {}
    with atomic_dir(out) as tmp:
        files = write_data(runs, tmp)
        for name, sections in {**tables(runs), **v1_tables(runs, data or RESULTS)}.items():
            files[f"{name}.md"], files[f"{name}.tex"] = write_tables(tmp, name, sections)
        for i, path in enumerate(accuracy_vs_flops(runs, tmp)):
            files[f"accuracy_vs_flops_{i}"] = path
        for i, path in enumerate(accuracy_vs_latency(runs, tmp)):
            files[f"accuracy_vs_latency_{i}"] = path
        for name, path in (("speedup", speedup_vs_flops(runs, tmp)),
                           ("time", time_breakdown(runs, tmp))):
            if path is not None:
                files[name] = path
        for name, text in blocks(runs, data or RESULTS).items():
            (tmp / f"block-{name}.md").write_text(text)
        written = {k: out / p.relative_to(tmp) for k, p in files.items()}
    return written


def readme_blocks(readme: str | Path = README) -> dict[str, str]:
    """The README's generated blocks, by name."""
    return {m.group(2): m.group(3) for m in BLOCK.finditer(Path(readme).read_text())}


def update_readme(generated: dict[str, str], readme: str | Path = README) -> list[str]:
    """Replace each README block by its generated text; returns the names of the blocks that
    have no generator (they are left as they are, and reported)."""
    from experiments.records import write_atomic

    path = Path(readme)
    unknown: list[str] = []

    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in generated:
            unknown.append(name)
            return m.group(0)
        return f"{m.group(1)}{generated[name]}{m.group(4)}"

    text = BLOCK.sub(fill, path.read_text())
    write_atomic(path, lambda tmp: tmp.write_text(text))
    return unknown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="*", default=["outputs"])
    parser.add_argument("--out", default="analysis/out")
    parser.add_argument("--data", default=str(RESULTS), help="committed data (the store)")
    parser.add_argument("--readme", default=str(README), help="'' leaves the README alone")
    args = parser.parse_args()
    written = make_all(args.results, args.out, args.data)
    for name in TABLES:
        print(f"## {name}\n{written[f'{name}.md'].read_text()}")
    if args.readme:
        generated = {p.name[len("block-"):-3]: p.read_text()
                     for p in Path(args.out).glob("block-*.md")}
        unknown = update_readme(generated, args.readme)
        if unknown:
            raise SystemExit(f"README blocks without a table: {', '.join(unknown)}")
        print(f"updated the generated blocks of {args.readme}")
    print(f"wrote {len(written)} files to {args.out}")


if __name__ == "__main__":
    main()

"""Regenerate every table and figure from the logged results.

    python -m analysis.make_tables [--results outputs] [--out analysis/out]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis.collect import collect
from analysis.plots import accuracy_vs_flops, speedup_vs_flops, time_breakdown
from analysis.tables import (
    ablation_table,
    main_table,
    paper_results,
    samples_table,
    to_latex,
    to_markdown,
)


def make_all(results: list[str | Path], out: str | Path) -> dict[str, Path]:
    """Write results.csv, the tables (.md, .tex) and figures (.png) to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = collect(*results)
    written = {"results": out / "results.csv"}
    df.to_csv(written["results"], index=False)
    for name, table in (("main", main_table(df, paper_results())),
                        ("ablation", ablation_table(df)),
                        ("samples", samples_table(df))):
        written[f"{name}.md"] = out / f"{name}.md"
        written[f"{name}.md"].write_text(to_markdown(table))
        written[f"{name}.tex"] = out / f"{name}.tex"
        written[f"{name}.tex"].write_text(to_latex(table))
    for i, path in enumerate(accuracy_vs_flops(df, out)):
        written[f"accuracy_vs_flops_{i}"] = path
    for name, path in (("speedup", speedup_vs_flops(df, out)),
                       ("time", time_breakdown(df, out))):
        if path is not None:
            written[name] = path
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="+", default=["outputs"])
    parser.add_argument("--out", default="analysis/out")
    args = parser.parse_args()
    written = make_all(args.results, args.out)
    for name in ("main.md", "ablation.md", "samples.md"):
        print(f"## {name}\n{written[name].read_text()}")
    print(f"wrote {len(written)} files to {args.out}")


if __name__ == "__main__":
    main()

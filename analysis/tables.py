"""The tables from collected results, each cell ``mean ± std`` over seeds (``analysis.stats``).

Every table takes ``collect``'s runs (or their ``summarize``). A table row is one *base*: the
settings of its cells without the keys its columns compare (the stage, the importance, ...), so
cells of a row differ in those keys only. Rows whose labels coincide but whose other inputs
differ (checkpoint, data, latency settings) get a ``detail`` column naming the difference.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.collect import summarize
from analysis.identity import (
    DEFAULT_STAGE,
    STAGES,
    differences,
    short_hash,
    show,
    without,
)
from analysis.stats import NOTE, Stat, paired

PAPER_CSV = Path(__file__).with_name("paper_results.csv")
STAGE_KEYS = ("settings.prune.rearrange", "settings.prune.tune", "settings.prune.tune_teacher")
VARIANT_KEYS = ("settings.prune", "settings.preset", "settings.eval.max_samples")
STEPS = {"+rearrange": "search", "+mask": "+rearrange", "+mask (TA)": "+mask",
         "+bias": "+mask", "+weights": "+mask"}  # each stage against the one it builds on, and
# the additions beyond the paper (+bias, +weights) against the paper's pipeline (+mask)


def paper_results() -> pd.DataFrame:
    """Published numbers, each with the table/figure (or rerun) it was transcribed from."""
    return pd.read_csv(PAPER_CSV, comment="#")


ADHOC = "adhoc"  # the sweep name of a run made without -m (conf/config.yaml)


def select(runs: pd.DataFrame, kind: str | None = "flops", stages: list[str] | None = None,
           variants: list[str] | None = None, departures: set[str] | None = None,
           sweep: str | None = None, adhoc: bool = False) -> pd.DataFrame:
    """Settings (``summarize`` rows) of one constraint kind, stage, variant; ``departures``:
    settings that depart from the defaults (no preset) in these prune options at most. A
    single run outside any sweep (``sweep_name=adhoc``, e.g. a ``make demo`` check) is left out
    unless ``adhoc``: it is shown by ``demo_table`` alone."""
    s = summarize(runs)
    if s.empty:
        return s
    keep = pd.Series(True, index=s.index)
    if kind is not None:
        keep &= s["kind"] == kind
    if stages is not None:
        keep &= s["stage"].isin(stages)
    if variants is not None:
        keep &= s["variant"].isin(variants)
    if departures is not None:
        keep &= s["_departures"].map(lambda d: set(d) <= departures)
        keep &= s["_identity"].map(lambda i: (i["settings"].get("preset") or "none") == "none")
    if sweep is not None:
        keep &= s["sweeps"].map(lambda x: sweep in str(x).split(","))
    if not adhoc:
        keep &= s["sweeps"].map(lambda x: set(str(x).split(",")) != {ADHOC})
    return s[keep].copy()


def with_bases(sel: pd.DataFrame, scope: list[str], drop: tuple[str, ...] = ()) -> pd.DataFrame:
    """``base``: the setting without the ``drop`` keys (cells of one row share it); ``detail``:
    what tells apart bases that share the ``scope`` labels ("" when one base)."""
    sel = sel.copy()
    reduced = {s: without(i, drop) for s, i in zip(sel["setting"], sel["_identity"], strict=True)}
    sel["base"] = sel["setting"].map(lambda s: short_hash(reduced[s]))
    sel["detail"] = ""
    for _, part in sel.groupby(scope):
        idents = {b: reduced[s] for s, b in zip(part["setting"], part["base"], strict=True)}
        for base, text in differences(idents).items():
            sel.loc[part.index[part["base"] == base], "detail"] = text
    return sel


def comparisons(sel: pd.DataFrame, column: str, drop: tuple[str, ...],
                having=None) -> pd.DataFrame:
    """The settings of the bases (per constraint) that compare something: more than one value
    of ``column``, or (``having``) one of them that value. Bases by ``with_bases``."""
    sel = with_bases(sel, ["model", "task"], drop)
    if sel.empty:
        return sel

    def compares(values: pd.Series) -> bool:
        return bool((values == having).any()) if having is not None else values.nunique() > 1

    keep = sel.groupby(["base", "constraint"])[column].transform(compares).astype(bool)
    return with_bases(sel[keep], ["model", "task"], drop)


def index_of(sel: pd.DataFrame, labels: list[str], after: list[str] = ()) -> list[str]:
    """The row labels, with ``detail`` when some rows need it to be told apart."""
    return labels + (["detail"] if sel["detail"].ne("").any() else []) + list(after)


def grid(sel: pd.DataFrame, index: list[str], column: str) -> dict[tuple, dict]:
    """``{row labels: {column value: [settings]}}``; a cell holds one setting unless labels
    collide (then all are shown, never averaged together)."""
    out: dict[tuple, dict] = {}
    for _, row in sel.iterrows():
        out.setdefault(tuple(row[c] for c in index), {}).setdefault(row[column], []).append(row)
    return out


def labels_of(index: list[str], key: tuple) -> dict:
    return dict(zip(index, key, strict=True))


def cell(settings: list[pd.Series], value: str = "pruned", digits: int = 2) -> str:
    return " | ".join(Stat.of(s, value).fmt(digits) for s in settings) or "--"


def compare(reference: list[pd.Series], other: list[pd.Series], value: str = "pruned") -> str:
    """``other - reference``, paired on the seeds both ran (``analysis.stats.paired``);
    ``--`` unless one setting each."""
    if len(reference) != 1 or len(other) != 1:
        return "--"
    return paired(reference[0][f"{value}_by_seed"], other[0][f"{value}_by_seed"])


def frame(rows: list[dict], index: list[str], sort: bool = True) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows).set_index(index)
    return table.sort_index() if sort else table


def baseline(settings: list[pd.Series]) -> str:
    """The unpruned metric of a row: one number when every seed and setting agree."""
    stat = Stat.pooled([Stat.of(s, "baseline") for s in settings])
    if stat.n == 1 or (stat.n > 1 and stat.std < 0.005):
        return f"{stat.mean:.2f}"
    return stat.fmt(show_n=False)


def second_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The tasks' second metric (MRPC F1, STS-B Pearson) of the main table's settings."""
    sel = select(runs, stages=[DEFAULT_STAGE], variants=["default"])
    if sel.empty:
        return pd.DataFrame()
    sel = sel[sel["metric2"].fillna("") != ""]
    if sel.empty:
        return pd.DataFrame()
    measured = sel.groupby(["model", "task"])["latency_ratio_mean"].transform(
        lambda v: v.notna().any())
    sel = with_bases(sel[sel["latency_ratio_mean"].notna() | ~measured],
                     ["model", "task", "metric2"])
    index = index_of(sel, ["model", "task", "metric2"])
    constraints = sorted(sel["constraint"].unique())
    rows = []
    for key, cells in grid(sel, index, "constraint").items():
        row = {**labels_of(index, key),
               "baseline": baseline_of([s for ss in cells.values() for s in ss], "baseline2")}
        row.update({f"ours @{c:g}": cell(cells.get(c, []), "pruned2") for c in constraints})
        rows.append(row)
    return pd.DataFrame(rows).rename(columns={"metric2": "metric"}).set_index(
        [c if c != "metric2" else "metric" for c in index]).sort_index()


def baseline_of(settings: list[pd.Series], value: str) -> str:
    stat = Stat.pooled([Stat.of(s, value) for s in settings])
    if stat.n == 1 or (stat.n > 1 and stat.std < 0.005):
        return f"{stat.mean:.2f}"
    return stat.fmt(show_n=False)


def main_table(runs: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Baseline and pruned metric per model and task (rows) and FLOPs constraint (columns):
    the default pipeline (``+mask``, variant ``default``); published numbers beside ours."""
    sel = select(runs, stages=[DEFAULT_STAGE], variants=["default"])
    if sel.empty:
        return pd.DataFrame()
    # the same runs without a latency measurement (other sweeps switch it off) add no row
    measured = sel.groupby(["model", "task"])["latency_ratio_mean"].transform(
        lambda v: v.notna().any())
    sel = sel[sel["latency_ratio_mean"].notna() | ~measured]
    sel = with_bases(sel, ["model", "task", "metric"])
    index = index_of(sel, ["model", "task", "metric"])
    constraints = sorted(sel["constraint"].unique())
    rows = []
    for key, cells in grid(sel, index, "constraint").items():
        row = {**labels_of(index, key),
               "baseline": baseline([s for ss in cells.values() for s in ss])}
        row.update({f"ours @{c:g}": cell(cells.get(c, [])) for c in constraints})
        rows.append(row)
    table = pd.DataFrame(rows)
    if paper is not None and not paper.empty:
        p = paper.dropna(subset=["constraint"])
        p = p.pivot_table(index=["model", "task", "metric"], columns="constraint",
                          values="pruned")
        p.columns = [f"paper @{c:g}" for c in p.columns]
        p = p.map(lambda v: "--" if pd.isna(v) else f"{v:.2f}").reset_index()
        table = table.merge(p, on=["model", "task", "metric"], how="left")
        table = table.dropna(axis=1, how="all").fillna("--")
    return table.set_index(index).sort_index()


def _ablation(runs: pd.DataFrame) -> tuple[list[str], dict, list[str]]:
    sel = select(runs, variants=["default"])
    if sel.empty:
        return [], {}, []
    sel = comparisons(sel, "stage", STAGE_KEYS)
    if sel.empty:
        return [], {}, []
    index = index_of(sel, ["model", "task"], ["constraint"])
    stages = [s for s in STAGES if s in set(sel["stage"])]
    stages += sorted(set(sel["stage"]) - set(STAGES))
    return index, grid(sel, index, "stage"), stages


def ablation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Pruned metric per stage of the pipeline (columns) for each model, task, FLOPs
    constraint where more than one stage ran; variant ``default``."""
    index, cells, stages = _ablation(runs)
    return frame([{**labels_of(index, key), **{st: cell(c.get(st, [])) for st in stages}}
                  for key, c in cells.items()], index)


def ablation_steps(runs: pd.DataFrame) -> pd.DataFrame:
    """What each stage adds to the one it builds on (``+mask (TA)``, ``+bias`` and
    ``+weights`` on ``+mask``, the paper's pipeline), paired on common seeds."""
    index, cells, stages = _ablation(runs)
    steps = [(st, ref) for st, ref in STEPS.items() if st in stages and ref in stages]
    return frame([{**labels_of(index, key),
                   **{f"{st} vs {ref}": compare(c.get(ref, []), c.get(st, []))
                      for st, ref in steps}} for key, c in cells.items()], index)


def _latex_escape(text: str) -> str:
    for old, new in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"),
                     ("#", r"\#"), ("_", r"\_"), ("{", r"\{"), ("}", r"\}"),
                     ("±", r"$\pm$"), ("Δ", r"$\Delta$")):
        text = text.replace(old, new)
    return text


def to_markdown(table: pd.DataFrame, note: str = NOTE) -> str:
    if table.empty:
        return "(no results)\n"
    text = table.reset_index().to_markdown(index=False, disable_numparse=True)
    return text + (f"\n\n{note}\n" if note else "\n")


def to_latex(table: pd.DataFrame) -> str:
    if table.empty:
        return "% no results\n"
    flat = table.reset_index()
    flat = flat.map(lambda v: "--" if v is None or (isinstance(v, float) and pd.isna(v))
                    else _latex_escape(show(v)))
    flat.columns = [_latex_escape(str(c)) for c in flat.columns]
    return flat.to_latex(index=False, escape=False)


def write_tables(out: Path, name: str, sections: list[tuple[str, pd.DataFrame]]) -> list[Path]:
    """``<name>.md`` and ``<name>.tex``: the tables in order, titled when several."""
    md, tex = [], []
    for title, table in sections:
        heading = len(sections) > 1
        md.append((f"### {title}\n\n" if heading else "") + to_markdown(table))
        tex.append((f"% {title}\n" if heading else "") + to_latex(table))
    paths = [out / f"{name}.md", out / f"{name}.tex"]
    paths[0].write_text("\n".join(md))
    paths[1].write_text("\n".join(tex))
    return paths


def demo_table(runs: pd.DataFrame, model: str = "minilm", task: str = "sst2",
               constraint: float = 0.6, seed: int = 0) -> pd.DataFrame:
    """The run ``make demo`` makes (``python run.py model=minilm task=sst2 constraint=0.6``,
    seed 0, the default pipeline): the figures its summary prints."""
    sel = runs[(runs["model"] == model) & (runs["task"] == task) & (runs["kind"] == "flops")
               & (runs["constraint"] == constraint) & (runs["seed"] == seed)
               & (runs["stage"] == DEFAULT_STAGE) & (runs["variant"] == "default")]
    if sel["latency_ratio"].notna().any():  # make demo times the latency: its own settings
        sel = sel[sel["latency_ratio"].notna()]
    if sel.empty:
        return pd.DataFrame()
    rows = [{"model": r["model"], "task": r["task"], "constraint": f"{r['constraint']:g}",
             "seed": int(r["seed"]), "code": r["code"], "baseline": f"{r['baseline']:.2f}",
             "pruned": f"{r['pruned']:.2f}", "drop": f"{r['drop']:+.2f}",
             "FLOPs kept": f"{r['flops_ratio']:.3f}",
             "heads / neurons kept": f"{int(r['heads_kept'])} / {int(r['neurons_kept'])}"}
            for _, r in sel.iterrows()]
    return pd.DataFrame(rows).set_index(["model", "task", "constraint", "seed", "code"])


GOALS = {0.6: 1.0, 0.5: 2.0}  # FLOPs kept -> the largest drop the goal allows (points)


def goals_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The paper's pipeline against the goals (drop <= 1 point at FLOPs 0.6, <= 2 at 0.5),
    per model and task: the mean drop over seeds and whether the goal is met."""
    sel = select(runs, stages=[DEFAULT_STAGE], variants=["default"])
    if sel.empty:
        return pd.DataFrame()
    rows = []
    for (model, task), part in sel.groupby(["model", "task"]):
        row = {"model": model, "task": task, "metric": part["metric"].iloc[0]}
        for c, allowed in GOALS.items():
            at = part[part["constraint"] == c]
            if at.empty:
                row[f"drop @{c:g}"], row[f"<= {allowed:g} @{c:g}"] = "--", "--"
                continue
            best = at.loc[at["drop_n"].idxmax()]  # the setting with most seeds
            drop = Stat.of(best, "drop")
            row[f"drop @{c:g}"] = drop.fmt()
            row[f"<= {allowed:g} @{c:g}"] = "met" if drop.mean <= allowed else \
                f"missed by {drop.mean - allowed:.2f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index(["model", "task", "metric"]).sort_index()

"""Tables of the studies beside the paper's: the departures from the official code, latency
against FLOPs constraints, label-free importance, the adaptive Fisher pass, and how many samples
the Fisher pass and mask tuning need, iterative pruning against one shot. Cells are
``mean ± std`` over seeds; comparisons follow the no-difference rule (``analysis.stats``)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from analysis.identity import DEFAULT_STAGE, STAGES, prune_defaults, short_hash, show
from analysis.stats import Stat
from analysis.tables import (
    VARIANT_KEYS,
    cell,
    compare,
    comparisons,
    frame,
    grid,
    index_of,
    labels_of,
    select,
    with_bases,
)
from experiments.config import LATENCY_TABLE_KEYS

REFERENCE = ("default", DEFAULT_STAGE)


def _row_order(key: tuple, reference: tuple = REFERENCE) -> tuple:
    """The reference first, then by stage and variant."""
    variant, stage = key[-2], key[-1]
    rank = STAGES.index(stage) if stage in STAGES else len(STAGES)
    return key[:-2], (variant, stage) != reference, rank, variant


def departures_table(runs: pd.DataFrame, sweep: str = "departures_cpu",
                     stage: str = DEFAULT_STAGE) -> pd.DataFrame:
    """One row per variant and stage of the ``sweep`` (FLOPs constraints): the pruned metric
    per constraint, its difference to the default variant at ``stage`` (the reference), and
    the tuning time."""
    sel = select(runs, sweep=sweep)
    if sel.empty:
        return pd.DataFrame()
    sel = with_bases(sel, ["model", "task"], VARIANT_KEYS)
    index = index_of(sel, ["model", "task"], ["variant", "stage"])
    constraints = sorted(sel["constraint"].unique())
    cells = grid(sel, index, "constraint")
    reference = ("default", stage)
    rows = []
    for key in sorted(cells, key=lambda k: _row_order(k, reference)):
        ref = cells.get(key[:-2] + reference, {})
        own = cells[key]
        row = labels_of(index, key)
        for c in constraints:
            row[f"@{c:g}"] = cell(own.get(c, []))
            row[f"vs default @{c:g}"] = "" if key[-2:] == reference else \
                compare(ref.get(c, []), own.get(c, []))
        tune = Stat.pooled([Stat.of(s, "t_tune") for ss in own.values() for s in ss])
        ref_tune = Stat.pooled([Stat.of(s, "t_tune") for ss in ref.values() for s in ss])
        row["tune s"] = tune.fmt(1, show_n=False)
        row["tune time / default"] = f"{tune.mean / ref_tune.mean:.2f}" \
            if tune.n and ref_tune.n and ref_tune.mean else "--"
        rows.append(row)
    return frame(rows, index, sort=False)


def latency_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Latency- against FLOPs-constrained runs (default pipeline and variant) that measured
    latency: the pruned metric, the FLOPs kept and the measured latency ratio."""
    sel = select(runs, kind=None, stages=[DEFAULT_STAGE], variants=["default"])
    if sel.empty:
        return pd.DataFrame()
    sel = sel[sel["latency_ratio_n"] > 0]
    if sel.empty:
        return pd.DataFrame()
    # the kind column tells the two apart; the lookup table's settings belong to the kind
    sel = with_bases(sel, ["model", "task"], ("settings.constraint_kind",) + tuple(
        f"settings.latency.{key}" for key in LATENCY_TABLE_KEYS))
    index = index_of(sel, ["model", "task"], ["kind", "constraint"])
    rows = [{**{c: s[c] for c in index}, "metric": s["metric"],
             "pruned": cell([s]), "FLOPs kept": cell([s], "flops_ratio", 3),
             "latency ratio": cell([s], "latency_ratio", 3)}
            for _, s in sel.sort_values(index).iterrows()]
    return frame(rows, index)


def unlabeled_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The labelled Fisher against the label-free one (the model's own predictions), same
    settings otherwise (default pipeline)."""
    sel = select(runs, stages=[DEFAULT_STAGE], departures={"importance"})
    if sel.empty:
        return pd.DataFrame()
    drop = ("settings.prune.importance", "data.sample_file")
    sel = comparisons(sel, "importance", drop, having="fisher_unlabeled")
    if sel.empty:
        return pd.DataFrame()
    index = index_of(sel, ["model", "task", "metric"], ["constraint"])
    return frame([{**labels_of(index, key), "fisher": cell(c.get("fisher", [])),
                   "fisher_unlabeled": cell(c.get("fisher_unlabeled", [])),
                   "unlabeled vs labelled": compare(c.get("fisher", []),
                                                    c.get("fisher_unlabeled", []))}
                  for key, c in grid(sel, index, "importance").items()], index)


def fisher_seconds_by_key(runs: pd.DataFrame) -> pd.Series:
    """Mean seconds of the Fisher passes computed for each cache key, each pass counted once: a
    family run records its one pass on every constraint's row, which must not weigh it more than
    a single-constraint run's pass of the same key."""
    computed = runs.dropna(subset=["fisher_seconds", "fisher_key"])
    computed = computed.drop_duplicates(subset=["fisher_key", "fisher_seconds"])
    return computed.groupby("fisher_key")["fisher_seconds"].mean()


def fisher_time(runs: pd.DataFrame, setting: str) -> Stat:
    """Seconds of the Fisher pass of a setting over seeds. A run that hit the cache has no time
    of its own: it takes the time of any run that computed the same cache key (the same
    computation, whichever constraint, stage or repeat paid for it)."""
    by_key = fisher_seconds_by_key(runs)
    part = runs[runs["setting"] == setting]
    seconds = part["fisher_seconds"].fillna(part["fisher_key"].map(by_key))
    per_seed = seconds.groupby(part["seed"]).mean().dropna()
    if per_seed.empty:
        return Stat(float("nan"), float("nan"), 0)
    return Stat(per_seed.mean(), per_seed.std(), len(per_seed))


def adaptive_table(runs: pd.DataFrame, full: int = 2048) -> pd.DataFrame:
    """``prune.num_samples=auto`` against ``full`` samples: samples used, Fisher time and the
    pruned metric per constraint. Takes ``collect``'s runs (the Fisher time is per seed)."""
    sel = select(runs, stages=[DEFAULT_STAGE], departures={"num_samples"})
    if sel.empty:
        return pd.DataFrame()
    sel = sel[sel["num_samples_setting"].isin(["auto", str(full)])]
    # an adaptive run's identity also names the constraints it watched; a fixed run has none
    sel = comparisons(sel, "num_samples_setting",
                      ("settings.prune.num_samples", "adaptive_constraints"), "auto")
    if sel.empty:
        return pd.DataFrame()
    index = index_of(sel, ["model", "task", "metric"], ["constraint"])
    rows = []
    for key, c in grid(sel, index, "num_samples_setting").items():
        auto, fixed = c.get("auto", []), c.get(str(full), [])
        times = [fisher_time(runs, s[0]["setting"]) if len(s) == 1 else Stat(0, 0, 0)
                 for s in (auto, fixed)]
        used = "adaptive_samples" if auto and auto[0]["adaptive_samples_n"] else "fisher_samples"
        rows.append({**labels_of(index, key), "samples (auto)": cell(auto, used, 0),
                     f"samples ({full})": cell(fixed, "fisher_samples", 0),
                     "Fisher s (auto)": times[0].fmt(1), f"Fisher s ({full})": times[1].fmt(1),
                     f"Fisher time auto / {full}": f"{times[0].mean / times[1].mean:.2f}"
                     if times[0].n and times[1].n and times[1].mean else "--",
                     "pruned (auto)": cell(auto), f"pruned ({full})": cell(fixed),
                     f"auto vs {full}": compare(fixed, auto)})
    return frame(rows, index)


def samples_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The pruned metric per sample count (Fisher and tuning on all the samples, as the
    paper), and its difference to the largest count of the same settings."""
    sel = select(runs, stages=[DEFAULT_STAGE], departures={"num_samples", "tune_samples"})
    if sel.empty:
        return pd.DataFrame()
    sel = sel[(sel["num_samples_setting"] != "auto")
              & (sel["tune_samples"] == sel["num_samples_mean"])]
    if sel.empty:
        return pd.DataFrame()
    sel = comparisons(sel, "num_samples_setting", ("settings.prune.num_samples",
                                                   "settings.prune.tune_samples"))
    if sel.empty:
        return pd.DataFrame()
    sel["num_samples"] = sel["num_samples_mean"].round().astype(int)
    index = index_of(sel, ["model", "task", "metric"], ["constraint", "num_samples"])
    rows = []
    for _, part in sel.groupby(["base", "constraint"]):
        most = part.loc[part["num_samples"].idxmax()]
        rows += [{**{c: s[c] for c in index}, "pruned": cell([s]),
                  f"vs {most['num_samples']}": "" if s.name == most.name else compare([most], [s])}
                 for _, s in part.iterrows()]
    table = frame(rows, index)
    return table.sort_index().fillna("") if not table.empty else table


def _tune_label(cap, used: float) -> tuple:
    """The column of a tuning-sample count: its order and label."""
    default = prune_defaults()["tune_samples"]
    if cap is None or pd.isna(cap):
        return (1, used), f"all ({used:g})"
    return (0, cap), f"{show(cap)}" + (" (default)" if cap == default else "")


def tune_samples_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The pruned metric per number of samples mask tuning used (the Fisher pass on all of
    them), and each count against the default."""
    sel = select(runs, stages=[DEFAULT_STAGE], departures={"tune_samples"})
    if sel.empty:
        return pd.DataFrame()
    caps = sel["_identity"].map(lambda i: (i["settings"].get("prune") or {}).get("tune_samples"))
    labels = [_tune_label(cap, used)
              for cap, used in zip(caps, sel["num_samples_mean"], strict=True)]
    sel["tune on"], sel["_order"] = [label for _, label in labels], labels
    sel = comparisons(sel, "tune on", ("settings.prune.tune_samples",))
    if sel.empty:
        return pd.DataFrame()
    order = [label for _, label in sorted(set(sel["_order"]))]
    ref = next((label for label in order if label.endswith("(default)")), None)
    index = index_of(sel, ["model", "task", "metric"], ["constraint"])
    rows = []
    for key, c in grid(sel, index, "tune on").items():
        row = {**labels_of(index, key), **{label: cell(c.get(label, [])) for label in order}}
        if ref is not None:
            row.update({f"{label} vs {ref.split()[0]}": compare(c.get(ref, []), c.get(label, []))
                        for label in order if label != ref})
        rows.append(row)
    return frame(rows, index)


# the high-compression methods beyond the paper, and the sample counts they may need
METHOD_KEYS = ("steps", "obs", "obs_greedy", "tune_samples", "num_samples", "layer_floor",
               "tune_inputs")


ISSUE_TASKS = ("sst2", "mrpc", "stsb")  # issue 25's goal tasks (its geometric mean >= 2.5x)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _frontier_rows(runs: pd.DataFrame, within: float) -> list[dict]:
    """Per model, task, stage (``+mask``, ``+weights``) and method (the one-shot default or a
    high-compression method of ``METHOD_KEYS``): the smallest FLOPs constraint whose mean metric
    is within ``within`` points of the baseline, its metric and its measured speedup."""
    sel = select(runs, stages=[DEFAULT_STAGE, "+weights"], departures=set(METHOD_KEYS))
    if sel.empty:
        return []
    # runs on two checkpoints of one task (a re-made fine-tune) are never pooled
    sel = sel.assign(_checkpoint=sel["_identity"].map(
        lambda i: short_hash(i.get("checkpoint"), 6)))
    rows = []
    for (model, task, stage, method, checkpoint), part in sel.groupby(
            ["model", "task", "stage", "variant", "_checkpoint"]):
        base = Stat.pooled([Stat.of(s, "baseline") for _, s in part.iterrows()]).mean
        ok = part[part["pruned_mean"] >= base - within]  # of one constraint, a timed setting
        ok = ok.assign(_timed=ok["speedup_n"] > 0).sort_values(["constraint", "_timed"],
                                                               ascending=[True, False])
        row = {"model": model, "task": task, "stage": stage, "method": method,
               "checkpoint": checkpoint, "baseline": f"{base:.2f}",
               "constraints": ",".join(f"{c:g}" for c in sorted(part["constraint"].unique())),
               "lowest FLOPs within": "--", "pruned there": "--", "speedup": "--", "_speed": None}
        if not ok.empty:
            best = ok.iloc[0]
            speed = Stat.of(best, "speedup")
            row.update({"lowest FLOPs within": f"{best['constraint']:g}",
                        "pruned there": cell([best]),
                        "speedup": f"{speed.mean:.2f}x" if speed.n else "--",
                        "_speed": speed.mean if speed.n else None})
        rows.append(row)
    return rows


def frontier_table(runs: pd.DataFrame, within: float = 3.0) -> pd.DataFrame:
    """High compression (issue 25): per model, task, stage (``+mask``, ``+weights``) and method
    (``default``: one shot; or the high-compression options of ``METHOD_KEYS``), the smallest
    FLOPs constraint whose mean metric is within ``within`` points of the baseline, the metric
    there, and the measured speedup of that setting (batch 32, 128 tokens, CPU float32), with
    the geometric mean of the speedups over tasks per model, stage and method (only when every
    task of the group has one, on one checkpoint: a re-made fine-tune that was not timed does not
    count)."""
    rows = _frontier_rows(runs, within)
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    for _, part in table.groupby(["model", "stage", "method"]):
        # one timed row per task (a re-made fine-tune that was not timed does not count;
        # a task timed on two checkpoints, or not at all: no mean)
        timed = part[part["_speed"].notna()]
        per_task = timed.groupby("task").size()
        complete = not timed.empty and (per_task == 1).all() and \
            len(per_task) == part["task"].nunique()
        table.loc[part.index, "geomean speedup"] = \
            f"{_geomean(list(timed['_speed'])):.2f}x" if complete else "--"
    table = table.drop(columns="_speed")
    table["_order"] = table["method"] != "default"
    table = table.sort_values(["model", "task", "stage", "_order", "method", "checkpoint"])
    table = table.drop(columns="_order")
    return table.set_index(["model", "task", "stage", "method"])


def frontier_best(runs: pd.DataFrame, within: float = 3.0) -> pd.DataFrame:
    """Per model and task, the largest measured speedup within ``within`` points of the
    baseline over every stage and method of ``frontier_table`` (which one), and the geometric
    mean of those speedups over the model's tasks: issue 25's figure. The choice is made on the
    same dev metric it reports, so it is an upper estimate."""
    rows = [r for r in _frontier_rows(runs, within)
            if r["_speed"] is not None and not pd.isna(r["_speed"])]
    if not rows:
        return pd.DataFrame()
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r["task"])
        if key not in best or r["_speed"] > best[key]["_speed"]:
            best[key] = r
    table = pd.DataFrame([{"model": r["model"], "task": r["task"], "stage": r["stage"],
                           "method": r["method"], "checkpoint": r["checkpoint"],
                           "baseline": r["baseline"],
                           "lowest FLOPs within": r["lowest FLOPs within"],
                           "pruned there": r["pruned there"], "speedup": r["speedup"],
                           "_speed": r["_speed"]} for r in best.values()])
    for _, part in table.groupby("model"):
        table.loc[part.index, "tasks"] = str(len(part))
        table.loc[part.index, "geomean speedup"] = f"{_geomean(list(part['_speed'])):.2f}x"
        three = part[part["task"].isin(ISSUE_TASKS)]
        table.loc[part.index, "geomean: sst2, mrpc, stsb"] = (
            f"{_geomean(list(three['_speed'])):.2f}x" if len(three) == len(ISSUE_TASKS)
            else "--")
    return table.drop(columns="_speed").set_index(["model", "task"]).sort_index()


GRID = (0.1, 0.15, 0.2, 0.25, 0.3)  # issue 25's FLOPs constraints


def grid_table(runs: pd.DataFrame, constraints: tuple[float, ...] = GRID) -> pd.DataFrame:
    """Issue 25's grid: per model, task, stage (``+mask``, ``+weights``), method (the one-shot
    default or a high-compression option of ``METHOD_KEYS``) and checkpoint, the pruned metric
    at each FLOPs constraint of ``constraints`` with the measured speedup there (``--``: not
    run). A cell measured by more than one setting (another code digest) shows the one with the
    most seeds, a timed one first, and says how many more there are; ``methods_table`` shows
    them all."""
    sel = select(runs, stages=[DEFAULT_STAGE, "+weights"], departures=set(METHOD_KEYS))
    wanted = [round(c, 6) for c in constraints]
    if not sel.empty:
        sel = sel[sel["constraint"].round(6).isin(wanted)]
    if sel.empty:
        return pd.DataFrame()
    sel = sel.assign(_checkpoint=sel["_identity"].map(
        lambda i: short_hash(i.get("checkpoint"), 6)), _at=sel["constraint"].round(6),
        _timed=sel["speedup_n"] > 0)
    rows = []
    for (model, task, stage, method, checkpoint), part in sel.groupby(
            ["model", "task", "stage", "variant", "_checkpoint"]):
        base = Stat.pooled([Stat.of(s, "baseline") for _, s in part.iterrows()]).mean
        row = {"model": model, "task": task, "stage": stage, "method": method,
               "checkpoint": checkpoint, "baseline": f"{base:.2f}"}
        for c, at in zip(constraints, wanted, strict=True):
            here = part[part["_at"] == at].sort_values(["pruned_n", "_timed"], ascending=False)
            text = "--"
            if not here.empty:
                first = here.iloc[0]
                speed = Stat.of(first, "speedup")
                text = Stat.of(first, "pruned").fmt(2) + (f" ({speed.mean:.1f}x)" if speed.n
                                                          else "")
                if len(here) > 1:
                    text += f" (+{len(here) - 1} more)"
            row[f"{c:g}"] = text
        rows.append(row)
    table = pd.DataFrame(rows)
    table["_order"] = table["method"] != "default"
    table = table.sort_values(["model", "task", "_order", "method", "stage", "checkpoint"])
    return table.drop(columns="_order").set_index(["model", "task", "stage", "method",
                                                   "checkpoint"])


def pruning_seconds(runs: pd.DataFrame, setting: str) -> Stat:
    """Seconds to prune at one constraint, per seed, as if every run computed its own first
    Fisher pass: the record's pruning time with the time it took to get that pass (computed or
    loaded from the cache) replaced by the pass's computed time (any run of the same cache key
    paid for it); later iterative steps' passes are in the record's own time."""
    by_key = fisher_seconds_by_key(runs)
    part = runs[runs["setting"] == setting]
    total = part["t_pruning"] - part["fisher_got"] + part["fisher_key"].map(by_key)
    per_seed = total.groupby(part["seed"]).mean().dropna()
    if per_seed.empty:
        return Stat(float("nan"), float("nan"), 0)
    return Stat(per_seed.mean(), per_seed.std(), len(per_seed))


def methods_table(runs: pd.DataFrame, sweep: str = "iterative_cpu") -> pd.DataFrame:
    """The ``sweep``'s methods (iterative pruning ``prune.steps``, reconstruction-aware
    importance ``prune.obs``, a floor per layer ``prune.layer_floor``, more tuning or Fisher
    samples) against its one-shot default, per
    stage and constraint: the pruned metric, its paired difference to the default, and the
    pruning time (``pruning_seconds``) against the default's. Takes ``collect``'s runs (times
    are per run)."""
    sel = select(runs, departures=set(METHOD_KEYS), sweep=sweep)
    if sel.empty:
        return pd.DataFrame()
    sel = comparisons(sel, "variant", tuple(f"settings.prune.{k}" for k in METHOD_KEYS))
    if sel.empty:
        return pd.DataFrame()
    index = index_of(sel, ["model", "task", "metric", "stage"], ["constraint", "method"])
    rows = []
    for key, c in grid(sel, index[:-1], "variant").items():
        times = {v: pruning_seconds(runs, own[0]["setting"]) for v, own in c.items()
                 if len(own) == 1}
        ref = c.get("default", [])
        for variant in sorted(c, key=lambda v: (v != "default", v)):
            own = c[variant]
            time = times.get(variant)
            rows.append({**labels_of(index[:-1], key), "method": variant,
                         "pruned": cell(own),
                         "vs default": "" if variant == "default" else compare(ref, own),
                         "pruning s": time.fmt(1, show_n=False) if time else "--",
                         "time / default": _time_ratio(time, times.get("default")),
                         "time / one shot, same samples": _time_ratio(
                             time, _same_samples_one_shot(variant, times))})
    return frame(rows, index, sort=False)


SAMPLE_KEYS = ("tune_samples", "num_samples")


def _same_samples_one_shot(variant: str, times: dict[str, Stat]) -> Stat | None:
    """The time of the plain one-shot run on the same samples as ``variant`` (issue 25's bound
    counts a method's pruning time against one ``tune=weights`` run at the same sample count):
    the method with every option but the sample counts taken away, "default" when none is set."""
    kept = {t for t in variant.split(",") if t.split("=")[0] in SAMPLE_KEYS}
    for other, time in times.items():
        tokens = set() if other == "default" else set(other.split(","))
        if tokens == kept:
            return time
    return None


def _time_ratio(time: Stat | None, ref: Stat | None) -> str:
    if not (time and ref and time.n and ref.n and ref.mean):
        return "--"
    return f"{time.mean / ref.mean:.2f}"


KPRUNE_CSV = Path(__file__).with_name("kprune_results.csv")


def kprune_table(runs: pd.DataFrame, model: str = "mpnet") -> pd.DataFrame:
    """K-prune's figures on BERT-base (``kprune_results.csv``, read from its plots) beside
    ours on ``model`` (the base size) at the same share of FLOPs removed: the best mean over
    every stage (``+mask``, ``+weights``) and high-compression method measured there, with its
    drop from our baseline (baselines differ: BERT-base is not reachable here), and for the
    geometric-mean row ``frontier_best``'s figure over the same tasks we have."""
    ref = pd.read_csv(KPRUNE_CSV, comment="#")
    sel = select(runs, stages=[DEFAULT_STAGE, "+weights"], departures=set(METHOD_KEYS))
    sel = sel[sel["model"] == model] if not sel.empty else sel
    best = frontier_best(runs)
    rows = []
    for _, r in ref.iterrows():
        row = {"task": r["task"], "metric": r["metric"],
               "FLOPs removed": "--" if pd.isna(r["flops_removed"]) else
               f"{r['flops_removed']:g}%",
               "K-prune (BERT-base)": f"{r['kprune']:g}",
               "paper's method (per K-prune)": "--" if pd.isna(r["paper_method"])
               else f"{r['paper_method']:g}", f"ours ({model})": "--", "ours: setting": "--"}
        if r["task"] == "geomean":
            if not best.empty and model in best.index.get_level_values("model"):
                part = best.loc[model]
                row[f"ours ({model})"] = part["geomean speedup"].iloc[0]
                row["ours: setting"] = f"over {len(part)} tasks: {', '.join(part.index)}"
        elif not sel.empty:
            kept = round(1 - r["flops_removed"] / 100, 6)
            at = sel[(sel["task"] == r["task"]) & (sel["constraint"].round(6) == kept)]
            if not at.empty:
                top = at.loc[at["pruned_mean"].idxmax()]
                base = Stat.of(top, "baseline").mean
                row[f"ours ({model})"] = f"{cell([top])} (drop {base - top['pruned_mean']:.2f})"
                row["ours: setting"] = f"{top['stage']} {top['variant']}"
        rows.append(row)
    return pd.DataFrame(rows).set_index(["task", "metric", "FLOPs removed"])

"""Tables and figures from fixture results; the notebook runs headless on the same results.

Fixture records have the runner's format (``experiments.runner.prune_one``): the resolved
config, its identity (settings without neutral keys, data and checkpoint digests, device, code
versions, constraint) and the seed. ``legacy`` makes one of the older format (no identity)."""

import dataclasses
import json
import os

import pytest
import yaml
from conftest import ROOT

OFFICIAL = yaml.safe_load((ROOT / "conf" / "preset" / "official.yaml").read_text())["prune"]


def record(model="minilm", task="sst2", constraint=0.6, seed=0, pruned=0.88, baseline=0.9,
           prune=None, kind="flops", preset="none", sweep="main_cpu", checkpoint="c0", data="d0",
           latency=None, max_samples=None, fisher=None, t_tune=20.0, device="cpu",
           code="c0de"):
    """A record as the runner writes it: ``prune`` overrides the schema's prune defaults,
    ``latency`` is the measured ratio (``None``: not measured), ``fisher`` the cache info."""
    from experiments.config import PruneConf
    from experiments.identity import RECORD_SCHEMA, settings_of

    prune_cfg = {f.name: f.default for f in dataclasses.fields(PruneConf)}
    prune_cfg.update(fisher_cache_dir="/cache/fisher", **(OFFICIAL if preset == "official"
                                                          else {}), **(prune or {}))
    config = {
        "constraint": constraint, "constraint_kind": kind, "seed": seed, "device": "auto",
        "progress": False, "save_model": True, "force": False, "sweep_name": sweep,
        "prune": prune_cfg,
        "task": {"name": task, "metric": "accuracy", "local_dir": "/data/glue/SST-2",
                 "max_seq_length": 64},
        "latency": {"enabled": latency is not None, "batch_size": 32, "seq_len": 128},
        "eval": {"batch_size": 128, "max_samples": max_samples},
        "model": {"name": model, "path": None, "pretrained": "pkg:x"},
        "paths": {"root_dir": "/work"}, "logger": {"kind": "none"}, "preset": preset,
    }
    identity = {"settings": settings_of(config),
                "data": {"train": {"file": "train.tsv", "sha256": data}},
                "checkpoint": {"files": {"model.safetensors": checkpoint}}, "device": device,
                "code": {"digest": code, "schema": RECORD_SCHEMA}, "constraint": constraint}
    if prune_cfg["num_samples"] == "auto":  # as the runner: the constraints the pass watched
        identity["adaptive_constraints"] = [constraint]
    return {
        "model": model, "task": task, "constraint": constraint, "constraint_kind": kind,
        "seed": seed, "device": "cpu", "num_samples": 2048, "metric": "accuracy",
        "baseline": {"accuracy": baseline}, "pruned": {"accuracy": pruned},
        "drop": 100 * (baseline - pruned),
        "flops": {"baseline": 1.0, "pruned": constraint, "ratio": constraint},
        "latency": None if latency is None else {"ratio": latency},
        "masks": {"heads_kept": 50, "neurons_kept": 4000},
        "timings": {"fisher": 30.0, "search": 0.01, "rearrange": 0.5, "tune": t_tune,
                    "physical": 0.1, "pruning_total": 50.6},
        "fisher_cache": fisher or {"key": "k", "hit": False, "seconds": 30.0, "samples": 2048},
        "config": config, "identity": identity,
    }


def legacy(constraint=0.6, stage=("r", "t", "full"), seed=0, baseline=0.9, pruned=0.88,
           hit=False, num_samples=2048, tune_samples="unset"):
    """A record of the older format: no identity, a partial config, ``tune`` a bool."""
    rearrange, tune, teacher = stage[0] == "r", stage[1] == "t", stage[2]
    prune = {"rearrange": rearrange, "tune": tune, "tune_teacher": teacher}
    if tune_samples != "unset":
        prune["tune_samples"] = tune_samples
    return {
        "model": "minilm", "task": "sst2", "constraint": constraint, "seed": seed,
        "num_samples": num_samples, "metric": "accuracy",
        "baseline": {"accuracy": baseline}, "pruned": {"accuracy": pruned},
        "drop": 100 * (baseline - pruned),
        "flops": {"baseline": 1.0, "pruned": constraint, "ratio": constraint},
        "masks": {"heads_kept": 50, "neurons_kept": 4000},
        "timings": {"fisher": 30.0, "search": 0.01, "rearrange": 0.5, "tune": 20.0,
                    "physical": 0.1, "pruning_total": 50.6},
        "fisher_cache": {"key": "k", "hit": hit}, "config": {"prune": prune},
    }


def write(root, runs: dict, mtime: float | None = None):
    for name, r in runs.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        path = root / name / "results.json"
        path.write_text(json.dumps(r))
        if mtime is not None:
            os.utime(path, (mtime, mtime))
    return root


def seeds(values, **kw) -> dict:
    """One record per seed, the pruned metric of seed ``i`` is ``values[i]``."""
    return {i: record(seed=i, pruned=v, **kw) for i, v in enumerate(values)}


def runs_of(**named) -> dict:
    """``name=[records]`` -> ``{"name-i": record}``."""
    return {f"{name}-{i}": r for name, rs in named.items() for i, r in enumerate(rs)}


def three(pruned, spread=(-0.01, 0, 0.01), **kw) -> list:
    """Three seeds around ``pruned`` (fractions), by default -0.01, 0, +0.01: settings made
    with the default spread differ by the same amount on every seed (a paired std of 0)."""
    return [record(seed=s, pruned=pruned + d, **kw) for s, d in enumerate(spread)]


@pytest.fixture
def results(tmp_path):
    """The demo's sweeps in small: the default pipeline at two constraints and a second model
    (3 seeds each), the ablation stages at 0.6, and a damping variant."""
    runs = runs_of(
        d4=three(0.80, constraint=0.4), d6=three(0.86),
        search=three(0.70, prune={"rearrange": False, "tune": "off"}),
        rearr=three(0.75, prune={"tune": "off"}),
        ta=three(0.855, prune={"tune_teacher": "ta"}),
        damp=three(0.50, prune={"tune_damp": 0.0}),
        bert=three(0.83, model="bert-base", task="mnli", baseline=0.8453),
    )
    return write(tmp_path / "runs", runs)


@pytest.mark.parametrize("change", [
    {"prune": {"tune_damp": 0.0}}, {"prune": {"sampling": "official"}},
    {"prune": {"seq_len": "official"}}, {"prune": {"amp": "off"}},
    {"prune": {"rearrange_sweeps": 2}}, {"checkpoint": "c1"}, {"data": "d1"},
    {"device": "NVIDIA A100"}, {"max_samples": 500}])
def test_runs_differing_in_one_input_stay_two_rows(tmp_path, change):
    from analysis.collect import collect, summarize

    write(tmp_path, {"a": record(pruned=0.86), "b": record(pruned=0.80, **change)})
    runs = collect(tmp_path)
    assert len(runs) == 2 and runs["setting"].nunique() == 2
    summary = summarize(runs)
    assert sorted(summary["pruned_mean"]) == pytest.approx([80.0, 86.0])
    labels = summary[["variant", "detail"]].apply(tuple, axis=1)
    assert labels.nunique() == 2  # told apart by the variant, or by the detail
    if "prune" in change or "max_samples" in change:
        assert "default" in set(summary["variant"])
        assert summary["detail"].eq("").all()
    else:  # same labels, other inputs: the detail names them
        assert set(summary["variant"]) == {"default"}
        assert summary["detail"].str.startswith(next(iter(change)) + "=").all()


@pytest.mark.parametrize("kind,rows", [("flops", 1), ("latency", 2)])
def test_latency_table_settings_split_only_latency_constrained_runs(tmp_path, kind, rows):
    from analysis.collect import collect

    a, b = record(seed=0, kind=kind), record(seed=1, kind=kind)
    for rec, seconds in ((a, 0.5), (b, 1.0)):
        rec["config"]["latency"]["table_min_run_time"] = seconds
        rec["identity"]["settings"]["latency"]["table_min_run_time"] = seconds
    write(tmp_path, {"a": a, "b": b})
    assert collect(tmp_path)["setting"].nunique() == rows


def test_variant_labels_name_the_departures_from_the_defaults(tmp_path):
    from analysis.collect import collect

    write(tmp_path, {"damp": record(prune={"tune_damp": 1e-4}),
                     "two": record(prune={"sampling": "official", "tune_samples": None}),
                     "max": record(max_samples=500),
                     "official": record(preset="official"),
                     "official_damp": record(preset="official", prune={"tune_damp": 0.0}),
                     "stage": record(prune={"rearrange": False, "tune": "off"})})
    runs = collect(tmp_path)
    got = {path.rsplit("/", 1)[-1]: (stage, variant)
           for path, stage, variant in runs[["path", "stage", "variant"]].values}
    assert got == {"damp": ("+mask", "tune_damp=0.0001"),
                   "two": ("+mask", "tune_samples=null,sampling=official"),
                   "max": ("+mask", "eval.max_samples=500"),
                   "official": ("+mask (TA)", "official"),
                   "official_damp": ("+mask (TA)", "official,tune_damp=0"),
                   "stage": ("search", "default")}


def test_seeds_of_one_setting_are_averaged(tmp_path):
    from analysis.collect import collect, summarize
    from analysis.tables import main_table

    write(tmp_path, runs_of(s=[record(seed=s, pruned=p)
                               for s, p in enumerate((0.85, 0.86, 0.88))]))
    runs = collect(tmp_path)
    assert len(runs) == 3 and runs["setting"].nunique() == 1
    row = summarize(runs).iloc[0]
    assert (row["pruned_mean"], row["pruned_std"], row["pruned_n"]) == \
        pytest.approx((86.3333, 1.5275, 3), abs=1e-4)
    assert row["seeds"] == "0,1,2"
    assert main_table(runs).loc[("minilm", "sst2", "accuracy"), "ours @0.6"] == "86.33 ± 1.53"


def test_an_exact_repeat_counts_once_and_the_newest_file_wins(tmp_path):
    from analysis.collect import collect

    # "a" sorts first but is the newer file: the modification time decides
    write(tmp_path, {"b": record(pruned=0.80)}, mtime=1_000_000)
    write(tmp_path, {"a": record(pruned=0.87)}, mtime=2_000_000)
    write(tmp_path, {"other_seed": record(seed=1, pruned=0.85)})
    runs = collect(tmp_path)
    first = runs[runs["seed"] == 0]
    assert len(runs) == 2 and len(first) == 1
    assert first["pruned"].iloc[0] == pytest.approx(87.0)
    assert first["repeats"].iloc[0] == 2


def test_rows_that_differ_in_code_are_told_apart_by_the_digest_the_runs_print():
    """The ``code=`` label is the source digest itself (what the run summary and the demo table
    print), not a hash of the identity's code entry, so one code has one name everywhere."""
    from analysis.identity import differences

    a = record(code="15e4b2e0aa11")["identity"]
    b = record(code="0137b7ffbb22")["identity"]
    labels = differences({"a": a, "b": b})
    assert labels == {"a": "code=15e4b2", "b": "code=0137b7"}
    # data and checkpoint stay named by a digest of their whole content
    c = record(checkpoint="other")["identity"]
    label = differences({"a": a, "c": c})["c"]
    assert label.startswith("checkpoint=") and "code=" in label


def test_the_no_difference_rule():
    from analysis.stats import Stat, difference, same

    ref = Stat(86.0, 0.5, 3)
    assert difference(ref, Stat(86.4, 0.3, 3)) == "no difference (+0.40)"
    assert difference(ref, Stat(85.5, 0.1, 3)) == "no difference (-0.50)"  # |Δ| == larger std
    assert difference(ref, Stat(87.0, 0.3, 3)) == "+1.00"
    assert difference(ref, Stat(85.2, 0.5, 3)) == "-0.80"
    # one seed each: no spread to judge by, so never "no difference", and the cell says n=1
    assert not same(Stat(80.0, float("nan"), 1), Stat(80.1, float("nan"), 1))
    assert difference(Stat(80.0, float("nan"), 1), Stat(87.0, float("nan"), 1)) == "+7.00 (n=1)"
    assert not same(Stat(80.0, float("nan"), 1), Stat(80.5, 0.2, 3))
    assert difference(ref, Stat(float("nan"), float("nan"), 0)) == "--"
    assert Stat(86.0, 0.5, 3).fmt() == "86.00 ± 0.50"
    assert Stat(86.0, 0.5, 2).fmt() == "86.00 ± 0.50 (n=2)"
    assert Stat(86.0, float("nan"), 1).fmt() == "86.00 (n=1)"


def test_main_table_takes_only_the_default_pipeline_under_flops(results):
    from analysis.collect import collect
    from analysis.tables import main_table, paper_results

    extra = runs_of(latency=three(0.40, kind="latency", latency=0.6),
                    official=three(0.40, preset="official"),
                    samples=three(0.40, prune={"num_samples": 256}),
                    bias=three(0.40, prune={"tune": "bias"}))
    runs = collect(write(results, extra))
    main = main_table(runs, paper_results())
    assert list(main.index) == [("bert-base", "mnli", "accuracy"), ("minilm", "sst2", "accuracy")]
    row = main.loc[("minilm", "sst2", "accuracy")]
    assert (row["baseline"], row["ours @0.4"], row["ours @0.6"]) == \
        ("90.00", "80.00 ± 1.00", "86.00 ± 1.00")
    # the published number sits beside ours for the same model, task, metric and constraint
    assert main.loc[("bert-base", "mnli", "accuracy"), "paper @0.6"] == "82.25"
    assert main.loc[("minilm", "sst2", "accuracy"), "paper @0.6"] == "--"
    assert main.loc[("bert-base", "mnli", "accuracy"), "ours @0.4"] == "--"


def test_same_labels_other_checkpoint_are_two_rows_of_the_main_table(results):
    from analysis.collect import collect
    from analysis.tables import main_table

    runs = collect(write(results, runs_of(ck=three(0.70, checkpoint="c9"))))
    main = main_table(runs).loc[("minilm", "sst2", "accuracy")]
    assert len(main) == 2
    assert sorted(main["ours @0.6"]) == ["70.00 ± 1.00", "86.00 ± 1.00"]
    assert main.index.str.startswith("checkpoint=").all()


def test_a_single_run_outside_a_sweep_is_the_demo_row_and_no_other(results):
    """``make demo`` (sweep ``adhoc``) on another checkpoint made a one-seed row of the main and
    frontier tables; it belongs to the demo table alone."""
    from analysis.collect import collect
    from analysis.studies import frontier_table
    from analysis.tables import demo_table, goals_table, main_table

    demo = record(pruned=0.87, checkpoint="c9", sweep="adhoc", code="c0de2")
    runs = collect(write(results, {"demo": demo}))
    shown = demo_table(runs)
    assert len(shown) == 2 and sorted(shown["pruned"]) == ["85.00", "87.00"]
    main = main_table(runs).loc[("minilm", "sst2", "accuracy")]
    assert main["ours @0.6"] == "86.00 ± 1.00"  # one row: the sweep's, no "(n=1)" beside it
    assert "87.00" not in goals_table(runs).to_string()
    assert len(frontier_table(runs).loc[("minilm", "sst2")]) == 1
    # the same run inside a sweep is a row of its own (another checkpoint)
    runs = collect(write(results, {"demo": {**demo, "config": {**demo["config"],
                                                                 "sweep_name": "main_cpu"}}}))
    assert len(main_table(runs).loc[("minilm", "sst2", "accuracy")]) == 2


def test_ablation_table_and_steps(results):
    from analysis.collect import collect
    from analysis.tables import ablation_steps, ablation_table, to_latex, to_markdown

    runs = collect(write(results, runs_of(bias=three(0.862, prune={"tune": "bias"},
                                                     spread=(0.0, -0.01, 0.02)))))
    ablation = ablation_table(runs)
    assert list(ablation.columns) == ["search", "+rearrange", "+mask", "+mask (TA)", "+bias"]
    row = ablation.loc[("minilm", "sst2", 0.6)]
    assert list(row) == ["70.00 ± 1.00", "75.00 ± 1.00", "86.00 ± 1.00", "85.50 ± 1.00",
                         "86.53 ± 1.53"]
    # only +mask ran at 0.4, and for bert-base: no comparison, no ablation row
    assert list(ablation.index) == [("minilm", "sst2", 0.6)]
    steps = ablation_steps(runs).loc[("minilm", "sst2", 0.6)]
    # paired on seeds 0-2: a constant per-seed offset is a difference even when it is
    # smaller than each setting's own spread over seeds (unpaired, -0.50 read "no difference")
    assert dict(steps) == {"+rearrange vs search": "+5.00 ± 0.00",
                           "+mask vs +rearrange": "+11.00 ± 0.00",
                           "+mask (TA) vs +mask": "-0.50 ± 0.00",
                           "+bias vs +mask": "no difference (+0.53 ± 1.15)"}
    assert "86.00 $\\pm$ 1.00" in to_latex(ablation)
    lines = [[c.strip() for c in line.split("|")[1:-1]]
             for line in to_markdown(ablation).splitlines() if line.startswith("|")]
    assert lines[0] == ["model", "task", "constraint", *ablation.columns]
    assert ["minilm", "sst2", "0.6", *row] in lines


def departures(root):
    """The departures sweep at 0.4 and 0.6, with an ablation run identical to its default
    (an exact repeat of another sweep counts once but keeps both sweep names)."""
    sweep = {"sweep": "departures_cpu"}
    runs = {}
    for c, base in ((0.4, 0.80), (0.6, 0.86)):
        runs.update(runs_of(**{
            f"default{c}": three(base, constraint=c, **sweep),
            f"damp{c}": three(base - 0.002, constraint=c, prune={"tune_damp": 0.0}, **sweep),
            f"stop{c}": three(base - 0.05, constraint=c, prune={"tune_on_failure": "stop"},
                              **sweep),
            f"teacher{c}": three(base + 0.03, constraint=c, prune={"tune_teacher": "ta"},
                                 **sweep),
            f"tune_samples{c}": three(base, constraint=c, prune={"tune_samples": None},
                                      t_tune=80.0, **sweep),
            f"official{c}": three(base - 0.02, constraint=c, preset="official", **sweep)}))
    runs["ablation"] = record(constraint=0.6, pruned=0.85, sweep="ablation_cpu")
    runs["elsewhere"] = record(constraint=0.6, pruned=0.10, prune={"tune_damp": 0.5})
    return write(root, runs)


def test_departures_table(tmp_path):
    from analysis.collect import collect
    from analysis.studies import departures_table

    runs = collect(departures(tmp_path))
    assert (runs["sweeps"] == "ablation_cpu,departures_cpu").sum() == 1
    table = departures_table(runs)
    keys = [k[2:] for k in table.index]
    assert keys[0] == ("default", "+mask")  # the reference first
    assert set(keys) == {("default", "+mask"), ("tune_damp=0", "+mask"),
                         ("tune_on_failure=stop", "+mask"), ("default", "+mask (TA)"),
                         ("tune_samples=null", "+mask"), ("official", "+mask (TA)")}
    t = table.droplevel(["model", "task"])
    assert t.loc[("default", "+mask"), "@0.6"] == "86.00 ± 1.00"
    assert t.loc[("default", "+mask"), "vs default @0.6"] == ""
    assert t.loc[("tune_damp=0", "+mask"), "vs default @0.4"] == "-0.20 ± 0.00"
    assert t.loc[("tune_on_failure=stop", "+mask"), "vs default @0.6"] == "-5.00 ± 0.00"
    assert t.loc[("default", "+mask (TA)"), "vs default @0.6"] == "+3.00 ± 0.00"
    assert t.loc[("official", "+mask (TA)"), "vs default @0.4"] == "-2.00 ± 0.00"
    assert t.loc[("tune_samples=null", "+mask"), "tune s"] == "80.0 ± 0.0"
    assert t.loc[("tune_samples=null", "+mask"), "tune time / default"] == "4.00"


def test_weights_damp_table_compares_with_the_default_ridge(tmp_path):
    """The ridge sweep runs only ``+weights``: its reference is the default ridge at that stage,
    not the paper's pipeline (which the sweep does not run), and the table says so per row."""
    from analysis.collect import collect
    from analysis.make_tables import tables
    from analysis.studies import departures_table

    sweep = {"sweep": "weights_damp_cpu", "prune": {"tune": "weights"}}
    runs = {}
    for c in (0.3, 0.6):
        runs.update(runs_of(**{
            f"default{c}": three(0.80 + c / 10, constraint=c, **sweep),
            f"small{c}": three(0.79 + c / 10, constraint=c,
                               **{**sweep, "prune": {"tune": "weights",
                                                     "tune_weight_damp": 0.01}})}))
    runs["mask"] = record(constraint=0.6, pruned=0.5, sweep="ablation_cpu")  # another sweep
    collected = collect(write(tmp_path, runs))
    t = departures_table(collected, "weights_damp_cpu", "+weights").droplevel(["model", "task"])
    assert list(t.index) == [("default", "+weights"), ("tune_weight_damp=0.01", "+weights")]
    assert t.loc[("default", "+weights"), "vs default @0.6"] == ""
    assert t.loc[("tune_weight_damp=0.01", "+weights"), "vs default @0.3"] == "-1.00 ± 0.00"
    assert t.loc[("tune_weight_damp=0.01", "+weights"), "@0.6"] == "85.00 ± 1.00"
    assert t.loc[("tune_weight_damp=0.01", "+weights"), "tune time / default"] == "1.00"
    # against the paper's stage (not in this sweep) there is nothing to compare with
    plain = departures_table(collected, "weights_damp_cpu").droplevel(["model", "task"])
    assert plain.loc[("tune_weight_damp=0.01", "+weights"), "vs default @0.3"] == "--"
    (_, made), = tables(collected)["weights_damp"]
    assert made.equals(departures_table(collected, "weights_damp_cpu", "+weights"))


def test_comparisons_are_paired_on_common_seeds(tmp_path):
    """The audit's case: a 3-seed variant against a 5-seed default. Unpaired, the default's
    two extra (lucky) seeds made the variant look 0.26 worse; paired on seeds 0-2 it is the
    per-seed difference, and its spread decides "no difference"."""
    from analysis.collect import collect
    from analysis.stats import paired
    from analysis.studies import departures_table

    sweep = {"sweep": "departures_cpu"}
    default = [record(seed=s, pruned=p, **sweep)
               for s, p in enumerate((0.860, 0.866, 0.864, 0.870, 0.871))]
    variant = [record(seed=s, pruned=p, prune={"tune_damp": 0.0}, **sweep)
               for s, p in enumerate((0.859, 0.865, 0.863))]
    t = departures_table(collect(write(tmp_path, runs_of(d=default, v=variant))))
    t = t.droplevel(["model", "task"])
    assert t.loc[("default", "+mask"), "@0.6"] == "86.62 ± 0.45 (n=5)"
    assert t.loc[("tune_damp=0", "+mask"), "vs default @0.6"] == "-0.10 ± 0.00"
    assert paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 1.5, 2: 3.3}) == \
        "no difference (+0.10 ± 0.53)"
    assert paired({0: 1.0, 1: 2.0}, {1: 2.5, 7: 9.0}) == "+0.50 (n=1)"
    assert paired({0: 1.0}, {1: 2.0}) == "--"
    assert paired({s: 1.0 for s in range(4)}, {s: 1.2 + 0.01 * s for s in range(4)}) == \
        "+0.21 ± 0.01 (n=4)"


def test_latency_table(tmp_path):
    from analysis.collect import collect
    from analysis.studies import latency_table

    runs = {}
    for c in (0.4, 0.6):
        runs.update(runs_of(**{
            f"lat{c}": [record(seed=s, constraint=c, kind="latency", pruned=c + 0.2 + d,
                               latency=c + d) for s, d in enumerate((-0.01, 0, 0.01))],
            f"flops{c}": [record(seed=s, constraint=c, pruned=c + 0.25, latency=c + 0.1)
                          for s in range(3)],
            f"unmeasured{c}": three(0.3, constraint=c)}))
    for rec in (r for name, r in runs.items() if name.startswith("lat")):
        for node in (rec["config"], rec["identity"]["settings"]):  # the table's settings
            node["latency"].update(table_points=8, table_min_run_time=1.0)
    table = latency_table(collect(write(tmp_path, runs)))
    assert "detail" not in table.index.names  # the kind tells them apart, nothing else
    assert list(table.index.get_level_values("kind")) == ["flops", "flops", "latency",
                                                          "latency"]
    row = table.loc[("minilm", "sst2", "latency", 0.4)]
    assert (row["pruned"], row["latency ratio"], row["FLOPs kept"]) == \
        ("60.00 ± 1.00", "0.400 ± 0.010", "0.400 ± 0.000")
    assert table.loc[("minilm", "sst2", "flops", 0.6), "latency ratio"] == "0.700 ± 0.000"


def test_unlabeled_table(tmp_path):
    from analysis.collect import collect
    from analysis.studies import unlabeled_table

    unlabeled = {"importance": "fisher_unlabeled"}
    runs = runs_of(l4=three(0.80, constraint=0.4), u4=three(0.795, constraint=0.4,
                                                           prune=unlabeled),
                   l6=three(0.86), u6=three(0.80, prune=unlabeled),
                   other=three(0.5, prune={"tune_damp": 0.0}))
    table = unlabeled_table(collect(write(tmp_path, runs)))
    assert list(table.index) == [("minilm", "sst2", "accuracy", 0.4),
                                 ("minilm", "sst2", "accuracy", 0.6)]
    assert list(table.loc[("minilm", "sst2", "accuracy", 0.6)]) == \
        ["86.00 ± 1.00", "80.00 ± 1.00", "-6.00 ± 0.00"]
    assert table.loc[("minilm", "sst2", "accuracy", 0.4), "unlabeled vs labelled"] == \
        "-0.50 ± 0.00"


def test_adaptive_table(tmp_path):
    from analysis.collect import collect
    from analysis.studies import adaptive_table

    auto = {"num_samples": "auto"}
    runs = {}
    for s, (samples, secs) in enumerate(((768, 40.0), (1024, 50.0), (1280, 60.0))):
        fisher = {"key": f"auto{s}", "hit": False, "seconds": secs, "samples": samples,
                  "adaptive": {"samples": samples, "reason": "settled"}}
        hit = {"key": f"full{s}", "hit": True, "seconds": 0.1, "samples": 2048}
        for c in (0.4, 0.6):
            runs[f"auto{s}-{c}"] = record(seed=s, constraint=c, prune=auto, fisher=fisher,
                                          pruned=0.80 if c == 0.4 else 0.85 + 0.01 * s)
            runs[f"full{s}-{c}"] = record(seed=s, constraint=c, fisher=hit,
                                          pruned=0.80 if c == 0.4 else 0.87 + 0.01 * s)
        # the 2048-sample Fisher of this seed was computed (and cached) by another sweep's run
        runs[f"search{s}"] = record(seed=s, prune={"rearrange": False, "tune": "off"},
                                    fisher={**hit, "hit": False, "seconds": 90.0 + 10 * s})
    table = adaptive_table(collect(write(tmp_path, runs)))
    row = table.loc[("minilm", "sst2", "accuracy", 0.6)]
    assert row["samples (auto)"] == "1024 ± 256"
    assert row["samples (2048)"] == "2048 ± 0"
    assert (row["Fisher s (auto)"], row["Fisher s (2048)"]) == ("50.0 ± 10.0", "100.0 ± 10.0")
    assert row["Fisher time auto / 2048"] == "0.50"
    assert (row["pruned (auto)"], row["pruned (2048)"]) == ("86.00 ± 1.00", "88.00 ± 1.00")
    assert row["auto vs 2048"] == "-2.00 ± 0.00"
    assert table.loc[("minilm", "sst2", "accuracy", 0.4), "auto vs 2048"] == \
        "no difference (+0.00 ± 0.00)"


def test_samples_and_tune_samples_tables(tmp_path):
    from analysis.collect import collect
    from analysis.studies import samples_table, tune_samples_table

    runs = {}
    for n, pruned in ((256, 0.80), (2048, 0.86)):
        for s in range(3):
            r = record(seed=s, constraint=0.5, prune={"num_samples": n, "tune_samples": None},
                       pruned=pruned + 0.01 * s)
            r["num_samples"] = n
            runs[f"n{n}-{s}"] = r
    runs.update(runs_of(t256=three(0.84, prune={"tune_samples": 256}), t512=three(0.86),
                        tall=three(0.861, prune={"tune_samples": None})))
    runs_df = collect(write(tmp_path, runs))
    samples = samples_table(runs_df)
    # at 0.6 one count only (tuned on all 2048; 256 and 512 tuned on a subset): no row
    assert list(samples.index) == [("minilm", "sst2", "accuracy", 0.5, 256),
                                   ("minilm", "sst2", "accuracy", 0.5, 2048)]
    assert list(samples.loc[("minilm", "sst2", "accuracy", 0.5, 256)]) == \
        ["81.00 ± 1.00", "-6.00 ± 0.00"]
    tune = tune_samples_table(runs_df).loc[("minilm", "sst2", "accuracy", 0.6)]
    assert dict(tune) == {"256": "84.00 ± 1.00", "512 (default)": "86.00 ± 1.00",
                          "all (2048)": "86.10 ± 1.00", "256 vs 512": "-2.00 ± 0.00",
                          "all (2048) vs 512": "+0.10 ± 0.00"}


def test_older_records_without_identity_still_load(tmp_path):
    from analysis.collect import collect
    from analysis.tables import ablation_table, main_table

    write(tmp_path, {
        "a": legacy(pruned=0.86, tune_samples=512),
        "b": legacy(stage=("-", "-", "full"), pruned=0.70, hit=True, tune_samples=512),
        "c": legacy(stage=("r", "t", "ta"), pruned=0.85, tune_samples=512),
        "all": legacy(pruned=0.84),  # before tune_samples existed: tuned on all samples
        "small": legacy(pruned=0.60, num_samples=256, tune_samples=512),
        "s1": legacy(seed=1, pruned=0.88, tune_samples=512)}, mtime=1_000_000)
    write(tmp_path, {"a2": legacy(pruned=0.87, tune_samples=512)}, mtime=2_000_000)
    runs = collect(tmp_path)
    assert len(runs) == 6  # a2 repeats a: newest wins
    got = {tuple(r) for r in runs[["stage", "variant", "seed", "pruned"]].values}
    assert got == {("+mask", "default", 0, 87.0), ("+mask", "default", 1, 88.0),
                   ("search", "default", 0, 70.0), ("+mask (TA)", "default", 0, 85.0),
                   ("+mask", "tune_samples=null", 0, 84.0),
                   ("+mask", "num_samples=256", 0, 60.0)}
    assert main_table(runs).loc[("minilm", "sst2", "accuracy"), "ours @0.6"] == \
        "87.50 ± 0.71 (n=2)"
    assert ablation_table(runs).loc[("minilm", "sst2", 0.6), "search"] == "70.00 (n=1)"


def test_make_all_writes_tables_and_figures(results, tmp_path):
    from analysis.make_tables import TABLES, make_all

    written = make_all([write(results, runs_of(
        lat=three(0.7, kind="latency", latency=0.55), fl=three(0.8, latency=0.65)))],
        tmp_path / "out")
    for name in [f"{t}.{ext}" for t in TABLES for ext in ("md", "tex")] + ["time", "speedup"]:
        assert written[name].exists() and written[name].stat().st_size > 0
    for figure in ("accuracy_vs_flops_sst2.png", "accuracy_vs_latency_sst2.png"):
        assert (tmp_path / "out" / figure).exists()
    assert "| minilm" in written["main.md"].read_text()
    assert "± 0.00" in written["ablation.md"].read_text()  # paired differences
    settings = json.loads(written["settings"].read_text())
    results_csv = written["results"].read_text().splitlines()
    # 8 settings (the default at two constraints), 3 seeds each: one row per run
    assert len(results_csv) == 1 + 27
    assert len(settings) == 8


@pytest.mark.slow
def test_notebook_runs_headless(results, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "analysis" / "report.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "notebooks are stored without outputs"
    os.environ["FASTPRUNE_RESULTS"] = str(results)
    os.environ["FASTPRUNE_TABLES"] = str(tmp_path / "nb")
    try:
        NotebookClient(nb, timeout=180, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["FASTPRUNE_RESULTS"], os.environ["FASTPRUNE_TABLES"]
    assert (tmp_path / "nb" / "main.md").exists()
    text = "".join(str(o.get("data", {}).get("text/plain", "")) for c in nb.cells
                   for o in c.get("outputs", []))
    assert "86.00 ± 1.00" in text and "± 0.00" in text



def test_frontier_table(tmp_path):
    """The smallest constraint within 3 points of the baseline per stage and method, its
    measured speedup, the geometric mean over tasks (only when every task has one), and per
    task the largest speedup over every stage and method."""
    from analysis.collect import collect
    from analysis.studies import frontier_best, frontier_table

    runs = {}
    for c, mask, weights in ((0.1, 0.40, 0.80), (0.2, 0.70, 0.875), (0.3, 0.875, 0.89)):
        runs.update(runs_of(**{
            f"m{c}": three(mask, constraint=c, latency=c + 0.1),
            f"w{c}": three(weights, constraint=c, latency=c + 0.1, prune={"tune": "weights"}),
            f"r{c}": three(weights, constraint=c, task="rte", latency=c + 0.15,
                           prune={"tune": "weights"})}))
    # iterative pruning reaches 0.1 on sst2 (timed); another departure is not a method
    runs.update(runs_of(
        i1=three(0.88, constraint=0.1, latency=0.125, prune={"tune": "weights", "steps": 2}),
        g1=three(0.89, constraint=0.1, latency=0.11, prune={"tune": "weights",
                                                           "granularity": 1}),
        # a re-made fine-tune of qnli (another checkpoint, another baseline): never pooled
        q1=three(0.80, constraint=0.5, task="qnli", latency=0.6, baseline=0.82),
        q2=three(0.94, constraint=0.5, task="qnli", latency=0.7, baseline=0.95,
                 checkpoint="c1")))
    collected = collect(write(tmp_path, runs))
    table = frontier_table(collected)
    mask = table.loc[("minilm", "sst2", "+mask", "default")]
    assert (mask["lowest FLOPs within"], mask["pruned there"], mask["speedup"]) == \
        ("0.3", "87.50 ± 1.00", "2.50x")
    weights = table.loc[("minilm", "sst2", "+weights", "default")]
    assert (weights["lowest FLOPs within"], weights["speedup"]) == ("0.2", "3.33x")
    rte = table.loc[("minilm", "rte", "+weights", "default")]
    assert rte["lowest FLOPs within"] == "0.2" and rte["speedup"] == "2.86x"
    assert weights["geomean speedup"] == "3.09x"  # sqrt(3.33 * 2.86)
    assert mask["geomean speedup"] == "--"  # qnli on two checkpoints
    steps = table.loc[("minilm", "sst2", "+weights", "steps=2")]
    assert (steps["lowest FLOPs within"], steps["speedup"]) == ("0.1", "8.00x")
    assert not any("granularity" in str(m) for m in table.index.get_level_values("method"))
    qnli = table.loc[("minilm", "qnli", "+mask", "default")]
    assert sorted(qnli["baseline"]) == ["82.00", "95.00"]  # one row per checkpoint
    assert list(qnli["lowest FLOPs within"]) == ["0.5", "0.5"]
    assert set(qnli["geomean speedup"]) == {"--"}  # qnli twice: not a mean over tasks
    assert list(table.index.get_level_values("method")[:5]) == ["default"] * 5  # qnli, rte, sst2

    best = frontier_best(collected)
    sst2, rte = best.loc[("minilm", "sst2")], best.loc[("minilm", "rte")]
    assert (sst2["stage"], sst2["method"], sst2["speedup"]) == ("+weights", "steps=2", "8.00x")
    assert (rte["method"], rte["speedup"]) == ("default", "2.86x")
    assert best.loc[("minilm", "qnli")]["baseline"] == "82.00"  # the checkpoint within 3
    # (8.00 * 2.857 * 1.667) ** (1 / 3)
    assert sst2["geomean speedup"] == "3.36x" and sst2["tasks"] == "3"
    assert sst2["geomean: sst2, mrpc, stsb"] == "--"  # mrpc and stsb not measured


def test_frontier_best_gives_issue_25s_geomean_over_its_three_tasks(tmp_path):
    """Issue 25's 2.5x goal is over SST-2, MRPC and STS-B: a fourth task (RTE) counts in the
    mean over every task, not in this one."""
    from analysis.collect import collect
    from analysis.studies import frontier_best

    runs = runs_of(**{task: three(0.88, constraint=0.2, task=task, latency=latency,
                                  prune={"tune": "weights"})
                      for task, latency in (("sst2", 0.25), ("mrpc", 0.5), ("stsb", 0.2),
                                            ("rte", 0.125))})
    best = frontier_best(collect(write(tmp_path, runs)))
    row = best.loc[("minilm", "rte")]
    assert row["geomean: sst2, mrpc, stsb"] == "3.42x"  # (4 * 2 * 5) ** (1 / 3)
    assert row["geomean speedup"] == "4.23x" and row["tasks"] == "4"  # (4 * 2 * 5 * 8) ** 0.25


def test_frontier_geomean_takes_the_timed_checkpoint_of_a_task(tmp_path):
    """A task re-made on another fine-tune and not timed there (an ablation, latency off) keeps
    its timed checkpoint's speedup in the mean; timed on both, it has no mean."""
    from analysis.collect import collect
    from analysis.studies import frontier_table

    base = dict(s=three(0.87, constraint=0.5, latency=0.5),
                r=three(0.87, constraint=0.5, task="rte", latency=0.4))
    untimed = three(0.87, constraint=0.5, task="rte", checkpoint="c1")
    table = frontier_table(collect(write(tmp_path / "a", runs_of(**base, u=untimed))))
    assert len(table.loc[("minilm", "rte", "+mask", "default")]) == 2  # one row per checkpoint
    assert set(table["geomean speedup"]) == {"2.24x"}  # sqrt(2.00 * 2.50)
    timed = three(0.87, constraint=0.5, task="rte", checkpoint="c1", latency=0.45)
    table = frontier_table(collect(write(tmp_path / "b", runs_of(**base, u=timed))))
    assert set(table["geomean speedup"]) == {"--"}


def test_grid_table(tmp_path):
    """Issue 25's grid: one row per stage, method and checkpoint, a cell per FLOPs of the grid
    (the metric, and the measured speedup when timed), ``--`` where not run, constraints off
    the grid left out, and a cell measured on two code digests shows the one with more seeds."""
    from analysis.collect import collect
    from analysis.identity import short_hash
    from analysis.studies import grid_table

    def short_hash_of(checkpoint: str) -> str:  # as record() writes it
        return short_hash({"files": {"model.safetensors": checkpoint}}, 6)

    runs = runs_of(
        m1=three(0.40, constraint=0.1, latency=0.125),
        m3=three(0.80, constraint=0.3),
        m5=three(0.86, constraint=0.5, latency=0.6),  # off the grid
        w2=three(0.85, constraint=0.2, latency=0.25, prune={"tune": "weights"}),
        w2old=three(0.70, constraint=0.2, prune={"tune": "weights"}, code="0ld")[:2],
        i2=three(0.88, constraint=0.2, latency=0.25, prune={"tune": "weights", "steps": 2}),
        c2=three(0.60, constraint=0.2, prune={"tune": "weights"}, checkpoint="c1",
                 baseline=0.95))
    table = grid_table(collect(write(tmp_path, runs)))
    mask = table.loc[("minilm", "sst2", "+mask", "default", short_hash_of("c0"))]
    assert (mask["0.1"], mask["0.15"], mask["0.3"]) == ("40.00 ± 1.00 (8.0x)", "--",
                                                        "80.00 ± 1.00")
    assert "0.5" not in table.columns
    weights = table.loc[("minilm", "sst2", "+weights", "default", short_hash_of("c0"))]
    assert weights["0.2"] == "85.00 ± 1.00 (4.0x) (+1 more)"  # 3 seeds before 2
    steps = table.loc[("minilm", "sst2", "+weights", "steps=2", short_hash_of("c0"))]
    assert steps["0.2"] == "88.00 ± 1.00 (4.0x)"
    other = table.loc[("minilm", "sst2", "+weights", "default", short_hash_of("c1"))]
    assert (other["baseline"], other["0.2"]) == ("95.00", "60.00 ± 1.00")  # never pooled
    assert list(table.index.get_level_values("method")) == ["default"] * 3 + ["steps=2"]


def test_second_metric_table(tmp_path):
    """MRPC reports accuracy (the main metric) and F1: F1 gets its own table."""
    from analysis.collect import collect
    from analysis.tables import main_table, second_table

    runs = []
    for s, (acc, f1) in enumerate(((0.80, 0.86), (0.81, 0.87), (0.82, 0.88))):
        r = record(task="mrpc", seed=s, pruned=acc)
        r["pruned"]["f1"], r["baseline"]["f1"] = f1, 0.90
        runs.append(r)
    table = collect(write(tmp_path, runs_of(mrpc=runs)))
    assert main_table(table).loc[("minilm", "mrpc", "accuracy"), "ours @0.6"] == "81.00 ± 1.00"
    second = second_table(table).loc[("minilm", "mrpc", "f1")]
    assert (second["baseline"], second["ours @0.6"]) == ("90.00", "87.00 ± 1.00")


def test_goals_table(results):
    """Drop <= 1 point at FLOPs 0.6 and <= 2 at 0.5: met, or missed by how much."""
    from analysis.collect import collect
    from analysis.tables import goals_table

    runs = collect(write(results, runs_of(d5=three(0.86, constraint=0.5))))
    row = goals_table(runs).loc[("minilm", "sst2", "accuracy")]
    assert (row["drop @0.6"], row["<= 1 @0.6"]) == ("4.00 ± 1.00", "missed by 3.00")
    assert (row["drop @0.5"], row["<= 2 @0.5"]) == ("4.00 ± 1.00", "missed by 2.00")


def test_methods_table_pairs_each_method_with_one_shot_and_counts_every_fisher_pass(tmp_path):
    """``prune.steps=2`` and ``prune.obs`` against the one-shot default on the same seeds; a
    method's pruning time counts the shared first Fisher pass at its computed time (the run
    itself loaded it from the cache) plus the later step's own pass and tuning."""
    from analysis.collect import collect
    from analysis.studies import methods_table

    runs = {}
    for s in range(3):
        runs[f"one{s}"] = record(seed=s, constraint=0.2, pruned=0.80 + 0.01 * s,
                                 prune={"tune": "weights"}, sweep="iterative_cpu",
                                 fisher={"key": f"k{s}", "hit": False, "seconds": 30.0})
        two = record(seed=s, constraint=0.2, pruned=0.82 + 0.01 * s, sweep="iterative_cpu",
                     prune={"tune": "weights", "steps": 2},
                     fisher={"key": f"k{s}", "hit": True, "seconds": 0.1})
        two["timings"].update(fisher=30.1, tune=40.0, pruning_total=70.71)
        runs[f"two{s}"] = two
        obs = record(seed=s, constraint=0.2, pruned=0.79 + 0.02 * s, sweep="iterative_cpu",
                     prune={"tune": "weights", "obs": True},
                     fisher={"key": f"k{s}", "hit": True, "seconds": 0.1})
        # made before the record's total counted the obs stage: the table adds it
        obs["timings"].update(fisher=0.1, obs=6.0, pruning_total=20.71)
        runs[f"obs{s}"] = obs
        all_ = record(seed=s, constraint=0.2, pruned=0.81, sweep="iterative_cpu",
                      prune={"tune": "weights", "tune_samples": None},
                      fisher={"key": f"k{s}", "hit": True, "seconds": 0.1})
        all_["timings"].update(fisher=0.1, tune=40.0, pruning_total=40.6)
        runs[f"all{s}"] = all_
        both = record(seed=s, constraint=0.2, pruned=0.83, sweep="iterative_cpu",
                      prune={"tune": "weights", "steps": 2, "tune_samples": None},
                      fisher={"key": f"k{s}", "hit": True, "seconds": 0.1})
        both["timings"].update(fisher=30.1, tune=80.0, pruning_total=140.6)
        runs[f"both{s}"] = both
    runs["elsewhere"] = record(constraint=0.4, prune={"tune": "weights"})  # nothing to pair
    runs["another-sweep"] = record(constraint=0.2, prune={"tune": "weights", "steps": 3})
    table = methods_table(collect(write(tmp_path, runs)))
    methods = list(table.index.get_level_values("method"))
    assert methods[:3] == ["default", "obs=true", "steps=2"] and len(methods) == 5
    one = table.loc[("minilm", "sst2", "accuracy", "+weights", 0.2, "default")]
    two = table.loc[("minilm", "sst2", "accuracy", "+weights", 0.2, "steps=2")]
    obs = table.loc[("minilm", "sst2", "accuracy", "+weights", 0.2, "obs=true")]
    assert (one["pruned"], two["pruned"]) == ("81.00 ± 1.00", "83.00 ± 1.00")
    assert two["vs default"] == "+2.00 ± 0.00"
    assert obs["vs default"] == "no difference (+0.00 ± 1.00)"
    assert (one["pruning s"], two["pruning s"]) == ("50.6 ± 0.0", "100.6 ± 0.0")
    assert two["time / default"] == "1.99" and one["vs default"] == ""
    assert (obs["pruning s"], obs["time / default"]) == ("56.6 ± 0.0", "1.12")
    # issue 25's bound: against the one-shot run on the same samples, not the default
    same = "time / one shot, same samples"
    assert (one[same], two[same], obs[same]) == ("1.00", "1.99", "1.12")
    rows = table.reset_index().set_index("method")
    both = rows.loc[[m for m in methods if "steps=2" in m and "tune_samples" in m][0]]
    alone = rows.loc[[m for m in methods if m.startswith("tune_samples")][0]]
    seconds = {name: float(row["pruning s"].split()[0]) for name, row in
               (("alone", alone), ("both", both), ("one", one))}
    assert seconds["alone"] > seconds["one"] + 15  # tuned on all samples: 40 s, not 20
    assert (both[same], alone[same]) == (f"{seconds['both'] / seconds['alone']:.2f}", "1.00")
    assert both["time / default"] == f"{seconds['both'] / seconds['one']:.2f}" != both[same]


def test_a_family_runs_fisher_pass_counts_once_in_a_cache_hits_time(tmp_path):
    """A cache hit is charged the mean of the passes computed for its key, each pass once: a
    family run's pass (on each of its three constraints' rows, 30 s) and a single run's (60 s)
    average to 45 s, not to 37.5 s as four rows would."""
    from analysis.collect import collect
    from analysis.studies import pruning_seconds

    runs = {f"family/c{c}": record(constraint=c, prune={"tune": "weights"},
                                   fisher={"key": "k", "hit": False, "seconds": 30.0})
            for c in (0.2, 0.25, 0.3)}
    runs["single"] = record(constraint=0.4, prune={"tune": "weights"},
                            fisher={"key": "k", "hit": False, "seconds": 60.0})
    hit = record(constraint=0.2, prune={"tune": "weights", "steps": 2},
                 fisher={"key": "k", "hit": True, "seconds": 0.5})
    hit["timings"].update(fisher=0.5, tune=10.0, pruning_total=10.5)
    runs["hit"] = hit
    table = collect(write(tmp_path, runs))
    row = table[table["path"].astype(str).str.contains("hit")].iloc[0]
    stat = pruning_seconds(table, row["setting"])
    assert round(stat.mean, 6) == round(row["t_pruning"] - 0.5 + 45.0, 6)


def test_kprune_reference_sits_beside_our_best_at_the_same_flops_removed(tmp_path):
    """K-prune's figures come from the committed CSV; ours is the best setting at the same share
    of FLOPs removed (40% removed = FLOPs 0.6 kept), with its drop; nothing measured: "--"."""
    from analysis.collect import collect
    from analysis.studies import kprune_table

    runs = collect(write(tmp_path / "runs", runs_of(
        mask=three(0.84, model="mpnet", task="mrpc", baseline=0.86, latency=0.6),
        weights=three(0.855, model="mpnet", task="mrpc", baseline=0.86, latency=0.6,
                      prune={"tune": "weights"}))))
    table = kprune_table(runs)
    row = table.loc[("mrpc", "accuracy", "40%")]
    assert row["K-prune (BERT-base)"] == "88.3"
    assert row["ours (mpnet)"] == "85.50 ± 1.00 (drop 0.50)"
    assert row["ours: setting"] == "+weights default"
    assert table.loc[("mrpc", "accuracy", "80%"), "paper's method (per K-prune)"] == "68.4"
    assert table.loc[("mrpc", "accuracy", "80%"), "ours (mpnet)"] == "--"
    assert table.loc[("squad", "f1", "60%"), "ours (mpnet)"] == "--"
    geo = table.loc[("geomean", "speedup within 3 points", "--")]
    assert geo["K-prune (BERT-base)"] == "2.22" and geo["ours (mpnet)"] == "1.67x"

"""Tables and figures from fixture results; the notebook runs headless on the same results."""

import json
import os

import pytest
from conftest import ROOT


def record(model="minilm", task="sst2", constraint=0.6, stage=("r", "t", "full"), seed=0,
           baseline=0.9, pruned=0.88, hit=False):
    rearrange, tune, teacher = stage[0] == "r", stage[1] == "t", stage[2]
    return {
        "model": model, "task": task, "constraint": constraint, "seed": seed,
        "num_samples": 2048, "metric": "accuracy",
        "baseline": {"accuracy": baseline}, "pruned": {"accuracy": pruned},
        "drop": 100 * (baseline - pruned),
        "flops": {"baseline": 1.0, "pruned": constraint, "ratio": constraint},
        "masks": {"heads_kept": 50, "neurons_kept": 4000},
        "timings": {"fisher": 30.0, "search": 0.01, "rearrange": 0.5, "tune": 20.0,
                    "physical": 0.1, "pruning_total": 50.6},
        "fisher_cache": {"key": "k", "hit": hit},
        "config": {"prune": {"rearrange": rearrange, "tune": tune, "tune_teacher": teacher}},
    }


@pytest.fixture
def results(tmp_path):
    runs = {
        "a": record(constraint=0.4, pruned=0.80),
        "b": record(constraint=0.6, pruned=0.86),
        "c": record(constraint=0.6, stage=("-", "-", "full"), pruned=0.70, hit=True),
        "d": record(constraint=0.6, stage=("r", "-", "full"), pruned=0.75, hit=True),
        "e": record(constraint=0.6, stage=("r", "t", "ta"), pruned=0.85, hit=True),
        "f": record(model="bert-base", task="mnli", constraint=0.6, baseline=0.8453,
                    pruned=0.83),
    }
    for name, r in runs.items():
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "results.json").write_text(json.dumps(r))
    return tmp_path / "runs"


def test_main_and_ablation_tables_have_the_expected_cells(results):
    from analysis.collect import collect
    from analysis.tables import ablation_table, main_table, paper_results, to_latex

    df = collect(results)
    assert len(df) == 6
    main = main_table(df, paper_results())
    assert main.loc[("minilm", "sst2", "accuracy"), "ours @0.6"] == pytest.approx(86.0)
    assert main.loc[("minilm", "sst2", "accuracy"), "ours @0.4"] == pytest.approx(80.0)
    assert main.loc[("minilm", "sst2", "accuracy"), "baseline"] == pytest.approx(90.0)
    # the published number sits beside ours for the same model, task and constraint
    assert main.loc[("bert-base", "mnli", "accuracy"), "paper @0.6"] == pytest.approx(82.25)
    ablation = ablation_table(df)
    row = ablation.loc[("minilm", "sst2", 0.6)]
    assert list(ablation.columns) == ["search", "+rearrange", "+tune", "+tune (TA)"]
    assert (row["search"], row["+rearrange"], row["+tune"], row["+tune (TA)"]) == \
        pytest.approx((70.0, 75.0, 86.0, 85.0))
    assert "86.00" in to_latex(main)


def test_a_repeated_run_is_counted_once(results):
    from analysis.collect import collect

    (results / "b2").mkdir()
    (results / "b2" / "results.json").write_text(json.dumps(record(constraint=0.6, pruned=0.87)))
    df = collect(results)
    assert len(df) == 6
    sel = df[(df["stage"] == "+tune") & (df["constraint"] == 0.6) & (df["model"] == "minilm")]
    assert sel["pruned"].tolist() == [pytest.approx(87.0)]  # the newest file wins


def test_make_all_writes_tables_and_figures(results, tmp_path):
    from analysis.make_tables import make_all

    written = make_all([results], tmp_path / "out")
    for name in ("main.md", "main.tex", "ablation.md", "ablation.tex", "time"):
        assert written[name].exists() and written[name].stat().st_size > 0
    assert (tmp_path / "out" / "accuracy_vs_flops_sst2.png").exists()
    assert "| minilm" in written["main.md"].read_text()


def test_notebook_runs_headless(results, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "analysis" / "report.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "notebooks are stored without outputs"
    os.environ["FASTPRUNE_RESULTS"] = str(results)
    os.environ["FASTPRUNE_TABLES"] = str(tmp_path / "nb")
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["FASTPRUNE_RESULTS"], os.environ["FASTPRUNE_TABLES"]
    assert (tmp_path / "nb" / "main.md").exists()
    text = "".join(str(o.get("data", {}).get("text/plain", "")) for c in nb.cells
                   for o in c.get("outputs", []))
    assert "86.0" in text


def test_sample_count_studies_do_not_leak_into_the_main_table(results):
    from analysis.collect import collect
    from analysis.tables import ablation_table, main_table, samples_table

    extra = record(constraint=0.6, pruned=0.50)
    extra["num_samples"] = 256
    (results / "g").mkdir()
    (results / "g" / "results.json").write_text(json.dumps(extra))
    df = collect(results)
    assert main_table(df).loc[("minilm", "sst2", "accuracy"), "ours @0.6"] == pytest.approx(86.0)
    assert ablation_table(df).loc[("minilm", "sst2", 0.6), "+tune"] == pytest.approx(86.0)
    assert samples_table(df).loc[("minilm", "sst2", 0.6, 256), "mean"] == pytest.approx(50.0)


def test_latency_constrained_runs_stay_out_of_the_flops_tables(results):
    from analysis.collect import collect
    from analysis.tables import main_table

    extra = record(constraint=0.6, pruned=0.40)
    extra["constraint_kind"] = "latency"
    (results / "h").mkdir()
    (results / "h" / "results.json").write_text(json.dumps(extra))
    df = collect(results)
    assert set(df["kind"]) == {"flops", "latency"}
    assert main_table(df).loc[("minilm", "sst2", "accuracy"), "ours @0.6"] == pytest.approx(86.0)


def test_tuning_sample_variants_are_distinct_runs_and_stay_out_of_the_main_table(results):
    from analysis.collect import collect
    from analysis.tables import ablation_table, main_table, samples_table

    for name, cap, pruned in (("t1", 512, 0.87), ("t2", 512, 0.87), ("t3", 256, 0.60)):
        extra = record(constraint=0.6, pruned=pruned)
        extra["config"]["prune"]["tune_samples"] = cap
        (results / name).mkdir()
        (results / name / "results.json").write_text(json.dumps(extra))
    df = collect(results)
    runs = df[(df["stage"] == "+tune") & (df["constraint"] == 0.6) & (df["model"] == "minilm")]
    # the run tuned on all 2,048 samples and the one tuned on 512 are both kept (512 twice: once)
    assert sorted(runs["tune_samples"]) == [256, 512, 2048]
    assert main_table(df).loc[("minilm", "sst2", "accuracy"), "ours @0.6"] == pytest.approx(87.0)
    assert ablation_table(df).loc[("minilm", "sst2", 0.6), "+tune"] == pytest.approx(87.0)
    # the sample-count study tunes on all samples: the subset-tuned runs are not its cells
    assert samples_table(df).loc[("minilm", "sst2", 0.6, 2048), "mean"] == pytest.approx(86.0)

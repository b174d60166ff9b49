"""The benchmark script: its table, its option checks, and (slow) a quick run end to end."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from experiments import bench


def family(one: float, four: float, fam: float) -> dict:
    return {"one_run": one, "four_runs": four, "family": fam,
            "family_over_one_run": fam / one, "family_over_four_runs": fam / four}


def test_family_table_has_a_row_set_per_variant_with_its_ratios():
    text = bench.table([], {"constraints": [0.4, 0.5, 0.6, 0.7],
                            "variants": {"latency timed": family(50.0, 200.0, 85.0),
                                         "latency off": family(40.0, 160.0, 58.0)}})
    rows = [line for line in text.splitlines() if line.startswith("| one family run")]
    assert rows == ["| one family run of the same four | latency timed | 85.0 | 1.70 |",
                    "| one family run of the same four | latency off | 58.0 | 1.45 |"]
    assert "| four single runs (0.4/0.5/0.6/0.7) | latency off | 160.0 | 4.00 |" in text
    assert "peak RSS" not in text  # no model was benchmarked, so no per-model tables


def test_contradictory_options_stop_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["bench", "--family-only", "--no-family",
                                      "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="leave nothing to run"):
        bench.main()
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_quick_bench_of_one_model_writes_its_tables(tmp_path):
    res = subprocess.run([sys.executable, "-m", "experiments.bench", "--quick", "--models",
                          "minilm", "--no-family", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "bench-quick-minilm.json").read_text())
    (model,) = data["models"]
    assert data["family"] is None and model["model"] == "minilm"
    for mode in ("mask", "weights"):
        t = model["modes"][mode]["timings"]
        assert t["fisher"] > 0 and t["tune"] > 0
        assert t["total"] >= t["fisher"] + t["tune"]
        assert model["modes"][mode]["ratio_to_floor"] == pytest.approx(t["total"] / model["floor"])
    for run in model["constraints"].values():
        assert 0 < run["flops_ratio"] <= 0.6 + 1e-9 and run["latency"]["speedup"] > 0
    assert "| minilm |" in (tmp_path / "bench-quick-minilm.md").read_text()

"""Sweeps: every experiment config composes and runs one point; a sweep resumes without redoing
or duplicating runs; constraints of one sweep share the Fisher information through the cache."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from test_run import FAST, run

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def sweep_params(name):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    return cfg, {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_its_first_point_runs(name, tiny_checkpoints, tmp_path):
    cfg, params = sweep_params(name)
    assert cfg.sweep_name == name
    for group in ("model", "task", "stages"):
        for option in params.get(group, []):
            assert (ROOT / "conf" / group / f"{option}.yaml").exists(), f"{group}={option}"
    first = [f"{k}={v[0]}" for k, v in params.items()]
    assert "task=sst2" in first or "task" not in params  # the first point is a GLUE run
    if cfg.constraint_kind == "latency":
        # a tiny model's latency is mostly fixed overhead: 0.5 of it is out of reach (the run
        # says so and stops), so its first point runs at a budget the tiny model can meet
        first = [p if not p.startswith("constraint=") else "constraint=0.9" for p in first]
    budget = float(next(p for p in first if p.startswith("constraint=")).split("=")[1])
    record = run([f"experiment={name}", *first, f"model.path={tiny_checkpoints['cls2']}",
                  *FAST], tmp_path)
    assert record["constraint_kind"] == cfg.constraint_kind
    if cfg.constraint_kind == "latency":
        assert record["latency"]["predicted_ratio"] <= budget + 1e-6
    else:
        assert record["flops"]["ratio"] <= budget + 1e-9


def multirun(out: Path, ckpt: Path):
    args = [sys.executable, str(ROOT / "run.py"), "-m", "experiment=main_cpu",
            f"model.path={ckpt}", f"paths.output_dir={out}", f"paths.cache_dir={out}/cache",
            "save_model=false", *FAST]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


def test_sweep_reuses_fisher_and_resumes_without_redoing_runs(tiny_checkpoints, tmp_path):
    multirun(tmp_path, tiny_checkpoints["cls2"])
    results = sorted((tmp_path / "sweeps" / "main_cpu").glob("*/results.json"))
    names = [p.parent.name for p in results]
    assert [n.split(",")[0] for n in names] == [f"constraint={c}" for c in (0.4, 0.5, 0.6)]
    records = [json.loads(p.read_text()) for p in results]
    assert sorted(r["fisher_cache"]["hit"] for r in records) == [False, True, True]
    assert len({r["fisher_cache"]["key"] for r in records}) == 1
    stamps = [p.stat().st_mtime_ns for p in results]
    # an interrupted sweep: one run's result is lost, the others must be kept, not redone
    results[1].unlink()
    log = multirun(tmp_path, tiny_checkpoints["cls2"])
    assert log.count("skipping") == 2
    again = sorted((tmp_path / "sweeps" / "main_cpu").glob("*/results.json"))
    assert len(again) == 3
    assert again[0].stat().st_mtime_ns == stamps[0] and again[2].stat().st_mtime_ns == stamps[2]
    assert json.loads(again[1].read_text())["fisher_cache"]["hit"] is True


def test_fisher_cache_miss_on_another_seed_or_sample_count(tiny_checkpoints, tmp_path):
    cache = f"paths.cache_dir={tmp_path}/cache"
    base = [f"model.path={tiny_checkpoints['cls2']}", cache, "save_model=false", *FAST]
    first = run(base, tmp_path / "a")
    assert first["fisher_cache"]["hit"] is False
    assert run([*base, "constraint=0.4"], tmp_path / "b")["fisher_cache"]["hit"] is True
    assert run([*base, "seed=1"], tmp_path / "c")["fisher_cache"]["hit"] is False
    assert run([*base, "prune.num_samples=48"], tmp_path / "d")["fisher_cache"]["hit"] is False


def test_existing_result_of_another_configuration_is_rerun_and_kept(tiny_checkpoints, tmp_path):
    """A finished run is skipped only if it was made with the same settings; a result of other
    settings (say, a changed default) is re-run and the old file kept beside it, not lost."""
    base = [f"model.path={tiny_checkpoints['cls2']}", "save_model=false", *FAST]
    first = run(base, tmp_path)
    assert run([*base, "progress=true"], tmp_path) == first  # reporting only: skipped
    again = run([*base, "prune.tune_damp=0.05"], tmp_path)
    assert again["config"]["prune"]["tune_damp"] == 0.05
    stale = list(tmp_path.glob("results.stale-*.json"))
    assert len(stale) == 1 and json.loads(stale[0].read_text()) == first

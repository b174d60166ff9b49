"""The Hydra application end to end on tiny checkpoints and the real shared data (bad input:
test_bad_input.py)."""

import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir

from prune import load_pruned

FAST = ["prune.num_samples=64", "prune.batch_size=16", "eval.max_samples=96", "progress=false",
        "latency.batch_size=4", "latency.seq_len=16", "latency.min_run_time=0.01",
        "latency.table_min_run_time=0.01"]


def config(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def run(overrides, out_dir):
    """``run.run`` on the composed overrides; its records as ``results.json`` holds them
    (dicts of the ``Record`` schema), so tests read what a user reads."""
    import run as app
    from experiments.records import Record

    if not any(o.startswith("paths.cache_dir=") for o in overrides):
        overrides = [*overrides, f"paths.cache_dir={out_dir}/cache"]
    out = app.run(config(overrides), out_dir=out_dir)
    if isinstance(out, list):
        assert all(isinstance(r, Record) for r in out)
        return [r.to_dict() for r in out]
    assert out is None or isinstance(out, Record)
    return None if out is None else out.to_dict()


@pytest.mark.parametrize("task,ckpt", [("sst2", "cls2"), ("stsb", "reg1")])
def test_run_writes_results_and_a_reloadable_model(tiny_checkpoints, tmp_path, task, ckpt):
    record = run([f"task={task}", f"model.path={tiny_checkpoints[ckpt]}", "constraint=0.5",
                  *FAST], tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["flops"] == record["flops"]
    assert saved["flops"]["ratio"] <= 0.5 + 1e-9
    assert saved["num_samples"] == 64 and saved["num_eval"] == 96
    assert set(saved["timings"]) >= {"fisher", "search", "rearrange", "tune", "physical",
                                     "eval_baseline", "eval_pruned"}
    assert saved["config"]["constraint"] == 0.5
    key = saved["metric"]
    assert key in saved["baseline"] and key in saved["pruned"]
    model = load_pruned(tmp_path / "pruned_model")
    assert model.config.fastprune_heads == saved["masks"]["heads_per_layer"]
    masks = torch.load(tmp_path / "masks.pt")
    assert (masks["final"]["head"] != 0).sum(1).tolist() == saved["masks"]["heads_per_layer"]


def test_pipeline_switches_turn_stages_off(tiny_checkpoints, tmp_path):
    record = run([f"model.path={tiny_checkpoints['cls2']}", "prune.rearrange=false",
                  "prune.tune=off", "save_model=false", *FAST], tmp_path)
    assert "rearrange" not in record["timings"] and "tune" not in record["timings"]
    assert record["tune"] is None
    assert not (tmp_path / "pruned_model").exists()


def cli(*args):
    start = time.perf_counter()
    res = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    return res, time.perf_counter() - start


@pytest.mark.parametrize("group,value", [("model", "gpt9"), ("task", "nosuchtask")])
def test_unknown_model_or_task_exits_nonzero_with_the_options(group, value):
    res, _ = cli(f"{group}={value}")
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert f"Could not find '{group}/{value}'" in out
    assert "minilm" in out or "sst2" in out  # the available options are listed


def test_cli_error_is_one_clear_line_and_exit_code(tmp_path):
    res, _ = cli(f"model.path={tmp_path}/missing", f"hydra.run.dir={tmp_path}/run")
    assert res.returncode == 2
    lines = [l for l in (res.stdout + res.stderr).splitlines() if "ERROR" in l or "Error" in l]
    assert len(lines) == 1 and "does not exist" in lines[0]
    assert "Traceback" not in res.stdout + res.stderr

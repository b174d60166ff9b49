"""Bad input, round two: options the schema does not know or cannot take, and the results
record on a full disk. Each stops with one line naming the fix before any weights load, or, for
the record, with one line that carries the run's numbers."""

from __future__ import annotations

import re

import pytest
from test_bad_input import LEAN, Env, lean_run, no_weights  # noqa: F401 - a fixture
from test_run import run

from experiments.errors import RunError

CASES = [
    ("appended-unknown-key", ["+prune.constraint_type=latency"],
     r"unknown option prune.constraint_type \(did you mean constraint_kind\?\): remove it"),
    ("appended-unknown-top-level-key", ["+constraint_knd=latency"],
     r"unknown option constraint_knd \(did you mean constraint_kind\?\)"),
    ("negative-seed", ["seed=-1"], r"seed=-1: use a whole number from 0 to 2\*\*32 - 1"),
    ("float-sample-count", ["prune.num_samples=1e3"],
     r"prune.num_samples=1000.0: write it as a whole number \(prune.num_samples=1000\)"),
    ("bad-granularity", ["prune.granularity=0"], r"granularity=0: use a positive integer"),
    ("bad-layer-floor", ["prune.layer_floor=1.5"], r"layer_floor=1.5: use a number in \[0, 1\)"),
    # the tuning solve's options (the library's TuneOptions) under their flat config keys
    ("negative-tune-damp", ["prune.tune_damp=-1"], r"^prune.tune_damp=-1.0: use a damping >= 0"),
    ("bad-tune-solver", ["prune.tune_solver=qr"],
     r"^prune.tune_solver='qr': use one of cholesky, lsmr"),
    ("bad-tune-target", ["prune.tune_ffn_target=both"],
     r"^prune.tune_ffn_target='both': use one of masked, unmasked"),
    ("bad-tune-bound", ["prune.tune_max_scale=0"],
     r"^prune.tune_max_scale=0.0: use a positive bound"),
    ("negative-input-damp", ["prune.tune_inputs=true", "prune.tune_input_damp=-0.01"],
     r"^prune.tune_input_damp=-0.01: use a damping >= 0"),
    ("bad-tune-mode-while-off", ["prune.tune=off", "prune.tune_weight_damp=-0.5"],
     r"^prune.tune_weight_damp=-0.5: use a damping >= 0"),
]


@pytest.mark.usefixtures("no_weights")
@pytest.mark.parametrize("case,extra,message", CASES, ids=[c[0] for c in CASES])
def test_bad_option_stops_before_weights_load(tiny_checkpoints, tmp_path, case, extra, message):
    env = Env(tiny_checkpoints, tmp_path)
    with pytest.raises(RunError) as err:
        run([env.model(), env.data(), *LEAN, *extra], env.out)
    text = str(err.value)
    assert "\n" not in text and re.search(message, text), text


def test_full_disk_for_the_record_is_one_line_with_the_numbers(tiny_checkpoints, tmp_path,
                                                               monkeypatch):
    from experiments.records import Record

    def full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Record, "write", full)
    env = Env(tiny_checkpoints, tmp_path)
    with pytest.raises(RunError) as err:
        lean_run(env)
    text = str(err.value)
    assert "\n" not in text
    assert re.search(r"could not write .*results.json \(No space left on device\); cls2/sst2 at "
                     r"0.6: accuracy \d+\.\d\d -> \d+\.\d\d, FLOPs 0\.\d+", text), text


def test_a_noisy_latency_says_so_in_the_summary():
    from run import latency_line

    lat = {"baseline": {"median": 1.7772}, "pruned": {"median": 2.2981}, "ratio": 1.293,
           "batch_size": 32, "seq_len": 128, "dtype": "float32"}
    assert "NOISY" not in latency_line({**lat, "noisy": False})
    line = latency_line({**lat, "noisy": True})
    assert "\n" not in line and "NOISY" in line and "1777.2 -> 2298.1" in line


# --- typed values on the command line: Hydra reads any whole number as a boolean -------------

TYPED = [
    (["prune.obs=3"], "prune.obs=3: use true or false"),  # Hydra would run it as obs=true
    (["prune.obs=maybe"], "prune.obs=maybe: use true or false"),  # Hydra: several lines
    (["latency.enabled=1"], "latency.enabled=1: use true or false"),
    (["+prune.rearrange=0"], "prune.rearrange=0: use true or false"),
    (["prune.obs=false,3"], "prune.obs=3: use true or false"),  # each value of a sweep
    (["prune.steps=2.5"], "prune.steps=2.5: use a whole number"),
    (["prune.tune_samples=nul"], "prune.tune_samples=nul: use a whole number or null"),
    (["eval.max_samples="], "eval.max_samples=: use a whole number or null"),
    (["prune.layer_floor=abc"], "prune.layer_floor=abc: use a number"),
]
FINE = ["prune.obs=false,true", "progress=False", "seed=0,1,2", "seed=range(3)",
        "prune.tune_samples=null", "prune.tune_damp=1e-3", "prune.tune_samples=1_024",
        "constraint=[0.2,0.3]", "task=sst2", "model.path=/some/where", "prune.tune=weights",
        "hydra.job.chdir=false", "-m", "--cfg", "job", "~prune.obs"]


@pytest.mark.parametrize("args,line", TYPED, ids=[t[0][0] for t in TYPED])
def test_a_typed_option_written_as_another_type_is_one_line(args, line):
    from experiments.config import check_override_values

    with pytest.raises(RunError) as err:
        check_override_values(args)
    assert str(err.value) == line


def test_typed_options_written_as_hydra_writes_them_pass():
    from experiments.config import check_override_values

    check_override_values(FINE)  # raises nothing


def test_a_whole_number_for_a_switch_stops_the_cli_before_hydra(tmp_path):
    from test_run import cli

    res, _ = cli("-m", "prune.obs=false,3", f"paths.output_dir={tmp_path}/out")
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert out.strip() == "error: prune.obs=3: use true or false", out
    assert not (tmp_path / "out").exists()

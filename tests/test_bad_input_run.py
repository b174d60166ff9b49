"""Bad input, round two: the run-level cases (issue 24). Ctrl-C during a family, a run
directory that becomes unwritable mid-run, W&B online without a network, failed validations
that left run folders behind, and a sweep experiment run without ``-m``. Each stops with one
line naming the fix (or warns once and goes on); never a traceback, never a stale lock.
"""

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT
from test_bad_input import LEAN, Env, lean_run, warnings_of
from test_run import cli

import experiments.config
import experiments.records
import experiments.runner
from experiments.config import discard_unused_run_dir
from experiments.errors import RunError

FAMILY = "constraint=[0.4,0.5]"


def cli_patched(patch: str, *args: str) -> subprocess.CompletedProcess:
    """``python run.py *args`` with ``patch`` (Python; ``runner`` is ``experiments.runner``)
    applied first: the real CLI, with a failure placed where asked."""
    code = "\n".join([
        "import os, runpy, signal, sys",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "import experiments.runner as runner",
        textwrap.dedent(patch),
        f"sys.argv = [{str(ROOT / 'run.py')!r}, *{list(args)!r}]",
        f"runpy.run_path({str(ROOT / 'run.py')!r}, run_name='__main__')",
    ])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def lean_args(env: Env) -> list[str]:
    return [env.model(), env.data(), f"paths.cache_dir={env.tmp}/cache", *LEAN]


def one_line(out: str, marker: str) -> str:
    assert "Traceback" not in out, out
    (line,) = [line for line in out.splitlines() if marker in line]
    return line


# --- 1. Ctrl-C during a family -------------------------------------------------------------

CTRL_C_AT_SECOND = """
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, even when the
# suite itself runs in the background (``nohup ... &`` starts it with SIGINT ignored)
real = runner.prune_one
def prune_one(plan, loaded, constraint, *args):
    if constraint == 0.5:  # Ctrl-C once the first constraint is saved
        os.kill(os.getpid(), signal.SIGINT)
    return real(plan, loaded, constraint, *args)
runner.prune_one = prune_one
"""


def test_ctrl_c_during_a_family_is_one_line_and_the_rerun_resumes(tiny_checkpoints, tmp_path,
                                                                   monkeypatch):
    env = Env(tiny_checkpoints, tmp_path)
    args = lean_args(env)
    # the default run directory has a timestamp: the line says which directory to resume in
    res = cli_patched(CTRL_C_AT_SECOND, *args, FAMILY, f"paths.output_dir={tmp_path}/out")
    out = res.stdout + res.stderr
    assert res.returncode == 130, out
    line = one_line(out, "interrupted")
    (run_dir,) = (tmp_path / "out" / "runs").glob("*/*/*/*")
    assert f"the finished constraint(s) 0.4 are saved in {run_dir};" in line
    # quoted for the shell and for Hydra: the path has brackets, commas and spaces
    assert f"""re-run the same command with 'hydra.run.dir="{run_dir}"' to resume""" in line
    assert not (run_dir / ".lock").exists()
    assert json.loads((run_dir / "c0.4" / "results.json").read_text())["complete"] is True
    assert not (run_dir / "c0.5" / "results.json").exists()

    done = []
    real = experiments.runner.prune_one
    monkeypatch.setattr(experiments.runner, "prune_one",
                        lambda plan, loaded, c, *a: done.append(c) or real(plan, loaded, c, *a))
    records = lean_run(env, FAMILY, out=run_dir)
    assert done == [0.5] and [r["constraint"] for r in records] == [0.4, 0.5]


def test_ctrl_c_with_a_fixed_run_directory_says_rerun_the_same_command(tiny_checkpoints,
                                                                       tmp_path):
    env = Env(tiny_checkpoints, tmp_path)
    res = cli_patched(CTRL_C_AT_SECOND, *lean_args(env), FAMILY,
                      f"hydra.run.dir={env.out}")
    out = res.stdout + res.stderr
    assert res.returncode == 130, out
    line = one_line(out, "interrupted")
    assert line.endswith(f"saved in {env.out}; re-run the same command to resume (finished "
                         f"ones are skipped)")
    assert not (env.out / ".lock").exists()


# --- 2. the run directory becomes unwritable mid-run ---------------------------------------


def unwritable_from(monkeypatch, env: Env, stage: str) -> None:
    """From ``stage`` (a runner function) on, nothing can be created or removed in the run
    directory, as after ``chmod a-w`` (which root, running these tests, would ignore)."""
    blocked = []

    def denied(path):
        return bool(blocked) and path is not None and \
            Path(path).resolve().is_relative_to(env.out.resolve())

    real_mkstemp, real_unlink = experiments.records.tempfile.mkstemp, os.unlink

    def mkstemp(*args, dir=None, **kwargs):
        if denied(dir):
            raise PermissionError(13, "Permission denied", str(Path(dir) / "tmpfile"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def unlink(path, *args, **kwargs):
        if denied(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    real_stage = getattr(experiments.runner, stage)

    def start(*args, **kwargs):
        blocked.append(True)
        return real_stage(*args, **kwargs)

    monkeypatch.setattr(experiments.records.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr("os.unlink", unlink)
    monkeypatch.setattr(experiments.runner, stage, start)


@pytest.mark.parametrize("stage,message", [
    ("prune_masks", r"^could not write .*/run/results.json \(Permission denied\); .* at 0.6: "
                    r"accuracy .*; make .*/run writable again and re-run$"),
    ("pruning_state", r"^could not save the pruned model in .*/run \(Permission denied\); the "
                      r"results are in results.json; make .*/run writable again and re-run$"),
])
def test_run_directory_unwritable_mid_run_is_one_line_and_frees_the_lock(
        tiny_checkpoints, tmp_path, monkeypatch, stage, message):
    env = Env(tiny_checkpoints, tmp_path)
    with monkeypatch.context() as patch:
        unwritable_from(patch, env, stage)
        with pytest.raises(RunError) as err:
            lean_run(env)
    assert "\n" not in str(err.value), str(err.value)
    assert re.search(message, str(err.value)), str(err.value)
    lock = env.out / ".lock"  # could not be removed: emptied, so nobody holds it
    assert not lock.exists() or not experiments.runner._holder_alive(lock)
    assert lean_run(env)["complete"] is True  # writable again: the re-run takes the lock over
    assert not lock.exists()


def test_refused_new_sub_directory_names_the_directory_to_make_writable(tmp_path):
    err = PermissionError(13, "Permission denied", str(tmp_path / "run" / "c0.5"))
    assert experiments.runner.write_fix(err, tmp_path / "run" / "c0.5") == \
        f"make {tmp_path} writable again"
    assert experiments.runner.write_fix(OSError(28, "No space left on device"), tmp_path) == \
        "free space"


FAMILY_JSON_DENIED = """
def denied(path, data):
    raise PermissionError(13, "Permission denied", str(path))
runner.write_json_atomic = denied
"""


def test_cli_failed_write_outside_the_records_is_one_line(tiny_checkpoints, tmp_path):
    env = Env(tiny_checkpoints, tmp_path)
    res = cli_patched(FAMILY_JSON_DENIED, *lean_args(env), FAMILY, f"hydra.run.dir={env.out}")
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    line = one_line(out, "error:")
    assert f"could not write {env.out}/family.json (Permission denied); make {env.out} " \
           f"writable again and re-run" in line
    assert not (env.out / ".lock").exists()


# --- 3. W&B online without a network -------------------------------------------------------


def test_wandb_without_network_fails_fast_once_per_process(tiny_checkpoints, tmp_path,
                                                           monkeypatch, caplog):
    import wandb

    env = Env(tiny_checkpoints, tmp_path)
    timeouts = []

    def init(*args, settings=None, **kwargs):  # what W&B raises once init_timeout has passed
        timeouts.append(settings["init_timeout"])
        raise wandb.errors.CommError('Timed out while retrying: Post "https://api.wandb.ai/'
                                     'graphql": dial tcp: lookup api.wandb.ai: no such host\n'
                                     'Consider increasing the init_timeout setting')

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    with caplog.at_level(logging.INFO, logger="fastprune"):
        records = lean_run(env, FAMILY, "logger=wandb", "logger.mode=online",
                           f"logger.dir={tmp_path}")
    assert len(timeouts) == 1 and timeouts[0] <= 30  # not W&B's 90 s, and not per constraint
    assert all((env.out / f"c{c}" / "results.json").exists() for c in (0.4, 0.5))
    assert [r["complete"] for r in records] == [True, True]
    (line,) = [w for w in warnings_of(caplog) if "wandb" in w]
    assert "\n" not in line and "results.json" in line and "not trying wandb again" in line
    assert "WANDB_INIT_TIMEOUT" in line


# --- 4. failed validations leave no run folder ---------------------------------------------


def test_cli_failed_validation_leaves_no_run_folder(tmp_path):
    res, _ = cli("constraint=[0.4,abc]", f"paths.output_dir={tmp_path}/out")
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "constraint='abc'" in one_line(out, "error:")
    assert not (tmp_path / "out").exists()


def test_cli_failed_validation_in_a_sweep_leaves_no_job_folder(tmp_path):
    res, _ = cli("-m", "constraint=abc", f"hydra.sweep.dir={tmp_path}/sweep")
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "constraint='abc'" in one_line(out, "error:")
    assert not (tmp_path / "sweep" / "constraint=abc").exists()


def test_only_a_run_folder_this_process_made_and_holding_only_hydra_files_is_removed(
        tmp_path, monkeypatch):
    def hydra_files(path: Path) -> Path:
        (path / ".hydra").mkdir(parents=True)
        (path / ".hydra" / "config.yaml").write_text("{}")
        (path / "run.log").write_text("")
        return path

    monkeypatch.setattr(experiments.config, "_CREATED", [])
    mine = hydra_files(tmp_path / "runs" / "c[0.4, 'abc']" / "time")
    kept = hydra_files(tmp_path / "theirs")  # existed before this process
    busy = hydra_files(tmp_path / "runs2" / "time")
    (busy / "results.json").write_text("{}")
    experiments.config._CREATED.extend([(tmp_path / "runs").resolve(),
                                        (tmp_path / "runs2").resolve()])
    for path in (mine, kept, busy):
        discard_unused_run_dir(path, "run", sweep_job=False)
    assert not (tmp_path / "runs").exists()
    assert (kept / "run.log").exists() and (busy / "run.log").exists()


# --- 5. a sweep experiment without -m ------------------------------------------------------


def test_cli_sweep_experiment_without_multirun_says_add_m(tmp_path):
    res, _ = cli("experiment=main_cpu", f"paths.output_dir={tmp_path}/out")
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    (line,) = out.strip().splitlines()
    assert "error: experiment=main_cpu is a sweep of 27 runs (over task, constraint, seed) " \
           "and runs only with -m: python run.py -m experiment=main_cpu " in line
    assert not (tmp_path / "out").exists()

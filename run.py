"""Hydra entry point: prune a fine-tuned model on a task under a FLOPs or latency constraint.

    python run.py model=minilm task=sst2 constraint=0.6
    python run.py constraint=[0.4,0.5,0.6,0.7]      # a family from one Fisher pass

Writes ``results.json``, ``masks.pt`` and the pruned model into the run directory (one
sub-directory per constraint for a family) and prints a summary. The work is done by the
``prune`` library and the ``experiments`` harness; this file lists the stages.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("FASTPRUNE_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import experiments.config  # noqa: E402,F401 - registers the structured config

log = logging.getLogger("fastprune")


def run(cfg: DictConfig, out_dir: str | Path | None = None) -> dict | list[dict] | None:
    """One pruning run (or a family of constraints); returns the record(s) also written to
    ``results.json`` (default directory: Hydra's run directory)."""
    from hydra.core.hydra_config import HydraConfig

    from experiments import runner

    out_dir = Path(out_dir or HydraConfig.get().runtime.output_dir)
    plan = runner.prepare(cfg, out_dir)  # every check that needs no weights
    try:
        if plan.todo and not prune_locked(plan):
            return None
        records = [plan.done[c] for c in plan.constraints]
        if plan.family:
            runner.family_summary(plan, records)
            return records
        return records[0]
    except KeyboardInterrupt:  # Ctrl-C: say what is saved (each record is written whole)
        raise Interrupted([c for c in plan.constraints if c in plan.done], out_dir) from None


def prune_locked(plan) -> bool:
    """``prune_todo`` holding the run directory's lock; ``False`` if another process holds
    it. The lock is released however the work ends."""
    from experiments import runner

    lock = runner.claim(plan.out_dir)
    if lock is None:
        log.warning("another process is running %s; leaving it alone", plan.out_dir)
        return False
    try:
        runner.recheck(plan)  # another process may have finished some since prepare
        if plan.todo:
            prune_todo(plan)
    finally:
        release(lock)
    return True


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the constraints finished (``done``) and saved in ``out_dir``."""

    def __init__(self, done: list[float], out_dir: Path):
        super().__init__()
        self.done, self.out_dir = done, out_dir


def release(lock: Path) -> None:
    """Remove the run lock. In a directory that has become unwritable it cannot be removed:
    it is emptied instead (an empty lock names no live holder, so the next run takes it
    over)."""
    try:
        lock.unlink(missing_ok=True)
    except OSError:
        try:
            lock.write_text("")
        except OSError as err:
            log.warning("could not release the lock %s (%s); delete it before re-running", lock,
                        err.strerror)


def prune_todo(plan) -> None:
    """Load the model and data once, then prune each constraint still to do."""
    from experiments import runner

    loaded = runner.load(plan)
    baseline = runner.measure_baseline(plan, loaded)
    fisher, fisher_info = runner.importance(plan, loaded)
    for constraint, path in plan.todo.items():
        plan.done[constraint] = runner.prune_one(plan, loaded, constraint, fisher, fisher_info,
                                                 baseline, path)
        log.info("\n%s", summary_table(plan.done[constraint]))
        log.info("results: %s", path / "results.json")


def summary_table(r) -> str:
    """A finished run (``experiments.records.Record``) in a few lines."""
    from experiments.records import PRUNING_STAGES

    key, t = r.metric, r.timings
    rows = [
        ("model / task", f"{r.model} / {r.task}  (constraint {r.constraint:g})"),
        (f"{key} baseline", f"{100 * r.baseline[key]:.2f}"),
        (f"{key} pruned", f"{100 * r.pruned[key]:.2f}  (drop {r.drop:+.2f} points)"),
        *((f"{k} base/pruned", f"{100 * r.baseline[k]:.2f} / {100 * r.pruned[k]:.2f}")
          for k in r.baseline if "/" in k and k.endswith("/" + key)),
        ("FLOPs kept", f"{r.flops['ratio']:.3f}  ({r.flops['pruned'] / 1e9:.3f} / "
                       f"{r.flops['baseline'] / 1e9:.3f} GFLOPs at seq {r.seq_len:.2f})"),
        *((("latency (ms)", latency_line(r.latency)),) if r.latency else ()),
        ("heads / neurons kept", f"{r.masks['heads_kept']}/{r.masks['heads_total']}, "
                                 f"{r.masks['neurons_kept']}/{r.masks['neurons_total']}"),
        ("time (s)", "  ".join(f"{k} {t[k]:.1f}" for k in
                               (*PRUNING_STAGES, "pruning_total", "eval_baseline", "eval_pruned")
                               if k in t)),
        ("code", f"{r.code or 'unknown'} (digest of the source that made these numbers)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def latency_line(lat: dict) -> str:
    """Baseline and pruned median latency, their ratio, and a warning when the timing's
    spread is too large to trust the ratio."""
    text = (f"{1e3 * lat['baseline']['median']:.1f} -> {1e3 * lat['pruned']['median']:.1f}  "
            f"(ratio {lat['ratio']:.3f}, batch {lat['batch_size']} x seq {lat['seq_len']}, "
            f"{lat.get('dtype', 'float32')})")
    if lat.get("noisy"):
        text += "  NOISY: the timings' spread is too large to trust this ratio (other work " \
                "shared the machine?); re-time on a quiet machine (make bench)"
    return text


WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def check_mode(hc) -> None:
    """An experiment that defines a sweep (``hydra.sweeper.params``) runs only with ``-m``;
    without it Hydra would quietly run one of its runs."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from experiments.errors import RunError

    params = OmegaConf.select(hc, "sweeper.params")
    if hc.mode != RunMode.RUN or not params:
        return
    values = [str(v) for v in params.values()]
    simple = not any(c in v for v in values for c in "([{")  # plain a,b,c lists
    runs = math.prod(len(v.split(",")) for v in values) if simple else None
    experiment = hc.runtime.choices.get("experiment")
    what = f"experiment={experiment}" if experiment else "hydra.sweeper.params"
    size = f"a sweep of {runs} runs" if runs else "a sweep"
    raise RunError(f"{what} is {size} (over {', '.join(params)}) and runs only with -m: "
                   f"python run.py -m {shlex.join(hc.overrides.task)}")


def interrupted_line(err: KeyboardInterrupt, hc) -> str:
    """What a Ctrl-C left: the finished constraints and how to resume."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    done = getattr(err, "done", [])
    if not done:
        return "interrupted before a constraint finished; re-run the same command to start again"
    out_dir = err.out_dir
    timestamped = hc.mode == RunMode.RUN and "${now:" in str(
        OmegaConf.to_container(hc.run, resolve=False).get("dir", ""))
    override = shlex.quote('hydra.run.dir="%s"' % out_dir)  # a path with [, ] and spaces
    again = f"re-run the same command with {override}" if timestamped else \
        "re-run the same command"
    return (f"interrupted; the finished constraint(s) {', '.join(f'{c:g}' for c in done)} are "
            f"saved in {out_dir}; {again} to resume (finished ones are skipped)")


def write_error_line(err: OSError, out_dir: str) -> str:
    """A failed write outside the records' own handling (e.g. ``family.json``), in one line."""
    from experiments.runner import write_fix

    what = err.filename or f"in {out_dir}"
    where = Path(err.filename).parent if err.filename else Path(out_dir)
    return f"error: could not write {what} ({err.strerror}); {write_fix(err, where)} and re-run"


def stop(hc, line: str, code: int) -> None:
    """Log ``line``, remove a run directory that holds only Hydra's files, and exit."""
    from hydra.types import RunMode

    from experiments.config import discard_unused_run_dir

    log.error("%s", line)
    discard_unused_run_dir(hc.runtime.output_dir, hc.job.name, hc.mode == RunMode.MULTIRUN)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """``run`` with every expected failure as one line: bad input (exit 2), a failed write
    (exit 2), Ctrl-C (exit 130, the finished constraints kept)."""
    from hydra.core.hydra_config import HydraConfig

    from experiments.errors import RunError
    from prune import PruneError

    hc = HydraConfig.get()
    try:
        check_mode(hc)
        run(cfg)
    except (RunError, PruneError) as err:
        stop(hc, f"error: {err}", 2)
    except KeyboardInterrupt as err:
        stop(hc, interrupted_line(err, hc), 130)
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        stop(hc, write_error_line(err, hc.runtime.output_dir), 2)


def check_command_line(args: list[str]) -> None:
    """Typed options' values on the command line, before Hydra reads them (one line, exit 2)."""
    from experiments.config import check_override_values
    from experiments.errors import RunError

    try:
        check_override_values(args)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()

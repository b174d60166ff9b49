"""Hydra entry point: prune a fine-tuned model on a task under a FLOPs or latency constraint.

    python run.py model=minilm task=sst2 constraint=0.6
    python run.py constraint=[0.4,0.5,0.6,0.7]      # a family from one Fisher pass

Writes ``results.json``, ``masks.pt`` and the pruned model into the run directory (one
sub-directory per constraint for a family) and prints a summary. The work is done by the
``prune`` library and the ``experiments`` harness; this file lists the stages.
"""

from __future__ import annotations

import logging
import os
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
    if plan.todo:
        lock = runner.claim(out_dir)
        if lock is None:
            log.warning("another process is running %s; leaving it alone", out_dir)
            return None
        try:
            runner.recheck(plan)  # another process may have finished some since prepare
            if plan.todo:
                prune_todo(plan)
        finally:
            lock.unlink(missing_ok=True)
    records = [plan.done[c] for c in plan.constraints]
    if plan.family:
        runner.family_summary(plan, records)
        return records
    return records[0]


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
                               ("fisher", "search", "rearrange", "tune", "physical",
                                "pruning_total", "eval_baseline", "eval_pruned") if k in t)),
        ("code", f"{r.code or 'unknown'} (digest of the source that made these numbers)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def latency_line(lat: dict) -> str:
    """Baseline and pruned median latency, their ratio, and a warning when the timing's
    spread is too large to trust the ratio."""
    text = (f"{1e3 * lat['baseline']['median']:.1f} -> {1e3 * lat['pruned']['median']:.1f}  "
            f"(ratio {lat['ratio']:.3f}, batch {lat['batch_size']} x seq {lat['seq_len']})")
    if lat.get("noisy"):
        text += "  NOISY: the timings' spread is too large to trust this ratio (other work " \
                "shared the machine?); re-time on a quiet machine (make bench)"
    return text


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from experiments.errors import RunError
    from prune import PruneError

    try:
        run(cfg)
    except (RunError, PruneError) as err:
        log.error("error: %s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()

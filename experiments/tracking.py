"""Experiment tracking for run.py (kept out of the ``prune`` library): none or W&B, offline by
default."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("fastprune")


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; lists become per-index keys."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (list, tuple)) and value and all(
                isinstance(v, (int, float)) for v in value):
            out.update({f"{name}/{i}": v for i, v in enumerate(value)})
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
    return out


def _summary(record: dict) -> dict:
    """Metrics, FLOPs, latency, timings and per-layer counts, namespaced and flat."""
    summary = {
        "eval/baseline": record["baseline"], "eval/pruned": record["pruned"],
        "eval/drop": record["drop"], "flops": record["flops"],
        "latency": record.get("latency") or {}, "time": record["timings"],
        "masks": record["masks"],
    }
    return {k: v for k, v in flatten(summary).items() if isinstance(v, (int, float))}


# seconds W&B may take to start a run (its default, 90, is paid per run when the network is
# down; W&B adds 10 s of grace); WANDB_INIT_TIMEOUT overrides it
INIT_TIMEOUT = 10.0

# trackers that failed in this process (their settings -> why): not tried again, so that a
# family or a sweep pays the failure (a timeout) once
_failed: dict[tuple, str] = {}


def log_record(logger_cfg, record: dict, config: dict) -> None:
    """Send a finished run's record to the configured tracker. Called after ``results.json``
    is written: a tracker that fails (no network, no API key, a bad setting) only warns, once
    per process; the later runs of the process skip it."""
    if logger_cfg.kind == "none":
        return
    mode = os.environ.get("WANDB_MODE", logger_cfg.mode)
    settings = (logger_cfg.kind, mode, logger_cfg.project, logger_cfg.entity,
                str(logger_cfg.dir))
    if settings in _failed:
        log.debug("not logging to %s: it failed earlier in this process (%s)", logger_cfg.kind,
                  _failed[settings])
        return
    try:
        import wandb

        # settings as a dict: with a wandb.Settings object (wandb 0.31) the offline run's file
        # stayed empty (tests/test_latency.py::test_wandb_logs_offline_and_writes_its_files)
        # the short timeout is for the network: offline, a busy machine may need W&B's own (a
        # 10 s start failed the offline test once under load)
        online = {"init_timeout": float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT))} \
            if mode != "offline" else {}
        run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, mode=mode,
                         dir=str(logger_cfg.dir), name=f"{record['model']}-{record['task']}-"
                         f"c{record['constraint']}", tags=list(logger_cfg.tags), config=config,
                         reinit="create_new", settings=online)
        try:
            flat = _summary(record)
            run.log(flat)
            run.summary.update(flat)
        finally:
            run.finish()
    except Exception as err:  # any tracker failure: the record is already safe on disk
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        _failed[settings] = why
        longer = "; WANDB_INIT_TIMEOUT=60 waits longer" if "timed out" in why.lower() else ""
        log.warning("logging to %s failed (%s); the run's record is in results.json; not "
                    "trying %s again in this process%s", logger_cfg.kind, why, logger_cfg.kind,
                    longer)

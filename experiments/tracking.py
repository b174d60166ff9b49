"""Experiment trackers for run.py (kept out of the ``prune`` library): none or W&B."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

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


class NullTracker:
    def log(self, record: dict) -> None:
        pass


class WandbTracker:
    def __init__(self, run):
        self.run = run

    def log(self, record: dict) -> None:
        """Metrics, FLOPs, latency, timings and per-layer counts, namespaced."""
        summary = {
            "eval/baseline": record["baseline"], "eval/pruned": record["pruned"],
            "eval/drop": record["drop"], "flops": record["flops"],
            "latency": record.get("latency") or {}, "time": record["timings"],
            "masks": record["masks"], "tune": record.get("tune") or {},
        }
        flat = {k: v for k, v in flatten(summary).items() if isinstance(v, (int, float))}
        self.run.log(flat)
        self.run.summary.update(flat)


@contextmanager
def tracker(cfg, out_dir) -> Iterator[NullTracker | WandbTracker]:
    """The configured tracker, always closed when the run ends (also on errors)."""
    if cfg.logger.kind == "none":
        yield NullTracker()
        return
    if cfg.logger.kind != "wandb":
        from prune.errors import PruneError

        raise PruneError(f"unknown logger {cfg.logger.kind!r}: use logger=none or logger=wandb")
    import wandb
    from omegaconf import OmegaConf

    mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=mode,
                     dir=str(cfg.logger.dir), name=f"{cfg.model.name}-{cfg.task.name}-"
                     f"c{cfg.constraint}", tags=list(cfg.logger.tags),
                     config=OmegaConf.to_container(cfg, resolve=True))
    try:
        yield WandbTracker(run)
    finally:
        run.finish()

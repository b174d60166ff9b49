"""The pruning pipeline in order: Fisher -> mask search -> rearrangement -> tuning (Fig. 2).

``prune_masks`` returns masks; ``prune.physical.prune_model`` then makes the model smaller.
Each stage after the search can be switched off; each is timed.

Sample use, deliberately unlike the official code: the Fisher pass uses the whole sample set, mask
tuning its first ``tune_samples`` (512) samples. Tuning solves, per layer, a least-squares problem
with at most as many unknowns as the layer keeps units, over every token of every sample; 512
samples over-determine it many times, while tuning costs about one forward pass of the teacher
and one of the student per sample, as much as the Fisher pass itself. On the demo (SST-2, 0.4 /
0.5 / 0.6) tuning on 256 / 512 / 1,024 / 2,048 samples gave accuracies within 0.35 points of each
other (``experiment=tune_samples_cpu``). ``tune_samples=None`` tunes on everything, as the paper.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from torch import nn

from prune.arch import Adapter
from prune.cost import FlopsCost
from prune.fisher import Fisher, compute_fisher
from prune.masks import Masks
from prune.rearrange import rearrange_masks
from prune.search import check_constraint, search_masks
from prune.tune import TuneStats, tune_masks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneOptions:
    constraint: float  # fraction of encoder FLOPs kept, in (0, 1]
    rearrange: bool = True
    rearrange_sweeps: int = 1
    tune: bool = True
    tune_teacher: str = "full"  # "full" (unpruned model) or "ta" (official teacher-assistant)
    tune_damp: float = 1e-2
    tune_max_scale: float = 10.0
    tune_samples: int | None = 512  # tune on the first n samples only (None: the whole set)
    cls_only_last: bool = True  # fit the last FFN on [CLS] only (sequence classification)

    def __post_init__(self):
        check_constraint(self.constraint)
        from prune.errors import PruneError
        if self.tune_teacher not in ("full", "ta"):
            raise PruneError(f"tune_teacher must be 'full' or 'ta', not {self.tune_teacher!r}")
        if self.tune_samples is not None and (isinstance(self.tune_samples, bool)
                                              or not isinstance(self.tune_samples, int)
                                              or self.tune_samples < 1):
            raise PruneError(f"tune_samples={self.tune_samples!r}: use a positive number of "
                             "samples, or null to tune on all of them")


@dataclass
class PruneResult:
    masks: Masks  # final (tuned if enabled) masks
    searched: Masks
    rearranged: Masks | None
    fisher: Fisher
    timings: dict[str, float] = field(default_factory=dict)
    tune_stats: TuneStats | None = None


class _Timer:
    def __init__(self, timings: dict, key: str):
        self.timings, self.key = timings, key

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.key] = time.perf_counter() - self.start


def timed(timings: dict, key: str) -> _Timer:
    """``with timed(t, 'fisher'): ...`` stores the block's wall time in ``t['fisher']``."""
    return _Timer(timings, key)


def prune_masks(
    model: nn.Module,
    adapter: Adapter,
    sample_batches: list[dict],
    cost: FlopsCost,
    opts: PruneOptions,
    fisher: Fisher | None = None,
    progress: bool = True,
) -> PruneResult:
    """Find pruning masks for ``model`` from the sample set (no retraining).

    ``fisher`` may be passed in (e.g. from a cache) to skip the gradient pass.
    """
    timings: dict[str, float] = {}
    if fisher is None:
        with timed(timings, "fisher"):
            fisher = compute_fisher(model, adapter, sample_batches, progress)
    else:
        timings["fisher"] = 0.0
    with timed(timings, "search"):
        searched = search_masks(fisher.head_importance, fisher.neuron_importance, cost,
                                opts.constraint)
    rearranged = None
    masks = searched
    if opts.rearrange:
        with timed(timings, "rearrange"):
            rearranged = rearrange_masks(searched, fisher, opts.rearrange_sweeps)
        masks = rearranged
    stats = None
    if opts.tune:
        with timed(timings, "tune"):
            teacher = None
            if opts.tune_teacher == "ta":
                ta = search_masks(fisher.head_importance, fisher.neuron_importance, cost,
                                  math.sqrt(opts.constraint))
                teacher = rearrange_masks(ta, fisher, opts.rearrange_sweeps) \
                    if opts.rearrange else ta
            masks, stats = tune_masks(model, adapter, masks,
                                      first_samples(sample_batches, opts.tune_samples),
                                      teacher=teacher,
                                      damp=opts.tune_damp, max_scale=opts.tune_max_scale,
                                      cls_only_last=opts.cls_only_last, progress=progress)
    return PruneResult(masks.to("cpu"), searched, rearranged, fisher, timings, stats)


def first_samples(batches: list[dict], count: int | None) -> list[dict]:
    """The first ``count`` samples of ``batches`` (already a random draw), cutting the last
    batch; all of them when ``count`` is None."""
    if count is None:
        return batches
    out, left = [], int(count)
    for batch in batches:
        if left <= 0:
            break
        n = int(batch["input_ids"].shape[0])
        out.append(batch if n <= left else {k: v[:left] for k, v in batch.items()})
        left -= n
    return out

"""The pipeline in order: Fisher -> mask search -> rearrangement -> tuning (paper Fig. 2).

``prune_masks`` returns masks (and, when tuning reconstructs weights, new projection weights);
``prune.physical.prune_model`` then makes the model smaller. Each stage after the search can be
switched off, and each is timed. ``PruneOptions`` is the one place the pipeline's defaults live.

Aligned widths (``granularity``, default 8; the official code: 1): every layer keeps a multiple
of 8 FFN neurons, chosen inside the search, so the budget holds. On a GPU in float16/bfloat16 a
width off the multiple of 8 leaves the tensor cores' fast path (pruned BERT-base at FLOPs 0.5 ran
0.75x as fast as the unpruned model in bfloat16 unaligned, 1.54x aligned); on this CPU, float32,
the aligned MiniLM ran 5-8% faster than the unaligned one at the same FLOPs
(``analysis/results/align-cpu.json``), losing under 0.03% of the retained importance.

Sample use, deliberately unlike the official code: the Fisher pass uses the whole sample set,
tuning its first ``tune_samples`` (512) samples. Tuning solves, per layer, a least-squares
problem with at most as many unknowns as the layer keeps units, over every token of every
sample; 512 samples over-determine it many times, while tuning costs about one forward pass of
the teacher and one of the student per sample. ``tune_samples=None`` tunes on everything, as
the paper. The modes that may fall back on held-out samples (``bias``, ``weights``) take the
``tune_holdout`` samples that follow the tuning samples; on them the pipeline also checks the
whole model's output (``tune_check``, ``prune.guard``) and falls back to mask tuning where the
mode's fits, each better for its own layer, made the output worse.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import MISSING, dataclass, field, fields, replace

from torch import nn

from prune.arch import Adapter
from prune.cost import CostModel
from prune.errors import PruneError
from prune.fisher import AMP_MODES, IMPORTANCE, Fisher, compute_fisher, fisher_chunks
from prune.guard import model_outputs, output_error
from prune.masks import Masks, apply_masks
from prune.obs import discounted, greedy_unrecovered, unrecovered
from prune.rearrange import rearrange_masks
from prune.runtime import model_device
from prune.search import (
    check_constraint,
    check_floor,
    check_granularity,
    check_layer_floor,
    floored,
    search_masks,
)
from prune.tune import (
    TUNE_MODES,
    TunedWeights,
    TuneOptions,
    TuneResult,
    TuneStats,
    applied_weights,
    tune_masks,
)

log = logging.getLogger(__name__)

TEACHERS = ("full", "ta")


@dataclass(frozen=True)
class PruneOptions:
    """Every choice of the pipeline, with its default (run.py's config mirrors these, the
    tuning solve's as flat ``prune.tune_*`` keys). The constraint is not an option: it is an
    argument of ``prune_masks``. ``tune`` holds the tuning solve's own options (``TuneOptions``:
    mode, damping, solver, ...), or ``None`` to keep the searched (rearranged) masks as they are;
    the fields beside it say what tuning runs on: its samples and its teacher."""

    importance: str = "fisher"  # fisher (labels) | fisher_unlabeled (the model's predictions)
    amp: str = "auto"  # Fisher pass precision: auto (float32) | bf16 (autocast) | off
    granularity: int = 8  # a layer keeps FFN neurons in multiples of this (1: any count)
    rearrange: bool = True
    rearrange_sweeps: int = 1  # 1 = the paper's single greedy pass
    tune: TuneOptions | None = field(default_factory=TuneOptions)  # None: no tuning
    tune_teacher: str = "full"  # full (unpruned model) | ta (official teacher-assistant)
    tune_teacher_rearrange: bool = False  # rearrange the TA mask too (the official code does not)
    tune_samples: int | None = 512  # tune on the first n samples only (None: the whole set)
    tune_holdout: int = 128  # samples after those, to check bias/weight solutions on
    tune_check: bool = True  # bias/weights: keep mask tuning if the output error is lower
    steps: int = 1  # 1: one shot (the paper); k: k steps, importance re-measured after each
    obs: bool = False  # discount importance by what reconstruction recovers (prune.obs)
    obs_greedy: bool = False  # with obs: each unit's share in a greedy OBS order per layer
    layer_floor: float = 0.0  # each layer keeps at least this share of its heads and neurons

    def __post_init__(self):
        choices = (("importance", IMPORTANCE), ("amp", AMP_MODES), ("tune_teacher", TEACHERS))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise PruneError(f"{name}={getattr(self, name)!r}: use one of "
                                 f"{', '.join(allowed)}")
        for name in ("rearrange", "tune_teacher_rearrange", "tune_check", "obs", "obs_greedy"):
            if not isinstance(getattr(self, name), bool):
                raise PruneError(f"{name}={getattr(self, name)!r}: use true or false")
        if self.obs_greedy and not self.obs:
            raise PruneError("obs_greedy=true orders the reconstruction-aware importance: set "
                             "obs=true too (prune.obs=true prune.obs_greedy=true)")
        if self.tune is not None and not isinstance(self.tune, TuneOptions):
            raise PruneError(f"tune={self.tune!r}: use TuneOptions(mode=...) (mode one of "
                             f"{', '.join(TUNE_MODES)}), or None for no tuning")
        _positive_int("rearrange_sweeps", self.rearrange_sweeps)
        _positive_int("steps", self.steps)
        check_granularity(self.granularity)
        check_layer_floor(self.layer_floor)
        _positive_int("tune_holdout", self.tune_holdout, zero=True)
        if self.tune_samples is not None:
            _positive_int("tune_samples", self.tune_samples, hint=", or null to tune on all "
                          "of them")

    @property
    def tune_mode(self) -> str:
        """``off``, or the tuning mode: ``mask`` | ``bias`` | ``weights``."""
        return "off" if self.tune is None else self.tune.mode

    @classmethod
    def defaults(cls) -> dict:
        """Every option with a default, and its value."""
        return {f.name: f.default if f.default_factory is MISSING else f.default_factory()
                for f in fields(cls)}


def _positive_int(name: str, value, zero: bool = False, hint: str = "") -> None:
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a number >= 0" if zero else "a positive number"
        raise PruneError(f"{name}={value!r}: use {what}{hint}")


@dataclass
class PruneResult:
    masks: Masks  # final (tuned if enabled) masks
    searched: Masks
    rearranged: Masks | None
    fisher: Fisher
    timings: dict[str, float] = field(default_factory=dict)
    tune_stats: TuneStats | None = None
    weights: TunedWeights = field(default_factory=TunedWeights)  # tune=bias|weights


class _Timer:
    def __init__(self, timings: dict, key: str):
        self.timings, self.key = timings, key

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - \
            self.start


def timed(timings: dict, key: str) -> _Timer:
    """``with timed(t, 'fisher'): ...`` adds the block's wall time to ``t['fisher']``."""
    return _Timer(timings, key)


def prune_masks(
    model: nn.Module,
    adapter: Adapter,
    sample_batches: list[dict],
    cost: CostModel,
    constraint: float,
    opts: PruneOptions | None = None,
    fisher: Fisher | None = None,
    progress: bool = True,
    seed: int = 0,
) -> PruneResult:
    """Find pruning masks for ``model`` that keep ``constraint`` (a fraction in (0, 1]) of the
    cost, from the sample set (no retraining).

    ``fisher`` may be passed in (e.g. from a cache, or shared by several constraints) to skip
    the gradient pass (of the first step, with ``opts.steps > 1``).

    Iterative pruning (``opts.steps = k > 1``, beyond the paper): the constraint is reached in
    k steps, ``constraint ** (i / k)`` for ``i = 1..k``; each step after the first measures the
    importance on the model the previous step made (its masks and tuned weights in place, so a
    unit's importance is that of removing it from the pruned, reconstructed model), keeps only
    units the previous step kept, and searches, rearranges and tunes again. Tuning always fits
    the unpruned model's outputs from the original weights. Each extra step costs one more
    Fisher pass, on a physically pruned copy of the model the previous step made (the masked
    model's gradients at the smaller model's cost; with ``opts.obs``, on the masked model), and
    one more tuning; the result's timings add them up.

    ``opts.obs`` (beyond the paper, ``prune.obs``): each step's importance is discounted by the
    share of a unit's removal error that refitting the rest of its layer cannot recover
    (``prune.obs.unrecovered``), so units that others can stand in for go first; with
    ``opts.obs_greedy`` (``prune.obs_greedy``) each unit's share is taken in a greedy
    structured-OBS order per layer (``prune.obs.greedy_unrecovered``), so of two units that stand
    in for each other only the first is discounted.

    ``opts.layer_floor = f`` (beyond the paper, ``prune.layer_floor``): every step's search
    keeps at least the share ``f`` of each layer's heads and FFN neurons, the layer's most
    important ones (``prune.search.floored``), so no layer is emptied; ``PruneError`` when the
    floor alone exceeds the budget.
    """
    constraint = check_constraint(constraint)
    opts = opts or PruneOptions()
    check_granularity(opts.granularity, adapter.head_size)  # warns when heads are not aligned
    timings: dict[str, float] = {"fisher": 0.0}
    result: PruneResult | None = None
    for step, target in enumerate(step_constraints(constraint, opts.steps)):
        if result is not None and not opts.obs:  # the units of the model just made
            with timed(timings, "fisher"):
                fisher = _pruned_fisher(model, adapter, result, sample_batches, opts,
                                        progress, seed + step)
            used = fisher
        elif result is not None:  # the OBS discount needs the model in its full shape
            current = result.masks.to(model_device(model))
            with apply_masks(model, adapter, current), \
                    applied_weights(model, adapter, current, result.weights):
                with timed(timings, "fisher"):
                    fisher = compute_fisher(model, adapter, sample_batches, progress, opts.amp,
                                            opts.importance, seed + step)
                used = _discounted(model, adapter, sample_batches, fisher, opts, timings)
        else:
            if fisher is None:
                with timed(timings, "fisher"):
                    fisher = compute_fisher(model, adapter, sample_batches, progress, opts.amp,
                                            opts.importance, seed)
            used = _discounted(model, adapter, sample_batches, fisher, opts, timings)
        used.check_finite()
        kept = result.masks.kept() if result is not None else None
        result = _one_step(model, adapter, sample_batches, cost, target, opts, used, kept,
                           timings, progress)
    return result


def _pruned_fisher(model, adapter, result: PruneResult, sample_batches, opts: PruneOptions,
                   progress: bool, seed: int) -> Fisher:
    """The Fisher of the model a step made (its masks and tuned weights), measured on a
    physically pruned copy: the gradients of the masked model up to float rounding, at the
    cost of the smaller model; zero for the units it pruned."""
    from prune.physical import prune_model

    pruned = prune_model(copy.deepcopy(model), result.masks, adapter, result.weights,
                         allow_empty=True)
    fisher = compute_fisher(pruned, adapter, sample_batches, progress, opts.amp,
                            opts.importance, seed)
    del pruned
    return fisher.spread(result.masks.kept())


def _discounted(model, adapter, sample_batches, fisher: Fisher, opts: PruneOptions,
                timings: dict) -> Fisher:
    """``fisher``, or with ``opts.obs`` its rows discounted by the share of each unit's removal
    error that reconstruction cannot recover (``prune.obs``; moments from the tuning samples)."""
    if not opts.obs:
        return fisher
    samples = first_samples(sample_batches, opts.tune_samples)
    with timed(timings, "obs"):
        if opts.obs_greedy:
            shares = greedy_unrecovered(model, adapter, samples, fisher,
                                        chunk=opts.granularity)
        else:
            shares = unrecovered(model, adapter, samples)
    return discounted(fisher, *shares)


def step_constraints(constraint: float, steps: int) -> list[float]:
    """The constraint of each step: ``constraint ** (i / steps)``, the last one exact."""
    _positive_int("steps", steps)
    return [constraint ** (i / steps) for i in range(1, steps)] + [constraint]


def _only(importance, kept):
    """``importance`` with the units a previous step pruned below every kept one (never kept
    again: the search gains by leaving budget unused rather than taking them)."""
    floor = -(float(importance.abs().sum()) + 1.0)
    return importance.where(kept.to(importance.device) != 0, floor)


def _one_step(model, adapter, sample_batches, cost, constraint, opts, fisher, kept, timings,
              progress) -> PruneResult:
    """Search, rearrangement and tuning at one constraint, from ``fisher``."""
    with timed(timings, "search"):
        heads, neurons = fisher.head_importance, fisher.neuron_importance
        if kept is not None:
            heads, neurons = _only(heads, kept.head), _only(neurons, kept.neuron)
        if opts.layer_floor:
            heads, neurons = floored(heads, neurons, opts.layer_floor, opts.granularity, kept)
        searched = search_masks(heads, neurons, cost, constraint, granularity=opts.granularity)
        if opts.layer_floor:
            check_floor(searched, opts.layer_floor, opts.granularity)
    rearranged = None
    masks = searched
    if opts.rearrange:
        with timed(timings, "rearrange"):
            rearranged = rearrange_masks(searched, fisher, opts.rearrange_sweeps, kept)
        masks = rearranged
    result = PruneResult(masks.to("cpu"), searched, rearranged, fisher, timings)
    if opts.tune is not None:
        with timed(timings, "tune"):
            teacher = teacher_masks(fisher, cost, constraint, opts)
            tune_set, holdout = split_samples(sample_batches, opts.tune_samples,
                                              opts.tune_holdout if opts.tune.mode != "mask" else 0)
            tuned = tune_masks(model, adapter, masks, tune_set, teacher, opts.tune, holdout,
                               progress)
            if holdout and opts.tune_check and opts.tune.mode != "mask":
                tuned = _checked(model, adapter, masks, tuned, tune_set, teacher, holdout, opts,
                                 progress)
        result.masks, result.weights, result.tune_stats = tuned.masks, tuned.weights, tuned.stats
    return result


def _checked(model, adapter, masks: Masks, tuned: TuneResult, tune_set, teacher, holdout,
             opts: PruneOptions, progress: bool) -> TuneResult:
    """``tuned``, or where its output error on the held-out samples (``prune.guard``) is above
    that of the untuned ``masks``, the better of it and the masks tuned in ``mask`` mode; the
    errors go into its stats (``output``)."""
    reference = model_outputs(model, holdout)
    before = output_error(model, adapter, holdout, reference, masks)
    after = output_error(model, adapter, holdout, reference, tuned.masks, tuned.weights)
    check = {"before": before, opts.tune.mode: after, "chosen": opts.tune.mode}
    if after > before:
        fallback = tune_masks(model, adapter, masks, tune_set, teacher,
                              replace(opts.tune, mode="mask"), None, progress)
        check["mask"] = output_error(model, adapter, holdout, reference, fallback.masks)
        if check["mask"] < after:
            log.warning("tune=%s raised the output error on %d held-out samples from %.3f "
                        "(untuned) to %.3f; mask tuning gives %.3f and is kept (prune."
                        "tune_check=false keeps %s)", opts.tune.mode, _count(holdout), before,
                        after, check["mask"], opts.tune.mode)
            tuned, check["chosen"] = fallback, "mask"
    tuned.stats.output = check
    return tuned


def _count(batches: list[dict]) -> int:
    return sum(int(b["input_ids"].shape[0]) for b in batches)


def teacher_masks(fisher: Fisher, cost: CostModel, constraint: float,
                  opts: PruneOptions) -> Masks | None:
    """The tuning target: the unpruned model (``None``), or the official teacher-assistant,
    searched at ``sqrt(constraint)`` and rearranged only if ``tune_teacher_rearrange``."""
    if opts.tune_teacher == "full":
        return None
    ta = search_masks(fisher.head_importance, fisher.neuron_importance, cost,
                      math.sqrt(constraint), granularity=opts.granularity)
    if opts.tune_teacher_rearrange:
        ta = rearrange_masks(ta, fisher, opts.rearrange_sweeps)
    return ta


def pruning_state(result: PruneResult) -> dict:
    """Everything that rebuilds the evaluated model from the original checkpoint: the final
    masks, the tuned projection weights (``tune=bias|weights``: layers that chose them carry
    mask 1 and their scales folded into the weights) and, for reference, the searched masks.
    ``rebuild`` applies it; ``torch.save`` stores it (the run's ``masks.pt``)."""
    return {"format": 2, "final": result.masks.state_dict(),
            "searched": result.searched.state_dict(), "weights": result.weights.state_dict()}


def rebuild(model: nn.Module, state: dict, adapter: Adapter | None = None) -> nn.Module:
    """Prune ``model`` (the original checkpoint) in place into the evaluated model, from a
    ``pruning_state`` (e.g. ``torch.load`` of a run's ``masks.pt``)."""
    from prune.physical import prune_model

    if "final" not in state:
        raise PruneError("this is not a pruning state (no 'final' masks); pass the content of "
                         "a run's masks.pt")
    masks = Masks(state["final"]["head"], state["final"]["neuron"])
    weights = TunedWeights.from_state_dict(state.get("weights") or {})
    return prune_model(model, masks, adapter, weights)


def _take(batches: list[dict], skip: int, count: int | None) -> list[dict]:
    """Samples ``skip .. skip + count`` of ``batches`` (all the rest for ``None``)."""
    out, seen = [], 0
    for batch in batches:
        n = int(batch["input_ids"].shape[0])
        lo, hi = max(skip - seen, 0), n if count is None else min(skip + count - seen, n)
        if lo < hi:
            out.append(batch if (lo, hi) == (0, n) else {k: v[lo:hi] for k, v in batch.items()})
        seen += n
    return out


def split_samples(batches: list[dict], tune: int | None,
                  holdout: int) -> tuple[list[dict], list[dict]]:
    """The tuning samples (the first ``tune``, all if ``None``) and up to ``holdout`` held-out
    samples after them; if none are left, the last ``holdout`` tuning samples are held out."""
    total = _count(batches)
    fit = total if tune is None else min(tune, total)
    if holdout and fit >= total:  # nothing after the tuning samples: carve from their end
        held = min(holdout, fit // 4)
        fit -= held
        return _take(batches, 0, fit), _take(batches, fit, held)
    return _take(batches, 0, fit), _take(batches, fit, holdout) if holdout else []


def first_samples(batches: list[dict], count: int | None) -> list[dict]:
    """The first ``count`` samples of ``batches`` (already a random draw); all for ``None``."""
    return _take(batches, 0, count)


@dataclass
class AdaptiveInfo:
    """How many samples the adaptive Fisher pass used, and why it stopped."""

    samples: int
    reason: str
    regret: list[float] = field(default_factory=list)  # per check: the previous masks' regret
    churn: list[float] = field(default_factory=list)  # per check: cost share of units that moved


def masks_change(a: Masks, b: Masks, cost: CostModel) -> float:
    """The cost-weighted fraction of the kept units that differ between two binary masks."""
    ha, hb = a.head != 0, b.head != 0
    na, nb = a.neuron != 0, b.neuron != 0
    diff = float((ha ^ hb).sum()) * cost.attn.slope + float((na ^ nb).sum()) * cost.ffn.slope
    kept = float(hb.sum()) * cost.attn.slope + float(nb.sum()) * cost.ffn.slope
    return diff / (2 * kept) if kept else 0.0


def retained(masks: Masks, fisher: Fisher) -> float:
    """The share of the total Fisher importance held by the units ``masks`` keep."""
    h, n = fisher.head_importance, fisher.neuron_importance
    total = float(h.sum() + n.sum())
    kept = float(((masks.head != 0) * h).sum() + ((masks.neuron != 0) * n).sum())
    return kept / total if total > 0 else 1.0


def regret(previous: Masks, current: Masks, fisher: Fisher) -> float:
    """How much importance the previous answer loses against the current one, both judged by
    the current estimate: ``1 - retained(previous) / retained(current)``."""
    now = retained(current, fisher)
    return max(1.0 - retained(previous, fisher) / now, 0.0) if now > 0 else 0.0




def adaptive_fisher(
    model: nn.Module,
    adapter: Adapter,
    batches: list[dict],
    cost: CostModel,
    constraints: list[float],
    opts: PruneOptions,
    chunk: int = 256,
    tolerance: float = 0.01,
    min_samples: int = 512,
    progress: bool = True,
    seed: int = 0,
) -> tuple[Fisher, AdaptiveInfo]:
    """The Fisher pass over ``batches`` in chunks of ``chunk`` samples, stopped once the answer
    has settled: after at least ``min_samples``, when the masks searched after the previous
    chunk lose less than ``tolerance`` of the retained importance against those searched now
    (``regret``, judged by the current estimate), at every constraint; ``batches`` is the
    ceiling.

    Why not "the kept sets stop changing": on real models many units near the cut are nearly
    tied, and the kept sets keep moving by 5-10% of their cost from chunk to chunk even at
    2,048 samples, while what they retain no longer changes (``AdaptiveInfo.churn`` records it).
    """
    parts: list[Fisher] = []
    previous: list[Masks] | None = None
    info = AdaptiveInfo(0, "reached the sample ceiling")
    next_check = max(chunk, min_samples - chunk)
    for part in fisher_chunks(model, adapter, batches, opts.importance, opts.amp, progress,
                              seed):
        parts.append(part)
        info.samples += part.num_samples
        if info.samples < next_check:
            continue
        next_check = info.samples + chunk
        fisher = Fisher.concat(parts).check_finite()
        current = [search_masks(fisher.head_importance, fisher.neuron_importance, cost, c,
                                granularity=opts.granularity) for c in constraints]
        if previous is not None:
            pairs = list(zip(previous, current, strict=True))
            info.regret.append(max(regret(p, q, fisher) for p, q in pairs))
            info.churn.append(max(masks_change(p, q, cost) for p, q in pairs))
            if info.regret[-1] < tolerance and info.samples >= min_samples:
                info.reason = (f"the masks of the previous {chunk} samples lose "
                               f"{info.regret[-1]:.4f} < {tolerance} of the importance")
                return fisher, info
        previous = current
    if not parts:
        raise PruneError("adaptive_fisher got no batches: the sample set is empty")
    return Fisher.concat(parts), info


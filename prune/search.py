"""Mask search under a cost budget (paper Sec. 4.1, Algorithm 1; latency: Sec. 5).

Heads and neurons are ranked by their diagonal Fisher importance. Under the linear FLOPs model
this is Algorithm 1: for every possible number ``h`` of kept heads, the budget left after the
``h`` most important heads goes to the ``floor(rest / c_neuron)`` most important neurons, and
the split with the highest total retained importance wins (one vectorised pass over cumulative
sums).

The search only sees a ``prune.cost.CostModel``; under a latency model a layer's attention (or
FFN) costs a flat amount for its first ``threshold`` units and a slope per unit above. Then, as
in the paper, the decision below the threshold is per whole layer: for every number of layers
that keep their attention and every number that keep their FFN (the layers whose top
``threshold`` units are the most important), the kept layers get those units for the flat cost,
and what is left of the budget is split between further heads and neurons by Algorithm 1 on the
slopes. The best total importance over all these choices wins. Under FLOPs (no flat part) this
is exactly Algorithm 1.

Difference from the official code: its FLOPs loop starts at one head and clamps the neuron count
at zero (its commit 200c951, "Prevent negative num_neurons"), so when the heads it keeps alone
exceed the budget it keeps them with no neurons and overshoots; here a split that does not fit is
never chosen, and zero heads is a candidate. Its latency search tries dropping 0 .. L-1 whole
layers but decrements the remaining budget cumulatively across the tries, so it is defeated; here
each choice of whole layers starts from the whole budget.

Aligned widths (``granularity = g``, beyond the paper): on a GPU in float16/bfloat16 a kept FFN
width that is not a multiple of 8 misses the tensor cores, and the pruned model can be slower
than the unpruned one. With ``g > 1`` a layer keeps 0, g, 2g, ... FFN neurons, or its full width
``N`` when ``N`` is not a multiple of ``g`` (``allowed_counts``). The choice is made inside the
search, not by rounding afterwards, so the budget still holds. Each layer's neurons, sorted by
importance, form blocks of ``g`` (the last one ``N mod g`` wide when ``g`` does not divide
``N``); a block costs its width times the neuron cost, and Algorithm 1 runs over (heads,
blocks): the blocks of all layers ranked by importance per neuron, the budget left after ``h``
heads going to the longest prefix of blocks that fits. Block sums never increase within a layer,
so when ``g`` divides ``N`` every block costs the same and this is exactly optimal for every
number of blocks, as Algorithm 1 is for neurons; with a narrower last block it is the greedy
knapsack (the budget holds, optimality is not guaranteed). ``g = 1`` is the search above,
unit for unit. Under a latency model a kept layer takes the fewest whole blocks covering the
threshold (``ceil(threshold / g) * g`` neurons, capped at ``N``) and is charged the curve at that
width, ``flat + slope * (base - threshold)``; blocks above it cost ``g * slope`` (for ``g = 1``
that charge is ``flat``, as before, whenever ``threshold >= 1``, which every fitted curve has; a
hand-made curve with ``threshold = 0`` was undercharged one slope per kept layer and no longer
is). Heads are not grouped (a head is already ``head_size`` features wide);
``check_granularity(g, head_size)`` warns when ``g`` does not divide the head size.

A floor per layer (``layer_floor = f``, beyond the paper and the official code): at high
compression the Fisher of the masks can rank every unit of the upper layers below the lower
layers' (MPNet-base on CoLA at FLOPs 0.5 empties layers 8-11 and collapses). With ``f > 0`` each
layer keeps at least ``floor_counts(width, f, g)`` of its heads and of its FFN neurons, its most
important ones: ``floored`` raises them above every other unit, so the search (unchanged) takes
them first and spends the rest of the budget as before.
"""

from __future__ import annotations

import logging
import math
from numbers import Integral

import torch

from prune.cost import CostModel, UnitCurve
from prune.errors import PruneError
from prune.masks import Masks

EPS = 1e-9
log = logging.getLogger(__name__)


def check_constraint(constraint: float) -> float:
    if isinstance(constraint, bool) or not isinstance(constraint, (int, float)):
        raise PruneError(f"constraint={constraint!r}: use a number in (0, 1], the fraction of "
                         f"the cost kept, e.g. constraint=0.6")
    constraint = float(constraint)
    if not 0.0 < constraint <= 1.0:
        raise PruneError(
            f"constraint={constraint} is outside (0, 1]: it is the fraction of the cost kept, "
            f"e.g. constraint=0.6 keeps 60%"
        )
    return constraint


def check_granularity(granularity: int, head_size: int | None = None) -> int:
    """``granularity`` as an int, or ``PruneError``; one warning line when it does not divide
    ``head_size`` (the kept heads' width is then not a multiple of it)."""
    if isinstance(granularity, bool) or not isinstance(granularity, Integral) or granularity < 1:
        raise PruneError(
            f"granularity={granularity!r}: use a positive integer, the step of FFN neurons a "
            f"layer keeps, e.g. granularity=8 for float16/bfloat16 on a GPU (1 = any count)")
    granularity = int(granularity)
    if head_size is not None and granularity > 1 and head_size % granularity:
        log.warning("granularity %d does not divide the head size %d: kept FFN widths are "
                    "aligned, kept attention widths are not", granularity, head_size)
    return granularity


def allowed_counts(width: int, granularity: int) -> list[int]:
    """The numbers of units a layer of ``width`` units may keep: 0, g, 2g, ... up to ``width``,
    and ``width`` itself when ``g`` does not divide it."""
    counts = list(range(0, width + 1, granularity))
    return counts if counts[-1] == width else [*counts, width]


def check_layer_floor(share: float) -> float:
    """``share`` as a float in [0, 1), or ``PruneError``."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or \
            not 0.0 <= float(share) < 1.0:
        raise PruneError(f"layer_floor={share!r}: use a number in [0, 1), the share of each "
                         f"layer's heads and FFN neurons the search keeps at least (0: no floor)")
    return float(share)


def floor_counts(width: int, share: float, granularity: int = 1) -> int:
    """The fewest units a layer of ``width`` keeps under ``layer_floor = share``: the smallest
    allowed count (``allowed_counts``) of at least ``ceil(share * width)``; 0 for no floor."""
    need = math.ceil(check_layer_floor(share) * width - EPS)
    return 0 if need <= 0 else min(c for c in allowed_counts(width, granularity) if c >= need)


def floored(heads: torch.Tensor, neurons: torch.Tensor, share: float, granularity: int = 1,
            kept: Masks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The importances ``[L, H]`` and ``[L, N]`` (float64) with each layer's ``floor_counts``
    most important heads and neurons (among those ``kept`` by a previous step, if given) raised
    by more than the total importance of all units, so that a search keeps every one of them
    before anything else; unchanged for ``share = 0``."""
    lift = 2.0 * (float(heads.abs().sum()) + float(neurons.abs().sum()) + 1.0)
    return (_lift(heads, floor_counts(heads.shape[1], share), lift,
                  None if kept is None else kept.head),
            _lift(neurons, floor_counts(neurons.shape[1], share, granularity), lift,
                  None if kept is None else kept.neuron))


def _lift(importance: torch.Tensor, count: int, lift: float,
          kept: torch.Tensor | None) -> torch.Tensor:
    importance = importance.double()
    if count == 0:
        return importance
    rank = importance.clone()
    if kept is not None:  # units a previous step pruned never count towards the floor
        rank = rank.masked_fill(kept.to(rank.device) == 0, -float("inf"))
    top = torch.topk(rank, count, dim=1).indices
    up = torch.zeros_like(importance).scatter_(1, top, lift)
    if kept is not None:
        up = up.where(kept.to(up.device) != 0, torch.zeros_like(up))
    return importance + up


def check_floor(masks: Masks, share: float, granularity: int = 1) -> Masks:
    """``masks``, or ``PruneError`` naming the fix when a layer keeps fewer units than the floor
    (its cost exceeds the budget)."""
    heads = floor_counts(masks.head.shape[1], share)
    neurons = floor_counts(masks.neuron.shape[1], share, granularity)
    if min(masks.heads_per_layer()) < heads or min(masks.neurons_per_layer()) < neurons:
        raise PruneError(f"layer_floor={share:g} ({heads} heads and {neurons} FFN neurons per "
                         f"layer) costs more than the budget; lower prune.layer_floor or raise "
                         f"the constraint")
    return masks


def best_split(head_cum: torch.Tensor, neuron_cum: torch.Tensor, head_cost: float,
               neuron_cost: float, budget: float, scale: float,
               width_cum: torch.Tensor | None = None) -> tuple[float, int, int]:
    """Algorithm 1 on sorted cumulative importances (``[0, i_1, i_1 + i_2, ...]``): the best
    total importance and the numbers of heads and neurons (blocks), or ``-inf`` if nothing fits.

    ``width_cum`` (``[0, w_1, w_1 + w_2, ...]``) gives the neurons of each block when the
    candidates are blocks: the longest prefix of blocks whose width fits is taken."""
    heads = torch.arange(head_cum.numel(), dtype=torch.float64)
    rest = budget - heads * head_cost
    if neuron_cost > 0 and width_cum is not None:  # [h] the blocks whose neurons fit
        fit = torch.floor(rest / neuron_cost + EPS).clamp(min=0)
        neurons = torch.searchsorted(width_cum, fit, right=True) - 1
    elif neuron_cost > 0:
        neurons = torch.floor(rest / neuron_cost + EPS).clamp(0, neuron_cum.numel() - 1).long()
    else:
        neurons = torch.full_like(heads, neuron_cum.numel() - 1).long()
    score = head_cum + neuron_cum[neurons]
    score[rest < -EPS * scale] = -float("inf")
    best = int(torch.argmax(score))
    return float(score[best]), best, int(neurons[best])


def _base_count(curve: UnitCurve, units: int, granularity: int = 1) -> int:
    """Units a kept layer gets for its flat cost (all of them below the threshold), in whole
    blocks of ``granularity`` (capped at the layer's width)."""
    if curve.flat <= 0:
        return 0
    return min(units, math.ceil(max(int(curve.threshold), 1) / granularity) * granularity)


def _layer_choices(curve: UnitCurve, num_layers: int) -> range:
    """How many layers may keep this part: all of them when keeping costs nothing fixed."""
    return range(num_layers, num_layers + 1) if curve.flat <= 0 else range(num_layers + 1)


def _cum(values: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, values.cumsum(0)])


class _Part:
    """One kind of unit (heads or neurons): per-layer ranking, base units and candidate blocks
    of ``granularity`` units above the base (single units for ``granularity = 1``)."""

    def __init__(self, importance: torch.Tensor, curve: UnitCurve, granularity: int = 1):
        self.importance = importance.double().cpu()  # [L, n]
        L, n = self.importance.shape
        self.curve = curve
        self.base = _base_count(curve, n, granularity)
        self.base_cost = float(curve(self.base)) if self.base else 0.0  # a kept layer's base
        order = torch.sort(self.importance, dim=1, descending=True, stable=True).indices
        self.order = order  # [L, n] units of each layer, most important first
        ranked = self.importance.gather(1, order)
        self.layer_score = ranked[:, : self.base].sum(dim=1)  # [L]
        self.layer_rank = torch.sort(self.layer_score, descending=True, stable=True).indices
        above = ranked[:, self.base:]  # [L, m]
        full, part = divmod(n - self.base, granularity)
        value = above[:, : full * granularity].reshape(L, full, granularity).sum(dim=2)
        width = [granularity] * full
        if part:
            value = torch.cat([value, above[:, full * granularity:].sum(dim=1, keepdim=True)], 1)
            width.append(part)
        self.width = torch.tensor(width, dtype=torch.float64)  # [K] units per block
        self.value = value  # [L, K] importance of each layer's blocks, in rank order
        # importance per unit, forced non-increasing within a layer (it is, up to rounding),
        # so that a layer's chosen blocks are always its first ones
        self.key = (value / self.width).cummin(dim=1).values  # [L, K]

    def candidates(self, kept_layers: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(importance, width, layer) of the blocks above the base in the kept layers, best
        importance per unit first (ties by layer, then rank)."""
        layers = torch.sort(kept_layers).values
        K = self.width.numel()
        key, value = self.key[layers].flatten(), self.value[layers].flatten()
        rank = torch.sort(key, descending=True, stable=True).indices
        layer = layers.repeat_interleave(K)
        return value[rank], self.width.repeat(layers.numel())[rank], layer[rank]

    def mask(self, kept_layers: torch.Tensor, widths: torch.Tensor,
             layers: torch.Tensor) -> torch.Tensor:
        """Each kept layer's base, plus the chosen blocks (``widths`` in ``layers``)."""
        counts = torch.zeros(self.importance.shape[0], dtype=torch.float64)
        counts[kept_layers] = float(self.base)
        counts.index_add_(0, layers, widths)
        mask = torch.zeros_like(self.importance, dtype=torch.float32)
        for layer, count in enumerate(counts.round().long().tolist()):
            mask[layer, self.order[layer, :count]] = 1.0
        return mask


def search_masks(
    head_importance: torch.Tensor,  # [L, H]
    neuron_importance: torch.Tensor,  # [L, N]
    cost: CostModel,
    constraint: float,
    granularity: int = 1,
) -> Masks:
    """Binary masks keeping the most important units whose cost fits ``constraint`` times the
    unpruned model's cost under ``cost`` (FLOPs or latency); every layer keeps a number of FFN
    neurons in ``allowed_counts(N, granularity)``."""
    constraint = check_constraint(constraint)
    granularity = check_granularity(granularity)
    heads = _Part(head_importance, cost.attn)
    neurons = _Part(neuron_importance, cost.ffn, granularity)
    L = head_importance.shape[0]
    budget = constraint * cost.full - cost.fixed
    best: tuple | None = None
    for k_attn in _layer_choices(cost.attn, L):
        for k_ffn in _layer_choices(cost.ffn, L):
            rest = budget - k_attn * heads.base_cost - k_ffn * neurons.base_cost
            if rest < -EPS * cost.full:
                continue
            attn_layers, ffn_layers = heads.layer_rank[:k_attn], neurons.layer_rank[:k_ffn]
            h_val, _, h_layer = heads.candidates(attn_layers)
            n_val, n_width, n_layer = neurons.candidates(ffn_layers)
            score, h, n = best_split(_cum(h_val), _cum(n_val), cost.attn.slope,
                                     cost.ffn.slope, rest, cost.full, _cum(n_width))
            score += float(heads.layer_score[attn_layers].sum()
                           + neurons.layer_score[ffn_layers].sum())
            if best is None or score > best[0]:
                best = (score, attn_layers, h_layer[:h], ffn_layers, n_width[:n], n_layer[:n])
    if best is None or best[0] == -float("inf"):
        raise PruneError(
            f"constraint {constraint} is below what the model costs with every head and neuron "
            f"removed ({cost.fixed / cost.full:.2f} of its {cost.unit}); raise the constraint")
    _, attn_layers, h_layer, ffn_layers, n_width, n_layer = best
    head_mask = heads.mask(attn_layers, torch.ones(h_layer.numel(), dtype=torch.float64),
                           h_layer)
    return Masks(head_mask, neurons.mask(ffn_layers, n_width, n_layer))

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

Difference from the official code: its FLOPs loop starts at one head and, when the heads alone
exceed the budget, takes a negative neuron count as a Python slice (all but the last few
neurons), so it can keep far more than the budget (0.339 of the FLOPs at constraint 0.3 on
BERT-base MNLI shapes); here a split that does not fit is never chosen, and zero heads is a
candidate. Its latency search keeps the flat part of every layer; here whole layers may go.
"""

from __future__ import annotations

import torch

from prune.cost import CostModel, UnitCurve
from prune.errors import PruneError
from prune.masks import Masks

EPS = 1e-9


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


def best_split(head_cum: torch.Tensor, neuron_cum: torch.Tensor, head_cost: float,
               neuron_cost: float, budget: float, scale: float) -> tuple[float, int, int]:
    """Algorithm 1 on sorted cumulative importances (``[0, i_1, i_1 + i_2, ...]``): the best
    total importance and the numbers of heads and neurons, or ``-inf`` if nothing fits."""
    heads = torch.arange(head_cum.numel(), dtype=torch.float64)
    rest = budget - heads * head_cost
    if neuron_cost > 0:
        neurons = torch.floor(rest / neuron_cost + EPS).clamp(0, neuron_cum.numel() - 1).long()
    else:
        neurons = torch.full_like(heads, neuron_cum.numel() - 1).long()
    score = head_cum + neuron_cum[neurons]
    score[rest < -EPS * scale] = -float("inf")
    best = int(torch.argmax(score))
    return float(score[best]), best, int(neurons[best])


def _base_count(curve: UnitCurve, units: int) -> int:
    """Units a kept layer gets for its flat cost (all of them below the threshold)."""
    if curve.flat <= 0:
        return 0
    return min(units, max(int(curve.threshold), 1))


def _layer_choices(curve: UnitCurve, num_layers: int) -> range:
    """How many layers may keep this part: all of them when keeping costs nothing fixed."""
    return range(num_layers, num_layers + 1) if curve.flat <= 0 else range(num_layers + 1)


def _cum(values: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, values.cumsum(0)])


class _Part:
    """One kind of unit (heads or neurons): per-layer ranking, base units and candidates."""

    def __init__(self, importance: torch.Tensor, curve: UnitCurve):
        self.importance = importance.double().cpu()  # [L, n]
        self.curve = curve
        self.base = _base_count(curve, importance.shape[1])
        order = torch.sort(self.importance, dim=1, descending=True, stable=True).indices
        self.order = order  # [L, n] units of each layer, most important first
        ranked = self.importance.gather(1, order)
        self.layer_score = ranked[:, : self.base].sum(dim=1)  # [L]
        self.layer_rank = torch.sort(self.layer_score, descending=True, stable=True).indices

    def candidates(self, kept_layers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(importance, flat index) of the units above the base in the kept layers, most
        important first (ties by position)."""
        L, n = self.importance.shape
        extra = torch.zeros(L, n, dtype=torch.bool)
        for layer in kept_layers.tolist():
            extra[layer, self.order[layer, self.base:]] = True
        flat = extra.flatten().nonzero().flatten()
        values = self.importance.flatten()[flat]
        rank = torch.sort(values, descending=True, stable=True).indices
        return values[rank], flat[rank]

    def mask(self, kept_layers: torch.Tensor, extra_units: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(self.importance.numel())
        mask[extra_units] = 1.0
        mask = mask.view_as(self.importance)
        for layer in kept_layers.tolist():
            mask[layer, self.order[layer, : self.base]] = 1.0
        return mask


def search_masks(
    head_importance: torch.Tensor,  # [L, H]
    neuron_importance: torch.Tensor,  # [L, N]
    cost: CostModel,
    constraint: float,
) -> Masks:
    """Binary masks keeping the most important units whose cost fits ``constraint`` times the
    unpruned model's cost under ``cost`` (FLOPs or latency)."""
    constraint = check_constraint(constraint)
    heads, neurons = _Part(head_importance, cost.attn), _Part(neuron_importance, cost.ffn)
    L = head_importance.shape[0]
    budget = constraint * cost.full - cost.fixed
    best: tuple | None = None
    for k_attn in _layer_choices(cost.attn, L):
        for k_ffn in _layer_choices(cost.ffn, L):
            rest = budget - k_attn * cost.attn.flat - k_ffn * cost.ffn.flat
            if rest < -EPS * cost.full:
                continue
            attn_layers, ffn_layers = heads.layer_rank[:k_attn], neurons.layer_rank[:k_ffn]
            h_val, h_idx = heads.candidates(attn_layers)
            n_val, n_idx = neurons.candidates(ffn_layers)
            score, h, n = best_split(_cum(h_val), _cum(n_val), cost.attn.slope,
                                     cost.ffn.slope, rest, cost.full)
            score += float(heads.layer_score[attn_layers].sum()
                           + neurons.layer_score[ffn_layers].sum())
            if best is None or score > best[0]:
                best = (score, attn_layers, h_idx[:h], ffn_layers, n_idx[:n])
    if best is None or best[0] == -float("inf"):
        raise PruneError(
            f"constraint {constraint} is below what the model costs with every head and neuron "
            f"removed ({cost.fixed / cost.full:.2f} of its {cost.unit}); raise the constraint")
    _, attn_layers, h_idx, ffn_layers, n_idx = best
    return Masks(heads.mask(attn_layers, h_idx), neurons.mask(ffn_layers, n_idx))

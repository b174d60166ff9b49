"""Mask search under a FLOPs budget (paper Sec. 4.1, Algorithm 1).

Heads and neurons are ranked by diagonal Fisher importance. For every possible number ``h`` of
kept heads, the budget left after the top ``h`` heads goes to the top ``floor(rest / c_neuron)``
neurons; the split with the highest total retained importance wins. The sweep over ``h`` is one
vectorised pass over cumulative sums.
"""

from __future__ import annotations

import torch

from prune.cost import FlopsCost
from prune.errors import PruneError
from prune.masks import Masks


def check_constraint(constraint: float) -> float:
    constraint = float(constraint)
    if not 0.0 < constraint <= 1.0:
        raise PruneError(
            f"constraint={constraint} is outside (0, 1]: it is the fraction of FLOPs kept, "
            f"e.g. constraint=0.6 keeps 60%"
        )
    return constraint


def _top_mask(importance: torch.Tensor, count: int) -> torch.Tensor:
    """1 on the ``count`` most important entries (ties broken by position), 0 elsewhere."""
    flat = importance.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros_like(flat)
    mask[order[:count]] = 1.0
    return mask.view_as(importance)


def search_masks(
    head_importance: torch.Tensor,  # [L, H]
    neuron_importance: torch.Tensor,  # [L, N]
    cost: FlopsCost,
    constraint: float,
) -> Masks:
    """Binary masks keeping the most important units whose MACs fit ``constraint * full``."""
    constraint = check_constraint(constraint)
    head_importance = head_importance.double().cpu()
    neuron_importance = neuron_importance.double().cpu()
    budget = constraint * cost.full_macs
    zero = torch.zeros(1, dtype=torch.float64)
    head_cum = torch.cat([zero, torch.sort(head_importance.flatten(), descending=True).values
                          .cumsum(0)])  # [L*H + 1]
    neuron_cum = torch.cat([zero, torch.sort(neuron_importance.flatten(), descending=True).values
                            .cumsum(0)])  # [L*N + 1]
    heads = torch.arange(head_cum.numel(), dtype=torch.float64)
    rest = budget - heads * cost.head_macs
    # a relative epsilon so that constraint=1.0 keeps everything despite rounding
    neurons = torch.floor(rest / cost.neuron_macs + 1e-9).clamp(0, neuron_cum.numel() - 1).long()
    score = head_cum + neuron_cum[neurons]
    score[rest < -1e-9 * cost.full_macs] = -float("inf")
    best = int(torch.argmax(score))
    return Masks(
        head=_top_mask(head_importance, best).float(),
        neuron=_top_mask(neuron_importance, int(neurons[best])).float(),
    )

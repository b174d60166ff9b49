"""Mask search under a FLOPs budget (paper Sec. 4.1, Algorithm 1).

Heads and neurons are ranked by diagonal Fisher importance. For every possible number ``h`` of
kept heads, the budget left after the top ``h`` heads goes to the top ``floor(rest / c_neuron)``
neurons; the split with the highest total retained importance wins. The sweep over ``h`` is one
vectorised pass over cumulative sums.
"""

from __future__ import annotations

import numpy as np
import torch

from prune.cost import FlopsCost
from prune.errors import PruneError
from prune.latency import LatencyTable
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
    cost: FlopsCost | LatencyTable,
    constraint: float,
) -> Masks:
    """Binary masks keeping the most important units whose cost fits ``constraint * full``:
    FLOPs (Algorithm 1) or measured latency (a ``LatencyTable``)."""
    constraint = check_constraint(constraint)
    if isinstance(cost, LatencyTable):
        return search_masks_latency(head_importance, neuron_importance, cost, constraint)
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


def search_masks_latency(
    head_importance: torch.Tensor,  # [L, H]
    neuron_importance: torch.Tensor,  # [L, N]
    table: LatencyTable,
    constraint: float,
) -> Masks:
    """Keep units in descending Fisher importance while the predicted latency fits the budget.

    The table's curves are flat below a threshold, so the first unit of a layer's attention or
    FFN costs the whole flat part and the next ones little: a unit that does not fit is skipped
    and cheaper ones after it are still considered. The budget is ``constraint`` times the
    table's prediction for the unpruned model, and is never exceeded (unlike the official code,
    whose remaining budget was decremented cumulatively).
    """
    L, H = head_importance.shape
    N = neuron_importance.shape[1]
    budget = constraint * table.predict([H] * L, [N] * L)
    attn = table.attn_time(np.arange(H + 1))  # [H + 1]: time of a layer's attention with h heads
    ffn = table.ffn_time(np.arange(N + 1))
    used = table.fixed + L * table.layer_base
    if used > budget:
        raise PruneError(
            f"latency constraint {constraint} is below what the model costs with every head and "
            f"neuron removed ({used / table.predict([H] * L, [N] * L):.2f} of its latency); "
            f"raise the constraint")
    scores = torch.cat([head_importance.flatten(), neuron_importance.flatten()]).double()
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    heads, neurons = np.zeros(L, dtype=int), np.zeros(L, dtype=int)
    keep = torch.zeros(L * H + L * N)
    for unit in order:
        if unit < L * H:
            layer, count, curve = unit // H, heads, attn
        else:
            layer, count, curve = (unit - L * H) // N, neurons, ffn
        delta = curve[count[layer] + 1] - curve[count[layer]]
        if used + delta <= budget * (1 + 1e-12):
            used += delta
            count[layer] += 1
            keep[unit] = 1.0
    return Masks(keep[: L * H].view(L, H), keep[L * H:].view(L, N))

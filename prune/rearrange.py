"""Mask rearrangement (paper Sec. 4.2, Algorithm 2).

The search fixes how many heads and neurons each layer keeps; rearrangement chooses which, using
the layer's block of the empirical Fisher, which captures interactions between units of the same
layer. The proxy loss of pruning a set P is ``sum_b (sum_{i in P} g_{b,i})^2`` over mini-batch
gradients ``g``. Starting from the search's choice, the kept units are visited in ascending
importance; each is tentatively added to P and the unit of P whose removal gives the lowest proxy
is dropped from it. One pass is the paper's algorithm; ``sweeps > 1`` repeats it until no change.

Every step swaps one unit in for one unit out, so each layer keeps exactly the counts the search
chose, including widths aligned to a granularity (``search_masks(..., granularity=g)``; tested
in ``tests/test_align.py``).
"""

from __future__ import annotations

import torch

from prune.fisher import Fisher
from prune.masks import Masks


@torch.no_grad()
def greedy_rearrange(kept: torch.Tensor, grads: torch.Tensor, sweeps: int = 1,
                     allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Rearrange one layer: ``kept`` [n] (bool), ``grads`` [num_batches, n]; returns new kept.
    Only units in ``allowed`` [n] (bool; all by default) may be swapped in."""
    kept = kept.bool().clone()
    if kept.all() or not kept.any():
        return kept
    g = grads.t().double()  # [n, num_batches]
    sq_norm = g.pow(2).sum(dim=1)  # [n]
    order = torch.sort(sq_norm, stable=True).indices
    for _ in range(sweeps):
        pruned = ~kept
        total = g[pruned].sum(dim=0)  # [num_batches]
        changed = False
        for j in order[kept[order]].tolist():  # kept units, ascending importance
            pruned[j] = True
            total += g[j]
            # ||total - g_i||^2 = ||total||^2 - 2 g_i.total + ||g_i||^2: argmin over i in P
            score = sq_norm - 2.0 * (g @ total)
            score[~pruned] = float("inf")
            if allowed is not None:
                score[~allowed & (torch.arange(len(score)) != j)] = float("inf")
            i = int(torch.argmin(score))
            pruned[i] = False
            total -= g[i]
            changed |= i != j
        kept = ~pruned
        if not changed:
            break
    return kept


def rearrange_masks(masks: Masks, fisher: Fisher, sweeps: int = 1,
                    allowed: Masks | None = None) -> Masks:
    """Rearrange heads and neurons of every layer; per-layer counts stay as searched. Units
    outside ``allowed`` (e.g. pruned by an earlier step) are never swapped in."""
    head, neuron = masks.head.clone(), masks.neuron.clone()
    for layer in range(head.shape[0]):
        ok_h = allowed.head[layer] != 0 if allowed is not None else None
        ok_n = allowed.neuron[layer] != 0 if allowed is not None else None
        head[layer] = greedy_rearrange(head[layer] != 0, fisher.head_grads[:, layer], sweeps,
                                       ok_h)
        neuron[layer] = greedy_rearrange(neuron[layer] != 0, fisher.neuron_grads[:, layer],
                                         sweeps, ok_n)
    return Masks(head.float(), neuron.float())

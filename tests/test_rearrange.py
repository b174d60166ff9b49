import torch

from prune import Masks, rearrange_masks
from prune.fisher import Fisher
from prune.rearrange import greedy_rearrange


def proxy(pruned: torch.Tensor, grads: torch.Tensor) -> float:
    return float(grads[:, pruned].sum(dim=1).pow(2).sum())


def test_rearrangement_keeps_counts_and_never_raises_the_proxy():
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(8, 3, 20, generator=g)  # [batches, L, N]
    masks = Masks(head=torch.ones(3, 4), neuron=torch.zeros(3, 20))
    imp = grads.pow(2).sum(0)
    for layer, keep in enumerate([5, 12, 19]):
        masks.neuron[layer, torch.argsort(imp[layer], descending=True)[:keep]] = 1
    fisher = Fisher(torch.zeros(8, 3, 4), grads, 64)
    out = rearrange_masks(masks, fisher)
    assert out.neurons_per_layer() == masks.neurons_per_layer()
    assert out.heads_per_layer() == masks.heads_per_layer()
    for layer in range(3):
        before = proxy(masks.neuron[layer] == 0, grads[:, layer])
        after = proxy(out.neuron[layer] == 0, grads[:, layer])
        assert after <= before + 1e-9


def test_rearrangement_uses_interactions_inside_a_layer():
    """Units 0 and 1 each look important but their gradients cancel: pruning both together
    costs nothing, which the diagonal ranking cannot see and the Fisher block can."""
    b = torch.tensor([1.0, 0.0, 0.0, 0.0])  # per-batch gradient directions
    e = torch.tensor([0.0, 1.0, 0.0, 0.0])
    grads = torch.stack([2 * b, -2 * b, 1.5 * e], dim=1)  # [batches, 3 units]
    kept = torch.tensor([True, False, False])  # the diagonal ranking keeps unit 0
    new = greedy_rearrange(kept, grads)
    assert new.tolist() == [False, False, True]
    assert proxy(~new, grads) == 0.0 < proxy(~kept, grads)


def test_fully_kept_or_fully_pruned_layers_are_untouched():
    grads = torch.randn(4, 6)
    for kept in (torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)):
        assert torch.equal(greedy_rearrange(kept, grads), kept)


def algorithm_2_as_written(kept: list[bool], grads: torch.Tensor) -> list[bool]:
    """Algorithm 2 literally: P, the pruned set; visit the kept units in ascending diagonal
    Fisher; add each to P, then drop from P the unit whose removal leaves the smallest
    ||sum of P's gradients||^2 (summed over mini-batches), computed directly for every
    candidate."""
    n = len(kept)
    importance = [float(grads[:, j].pow(2).sum()) for j in range(n)]
    pruned = {j for j in range(n) if not kept[j]}
    for j in sorted((j for j in range(n) if kept[j]), key=lambda j: importance[j]):
        candidates = pruned | {j}
        loss = {}
        for i in candidates:
            rest = [u for u in candidates if u != i]
            total = grads[:, rest].sum(dim=1) if rest else torch.zeros(grads.shape[0])
            loss[i] = float(total.double().pow(2).sum())
        best = min(loss, key=loss.get)
        pruned = candidates - {best}
    return [j not in pruned for j in range(n)]


def test_greedy_rearrange_equals_algorithm_2_as_the_paper_writes_it():
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        n = 6 + trial % 7
        grads = torch.randn(5, n, generator=g)
        kept = (torch.rand(n, generator=g) > 0.5).tolist()
        if all(kept) or not any(kept):
            continue
        ours = greedy_rearrange(torch.tensor(kept), grads).tolist()
        assert ours == algorithm_2_as_written(kept, grads), trial

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

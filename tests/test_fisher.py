import torch

from conftest import tiny_batches, tiny_model
from prune import Masks, apply_masks, compute_fisher, get_adapter, prune_masks, flops_cost
from prune.pipeline import PruneOptions


def test_fisher_is_the_sum_of_squared_batch_gradients(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    batches = tiny_batches(3)
    fisher = compute_fisher(model, adapter, batches, progress=False)
    assert fisher.head_grads.shape == (3, adapter.num_layers, adapter.num_heads)
    assert fisher.num_samples == 18
    # recompute one batch's gradient independently
    masks = Masks.ones(adapter)
    masks.neuron.requires_grad_(True)
    with apply_masks(model, adapter, masks):
        model(**batches[1]).loss.backward()
    assert torch.allclose(fisher.neuron_grads[1], masks.neuron.grad, atol=1e-6)
    expected = sum(g.pow(2) for g in fisher.head_grads)
    assert torch.allclose(fisher.head_importance, expected)
    assert all(p.requires_grad for p in model.parameters()), "weights must be unfrozen after"


def test_same_seed_same_masks(family):
    results = []
    for _ in range(2):
        model = tiny_model(family, seed=0)
        adapter = get_adapter(model)
        r = prune_masks(model, adapter, tiny_batches(3, seed=7), flops_cost(adapter, 10),
                        PruneOptions(constraint=0.5), progress=False)
        results.append(r.masks)
    assert torch.equal(results[0].head, results[1].head)
    assert torch.equal(results[0].neuron, results[1].neuron)

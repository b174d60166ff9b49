import torch
from conftest import tiny_batches, tiny_model

from prune import Masks, apply_masks, compute_fisher, flops_cost, get_adapter, prune_masks
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


def test_bfloat16_autocast_fisher_ranks_units_like_float32(family):
    """``amp='bf16'`` (what ``auto`` picks on a bf16 GPU; forced here on CPU) keeps float32
    gradients and the same importance ranking to within bfloat16 noise; ``auto`` on CPU is exact
    float32."""
    from prune.fisher import autocast_dtype

    model = tiny_model(family)
    adapter = get_adapter(model)
    batches = tiny_batches(3)
    full = compute_fisher(model, adapter, batches, progress=False, amp="off")
    auto = compute_fisher(model, adapter, batches, progress=False, amp="auto")
    half = compute_fisher(model, adapter, batches, progress=False, amp="bf16")
    assert autocast_dtype("cpu", "auto") is None
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16
    assert torch.equal(full.neuron_grads, auto.neuron_grads)
    assert half.neuron_grads.dtype == torch.float32
    assert not torch.equal(full.neuron_grads, half.neuron_grads), "bf16 must actually run"
    for a, b in ((full.neuron_importance, half.neuron_importance),
                 (full.head_importance, half.head_importance)):
        ra, rb = a.flatten().argsort().argsort().float(), b.flatten().argsort().argsort().float()
        assert torch.corrcoef(torch.stack([ra, rb]))[0, 1] > 0.9

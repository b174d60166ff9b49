import pytest
import torch
from conftest import tiny_model

from prune import PruneError, flops_cost, get_adapter, search_masks
from prune.cost import FlopsCost


def cost_for(layers=3, heads=4, neurons=16, seq=10):
    return FlopsCost(head_macs=4 * seq * 32 * 8 + 2 * seq * seq * 8, neuron_macs=2 * seq * 32,
                     num_layers=layers, num_heads=heads, num_neurons=neurons, seq_len=seq)


@pytest.mark.parametrize("constraint", [0.1, 0.3, 0.5, 0.6, 0.75, 0.9, 1.0])
def test_search_respects_the_budget(constraint):
    g = torch.Generator().manual_seed(1)
    cost = cost_for()
    head_imp, neuron_imp = torch.rand(3, 4, generator=g), torch.rand(3, 16, generator=g)
    masks = search_masks(head_imp, neuron_imp, cost, constraint)
    used = cost.macs(masks.heads_per_layer(), masks.neurons_per_layer())
    assert used <= constraint * cost.full_macs * (1 + 1e-9)
    # nothing more fits: one more neuron would break the budget (or all are kept)
    assert (used + cost.neuron_macs > constraint * cost.full_macs
            or masks.neuron.sum() == masks.neuron.numel())
    if constraint == 1.0:
        assert masks.head.all() and masks.neuron.all()


def test_search_keeps_the_highest_fisher_units():
    cost = cost_for()
    head_imp = torch.zeros(3, 4)
    neuron_imp = torch.zeros(3, 16)
    head_imp[0, 1], head_imp[2, 3] = 100.0, 90.0  # two heads that clearly matter
    neuron_imp[1, :5] = torch.tensor([50.0, 40.0, 30.0, 20.0, 10.0])
    neuron_imp[2, 7] = 60.0
    budget = 2 * cost.head_macs + 6 * cost.neuron_macs
    masks = search_masks(head_imp, neuron_imp, cost, budget / cost.full_macs)
    assert masks.head.sum() == 2 and masks.head[0, 1] == 1 and masks.head[2, 3] == 1
    assert masks.neuron.sum() == 6
    assert masks.neuron[1, :5].all() and masks.neuron[2, 7] == 1


def test_search_trades_heads_for_neurons_by_importance():
    """When neurons carry all the importance, the budget goes to neurons, not heads."""
    cost = cost_for()
    head_imp = torch.full((3, 4), 1e-6)
    neuron_imp = torch.rand(3, 16) + 1.0
    masks = search_masks(head_imp, neuron_imp, cost, 0.5)
    assert masks.neuron.sum() == 48 or masks.head.sum() == 0


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, 2])
def test_bad_constraint_is_rejected(bad):
    cost = cost_for()
    with pytest.raises(PruneError, match="outside"):
        search_masks(torch.rand(3, 4), torch.rand(3, 16), cost, bad)


def test_search_on_a_real_adapter_cost():
    adapter = get_adapter(tiny_model("distilbert"))
    cost = flops_cost(adapter, 12)
    masks = search_masks(torch.rand(2, 4), torch.rand(2, 48), cost, 0.4)
    assert cost.macs(masks.heads_per_layer(), masks.neurons_per_layer()) <= 0.4 * cost.full_macs

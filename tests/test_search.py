import itertools

import pytest
import torch
from conftest import tiny_model

from prune import PruneError, flops_cost, get_adapter, search_masks
from prune.cost import CostModel, FlopsCost, UnitCurve


def cost_for(layers=3, heads=4, neurons=16, seq=10, d=32, dh=8) -> FlopsCost:
    return FlopsCost(attn=UnitCurve(4 * seq * d * dh + 2 * seq * seq * dh),
                     ffn=UnitCurve(2 * seq * d), num_layers=layers, num_heads=heads,
                     num_neurons=neurons, seq_len=seq)


def retained(masks, head_imp, neuron_imp) -> float:
    return float((masks.head * head_imp).sum() + (masks.neuron * neuron_imp).sum())


def brute_force(head_imp, neuron_imp, cost: CostModel, constraint: float) -> float:
    """The best retained importance over every subset of units that fits the budget."""
    L, H = head_imp.shape
    N = neuron_imp.shape[1]
    units = [("h", l, i) for l in range(L) for i in range(H)] + \
            [("n", l, i) for l in range(L) for i in range(N)]
    budget = constraint * cost.full
    best = -1.0
    for keep in itertools.product([0, 1], repeat=len(units)):
        heads, neurons, value = [0] * L, [0] * L, 0.0
        for k, (kind, l, i) in zip(keep, units, strict=True):
            if k:
                if kind == "h":
                    heads[l] += 1
                    value += float(head_imp[l, i])
                else:
                    neurons[l] += 1
                    value += float(neuron_imp[l, i])
        if value > best and cost.total(heads, neurons) <= budget * (1 + 1e-12):
            best = value
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("constraint", [0.05, 0.2, 0.35, 0.5, 0.8])
def test_flops_search_equals_the_brute_force_optimum(seed, constraint):
    """Algorithm 1 is exact for the linear FLOPs model: no subset that fits keeps more
    importance. At 0.05 a single head costs more than the whole budget (only neurons fit)."""
    g = torch.Generator().manual_seed(seed)
    cost = cost_for(layers=2, heads=2, neurons=3, seq=4, d=8, dh=4)
    assert cost.head_macs > 0.05 * cost.full  # the heads-alone-exceed-the-budget case
    head_imp, neuron_imp = torch.rand(2, 2, generator=g), torch.rand(2, 3, generator=g)
    masks = search_masks(head_imp, neuron_imp, cost, constraint)
    assert cost.total(masks.heads_per_layer(), masks.neurons_per_layer()) <= \
        constraint * cost.full * (1 + 1e-9)
    assert retained(masks, head_imp, neuron_imp) == pytest.approx(
        brute_force(head_imp, neuron_imp, cost, constraint), rel=1e-6)


@pytest.mark.parametrize("constraint", [0.1, 0.3, 0.5, 0.6, 0.75, 0.9, 1.0])
def test_search_respects_the_budget_and_leaves_nothing_that_fits(constraint):
    g = torch.Generator().manual_seed(1)
    cost = cost_for()
    head_imp, neuron_imp = torch.rand(3, 4, generator=g), torch.rand(3, 16, generator=g)
    masks = search_masks(head_imp, neuron_imp, cost, constraint)
    used = cost.macs(masks.heads_per_layer(), masks.neurons_per_layer())
    assert used <= constraint * cost.full_macs * (1 + 1e-9)
    assert (used + cost.neuron_macs > constraint * cost.full_macs
            or masks.neuron.sum() == masks.neuron.numel())
    if constraint == 1.0:
        assert masks.head.all() and masks.neuron.all()


def test_budget_binds_on_neurons_and_the_least_important_neurons_go():
    """Neurons compete for a budget that cannot hold them all: the least important go."""
    cost = cost_for()
    head_imp = torch.full((3, 4), 1e4)  # every head is worth more than any neurons
    neuron_imp = torch.arange(48, dtype=torch.float).view(3, 16)
    budget = 12 * cost.head_macs + 20 * cost.neuron_macs
    masks = search_masks(head_imp, neuron_imp, cost, budget / cost.full_macs)
    assert masks.head.all()
    assert int(masks.neuron.sum()) == 20 < 48
    assert torch.equal(masks.neuron.flatten().nonzero().flatten(), torch.arange(28, 48))


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
    with pytest.raises(PruneError, match="outside"):
        search_masks(torch.rand(3, 4), torch.rand(3, 16), cost_for(), bad)


def test_search_on_a_real_adapter_cost():
    adapter = get_adapter(tiny_model("distilbert"))
    cost = flops_cost(adapter, 12)
    masks = search_masks(torch.rand(2, 4), torch.rand(2, 48), cost, 0.4)
    assert cost.macs(masks.heads_per_layer(), masks.neurons_per_layer()) <= 0.4 * cost.full_macs


def official_flops_loop(head_imp, neuron_imp, cost, constraint):
    """The official code's loop (our own transcription of its logic): from one head upwards,
    the rest of the budget to the top neurons, a negative rest clamped to zero neurons, so the
    heads alone may exceed the budget."""
    heads = torch.sort(head_imp.flatten(), descending=True).values
    neurons = torch.sort(neuron_imp.flatten(), descending=True).values
    budget, best, pick = constraint * cost.full, 0.0, None
    for h in range(1, heads.numel() + 1):
        n = max(int((budget - h * cost.head_macs) / cost.neuron_macs), 0)
        value = float(heads[:h].sum() + neurons[:n].sum())
        if value > best:
            best, pick = value, (h, n)
    return pick


def test_official_loop_overshoots_where_ours_does_not():
    """The documented difference: on BERT-base MNLI shapes at 0.3 the official loop keeps more
    than the budget; our search never does."""
    g = torch.Generator().manual_seed(0)
    cost = cost_for(layers=12, heads=12, neurons=3072, seq=39.05, d=768, dh=64)
    head_imp = torch.rand(12, 12, generator=g) * 10 + 5  # heads matter much more here
    neuron_imp = torch.rand(12, 3072, generator=g) * 1e-3
    h, n = official_flops_loop(head_imp, neuron_imp, cost, 0.3)
    assert (h * cost.head_macs + n * cost.neuron_macs) / cost.full > 0.3
    ours = search_masks(head_imp, neuron_imp, cost, 0.3)
    assert cost.ratio(ours.heads_per_layer(), ours.neurons_per_layer()) <= 0.3 + 1e-9


def latency_like(L=3, H=4, N=16) -> CostModel:
    """Flat up to 2 heads / 8 neurons, then linear; a fixed part outside the layers."""
    return CostModel(attn=UnitCurve(slope=1.0, flat=2.0, threshold=2),
                     ffn=UnitCurve(slope=0.25, flat=2.0, threshold=8), num_layers=L,
                     num_heads=H, num_neurons=N, fixed=1.5, unit="latency")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("constraint", [0.3, 0.45, 0.6, 0.8, 1.0])
def test_latency_search_fits_and_nothing_more_fits(seed, constraint):
    """Under flat-then-linear curves: the budget holds; whole layers below the threshold are
    dropped or kept with their flat units; and no single further step would still fit."""
    g = torch.Generator().manual_seed(seed)
    cost = latency_like()
    head_imp, neuron_imp = torch.rand(3, 4, generator=g), torch.rand(3, 16, generator=g)
    masks = search_masks(head_imp, neuron_imp, cost, constraint)
    heads, neurons = masks.heads_per_layer(), masks.neurons_per_layer()
    budget = constraint * cost.full
    assert cost.total(heads, neurons) <= budget * (1 + 1e-9)
    assert all(h == 0 or h >= 2 for h in heads) and all(n == 0 or n >= 8 for n in neurons)
    for l in range(3):  # one more head / neuron, or opening a closed layer, does not fit
        for more_h, more_n in ((heads[l] + (2 if heads[l] == 0 else 1), neurons[l]),
                               (heads[l], neurons[l] + (8 if neurons[l] == 0 else 1))):
            if more_h > 4 or more_n > 16:
                continue
            h2, n2 = list(heads), list(neurons)
            h2[l], n2[l] = more_h, more_n
            assert cost.total(h2, n2) > budget
    if constraint == 1.0:
        assert masks.head.all() and masks.neuron.all()


def test_latency_search_keeps_a_layers_most_important_units():
    cost = latency_like()
    head_imp = torch.tensor([[0.1, 9.0, 0.2, 8.0], [0.0] * 4, [0.0] * 4])
    neuron_imp = torch.zeros(3, 16)
    neuron_imp[1, :8] = 5.0
    masks = search_masks(head_imp, neuron_imp, cost, (1.5 + 2 + 2) / cost.full)
    assert masks.heads_per_layer() == [2, 0, 0] and masks.head[0, 1] == masks.head[0, 3] == 1
    assert masks.neurons_per_layer() == [0, 8, 0] and masks.neuron[1, :8].all()


def test_latency_search_rejects_an_impossible_budget():
    with pytest.raises(PruneError, match="raise the constraint"):
        search_masks(torch.rand(3, 4), torch.rand(3, 16), latency_like(), 0.05)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("constraint", [0.3, 0.5, 0.7, 0.9])
def test_latency_search_with_a_zero_threshold_respects_the_budget(seed, constraint):
    """A curve flat up to 0 units costs ``flat + slope`` for one unit: a kept layer's base unit
    is charged at the curve (earlier only ``flat``, up to 14% over the budget here)."""
    g = torch.Generator().manual_seed(seed)
    cost = CostModel(attn=UnitCurve(slope=1.0, flat=2.0, threshold=0),
                     ffn=UnitCurve(slope=0.25, flat=2.0, threshold=0), num_layers=3,
                     num_heads=4, num_neurons=16, fixed=1.5, unit="latency")
    masks = search_masks(torch.rand(3, 4, generator=g), torch.rand(3, 16, generator=g), cost,
                         constraint)
    assert cost.total(masks.heads_per_layer(), masks.neurons_per_layer()) <= \
        constraint * cost.full * (1 + 1e-9)


def test_floor_counts_round_up_to_an_allowed_width():
    from prune.search import floor_counts

    assert floor_counts(12, 0.0) == 0
    assert floor_counts(12, 0.1) == 2  # ceil(1.2)
    assert floor_counts(12, 0.25) == 3  # exact, no rounding up
    assert floor_counts(3072, 0.05, 8) == 160  # ceil(153.6) = 154, up to a multiple of 8
    assert floor_counts(20, 0.5, 8) == 16  # 10 -> 16
    assert floor_counts(20, 0.9, 8) == 20  # 18 -> the full width (20 is not a multiple of 8)


@pytest.mark.parametrize("granularity", [1, 4])
@pytest.mark.parametrize("constraint", [0.27, 0.3])
def test_layer_floor_keeps_the_most_important_units_of_a_layer_the_search_would_empty(
        granularity, constraint):
    """Layer 2's units are the least important: the plain search empties it; with a floor of
    a quarter it keeps its most important quarter of heads and neurons, the budget still
    holds, and the rest of the budget goes to the other layers by importance."""
    from prune.search import floored

    g = torch.Generator().manual_seed(3)
    cost = cost_for(neurons=64)
    head_imp, neuron_imp = torch.rand(3, 4, generator=g) + 1, torch.rand(3, 64, generator=g) + 1
    head_imp[2] *= 1e-3
    neuron_imp[2] *= 1e-3
    plain = search_masks(head_imp, neuron_imp, cost, constraint, granularity=granularity)
    assert plain.heads_per_layer()[2] == 0 and plain.neurons_per_layer()[2] == 0
    masks = search_masks(*floored(head_imp, neuron_imp, 0.25, granularity), cost, constraint,
                         granularity=granularity)
    assert masks.heads_per_layer()[2] == 1 and masks.neurons_per_layer()[2] == 16
    assert masks.head[2, int(head_imp[2].argmax())] == 1
    assert set(masks.neuron[2].nonzero().flatten().tolist()) == \
        set(torch.topk(neuron_imp[2], 16).indices.tolist())
    assert cost.total(masks.heads_per_layer(), masks.neurons_per_layer()) <= \
        constraint * cost.full * (1 + 1e-9)
    # outside layer 2 the floor changes nothing but the budget left: the kept units there are
    # still the most important ones of their layer
    for layer in (0, 1):
        k = masks.neurons_per_layer()[layer]
        assert set(masks.neuron[layer].nonzero().flatten().tolist()) == \
            set(torch.topk(neuron_imp[layer], k).indices.tolist())


def test_layer_floor_counts_only_units_a_previous_step_kept():
    from prune.masks import Masks
    from prune.search import floored

    heads = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    neurons = torch.tensor([[1.0, 2.0]])
    kept = Masks(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), torch.ones(1, 2))
    out, n_out = floored(heads, neurons, 0.5, kept=kept)
    total = float(heads.sum() + neurons.sum())
    assert out[0, 0] == 5.0  # pruned before: never lifted
    assert out[0, 1] > total and out[0, 2] > total and out[0, 3] == 2.0
    assert n_out[0, 0] == 1.0 and n_out[0, 1] > total


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, "a", True])
def test_bad_layer_floor_is_rejected(bad):
    from prune import PruneOptions

    with pytest.raises(PruneError, match=r"layer_floor=.*: use a number in \[0, 1\)"):
        PruneOptions(layer_floor=bad)


def test_a_floor_the_budget_cannot_hold_stops_with_the_fix():
    """A floor of 90% of every layer cannot fit in 30% of the cost: one line naming the fix."""
    from prune.search import check_floor, floored

    cost = cost_for()
    head_imp, neuron_imp = torch.rand(3, 4) + 1, torch.rand(3, 16) + 1
    masks = search_masks(*floored(head_imp, neuron_imp, 0.9), cost, 0.3)
    with pytest.raises(PruneError, match="lower prune.layer_floor or raise the constraint"):
        check_floor(masks, 0.9)

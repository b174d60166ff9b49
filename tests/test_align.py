"""Aligned FFN widths (``search_masks(..., granularity=g)``): every layer keeps 0, g, 2g, ...
neurons (or its full width), the budget holds, the search is exact against brute force, and
rearrangement, tuning and physical pruning keep the aligned counts."""

import copy
import itertools
import logging

import pytest
import torch
from conftest import tiny_batches, tiny_model

from prune import (
    Masks,
    PruneError,
    TuneOptions,
    compute_fisher,
    flops_cost,
    get_adapter,
    prune_model,
    rearrange_masks,
    search_masks,
    tune_masks,
)
from prune.cost import CostModel, FlopsCost, UnitCurve
from prune.search import allowed_counts, check_granularity


def cost_for(layers=3, heads=2, neurons=16, seq=4, d=8, dh=4) -> FlopsCost:
    return FlopsCost(attn=UnitCurve(4 * seq * d * dh + 2 * seq * seq * dh),
                     ffn=UnitCurve(2 * seq * d), num_layers=layers, num_heads=heads,
                     num_neurons=neurons, seq_len=seq)


def retained(masks: Masks, head_imp, neuron_imp) -> float:
    return float((masks.head.double() * head_imp.double()).sum()
                 + (masks.neuron.double() * neuron_imp.double()).sum())


def top_sums(imp: torch.Tensor) -> torch.Tensor:
    """[L, n + 1]: the importance of each layer's ``k`` best units, for k = 0..n."""
    ranked = torch.sort(imp.double(), dim=1, descending=True).values
    return torch.cat([torch.zeros(imp.shape[0], 1, dtype=torch.float64), ranked.cumsum(1)], 1)


def brute_force(head_imp, neuron_imp, cost: CostModel, constraint: float, g: int) -> float:
    """The best retained importance over every combination of per-layer counts (heads: any,
    neurons: ``allowed_counts``) that fits the budget; a layer keeps its best units."""
    L, H = head_imp.shape
    N = neuron_imp.shape[1]
    heads, neurons = top_sums(head_imp), top_sums(neuron_imp)
    budget, best = constraint * cost.full, -1.0
    for hs in itertools.product(range(H + 1), repeat=L):
        for ns in itertools.product(allowed_counts(N, g), repeat=L):
            if cost.total(list(hs), list(ns)) > budget * (1 + 1e-12):
                continue
            value = sum(float(heads[l, hs[l]] + neurons[l, ns[l]]) for l in range(L))
            best = max(best, value)
    return best


def assert_aligned(masks: Masks, width: int, g: int) -> None:
    assert all(n in allowed_counts(width, g) for n in masks.neurons_per_layer())


def test_allowed_counts():
    assert allowed_counts(16, 4) == [0, 4, 8, 12, 16]
    assert allowed_counts(10, 4) == [0, 4, 8, 10]
    assert allowed_counts(3, 8) == [0, 3]
    assert allowed_counts(5, 1) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("constraint", [0.05, 0.2, 0.35, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("layers,neurons", [(2, 8), (3, 16)])
def test_aligned_search_equals_the_brute_force_optimum(seed, constraint, layers, neurons):
    """With ``g`` dividing the width, the search over (heads, blocks) is exact: no combination
    of aligned per-layer counts that fits keeps more importance."""
    g = torch.Generator().manual_seed(seed)
    cost = cost_for(layers=layers, neurons=neurons)
    head_imp = torch.rand(layers, 2, generator=g)
    neuron_imp = torch.rand(layers, neurons, generator=g) ** 3  # uneven, so alignment binds
    masks = search_masks(head_imp, neuron_imp, cost, constraint, granularity=4)
    assert_aligned(masks, neurons, 4)
    assert cost.ratio(masks.heads_per_layer(), masks.neurons_per_layer()) <= constraint + 1e-9
    assert retained(masks, head_imp, neuron_imp) == pytest.approx(
        brute_force(head_imp, neuron_imp, cost, constraint, 4), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("constraint", [0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_a_width_not_divisible_by_g_allows_the_full_width(seed, constraint):
    """Width 10, g = 4: layers keep 0, 4, 8 or 10 neurons; the budget holds, and the greedy
    over blocks (the last one 2 wide) is within one block's importance of the optimum."""
    g = torch.Generator().manual_seed(seed)
    cost = cost_for(layers=2, neurons=10)
    head_imp, neuron_imp = torch.rand(2, 2, generator=g), torch.rand(2, 10, generator=g)
    masks = search_masks(head_imp, neuron_imp, cost, constraint, granularity=4)
    assert_aligned(masks, 10, 4)
    assert cost.ratio(masks.heads_per_layer(), masks.neurons_per_layer()) <= constraint + 1e-9
    best = brute_force(head_imp, neuron_imp, cost, constraint, 4)
    assert best - 4.0 - 1e-9 <= retained(masks, head_imp, neuron_imp) <= best + 1e-9
    if constraint == 1.0:
        assert masks.head.all() and masks.neuron.all()


def test_a_layer_keeps_its_most_important_neurons_in_whole_blocks():
    cost = cost_for(layers=2, neurons=16)
    head_imp = torch.full((2, 2), 1e4)  # every head stays
    neuron_imp = torch.zeros(2, 16)
    neuron_imp[0, [3, 9, 12, 1, 5]] = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0])
    budget = 4 * cost.head_macs + 7 * cost.neuron_macs  # room for 7 neurons: one block of 4
    masks = search_masks(head_imp, neuron_imp, cost, budget / cost.full, granularity=4)
    assert masks.neurons_per_layer() == [4, 0]
    assert masks.neuron[0].nonzero().flatten().tolist() == [1, 3, 9, 12]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("constraint", [0.3, 0.6, 1.0])
def test_granularity_one_is_the_unaligned_search(seed, constraint):
    g = torch.Generator().manual_seed(seed)
    head_imp, neuron_imp = torch.rand(3, 4, generator=g), torch.rand(3, 16, generator=g)
    neuron_imp[1, :6] = 0.5  # ties
    for cost in (cost_for(heads=4), latency_like()):
        plain = search_masks(head_imp, neuron_imp, cost, constraint)
        one = search_masks(head_imp, neuron_imp, cost, constraint, granularity=1)
        assert torch.equal(plain.head, one.head) and torch.equal(plain.neuron, one.neuron)


def test_aligned_counts_are_what_rounding_after_the_fact_overshoots():
    """Rounding the unaligned counts up to multiples of g breaks the budget; the aligned search
    keeps within it and loses little importance."""
    g = torch.Generator().manual_seed(0)
    cost = cost_for(layers=3, heads=4, neurons=64, seq=16, d=32, dh=8)
    head_imp, neuron_imp = torch.rand(3, 4, generator=g), torch.rand(3, 64, generator=g)
    plain = search_masks(head_imp, neuron_imp, cost, 0.5)
    rounded = [-(-n // 8) * 8 for n in plain.neurons_per_layer()]
    assert cost.ratio(plain.heads_per_layer(), rounded) > 0.5
    aligned = search_masks(head_imp, neuron_imp, cost, 0.5, granularity=8)
    assert_aligned(aligned, 64, 8)
    assert cost.ratio(aligned.heads_per_layer(), aligned.neurons_per_layer()) <= 0.5 + 1e-9
    assert retained(aligned, head_imp, neuron_imp) >= 0.95 * retained(plain, head_imp,
                                                                          neuron_imp)


def latency_like(L=3, H=4, N=16, threshold=8) -> CostModel:
    return CostModel(attn=UnitCurve(slope=1.0, flat=2.0, threshold=2),
                     ffn=UnitCurve(slope=0.25, flat=2.0, threshold=threshold), num_layers=L,
                     num_heads=H, num_neurons=N, fixed=1.5, unit="latency")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("constraint", [0.3, 0.45, 0.6, 0.8, 1.0])
@pytest.mark.parametrize("threshold", [3, 8])
def test_aligned_latency_search_fits_and_no_further_block_fits(seed, constraint, threshold):
    """Latency curves with g = 4: a kept FFN starts with the whole blocks covering the
    threshold (4 or 8 neurons), grows by blocks, and no further block would still fit."""
    g = torch.Generator().manual_seed(seed)
    cost = latency_like(threshold=threshold)
    base = 4 if threshold == 3 else 8
    head_imp, neuron_imp = torch.rand(3, 4, generator=g), torch.rand(3, 16, generator=g)
    masks = search_masks(head_imp, neuron_imp, cost, constraint, granularity=4)
    heads, neurons = masks.heads_per_layer(), masks.neurons_per_layer()
    budget = constraint * cost.full
    assert cost.total(heads, neurons) <= budget * (1 + 1e-9)
    assert_aligned(masks, 16, 4)
    assert all(n == 0 or n >= base for n in neurons)
    for l in range(3):
        more = neurons[l] + (base if neurons[l] == 0 else 4)
        if more <= 16:
            n2 = list(neurons)
            n2[l] = more
            assert cost.total(heads, n2) > budget
    if constraint == 1.0:
        assert masks.head.all() and masks.neuron.all()


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8", None])
def test_a_bad_granularity_stops_with_one_clear_line(bad):
    with pytest.raises(PruneError, match=r"granularity=.*positive integer") as err:
        search_masks(torch.rand(3, 4), torch.rand(3, 16), cost_for(heads=4), 0.5,
                     granularity=bad)
    assert "\n" not in str(err.value)


def test_a_head_size_not_divisible_by_g_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="prune.search"):
        assert check_granularity(8, head_size=64) == 8
        assert not caplog.records
        check_granularity(8, head_size=12)
    assert len(caplog.records) == 1 and "head size 12" in caplog.messages[0]


@pytest.fixture(scope="module")
def aligned_setup():
    """A tiny BERT (FFN 48), its Fisher, and masks searched at 0.5 with g = 8."""
    model = tiny_model("bert", layers=3)
    adapter = get_adapter(model)
    batches = tiny_batches(3)
    fisher = compute_fisher(model, adapter, batches, progress=False)
    masks = search_masks(fisher.head_importance, fisher.neuron_importance,
                         flops_cost(adapter, 10), 0.5, granularity=8)
    assert_aligned(masks, 48, 8)
    assert 0 < sum(masks.neurons_per_layer()) < 3 * 48
    return model, adapter, batches, fisher, masks


def test_rearrangement_and_physical_pruning_keep_the_aligned_counts(aligned_setup):
    model, adapter, batches, fisher, masks = aligned_setup
    moved = rearrange_masks(masks, fisher, sweeps=3)
    assert moved.neurons_per_layer() == masks.neurons_per_layer()
    assert moved.heads_per_layer() == masks.heads_per_layer()
    small = prune_model(copy.deepcopy(model), moved, adapter)
    assert adapter.neurons_per_layer(small) == masks.neurons_per_layer()
    assert all(n % 8 == 0 for n in adapter.neurons_per_layer(small))


@pytest.mark.parametrize("mode", ["mask", "weights"])
def test_tuning_keeps_the_aligned_counts(aligned_setup, mode):
    model, adapter, batches, _, masks = aligned_setup
    tuned = tune_masks(model, adapter, masks, batches, options=TuneOptions(mode=mode),
                       progress=False)
    assert tuned.masks.neurons_per_layer() == masks.neurons_per_layer()
    assert torch.equal(tuned.masks.kept().neuron, masks.neuron)
    small = prune_model(copy.deepcopy(model), tuned.masks, adapter, tuned.weights)
    assert adapter.neurons_per_layer(small) == masks.neurons_per_layer()

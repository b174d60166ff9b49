"""Importance that counts what reconstruction recovers (``prune.obs``): the closed forms
against least squares done by hand, and the pipeline with it."""

import pytest
import torch
from conftest import tiny_batches, tiny_model

from prune import (
    PruneError,
    PruneOptions,
    TuneOptions,
    compute_fisher,
    flops_cost,
    get_adapter,
    prune_masks,
)
from prune.obs import (
    _greedy_shares,
    _head_shares,
    _Moments,
    _neuron_shares,
    discounted,
    greedy_unrecovered,
    unrecovered,
)


def moments_of(x: torch.Tensor) -> _Moments:
    m = _Moments(x.shape[1], torch.device("cpu"))
    m.add(x)
    return m


def refit_left(x: torch.Tensor, w: torch.Tensor, cols: list[int]) -> float:
    """The error left after dropping ``cols`` and refitting the rest and a bias by hand."""
    x, w = x.double(), w.double()
    y = x @ w.T
    rest = [i for i in range(x.shape[1]) if i not in cols]
    design = torch.cat([x[:, rest], torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    coef = torch.linalg.lstsq(design, y).solution
    return float((y - design @ coef).pow(2).sum())


def refit_share(x: torch.Tensor, w: torch.Tensor, cols: list[int]) -> float:
    """Least squares by hand: drop ``cols``, refit the other columns and a bias to the full
    layer's output; the error left over the error of dropping them with nothing refitted."""
    return refit_left(x, w, cols) / plain_error(x, w, cols)


def plain_error(x: torch.Tensor, w: torch.Tensor, cols: list[int]) -> float:
    """The error of dropping ``cols`` with nothing refitted."""
    x, w = x.double(), w.double()
    return float((x[:, cols] @ w[:, cols].T).pow(2).sum())


def test_shares_equal_the_error_left_after_refitting_the_rest_of_the_layer():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 6, generator=g, dtype=torch.float64)
    # columns 6-7: noisy mixtures of others (recoverable), plus a shifted mean
    x = torch.cat([base, base[:, :2] @ torch.tensor([[1.0, 0.5], [-0.5, 1.0]],
                                                    dtype=torch.float64)
                   + 0.1 * torch.randn(400, 2, generator=g, dtype=torch.float64)], 1) + 0.3
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    m = moments_of(x)
    heads = _head_shares(m, w, 2, damp=1e-12)
    for b in range(4):
        assert float(heads[b]) == pytest.approx(refit_share(x, w, [2 * b, 2 * b + 1]), rel=1e-6)
    neurons = _neuron_shares(m, damp=1e-12)
    for i in range(8):
        assert float(neurons[i]) == pytest.approx(refit_share(x, w, [i]), rel=1e-6)
    assert float(neurons[6]) < 0.1 and float(neurons[5]) > 0.5  # the mixtures are recoverable


def test_a_copied_neuron_is_recoverable_and_a_lone_one_is_not():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 3, generator=g)
    x = torch.cat([a, a[:, :1]], 1)  # neuron 3 copies neuron 0
    shares = _neuron_shares(moments_of(x), damp=1e-6)
    assert float(shares[0]) < 1e-3 and float(shares[3]) < 1e-3
    assert float(shares[1]) > 0.9 and float(shares[2]) > 0.9


def test_discounted_fisher_scales_importance_by_the_share():
    model = tiny_model("bert", layers=2)
    adapter = get_adapter(model)
    batches = tiny_batches(2)
    fisher = compute_fisher(model, adapter, batches, progress=False)
    heads, neurons = unrecovered(model, adapter, batches)
    assert heads.shape == (2, 4) and neurons.shape == (2, 48)
    assert bool(((heads > 0) & (heads <= 1)).all() and ((neurons >= 0) & (neurons <= 1)).all())
    scaled = discounted(fisher, heads, neurons)
    assert torch.allclose(scaled.neuron_importance, fisher.neuron_importance * neurons)
    assert torch.allclose(scaled.head_importance, fisher.head_importance * heads)


@pytest.mark.parametrize("size", [1, 2])
def test_greedy_shares_are_the_added_error_of_each_removal_refitted_by_hand(size):
    """The greedy order's share of a block: the error left after refitting the rest with it and
    every block before it removed, less the error left before it went, over its plain error
    with the original weights; the order is forced by importances 1000x apart."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64)
    x[:, 5] += 0.8 * x[:, 1]  # some overlap, so the updates matter
    x += 0.2
    w = torch.randn(4, 8, generator=g, dtype=torch.float64)
    blocks = 8 // size
    order = [3, 0, 2, 1] if size == 2 else [5, 1, 7, 0, 2, 6, 3, 4]
    importance = torch.empty(blocks, dtype=torch.float64)
    for rank, b in enumerate(order):
        importance[b] = 1000.0 ** rank
    shares = _greedy_shares(moments_of(x), w, size, importance, damp=1e-12)
    n = x.shape[0]
    gone: list[int] = []
    before = 0.0
    for b in order:
        cols = list(range(b * size, (b + 1) * size))
        after = refit_left(x, w, gone + cols)
        plain = plain_error(x, w, cols)
        assert float(shares[b]) == pytest.approx((after - before) / plain, rel=1e-5,
                                                 abs=1e-9 * n)
        gone, before = gone + cols, after
    # the first block's share is the one-at-a-time share
    first = (_head_shares(moments_of(x), w, 2, 1e-12) if size == 2
             else _neuron_shares(moments_of(x), 1e-12))[order[0]]
    assert float(shares[order[0]]) == pytest.approx(float(first), rel=1e-6)


def test_greedy_discounts_one_of_two_copies_and_charges_the_other_for_both():
    """One-at-a-time OBS discounts both copies (each can stand in for the other), so a search
    removes both; the greedy order discounts the first to go and charges the second for both."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 3, generator=g)
    x = torch.cat([a, a[:, :1]], 1)  # neuron 3 copies neuron 0
    w = torch.ones(2, 4)
    importance = torch.ones(4)
    single = _neuron_shares(moments_of(x), damp=1e-6)
    assert float(single[0]) < 1e-3 and float(single[3]) < 1e-3
    shares = _greedy_shares(moments_of(x), w, 1, importance, damp=1e-6)
    low, high = sorted([float(shares[0]), float(shares[3])])
    # about (w0 + w3)^2 / w3^2 = 4: the second carries the first's work too (4.4 on this draw)
    assert low < 1e-3 and 3.0 < high < 6.0


def test_greedy_unrecovered_on_a_model_and_its_option():
    model = tiny_model("bert", layers=2)
    adapter = get_adapter(model)
    batches = tiny_batches(2)
    fisher = compute_fisher(model, adapter, batches, progress=False)
    heads, neurons = greedy_unrecovered(model, adapter, batches, fisher, chunk=8)
    assert heads.shape == (2, 4) and neurons.shape == (2, 48)
    assert bool((heads >= 0).all() and (neurons >= 0).all())
    one, _ = unrecovered(model, adapter, batches)
    # the first head each layer gives up is judged with all others present, as one-at-a-time
    for layer in range(2):
        first = int(torch.argmin(fisher.head_importance[layer] * one[layer]))
        assert float(heads[layer, first]) == pytest.approx(float(one[layer, first]), rel=1e-4)
    with pytest.raises(PruneError, match="set obs=true too"):
        PruneOptions(obs_greedy=True)


@pytest.mark.parametrize("steps", [1, 2])
def test_pipeline_with_obs_holds_the_budget_and_changes_the_ranking(steps):
    model = tiny_model("bert", layers=3)
    adapter = get_adapter(model)
    batches = tiny_batches(4, batch=8)
    cost = flops_cost(adapter, 10)
    fisher = compute_fisher(model, adapter, batches, progress=False)
    tune = TuneOptions(mode="weights")
    plain = prune_masks(model, adapter, batches, cost, 0.3,
                        PruneOptions(tune=tune, granularity=1, steps=steps), fisher=fisher,
                        progress=False)
    obs = prune_masks(model, adapter, batches, cost, 0.3,
                      PruneOptions(tune=tune, granularity=1, steps=steps, obs=True),
                      fisher=fisher, progress=False)
    kept = obs.masks.kept()
    assert cost.ratio(kept.heads_per_layer(), kept.neurons_per_layer()) <= 0.3 + 1e-9
    assert obs.timings["obs"] > 0
    assert not torch.equal(obs.fisher.neuron_grads, plain.fisher.neuron_grads)

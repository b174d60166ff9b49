"""Importance that counts what reconstruction recovers (``prune.obs``): the closed forms
against least squares done by hand, and the pipeline with it."""

import pytest
import torch
from conftest import tiny_batches, tiny_model

from prune import PruneOptions, TuneOptions, compute_fisher, flops_cost, get_adapter, prune_masks
from prune.obs import _head_shares, _Moments, _neuron_shares, discounted, unrecovered


def moments_of(x: torch.Tensor) -> _Moments:
    m = _Moments(x.shape[1], torch.device("cpu"))
    m.add(x)
    return m


def refit_share(x: torch.Tensor, w: torch.Tensor, cols: list[int]) -> float:
    """Least squares by hand: drop ``cols``, refit the other columns and a bias to the full
    layer's output; the error left over the error of dropping them with nothing refitted."""
    x, w = x.double(), w.double()
    y = x @ w.T
    rest = [i for i in range(x.shape[1]) if i not in cols]
    design = torch.cat([x[:, rest], torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    coef = torch.linalg.lstsq(design, y).solution
    left = float((y - design @ coef).pow(2).sum())
    plain = float((x[:, cols] @ w[:, cols].T).pow(2).sum())
    return left / plain


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

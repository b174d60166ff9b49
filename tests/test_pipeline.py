"""The pipeline's own logic: sample splits for tuning, and the adaptive Fisher pass."""

import pytest
import torch
from conftest import tiny_batches, tiny_model
from test_run import FAST, run

from prune import (
    Masks,
    PruneError,
    PruneOptions,
    adaptive_fisher,
    compute_fisher,
    flops_cost,
    get_adapter,
    prune_masks,
)
from prune.pipeline import masks_change, split_samples


def test_split_samples_takes_the_first_for_tuning_and_the_next_for_holding_out():
    batches = tiny_batches(4, batch=6)  # 24 samples
    fit, held = split_samples(batches, 10, 5)
    assert sum(b["input_ids"].shape[0] for b in fit) == 10
    assert sum(b["input_ids"].shape[0] for b in held) == 5
    flat = torch.cat([b["input_ids"] for b in batches])
    assert torch.equal(torch.cat([b["input_ids"] for b in fit]), flat[:10])
    assert torch.equal(torch.cat([b["input_ids"] for b in held]), flat[10:15])
    fit, held = split_samples(batches, None, 4)  # nothing left after: carved from the end
    assert sum(b["input_ids"].shape[0] for b in fit) == 20
    assert torch.equal(torch.cat([b["input_ids"] for b in held]), flat[20:])
    fit, held = split_samples(batches, 8, 0)
    assert held == [] and sum(b["input_ids"].shape[0] for b in fit) == 8


def test_masks_change_is_the_cost_weighted_share_of_units_that_moved():
    cost = flops_cost(get_adapter(tiny_model("bert")), 10)
    a = Masks(torch.ones(2, 4), torch.ones(2, 48))
    b = a.clone()
    assert masks_change(a, b, cost) == 0.0
    b.neuron[0, 0] = 0.0
    b.neuron[0, 1] = 0.0
    a.neuron[0, 2] = 0.0
    a.neuron[0, 3] = 0.0  # two neurons swapped for two others: 2 of the kept units moved
    kept = 8 * cost.head_macs + 94 * cost.neuron_macs
    assert masks_change(a, b, cost) == 2 * cost.neuron_macs / kept


def test_adaptive_fisher_stops_when_the_masks_settle_and_never_past_the_ceiling():
    model = tiny_model("bert")
    adapter = get_adapter(model)
    batches = tiny_batches(12, batch=8)  # 96 samples
    cost = flops_cost(adapter, 10)
    opts = PruneOptions()
    loose, info = adaptive_fisher(model, adapter, batches, cost, [0.5], opts, chunk=16,
                                  tolerance=1.0, min_samples=32, progress=False)
    assert info.samples == 32 and "lose" in info.reason
    strict, info = adaptive_fisher(model, adapter, batches, cost, [0.4, 0.6], opts, chunk=16,
                                   tolerance=0.0, min_samples=32, progress=False)
    assert info.samples == 96 and info.reason == "reached the sample ceiling"
    assert len(info.regret) == len(info.churn) == 5  # checks at 32, 48, ..., 96
    full = compute_fisher(model, adapter, batches, progress=False)
    assert torch.equal(strict.neuron_grads, full.neuron_grads)
    assert torch.equal(loose.neuron_grads, full.neuron_grads[:4])  # the first 32 samples


def test_adaptive_fisher_end_to_end_records_how_many_samples_and_why(tiny_checkpoints,
                                                                     tmp_path):
    fast = [o for o in FAST if not o.startswith("prune.num_samples")]
    record = run([f"model.path={tiny_checkpoints['cls2']}", "prune.num_samples=auto",
                  "prune.adaptive_chunk=64", "save_model=false", *fast], tmp_path)
    adaptive = record["fisher_cache"]["adaptive"]
    assert 512 <= adaptive["samples"] <= 2048 and adaptive["reason"]
    assert record["num_samples"] == adaptive["samples"] == record["fisher_cache"]["samples"]


def test_regret_is_the_importance_the_previous_masks_lose_under_the_current_estimate():
    from prune import Fisher
    from prune.pipeline import regret, retained

    heads = torch.tensor([[[3.0, 1.0]]])  # one row, one layer, two heads: importance 9, 1
    neurons = torch.tensor([[[2.0, 0.0, 1.0]]])  # importance 4, 0, 1
    fisher = Fisher(heads, neurons, 1)
    best = Masks(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    worse = Masks(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    assert retained(best, fisher) == 13 / 15 and retained(worse, fisher) == 5 / 15
    assert regret(best, best, fisher) == 0.0
    assert regret(worse, best, fisher) == pytest.approx(1 - 5 / 13)


def test_step_constraints_are_geometric_and_end_exactly_at_the_target():
    from prune.pipeline import step_constraints

    assert step_constraints(0.3, 1) == [0.3]
    got = step_constraints(0.2, 3)
    assert got[-1] == 0.2 and got == sorted(got, reverse=True)
    assert got[0] == pytest.approx(0.2 ** (1 / 3)) and got[1] == pytest.approx(0.2 ** (2 / 3))


@pytest.mark.parametrize("mode", [None, "mask", "weights"])
def test_iterative_pruning_keeps_within_the_first_steps_units_and_the_budget(mode):
    """With the Fisher passed in, step 1 of ``steps=2`` is the one-shot answer at
    ``sqrt(c)``; step 2 re-measures the importance on that pruned (tuned) model, keeps a subset
    of its units and holds the budget; its importance differs from the unpruned model's."""
    from prune import TuneOptions

    model = tiny_model("bert", layers=3)
    adapter = get_adapter(model)
    batches = tiny_batches(4, batch=8)
    cost = flops_cost(adapter, 10)
    fisher = compute_fisher(model, adapter, batches, progress=False)
    tune = TuneOptions(mode=mode) if mode else None
    one = PruneOptions(tune=tune, granularity=1)
    first = prune_masks(model, adapter, batches, cost, 0.3 ** 0.5, one, fisher=fisher,
                        progress=False)
    two = prune_masks(model, adapter, batches, cost, 0.3, PruneOptions(
        tune=tune, granularity=1, steps=2), fisher=fisher, progress=False)
    kept, before = two.masks.kept(), first.masks.kept()
    assert bool((kept.head <= before.head).all() and (kept.neuron <= before.neuron).all())
    assert float(kept.head.sum() + kept.neuron.sum()) < float(before.head.sum()
                                                              + before.neuron.sum())
    assert cost.ratio(kept.heads_per_layer(), kept.neurons_per_layer()) <= 0.3 + 1e-9
    assert not torch.equal(two.fisher.neuron_grads, fisher.neuron_grads)
    assert first.timings["fisher"] == 0.0 < two.timings["fisher"]  # the second step's pass
    # units the first step pruned have no gradient on the model it made
    assert float(two.fisher.neuron_importance[before.neuron == 0].abs().sum()) == 0.0
    with pytest.raises(PruneError, match="steps=0: use a positive number"):
        PruneOptions(steps=0)

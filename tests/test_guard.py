"""The output-level check of tuning (prune.guard): the error it measures, and the pipeline's
fall back to mask tuning where bias/weights tuning moved the output away from the teacher's."""

import logging

import pytest
import torch
from conftest import tiny_batches, tiny_model

from prune import (
    Masks,
    PruneError,
    PruneOptions,
    TunedWeights,
    TuneOptions,
    compute_fisher,
    flops_cost,
    get_adapter,
    prune_masks,
)
from prune.guard import model_outputs, output_error, relative_error
from prune.pipeline import split_samples


def test_relative_error_is_zero_on_the_reference_and_one_at_its_mean():
    ref = [torch.tensor([[1.0, -2.0], [3.0, 0.5]]), torch.tensor([[0.0, 1.0]])]
    assert relative_error(ref, ref) == 0.0
    mean = torch.cat(ref).mean(dim=0)
    assert relative_error([mean.expand(2, 2), mean[None]], ref) == pytest.approx(1.0)
    assert relative_error([2 * r for r in ref], ref) > 0.0
    with pytest.raises(ValueError, match="shape"):
        relative_error([torch.zeros(4, 2)], ref)


@pytest.mark.parametrize("qa", [False, True])
def test_output_error_of_the_unpruned_masks_is_zero_and_grows_with_pruning(qa):
    model = tiny_model("bert", qa=qa)
    adapter = get_adapter(model)
    batches = tiny_batches(2, qa=qa)
    reference = model_outputs(model, batches)
    rows = sum(int(b["attention_mask"].sum()) for b in batches) if qa else 12
    assert torch.cat(reference).shape == (rows, 2)  # QA: start and end of each real token
    ones = Masks(torch.ones(2, 4), torch.ones(2, 48))
    assert output_error(model, adapter, batches, reference, ones) == pytest.approx(0.0, abs=1e-9)
    half = ones.clone()
    half.neuron[:, 24:] = 0.0
    half.head[:, 2:] = 0.0
    assert output_error(model, adapter, batches, reference, half) > 1e-3
    # the masks and any tuned weights are only in place inside the call
    assert torch.allclose(torch.cat(model_outputs(model, batches)), torch.cat(reference))


def _setup():
    model = tiny_model("bert", layers=3)
    adapter = get_adapter(model)
    batches = tiny_batches(4, batch=8)  # 32 samples: 24 tuned, the last 8 held out
    cost = flops_cost(adapter, 10)
    fisher = compute_fisher(model, adapter, batches, progress=False)
    return model, adapter, batches, cost, fisher


def _options(mode: str, **kw) -> PruneOptions:
    return PruneOptions(tune=TuneOptions(mode=mode), granularity=1, **kw)


@pytest.mark.parametrize("mode", ["bias", "weights"])
def test_the_check_records_the_output_error_before_and_after_tuning(mode):
    model, adapter, batches, cost, fisher = _setup()
    result = prune_masks(model, adapter, batches, cost, 0.5, _options(mode), fisher=fisher,
                         progress=False)
    out = result.tune_stats.output
    assert set(out) >= {"before", mode, "chosen"} and out["before"] > 0
    kept = out["chosen"]
    assert kept in (mode, "mask")
    if kept == mode:  # kept only when it did not raise the error, or mask tuning was worse
        assert out[mode] <= out["before"] or out["mask"] >= out[mode]
    assert result.tune_stats.as_dict()["output"] == out
    off = prune_masks(model, adapter, batches, cost, 0.5, _options(mode, tune_check=False),
                      fisher=fisher, progress=False)
    assert off.tune_stats.output == {} and "output" not in off.tune_stats.as_dict()
    plain = prune_masks(model, adapter, batches, cost, 0.5, _options("mask"), fisher=fisher,
                        progress=False)
    assert plain.tune_stats.output == {}  # mask mode has no held-out samples to check on


def test_tuning_that_moves_the_output_away_falls_back_to_mask_tuning(monkeypatch, caplog):
    """A bias solution that sends every layer's output off (as bias compensation did on
    MPNet-base RTE) is replaced by the paper's mask tuning, with a warning; with the check off
    it is kept."""
    import prune.pipeline as pipeline

    real = pipeline.tune_masks

    def broken(model, adapter, masks, batches, teacher, options, holdout, progress):
        result = real(model, adapter, masks, batches, teacher, options, holdout, progress)
        if options.mode == "bias":  # every attention output shifted far off (not by a
            for l in range(adapter.num_layers):  # constant: LayerNorm would remove it)
                proj = adapter.module(model, l, "attn_out")
                shift = torch.linspace(-50.0, 50.0, proj.bias.numel())
                result.weights.bias[(l, "attn")] = proj.bias.detach() + shift
        return result

    monkeypatch.setattr(pipeline, "tune_masks", broken)
    model, adapter, batches, cost, fisher = _setup()
    mask = prune_masks(model, adapter, batches, cost, 0.9, _options("mask"), fisher=fisher,
                       progress=False)
    with caplog.at_level(logging.WARNING, logger="prune.pipeline"):
        checked = prune_masks(model, adapter, batches, cost, 0.9, _options("bias"),
                              fisher=fisher, progress=False)
    out = checked.tune_stats.output
    assert out["chosen"] == "mask" and out["bias"] > out["before"] and out["mask"] < out["bias"]
    assert "tune=bias raised the output error" in caplog.text
    # the fallback is mask tuning of the same searched masks on the same (non-held-out) samples
    tune_set, _ = split_samples(batches, 512, 128)
    again = real(model, adapter, checked.rearranged, tune_set, None,
                 TuneOptions(mode="mask"), None, False)
    assert torch.equal(checked.masks.head, again.masks.head)
    assert torch.equal(checked.masks.neuron, again.masks.neuron)
    assert not torch.equal(checked.masks.neuron, mask.masks.neuron)  # fewer samples than alone
    assert not checked.weights and isinstance(checked.weights, TunedWeights)
    kept = prune_masks(model, adapter, batches, cost, 0.9, _options("bias", tune_check=False),
                       fisher=fisher, progress=False)
    assert kept.weights.bias and kept.tune_stats.output == {}


def test_tune_check_must_be_true_or_false():
    with pytest.raises(PruneError, match="tune_check='yes': use true or false"):
        PruneOptions(tune_check="yes")

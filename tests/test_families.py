"""Architecture families: the layout table resolves on the installed transformers, MPNet's
per-head relative position bias follows the heads a layer keeps, the Fisher reaches every unit,
and unsupported architectures are refused with one line."""

import copy
import json
import math

import pytest
import torch
from conftest import FAMILIES, outputs, tiny_batches, tiny_model
from torch import nn

from prune import (
    Masks,
    PruneError,
    apply_masks,
    compute_fisher,
    get_adapter,
    load_pruned,
    prune_model,
    save_pruned,
)
from prune.hf_remote import modeling_fastprune as remote


def test_layout_paths_resolve_to_the_expected_modules(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    d, n = adapter.hidden_size, adapter.intermediate_size
    hd = adapter.num_heads * adapter.head_size
    assert len(adapter.layers(model)) == adapter.num_layers == 2
    assert (adapter.num_heads, d, n) == (4, 32, 48)
    shapes = {"query": (hd, d), "key": (hd, d), "value": (hd, d), "attn_out": (d, hd),
              "ffn_in": (n, d), "ffn_out": (d, n)}
    for l in range(adapter.num_layers):
        for part, shape in shapes.items():
            module = adapter.module(model, l, part)
            assert isinstance(module, nn.Linear) and tuple(module.weight.shape) == shape, part
        for part in ("attn_norm", "ffn_norm"):
            assert isinstance(adapter.module(model, l, part), nn.LayerNorm)
        attention = adapter.module(model, l, "attention")
        assert adapter.module(model, l, "query") in attention.modules()
        assert callable(adapter.module(model, l, "ffn_act"))


def test_roberta_xlmr_and_electra_share_berts_layout():
    for family in ("roberta", "xlm-roberta", "electra"):
        assert remote.LAYOUTS[family] == remote.LAYOUTS["bert"]
    assert set(remote.LAYOUTS) == set(FAMILIES) == set(remote.MODEL_CLASSES)


def test_saved_model_classes_are_module_attributes_with_stable_names():
    for family, bases in remote.MODEL_CLASSES.items():
        for auto, base in zip(remote.AUTO_CLASSES, bases, strict=True):
            cls = remote.CLASSES[(family, auto)]
            assert cls.__name__ == f"FastPrune{base.__name__}" and issubclass(cls, base)
            assert getattr(remote, cls.__name__) is cls
            assert cls.__module__ == remote.__name__
    for name in ("FastPruneBertForSequenceClassification", "FastPruneBertForQuestionAnswering",
                 "FastPruneDistilBertForSequenceClassification",
                 "FastPruneDistilBertForQuestionAnswering", "FastPruneMPNetForQuestionAnswering",
                 "FastPruneRobertaForSequenceClassification",
                 "FastPruneXLMRobertaForSequenceClassification",
                 "FastPruneElectraForQuestionAnswering"):
        assert isinstance(getattr(remote, name), type)


def head_masks(adapter, rows) -> Masks:
    masks = Masks.ones(adapter)
    for l, row in enumerate(rows):
        masks.head[l] = torch.tensor(row)
    masks.neuron[-1, ::3] = 0.0
    return masks


def test_mpnet_layers_see_only_their_kept_heads_position_bias(tmp_path):
    model = tiny_model("mpnet", layers=3)
    adapter = get_adapter(model)
    masks = head_masks(adapter, [[0.0, 1.2, 0.0, 0.8], [0.0, 0.0, 1.5, 0.0], [0.0] * 4])
    batch = tiny_batches(1)[0]
    with apply_masks(model, adapter, masks):
        expected = outputs(model, batch)
    pruned = prune_model(copy.deepcopy(model), masks)
    attention = [adapter.module(pruned, l, "attention") for l in range(3)]
    assert attention[0].fastprune_head_index == [1, 3]
    assert attention[1].fastprune_head_index == [2]
    assert isinstance(attention[2], remote.NoHeadAttention)
    assert torch.allclose(outputs(pruned, batch), expected, atol=1e-4)
    # the selection matters: the first heads' bias rows give another output
    attention[0].fastprune_head_index = [0, 1]
    assert (outputs(pruned, batch) - expected).abs().max() > 1e-3
    attention[0].fastprune_head_index = [1, 3]

    save_pruned(pruned, tmp_path / "ckpt")
    reloaded = load_pruned(tmp_path / "ckpt")
    assert reloaded.config.fastprune_head_index == [[1, 3], [2], []]
    assert adapter.module(reloaded, 0, "attention").fastprune_head_index == [1, 3]
    assert torch.allclose(outputs(reloaded, batch), expected, atol=1e-4)
    # deep copies (the latency table copies layers) keep the selection
    assert torch.allclose(outputs(copy.deepcopy(reloaded), batch), expected, atol=1e-4)


def test_mpnet_checkpoint_without_head_index_is_refused(tmp_path):
    model = tiny_model("mpnet")
    masks = head_masks(get_adapter(model), [[1.0, 0.0, 1.0, 1.0], [1.0] * 4])
    save_pruned(prune_model(model, masks), tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    del config["fastprune_head_index"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="fastprune_head_index"):
        load_pruned(tmp_path / "ckpt")


def test_fisher_reaches_every_head_and_neuron(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    fisher = compute_fisher(model, adapter, tiny_batches(2), progress=False)
    assert fisher.head_importance.shape == (adapter.num_layers, adapter.num_heads)
    assert (fisher.head_importance > 0).all()
    assert (fisher.neuron_importance > 0).all()


def test_unsupported_architecture_is_refused_in_one_line():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=1, n_head=4,
                                                    vocab_size=120, n_positions=32))
    messages = []
    for model in (gpt2, nn.Linear(2, 2)):
        with pytest.raises(PruneError) as info:
            get_adapter(model)
        messages.append(str(info.value))
    for message in messages:
        assert "\n" not in message and "not supported" in message
        assert all(family in message for family in FAMILIES)
    assert "'gpt2'" in messages[0] and "'Linear'" in messages[1]


def test_reloaded_model_can_switch_attention_implementation(tmp_path):
    """A pruned checkpoint switches between SDPA and eager like its stock model does (the layer
    without heads included)."""
    model = tiny_model("roberta", layers=3)
    masks = head_masks(get_adapter(model), [[0.0] * 4, [0.0, 1.0, 0.0, 1.0], [1.0] * 4])
    batch = tiny_batches(1)[0]
    save_pruned(prune_model(model, masks), tmp_path / "ckpt")
    reloaded = load_pruned(tmp_path / "ckpt")
    expected = outputs(reloaded, batch)
    assert reloaded.config._attn_implementation == "sdpa"
    reloaded.set_attn_implementation("eager")
    assert reloaded.config._attn_implementation == "eager"
    assert torch.allclose(outputs(reloaded, batch), expected, atol=1e-5)


def test_tuned_masks_and_weights_prune_to_the_same_model(family):
    """Tuning (``mode="weights"``, which also rewrites the output projections) keeps the kept
    sets, and the physically pruned model computes what the tuned masked model computes."""
    from prune.tune import TuneOptions, applied_weights, tune_masks

    model = tiny_model(family, layers=3)
    adapter = get_adapter(model)
    masks = head_masks(adapter, [[0.0] * 4, [0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]])
    masks.neuron[1] = 0.0
    masks.neuron[1, 7] = 1.0
    batches = tiny_batches(3)
    result = tune_masks(model, adapter, masks, batches, options=TuneOptions(mode="weights"),
                        progress=False)
    assert torch.equal(result.masks.kept().head, masks.head)
    assert torch.equal(result.masks.kept().neuron, masks.neuron)
    assert result.weights, "weights mode must rewrite some projections"
    with apply_masks(model, adapter, result.masks), \
            applied_weights(model, adapter, result.masks, result.weights):
        expected = outputs(model, batches[0])
    pruned = prune_model(copy.deepcopy(model), result.masks, adapter, result.weights)
    assert torch.allclose(outputs(pruned, batches[0]), expected, atol=1e-4)


@pytest.mark.parametrize("obs,floor,inputs", [(False, 0.0, False), (True, 0.0, False),
                                              ("greedy", 0.0, False), (False, 0.2, False),
                                              (False, 0.0, True)])
def test_iterative_pruning_masked_equals_pruned_equals_reloaded(family, obs, floor, inputs,
                                                                tmp_path):
    """``steps=2`` with weight reconstruction (and with the reconstruction-aware importance,
    ``obs``, in its greedy order too, a floor per layer, ``layer_floor``, or the input-side maps
    folded into query, key, value and FFN input, ``tune_inputs``): the masked model with its
    tuned weights, the physically pruned one and its reloaded copy compute the same outputs;
    with the floor every layer keeps at least 20% of its heads and neurons."""
    from prune import PruneOptions, TuneOptions, flops_cost, prune_masks
    from prune.tune import applied_weights

    model = tiny_model(family, layers=3)
    adapter = get_adapter(model)
    batches = tiny_batches(4, batch=8)
    # the output check off: on a tiny random model it may fall back to mask tuning, and this
    # test is about the reconstructed weights (tests/test_guard.py tests the check)
    opts = PruneOptions(tune=TuneOptions(mode="weights", inputs=inputs), steps=2,
                        granularity=1, obs=bool(obs), obs_greedy=obs == "greedy",
                        layer_floor=floor, tune_check=False)
    result = prune_masks(model, adapter, batches, flops_cost(adapter, 10), 0.4, opts,
                         progress=False)
    if floor:
        assert min(result.masks.heads_per_layer()) >= math.ceil(floor * result.masks.head.shape[1])
        assert min(result.masks.neurons_per_layer()) >= \
            math.ceil(floor * result.masks.neuron.shape[1])
    assert result.weights, "weights mode must rewrite some projections"
    assert bool(result.weights.inputs) == inputs
    with apply_masks(model, adapter, result.masks), \
            applied_weights(model, adapter, result.masks, result.weights):
        expected = outputs(model, batches[0])
    pruned = prune_model(copy.deepcopy(model), result.masks, adapter, result.weights)
    assert torch.allclose(outputs(pruned, batches[0]), expected, atol=1e-4)
    save_pruned(pruned, tmp_path / "pruned")
    reloaded = load_pruned(tmp_path / "pruned")
    assert torch.allclose(outputs(reloaded, batches[0]), expected, atol=1e-4)


@pytest.mark.parametrize("importance", ["fisher", "fisher_unlabeled"])
def test_fisher_of_the_physically_pruned_model_equals_the_masked_one(family, importance):
    """A later step of iterative pruning measures the Fisher on a physically pruned copy (the
    cost of the smaller model): each kept unit's gradients equal those of the masked model
    with the same tuned weights (a layer without heads and one without neurons included), and
    the pruned units' are zero."""
    from prune import PruneOptions, TuneOptions
    from prune.pipeline import PruneResult, _pruned_fisher
    from prune.tune import applied_weights, tune_masks

    model = tiny_model(family, layers=3, num_labels=3)
    adapter = get_adapter(model)
    masks = head_masks(adapter, [[0.0] * 4, [0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]])
    masks.neuron[1] = 0.0
    batches = tiny_batches(3, num_labels=3)
    tuned = tune_masks(model, adapter, masks, batches, options=TuneOptions(mode="weights"),
                       progress=False)
    with apply_masks(model, adapter, tuned.masks), \
            applied_weights(model, adapter, tuned.masks, tuned.weights):
        masked = compute_fisher(model, adapter, batches, progress=False, importance=importance,
                                seed=3)
    result = PruneResult(tuned.masks, masks, None, masked, weights=tuned.weights)
    assert tuned.weights, "weights mode must rewrite some projections"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = _pruned_fisher(model, adapter, result, batches,
                            PruneOptions(importance=importance), False, 3)
    kept = tuned.masks.kept()
    assert pruned.head_grads.shape == masked.head_grads.shape
    assert torch.allclose(pruned.head_grads, masked.head_grads * kept.head, atol=1e-5)
    assert torch.allclose(pruned.neuron_grads, masked.neuron_grads * kept.neuron, atol=1e-5)
    assert pruned.head_importance[0].abs().sum() == 0 and pruned.neuron_importance[1].sum() == 0
    assert masked.head_importance[kept.head != 0].min() > 0  # the comparison is not vacuous
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

import copy

import pytest
import torch
from conftest import tiny_model
from torch.utils.flop_counter import FlopCounterMode

from prune import Masks, flops_cost, get_adapter, prune_model


def counted_encoder_flops(model, seq_len: int) -> int:
    """FLOPs of the encoder layers alone, counted by torch (eager attention, no padding).

    Each layer gets the extra arguments the encoder really passes it (captured from one forward
    pass outside the count): for MPNet that is the relative position bias (1, H, T, T), computed
    once by the encoder and, like the embeddings, outside the per-layer budget.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    captured = {}

    def grab(module, args, kwargs):
        captured.update(args=args[1:], kwargs=kwargs)

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(5, 100, (1, seq_len)))
    finally:
        handle.remove()
    hidden = torch.randn(1, seq_len, adapter.hidden_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for layer in layers:
            out = layer(hidden, *captured["args"], **captured["kwargs"])
            hidden = out[0] if isinstance(out, tuple) else out
    return counter.get_total_flops()


def random_masks(adapter, seed: int) -> Masks:
    g = torch.Generator().manual_seed(seed)
    masks = Masks(
        head=(torch.rand(adapter.num_layers, adapter.num_heads, generator=g) > 0.4).float(),
        neuron=(torch.rand(adapter.num_layers, adapter.intermediate_size, generator=g) > 0.5)
        .float(),
    )
    masks.head[0] = 0.0  # a layer with no head
    masks.neuron[1] = 0.0
    masks.neuron[1, 7] = 1.0  # a layer with one neuron
    return masks


@pytest.mark.parametrize("seq_len", [7, 33])
def test_cost_model_matches_flop_counter_on_pruned_model(family, seq_len):
    model = tiny_model(family, attn="eager", layers=3, heads=4, hidden=32, ffn=48)
    adapter = get_adapter(model)
    cost = flops_cost(adapter, seq_len)
    full = counted_encoder_flops(model, seq_len)
    assert full == pytest.approx(2 * cost.full_macs, rel=0.01)
    for seed in range(3):
        masks = random_masks(adapter, seed)
        pruned = prune_model(copy.deepcopy(model), masks)
        counted = counted_encoder_flops(pruned, seq_len)
        predicted = cost.flops(masks.heads_per_layer(), masks.neurons_per_layer())
        assert counted == pytest.approx(predicted, rel=0.01)
        assert counted < full
        assert adapter.heads_per_layer(pruned) == masks.heads_per_layer()
        assert adapter.neurons_per_layer(pruned) == masks.neurons_per_layer()


def test_unit_costs_follow_the_paper_formulas():
    model = tiny_model("bert", hidden=32, heads=4)
    cost = flops_cost(get_adapter(model), 10)
    d, dh, s = 32, 8, 10
    assert cost.head_macs == 4 * s * d * dh + 2 * s * s * dh
    assert cost.neuron_macs == 2 * s * d

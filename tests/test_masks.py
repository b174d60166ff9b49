import torch
from conftest import outputs, tiny_batches, tiny_model

from prune import Masks, apply_masks, get_adapter


def test_masks_change_output_and_get_gradients_under_eager_and_sdpa(family):
    for attn in ("eager", "sdpa"):
        model = tiny_model(family, attn=attn)
        adapter = get_adapter(model)
        batch = tiny_batches(1)[0]
        base = outputs(model, batch)
        masks = Masks.ones(adapter)
        with apply_masks(model, adapter, masks):
            assert torch.allclose(outputs(model, batch), base, atol=1e-6)
        masks.head[0, 1] = 0.0
        with apply_masks(model, adapter, masks):
            head_out = outputs(model, batch)
        assert (head_out - base).abs().max() > 1e-3, "head mask had no effect"
        masks = Masks.ones(adapter)
        masks.neuron[1, 3] = 0.0
        with apply_masks(model, adapter, masks):
            assert (outputs(model, batch) - base).abs().max() > 1e-4, "neuron mask had no effect"
        # hooks are gone after the block
        assert torch.allclose(outputs(model, batch), base, atol=1e-6)
        masks = Masks.ones(adapter)
        masks.head.requires_grad_(True)
        masks.neuron.requires_grad_(True)
        with apply_masks(model, adapter, masks):
            loss = model(**batch).loss
        g_head, g_neuron = torch.autograd.grad(loss, [masks.head, masks.neuron])
        assert g_head is not None and g_head.abs().sum() > 0
        assert g_neuron is not None and g_neuron.abs().sum() > 0


def scaled_value_and_down_weights(model, adapter, head_scale, neuron_scale):
    """A copy of the model with head ``(l, k)``'s value rows (weight and bias) multiplied by
    ``head_scale[l, k]`` and neuron ``(l, n)``'s down-projection column by
    ``neuron_scale[l, n]``: a head's context is its attention-weighted values, so this scales
    exactly that head's context, without any hook."""
    import copy

    other = copy.deepcopy(model)
    dh = adapter.head_size
    with torch.no_grad():
        for l in range(adapter.num_layers):
            value = adapter.module(other, l, "value")
            rows = head_scale[l].repeat_interleave(dh)
            value.weight.mul_(rows[:, None])
            value.bias.mul_(rows)
            adapter.module(other, l, "ffn_out").weight.mul_(neuron_scale[l][None, :])
    return other


def test_masks_equal_scaling_the_values_and_the_down_projection(family):
    """Head mask m == the head's values scaled by m (0 removes the head's context); neuron mask
    m == its down-projection column scaled by m: the hooks agree with weights edited by hand."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    batch = tiny_batches(1)[0]
    g = torch.Generator().manual_seed(0)
    masks = Masks((torch.rand(adapter.num_layers, adapter.num_heads, generator=g) * 2),
                  (torch.rand(adapter.num_layers, adapter.intermediate_size, generator=g) * 2))
    masks.head[1, 2] = 0.0
    masks.neuron[0, :5] = 0.0
    expected = outputs(scaled_value_and_down_weights(model, adapter, masks.head, masks.neuron),
                       batch)
    assert (expected - outputs(model, batch)).abs().max() > 1e-3, "the scaling must matter"
    with apply_masks(model, adapter, masks):
        assert torch.allclose(outputs(model, batch), expected, atol=1e-5)

import torch
from conftest import inputs_of, outputs, tiny_batches, tiny_model

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


def test_head_mask_equals_removing_that_heads_context(family):
    """Masking head h = zeroing its slice of the context before the output projection."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    batch = tiny_batches(1)[0]
    masks = Masks.ones(adapter)
    masks.head[1, 2] = 0.0
    dh = adapter.head_size

    def zero_slice(module, args):
        x = args[0].clone()
        x[..., 2 * dh:3 * dh] = 0
        return (x,)

    handle = adapter.module(model, 1, "attn_out").register_forward_pre_hook(zero_slice)
    try:
        expected = outputs(model, batch)
    finally:
        handle.remove()
    with apply_masks(model, adapter, masks):
        assert torch.allclose(outputs(model, batch), expected, atol=1e-6)
    assert inputs_of(batch)

import pytest
import torch
from conftest import outputs, tiny_batches, tiny_model

from prune import Masks, apply_masks, compute_fisher, flops_cost, get_adapter, search_masks
from prune.tune import tune_masks


def searched(model, batches, constraint=0.5):
    adapter = get_adapter(model)
    fisher = compute_fisher(model, adapter, batches, progress=False)
    cost = flops_cost(adapter, 10)
    return adapter, search_masks(fisher.head_importance, fisher.neuron_importance, cost,
                                 constraint)


def layer_errors(model, adapter, masks, batches):
    """Squared error of each layer's pre-LN FFN sum against the unpruned model's."""
    def sums(m):
        store = []
        hooks = [adapter.module(model, l, "ffn_norm").register_forward_pre_hook(
            lambda mod, args: store.append(args[0])) for l in range(adapter.num_layers)]
        try:
            with torch.no_grad(), apply_masks(model, adapter, m):
                for b in batches:
                    outputs(model, b)
        finally:
            for h in hooks:
                h.remove()
        return store

    ref, got = sums(None), sums(masks)
    return sum(float((a - b).pow(2).sum()) for a, b in zip(ref, got, strict=True))


def test_tuning_lowers_reconstruction_error(family):
    model = tiny_model(family, layers=3)
    batches = tiny_batches(4)
    adapter, masks = searched(model, batches, 0.5)
    tuned, stats = tune_masks(model, adapter, masks, batches, progress=False)
    # the solver's own accounting: every fitted layer got no worse, and most got better
    for before, after in ((stats.attn_before, stats.attn_after),
                          (stats.ffn_before, stats.ffn_after)):
        assert all(a <= b + 1e-9 for a, b in zip(after, before, strict=True))
    assert sum(stats.ffn_after) < sum(stats.ffn_before)
    # an independent measurement on the same samples: the model is closer to the unpruned one
    assert layer_errors(model, adapter, tuned, batches) < layer_errors(model, adapter, masks,
                                                                        batches)
    assert torch.equal(tuned.kept().head, masks.head)  # tuning never changes which units stay
    assert torch.equal(tuned.kept().neuron, masks.neuron)
    assert not stats.fallbacks


def test_unpruned_masks_are_a_fixed_point(family):
    """With every unit kept the student is the teacher: all scales stay at 1."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    tuned, _ = tune_masks(model, adapter, Masks.ones(adapter), tiny_batches(2), progress=False)
    assert torch.allclose(tuned.head, torch.ones_like(tuned.head), atol=1e-4)
    assert torch.allclose(tuned.neuron, torch.ones_like(tuned.neuron), atol=1e-4)


def test_zero_head_layer_and_one_neuron_layer_are_handled(family):
    model = tiny_model(family, layers=3)
    adapter = get_adapter(model)
    masks = Masks.ones(adapter)
    masks.head[1] = 0.0
    masks.neuron[2] = 0.0
    masks.neuron[2, 4] = 1.0
    tuned, stats = tune_masks(model, adapter, masks, tiny_batches(3), progress=False)
    assert tuned.heads_per_layer() == [4, 0, 4]
    assert tuned.neurons_per_layer() == [48, 48, 1]
    assert torch.isfinite(tuned.neuron).all() and torch.isfinite(tuned.head).all()
    assert len(stats.attn_after) == 2 and len(stats.ffn_after) == 3


def test_out_of_range_scale_falls_back_to_previous_values():
    model = tiny_model("bert", layers=2)
    batches = tiny_batches(3)
    adapter, masks = searched(model, batches, 0.4)
    tuned, stats = tune_masks(model, adapter, masks, batches, max_scale=1e-3, progress=False)
    assert stats.fallbacks, "every solve exceeds a 1e-3 scale bound and must fall back"
    assert torch.equal(tuned.head, masks.head) and torch.equal(tuned.neuron, masks.neuron)


@pytest.mark.parametrize("teacher_constraint", [0.8])
def test_teacher_assistant_target_runs(teacher_constraint):
    model = tiny_model("bert", layers=2)
    batches = tiny_batches(3)
    adapter, masks = searched(model, batches, 0.5)
    _, ta = searched(model, batches, teacher_constraint)
    tuned, stats = tune_masks(model, adapter, masks, batches, teacher=ta, progress=False)
    assert torch.equal(tuned.kept().neuron, masks.neuron)
    assert all(a <= b + 1e-9 for a, b in zip(stats.ffn_after, stats.ffn_before, strict=True))


def test_cached_student_recomputation_matches_the_masked_layer(family):
    """Tuning rebuilds each student layer from its cached context; it must equal the real
    masked forward of that layer."""
    from prune.tune import _attention_pass, _ffn_block, _ffn_pass, _layer_inputs, _run_layer

    model = tiny_model(family, layers=2)
    adapter = get_adapter(model)
    batches = tiny_batches(2)
    masks = Masks.ones(adapter)
    masks.head[0, 1] = 0.0
    masks.head[0, 2] = 1.7
    masks.neuron[0, ::3] = 0.0
    masks.neuron[0, 1] = 0.4
    inputs = _layer_inputs(model, adapter, batches)
    tokens = [b["attention_mask"].bool() for b in batches]
    D = adapter.hidden_size
    fake_targets = [torch.zeros(int(t.sum()), D) for t in tokens]
    with torch.no_grad():
        contexts, _ = _attention_pass(model, adapter, 0, masks, inputs, tokens, fake_targets)
        for keep in (True, False):
            ffn_in, acts, _ = _ffn_pass(model, adapter, 0, masks, inputs, contexts, tokens,
                                        fake_targets, keep_activations=keep)
            assert bool(acts) == keep
            layer = adapter.layers(model)[0]
            for i, ((h, a, k), y) in enumerate(zip(inputs, ffn_in, strict=True)):
                with apply_masks(model, adapter, masks, layers=[0]):
                    expected = _run_layer(layer, h, (a, k))
                got = _ffn_block(model, adapter, 0, y, masks.neuron[0], acts[i] if keep else None)
                assert torch.allclose(got, expected, atol=1e-5)



def test_normal_equations_match_explicit_unit_contributions(family):
    """G and c from the fast Gram formulas equal sums over tokens of each unit's explicit
    contribution to the layer output (out-projection of one head's slice; down-projection of
    one neuron)."""
    from prune.tune import _attention_pass, _ffn_pass, _layer_inputs

    torch.manual_seed(0)
    model = tiny_model(family, layers=2)
    adapter = get_adapter(model)
    batches = tiny_batches(2)
    masks = Masks.ones(adapter)
    masks.head[0, 0] = 0.0
    masks.neuron[0, ::2] = 0.0
    inputs = _layer_inputs(model, adapter, batches)
    tokens = [b["attention_mask"].bool() for b in batches]
    D, dh = adapter.hidden_size, adapter.head_size
    targets = [torch.randn(int(t.sum()), D) for t in tokens]
    out_proj = adapter.module(model, 0, "attn_out")
    down = adapter.module(model, 0, "ffn_out")
    with torch.no_grad():
        contexts, attn = _attention_pass(model, adapter, 0, masks, inputs, tokens, targets)
        ffn_in, _, ffn = _ffn_pass(model, adapter, 0, masks, inputs, contexts, tokens, targets,
                                   keep_activations=False)
        heads = masks.head[0].nonzero().flatten()
        neurons = masks.neuron[0].nonzero().flatten()
        G_a = torch.zeros(len(heads), len(heads), dtype=torch.float64)
        c_a = torch.zeros(len(heads), dtype=torch.float64)
        G_f = torch.zeros(len(neurons), len(neurons), dtype=torch.float64)
        c_f = torch.zeros(len(neurons), dtype=torch.float64)
        store = {}
        hook = out_proj.register_forward_pre_hook(lambda m, a: store.update(u=a[0]))
        for b, (h, args, kwargs) in enumerate(inputs):
            adapter.layers(model)[0](h, *args, **kwargs)
            u, sel = store["u"], tokens[b]
            Y = []
            for k in heads:
                one = torch.zeros_like(u)
                one[..., k * dh:(k + 1) * dh] = u[..., k * dh:(k + 1) * dh]
                Y.append((out_proj(one) - out_proj.bias)[sel].double())
            Y = torch.stack(Y)
            r = targets[b].double() - out_proj.bias.double() - h[sel].double()
            G_a += torch.einsum("kte,jte->kj", Y, Y)
            c_a += torch.einsum("kte,te->k", Y, r)
            y = ffn_in[b][sel]
            act = adapter.module(model, 0, "ffn_act")(adapter.module(model, 0, "ffn_in")(y))
            Z = torch.stack([(act[:, [n]] * down.weight[:, n]).double() for n in neurons])
            r = targets[b].double() - down.bias.double() - y.double()
            G_f += torch.einsum("kte,jte->kj", Z, Z)
            c_f += torch.einsum("kte,te->k", Z, r)
        hook.remove()
    for got, want in ((attn.G, G_a), (attn.c, c_a), (ffn.G, G_f), (ffn.c, c_f)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))

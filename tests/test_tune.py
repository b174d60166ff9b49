import copy
import math
from dataclasses import fields

import pytest
import torch
from conftest import inputs_of, outputs, tiny_batches, tiny_model

from prune import (
    Masks,
    PruneError,
    PruneOptions,
    applied_weights,
    apply_masks,
    compute_fisher,
    flops_cost,
    get_adapter,
    prune_model,
    search_masks,
)
from prune.pipeline import teacher_masks
from prune.rearrange import rearrange_masks
from prune.tune import Moments, Projection, TuneOptions, mask_system, solve_masks, tune_masks


def searched(model, batches, constraint=0.5):
    adapter = get_adapter(model)
    fisher = compute_fisher(model, adapter, batches, progress=False)
    cost = flops_cost(adapter, 10)
    return adapter, search_masks(fisher.head_importance, fisher.neuron_importance, cost,
                                 constraint)


def layer_sums(model, adapter, masks, batches, weights=None):
    """Per layer: the layer's input and the pre-LN sums of attention and FFN, from real
    (hooked) forwards of the whole model."""
    store = {k: [] for k in ("h", "attn", "ffn")}
    hooks = []
    for l in range(adapter.num_layers):
        hooks.append(adapter.layers(model)[l].register_forward_pre_hook(
            lambda m, a, l=l: store["h"].append((l, a[0]))))
        hooks.append(adapter.module(model, l, "attn_norm").register_forward_pre_hook(
            lambda m, a, l=l: store["attn"].append((l, a[0]))))
        hooks.append(adapter.module(model, l, "ffn_norm").register_forward_pre_hook(
            lambda m, a, l=l: store["ffn"].append((l, a[0]))))
    try:
        with torch.no_grad(), apply_masks(model, adapter, masks), \
                applied_weights(model, adapter, masks if masks is not None else
                                Masks.ones(adapter), weights):
            for b in batches:
                outputs(model, b)
    finally:
        for h in hooks:
            h.remove()
    return store


def measured_errors(model, adapter, tuned, batches, weights=None):
    """Relative errors of each layer's attention and FFN sums against the unpruned model,
    measured on the real model (as the tuner defines them: ||z - z*||^2 / ||z* - b - x||^2)."""
    ref = layer_sums(model, adapter, None, batches)
    got = layer_sums(model, adapter, tuned, batches, weights)
    tokens = [b["attention_mask"].bool() for b in batches]
    out = {}
    for part, bias_of, residual in (("attn", "attn_out", "h"), ("ffn", "ffn_out", "attn")):
        for l in range(adapter.num_layers):
            num = den = 0.0
            zs = [z for i, z in got[part] if i == l]
            zr = [z for i, z in ref[part] if i == l]
            xs = [x for i, x in got[residual] if i == l]
            bias = adapter.module(model, l, bias_of).bias  # the original bias
            for z, t, x, sel in zip(zs, zr, xs, tokens, strict=True):
                if part == "ffn":  # the FFN's residual is the attention block's output
                    x = adapter.module(model, l, "attn_norm")(x)
                num += float((z - t)[sel].double().pow(2).sum())
                den += float((t - bias - x)[sel].double().pow(2).sum())
            out[(l, part)] = num / den
    return out


def test_tuning_lowers_reconstruction_error(family):
    model = tiny_model(family, layers=3)
    batches = tiny_batches(4)
    adapter, masks = searched(model, batches, 0.5)
    result = tune_masks(model, adapter, masks, batches, progress=False)
    stats = result.stats
    for before, after in ((stats.attn_before, stats.attn_after),
                          (stats.ffn_before, stats.ffn_after)):
        assert all(a <= b + 1e-9 for a, b in zip(after, before, strict=True))
    assert sum(stats.ffn_after) < sum(stats.ffn_before)
    assert torch.equal(result.masks.kept().head, masks.head)  # tuning never changes which stay
    assert torch.equal(result.masks.kept().neuron, masks.neuron)
    assert not stats.fallbacks


def test_the_tuners_errors_are_what_the_real_model_computes(family):
    """The tuner computes each student layer from cached inputs and moments; its recorded
    errors must equal those measured on the real masked model afterwards, for masks and for
    reconstructed weights."""
    model = tiny_model(family, layers=3)
    batches = tiny_batches(4)
    adapter, masks = searched(model, batches, 0.5)
    for mode in ("mask", "weights"):
        # every token fitted, as measured_errors measures (classifiers default to [CLS] last)
        options = TuneOptions(mode=mode, cls_only_last=False)
        result = tune_masks(model, adapter, masks, batches, options=options, progress=False)
        measured = measured_errors(model, adapter, result.masks, batches, result.weights)
        for fit in result.stats.fits:
            assert fit.after == pytest.approx(measured[(fit.layer, fit.part)], rel=1e-3,
                                              abs=1e-7), (mode, fit)


def test_unpruned_masks_are_a_fixed_point(family):
    """With every unit kept the student is the teacher: all scales stay at 1."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    tuned = tune_masks(model, adapter, Masks.ones(adapter), tiny_batches(2), progress=False)
    assert torch.allclose(tuned.masks.head, torch.ones_like(tuned.masks.head), atol=1e-4)
    assert torch.allclose(tuned.masks.neuron, torch.ones_like(tuned.masks.neuron), atol=1e-4)


def test_zero_head_layer_and_one_neuron_layer_are_handled(family):
    model = tiny_model(family, layers=3)
    adapter = get_adapter(model)
    masks = Masks.ones(adapter)
    masks.head[1] = 0.0
    masks.neuron[2] = 0.0
    masks.neuron[2, 4] = 1.0
    for mode in ("mask", "weights"):
        tuned = tune_masks(model, adapter, masks, tiny_batches(3),
                           options=TuneOptions(mode=mode), progress=False)
        assert tuned.masks.heads_per_layer() == [4, 0, 4]
        assert tuned.masks.neurons_per_layer() == [48, 48, 1]
        assert torch.isfinite(tuned.masks.neuron).all() and torch.isfinite(tuned.masks.head).all()
        assert len(tuned.stats.attn_after) == 2 and len(tuned.stats.ffn_after) == 3


def test_out_of_range_scale_falls_back_to_previous_values():
    model = tiny_model("bert", layers=2)
    batches = tiny_batches(3)
    adapter, masks = searched(model, batches, 0.4)
    tuned = tune_masks(model, adapter, masks, batches, options=TuneOptions(max_scale=1e-3),
                       progress=False)
    assert len(tuned.stats.fallbacks) == 4, "every solve exceeds the bound and falls back"
    assert torch.equal(tuned.masks.head, masks.head) and torch.equal(tuned.masks.neuron,
                                                                     masks.neuron)


def test_stop_on_failure_abandons_every_later_layer_like_the_official_code():
    model = tiny_model("bert", layers=3)
    batches = tiny_batches(3)
    adapter, masks = searched(model, batches, 0.5)
    tuned = tune_masks(model, adapter, masks, batches,
                       options=TuneOptions(max_scale=1e-3, on_failure="stop"), progress=False)
    assert len(tuned.stats.fits) == 1 and tuned.stats.fits[0].fallback
    assert torch.equal(tuned.masks.head, masks.head) and torch.equal(tuned.masks.neuron,
                                                                     masks.neuron)


def explicit_layer(model, adapter, masks, batch, l=0):
    """Each kept head's explicit output (out-projection of its context slice alone) on the
    real tokens of layer ``l``, and the target ``r`` it must produce for the unpruned layer."""
    out_proj = adapter.module(model, l, "attn_out")
    dh = adapter.head_size
    store = {}
    hook = out_proj.register_forward_pre_hook(lambda m, a: store.update(u=a[0]))
    hook2 = adapter.module(model, l, "attn_norm").register_forward_pre_hook(
        lambda m, a: store.update(z=a[0]))
    hook3 = adapter.layers(model)[l].register_forward_pre_hook(
        lambda m, a: store.update(h=a[0]))
    with torch.no_grad():
        outputs(model, batch)
    for h in (hook, hook2, hook3):
        h.remove()
    sel = batch["attention_mask"].bool()
    u = store["u"]
    heads = masks.head[l].nonzero().flatten()
    Y = []
    for k in heads:
        one = torch.zeros_like(u)
        one[..., k * dh:(k + 1) * dh] = u[..., k * dh:(k + 1) * dh]
        Y.append((out_proj(one) - out_proj.bias)[sel].double().flatten())
    r = (store["z"] - out_proj.bias - store["h"])[sel].double()
    return torch.stack(Y, dim=1), r, u[sel], heads


def test_undamped_mask_solve_equals_lstsq_on_the_explicit_outputs(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    batch = tiny_batches(1)[0]
    masks = Masks.ones(adapter)
    masks.head[0, 1] = 0.0
    Y, r, u, heads = explicit_layer(model, adapter, masks, batch)
    expected = torch.linalg.lstsq(Y, r.flatten()[:, None]).solution[:, 0]
    dh = adapter.head_size
    cols = (heads[:, None] * dh + torch.arange(dh)).flatten()
    m = Moments.zeros(cols.numel(), adapter.hidden_size)
    m.add(u[:, cols], r.float())
    W = adapter.module(model, 0, "attn_out").weight[:, cols]
    proj = Projection(W, torch.zeros(adapter.hidden_size), W, torch.ones(len(heads)), dh)
    got = solve_masks(m, proj, TuneOptions(damp=0.0), with_bias=False)
    assert torch.allclose(got.scales, expected, rtol=1e-4, atol=1e-5)
    # and the normal equations are those of the explicit outputs
    G, c, _ = mask_system(m, proj)
    assert torch.allclose(G, Y.t() @ Y, rtol=1e-4, atol=1e-6 * float(G.abs().max()))
    assert torch.allclose(c, Y.t() @ r.flatten(), rtol=1e-4, atol=1e-6 * float(c.abs().max()))


def test_ffn_target_includes_the_teachers_neuron_mask():
    """Tuned towards a teacher equal to the student's own masks, the student already is the
    teacher: with the teacher's masked FFN as target (ours) nothing moves; with the official
    target (the teacher's FFN before its neuron mask) the scales move to make up for the
    removed neurons."""
    model = tiny_model("bert", layers=2)
    adapter = get_adapter(model)
    batches = tiny_batches(3)
    masks = Masks.ones(adapter)
    masks.neuron[0, ::2] = 0.0
    masks.neuron[1, 1::3] = 0.0
    ours = tune_masks(model, adapter, masks, batches, teacher=masks, progress=False)
    assert torch.allclose(ours.masks.neuron, masks.neuron, atol=1e-4)
    assert max(ours.stats.ffn_after) < 1e-6
    official = tune_masks(model, adapter, masks, batches, teacher=masks,
                          options=TuneOptions(ffn_target="unmasked"), progress=False)
    assert (official.masks.neuron - masks.neuron).abs().max() > 1e-2


@pytest.mark.parametrize("qa", [False, True])
def test_last_ffn_fits_cls_for_classification_and_every_token_for_qa(qa):
    model = tiny_model("bert", qa=qa, layers=2)
    adapter = get_adapter(model)
    batches = tiny_batches(3, qa=qa)
    fisher = compute_fisher(model, adapter, batches, progress=False)
    from prune import prune_masks

    result = prune_masks(model, adapter, batches, flops_cost(adapter, 10),
                         0.6, PruneOptions(), fisher=fisher, progress=False)
    last = [f for f in result.tune_stats.fits if f.part == "ffn"][-1]
    first = [f for f in result.tune_stats.fits if f.part == "ffn"][0]
    samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert first.tokens == tokens
    assert last.tokens == (tokens if qa else samples)


def test_teacher_assistant_is_searched_at_sqrt_constraint_and_not_rearranged():
    model = tiny_model("bert", layers=2)
    adapter = get_adapter(model)
    fisher = compute_fisher(model, adapter, tiny_batches(3), progress=False)
    cost = flops_cost(adapter, 10)
    opts = PruneOptions(tune_teacher="ta")
    ta = teacher_masks(fisher, cost, 0.36, opts)
    # searched like the student: at the pipeline's FFN granularity (aligned by default)
    at_sqrt = search_masks(fisher.head_importance, fisher.neuron_importance, cost, 0.6,
                           granularity=opts.granularity)
    assert torch.equal(ta.head, at_sqrt.head) and torch.equal(ta.neuron, at_sqrt.neuron)
    unaligned = teacher_masks(fisher, cost, 0.36, PruneOptions(tune_teacher="ta", granularity=1))
    expected = search_masks(fisher.head_importance, fisher.neuron_importance, cost, 0.6)
    assert torch.equal(unaligned.head, expected.head)
    assert torch.equal(unaligned.neuron, expected.neuron)
    assert teacher_masks(fisher, cost, 0.36, PruneOptions()) is None
    rearranged = teacher_masks(fisher, cost, 0.36, PruneOptions(
        tune_teacher="ta", tune_teacher_rearrange=True))
    expected = rearrange_masks(at_sqrt, fisher)
    assert torch.equal(rearranged.neuron, expected.neuron)
    assert cost.ratio(ta.heads_per_layer(), ta.neurons_per_layer()) <= math.sqrt(0.36) + 1e-9


def test_official_solver_runs_and_leaves_layer_0_attention_alone():
    model = tiny_model("bert", layers=3)
    batches = tiny_batches(3)
    adapter, masks = searched(model, batches, 0.5)
    opts = TuneOptions(solver="lsmr", bias_column=True, first_attention=False)
    tuned = tune_masks(model, adapter, masks, batches, options=opts, progress=False)
    assert [(f.layer, f.part) for f in tuned.stats.fits if f.part == "attn"] == [(1, "attn"),
                                                                                 (2, "attn")]
    assert torch.equal(tuned.masks.head[0], masks.head[0])
    assert not torch.equal(tuned.masks.head[1:], masks.head[1:])
    assert all(f.after <= f.before + 1e-6 for f in tuned.stats.fits)


def test_weight_reconstruction_never_increases_the_fit_error_and_beats_masks(family):
    model = tiny_model(family, layers=3)
    batches = tiny_batches(4)
    adapter, masks = searched(model, batches, 0.4)
    by_mode = {m: tune_masks(model, adapter, masks, batches, options=TuneOptions(mode=m),
                             progress=False) for m in ("mask", "bias", "weights")}
    for mode, result in by_mode.items():
        assert all(f.after <= f.before + 1e-9 for f in result.stats.fits), mode
    total = {m: sum(f.after for f in r.stats.fits) for m, r in by_mode.items()}
    assert total["weights"] < total["bias"] <= total["mask"] + 1e-9
    w = by_mode["weights"]
    assert w.weights.weight, "some projection was reconstructed"
    # the reconstructed model is an ordinary smaller model computing the same function
    batch = tiny_batches(1, seed=5)[0]
    with apply_masks(model, adapter, w.masks), applied_weights(model, adapter, w.masks,
                                                               w.weights):
        expected = outputs(model, batch)
    small = prune_model(copy.deepcopy(model), w.masks, adapter, w.weights)
    assert torch.allclose(outputs(small, batch), expected, atol=1e-4)
    assert not torch.allclose(outputs(model, batch), expected, atol=1e-3)  # weights restored


def test_input_side_maps_fold_into_query_key_value_and_ffn_input(family):
    """``inputs=True``: each sublayer's input map lowers its own fit error, layer 0's attention
    has none, and the output projections' recorded errors are what the real model computes
    once the maps are folded into its weights (``W A``, ``b + W c``); the folded, physically
    pruned model computes the tuned masked one; on unpruned masks the maps are the identity."""
    model = tiny_model(family, layers=3)
    batches = tiny_batches(4)
    adapter, masks = searched(model, batches, 0.4)
    options = TuneOptions(mode="weights", inputs=True, cls_only_last=False)
    result = tune_masks(model, adapter, masks, batches, options=options, progress=False)
    maps = [f for f in result.stats.fits if f.part.endswith("_in")]
    heads, neurons = masks.heads_per_layer(), masks.neurons_per_layer()
    assert {(f.layer, f.part) for f in maps} == \
        {(l, "attn_in") for l in (1, 2) if heads[l]} | {(l, "ffn_in") for l in range(3)
                                                         if neurons[l]}
    assert len(maps) >= 4
    assert all(f.after <= f.before + 1e-9 for f in maps)
    assert sum(f.after for f in maps) < sum(f.before for f in maps)
    assert set(result.weights.inputs) == {(f.layer, f.part[:-3]) for f in maps}
    measured = measured_errors(model, adapter, result.masks, batches, result.weights)
    for fit in result.stats.fits:
        if not fit.part.endswith("_in"):
            assert fit.after == pytest.approx(measured[(fit.layer, fit.part)], rel=1e-3,
                                              abs=1e-7), fit
    plain = tune_masks(model, adapter, masks, batches, progress=False,
                       options=TuneOptions(mode="weights", cls_only_last=False))
    deep = [f.after for f in result.stats.fits if f.layer == 2 and f.part == "ffn"]
    assert deep[0] < [f.after for f in plain.stats.fits if (f.layer, f.part) == (2, "ffn")][0]
    batch = tiny_batches(1, seed=5)[0]
    with apply_masks(model, adapter, result.masks), \
            applied_weights(model, adapter, result.masks, result.weights):
        expected = outputs(model, batch)
    small = prune_model(copy.deepcopy(model), result.masks, adapter, result.weights)
    assert torch.allclose(outputs(small, batch), expected, atol=1e-4)
    full = tune_masks(model, adapter, Masks.ones(adapter), batches, options=options,
                      progress=False)
    for Ac in full.weights.inputs.values():
        eye = torch.cat([torch.eye(Ac.shape[0]), torch.zeros(Ac.shape[0], 1)], 1)
        assert torch.allclose(Ac, eye, atol=1e-3)


def test_weights_fall_back_when_they_do_not_help_on_held_out_samples():
    """Held-out samples unlike the fit set: a reconstruction fitted to a handful of tokens
    does not carry over, and the per-layer check keeps the scale solution."""
    model = tiny_model("bert", layers=2)
    adapter = get_adapter(model)
    fit = tiny_batches(1, batch=2, length=6, seed=1)
    held = tiny_batches(4, seed=2)
    _, masks = searched(model, held, 0.4)
    # every token fitted and held out, as measured_errors measures
    options = TuneOptions(mode="weights", weight_damp=0.0, cls_only_last=False)
    tuned = tune_masks(model, adapter, masks, fit, options=options, holdout=held,
                       progress=False)
    fits = tuned.stats.fits
    assert all(set(f.holdout_candidates) == {"scales", "bias", "weights"} for f in fits)
    # the recorded held-out errors are what the real tuned model computes on those samples
    # (measured on it, not from the tuner's moments); the choice rule itself is checked on a
    # hand-built case in test_choice_is_the_lowest_held_out_error_and_the_simpler_on_ties
    measured = measured_errors(model, adapter, tuned.masks, held, tuned.weights)
    for f in fits:
        assert f.holdout_after == pytest.approx(measured[(f.layer, f.part)], rel=1e-3,
                                                abs=1e-7), f
        assert f.holdout_after == pytest.approx(f.holdout_candidates[f.chosen])
    assert any(f.chosen != "weights" for f in fits), "some layer must fall back"
    assert len(tuned.weights.weight) == sum(f.chosen == "weights" for f in fits)


def hand_moments(x: torch.Tensor, r: torch.Tensor) -> Moments:
    m = Moments.zeros(x.shape[1], r.shape[1])
    m.add(x, r)
    return m


def test_choice_is_the_lowest_held_out_error_and_the_simpler_on_ties():
    """Held-out tokens with a known answer, ``r = 2 x + 1``, and candidates whose errors are
    known in closed form (integer data: every error is exact in float64):

    - scales ``(I, 0)``: residual ``-(x + 1)``; bias ``(I, 1)``: residual ``-x``;
    - weights ``(2 I, 1)``: residual 0, the best; ``(3 I, 1)``: residual ``x``, a tie with bias,
      which goes to the simpler; ``(5 I, 0)``: residual ``3 x - 1``, the worst.
    """
    from prune.tune import Solution, _Tuner

    x = torch.tensor([[1.0, 2.0], [3.0, 1.0], [2.0, 4.0], [1.0, 1.0]])
    r = 2 * x + 1
    held = hand_moments(x, r)
    eye = torch.eye(2, dtype=torch.float64)

    def sol(w, b):
        return Solution(w * eye, torch.full((2,), float(b), dtype=torch.float64))

    rr = float(r.pow(2).sum())
    # the moments' error is the explicit residual's (independent of Moments.error's algebra)
    for w, b, residual in ((1, 0, -(x + 1)), (1, 1, -x), (2, 1, 0 * x), (3, 1, x),
                           (5, 0, 3 * x - 1)):
        candidate = sol(w, b)
        assert held.error(candidate.weight, candidate.beta) == pytest.approx(
            float(residual.pow(2).sum()) / rr, abs=1e-12), (w, b)
    tuner = _Tuner(None, None, None, None, TuneOptions(mode="weights"), {})
    scales, bias = sol(1, 0), sol(1, 1)
    assert tuner._choose(0, "ffn", {"scales": scales, "bias": bias, "weights": sol(2, 1)},
                         held) == "weights"
    assert tuner._choose(0, "ffn", {"scales": scales, "bias": bias, "weights": sol(3, 1)},
                         held) == "bias"  # a tie: the simpler
    assert tuner._choose(0, "ffn", {"scales": scales, "bias": bias, "weights": sol(5, 0)},
                         held) == "bias"
    assert tuner._choose(0, "ffn", {"scales": sol(2, 1), "bias": bias, "weights": sol(5, 0)},
                         held) == "scales"
    # no held-out samples: the most elaborate; one candidate: that one
    assert tuner._choose(0, "ffn", {"scales": scales, "bias": bias, "weights": sol(5, 0)},
                         None) == "weights"
    assert tuner._choose(0, "attn", {"scales": sol(5, 0)}, held) == "scales"


@pytest.mark.parametrize("kind,bad,message", [
    (PruneOptions, dict(rearrange_sweeps=0), "rearrange_sweeps=0: use a positive number"),
    (PruneOptions, dict(tune="weights"), "tune='weights': use TuneOptions\\(mode=...\\)"),
    (PruneOptions, dict(tune_samples=0), "tune_samples=0: use a positive number"),
    (PruneOptions, dict(tune_teacher="student"), "tune_teacher='student': use one of full, ta"),
    (TuneOptions, dict(damp=-1.0), "damp=-1.0: use a damping >= 0"),
    (TuneOptions, dict(max_scale=-2.0), "max_scale=-2.0: use a positive bound"),
    (TuneOptions, dict(mode="sometimes"), "mode='sometimes': use one of mask, bias, weights"),
    (TuneOptions, dict(cls_only_last=1), "cls_only_last=1: use true, false or null"),
    (TuneOptions, dict(first_attention="no"), "first_attention='no': use true or false"),
    (TuneOptions, dict(inputs="yes"), "inputs='yes': use true or false"),
    (TuneOptions, dict(input_damp=-0.1), "input_damp=-0.1: use a damping >= 0"),
])
def test_bad_pruning_options_are_rejected_with_one_line(kind, bad, message):
    with pytest.raises(PruneError, match=message) as err:
        kind(**bad)
    assert "\n" not in str(err.value)


def test_pruning_options_hold_the_tuning_options_and_the_config_keys_reach_them():
    """``PruneOptions.tune`` is a ``TuneOptions`` (or None), not a mirror of its fields; the
    run's flat ``prune.tune_*`` keys build exactly it, and ``tune=off`` is None."""
    from omegaconf import OmegaConf

    from experiments.config import TUNE_KEYS, PruneConf, prune_options

    names = {f.name for f in fields(PruneOptions)}
    assert not names & ({f"tune_{f.name}" for f in fields(TuneOptions)} | {"cls_only_last"})
    assert PruneOptions().tune == TuneOptions() and PruneOptions().tune_mode == "mask"
    assert PruneOptions(tune=None).tune_mode == "off"
    cfg = OmegaConf.structured(PruneConf)
    assert prune_options(cfg) == PruneOptions()
    cfg.tune, cfg.tune_weight_damp, cfg.tune_solver = "weights", 0.3, "lsmr"
    cfg.cls_only_last = False
    got = prune_options(cfg)
    assert got.tune == TuneOptions(mode="weights", weight_damp=0.3, solver="lsmr",
                                   cls_only_last=False)
    assert set(TUNE_KEYS.values()) == {f.name for f in fields(TuneOptions)} - {
        "activation_cache_bytes"}
    cfg.tune = "off"
    assert prune_options(cfg).tune is None


def test_cls_only_last_is_decided_from_the_model_unless_set():
    classifier, qa = tiny_model("bert", layers=1), tiny_model("bert", layers=1, qa=True)
    assert TuneOptions().for_model(classifier).cls_only_last is True
    assert TuneOptions().for_model(qa).cls_only_last is False
    assert TuneOptions(cls_only_last=False).for_model(classifier).cls_only_last is False


def test_tuning_inputs_ignore_labels():
    model = tiny_model("bert", layers=2)
    adapter = get_adapter(model)
    batches = tiny_batches(2)
    masks = Masks.ones(adapter)
    masks.neuron[:, ::2] = 0.0
    a = tune_masks(model, adapter, masks, batches, progress=False)
    b = tune_masks(model, adapter, masks, [inputs_of(x) for x in batches], progress=False)
    assert torch.equal(a.masks.neuron, b.masks.neuron)


def ffn_activations(model, adapter, batches, l=0) -> torch.Tensor:
    """Layer ``l``'s FFN activations (the down projection's inputs) on the real tokens."""
    store = []
    hook = adapter.module(model, l, "ffn_out").register_forward_pre_hook(
        lambda m, a: store.append(a[0]))
    try:
        for b in batches:
            outputs(model, b)
    finally:
        hook.remove()
    return torch.cat([a[b["attention_mask"].bool()] for a, b in zip(store, batches,
                                                                      strict=True)])


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_weight_damping_conditions_the_solve_on_a_tiny_sample_set(seed):
    """The weight solve's ridge (``weight_damp * mean(diag S)``, towards the ``bias`` solution)
    on a sample set with fewer tokens than kept units, where ``S`` is singular: undamped, the
    solve interpolates the 8 fitted tokens and blows up on held-out ones (weights many times
    the original's, a held-out error far above the untuned layer's); at the default damping
    the weights stay near their anchor and the held-out error is below the untuned layer's.
    Errors are measured on explicit held-out tokens, not from the tuner's moments.

    (The blow-up comes from the float32 rounding of each batch's ``x^T x`` in
    ``Moments.add``: it leaves ``S`` numerically full rank with eigenvalues of rounding size,
    which the undamped solve inverts. With exactly rank-deficient float64 moments the undamped
    fallback to least squares stays bounded.)"""
    from prune.tune import Solution, solve_weights

    model = tiny_model("bert", layers=2)
    adapter = get_adapter(model)
    W = adapter.module(model, 0, "ffn_out").weight.detach()  # [32, 48]
    kept = torch.arange(0, 48, 2)[:20]  # 20 kept neurons of 48
    fit_acts = ffn_activations(model, adapter, tiny_batches(1, batch=1, length=8, seed=seed))
    held_acts = ffn_activations(model, adapter, tiny_batches(4, seed=20))

    def data(acts):  # the kept neurons' inputs, and the whole FFN's output (minus its bias)
        return acts[:, kept], acts @ W.t()

    (xf, rf), (xh, rh) = data(fit_acts), data(held_acts)
    assert xf.shape[0] < len(kept) + 1 < xh.shape[0]  # under-determined fit, many held-out
    fit = Moments.zeros(len(kept), W.shape[0])
    fit.add(xf, rf)  # float32 activations, as the tuner accumulates them
    xh, rh = xh.double(), rh.double()
    eig = torch.linalg.eigvalsh(fit.S)  # rank <= 8 in exact arithmetic: ill-conditioned
    assert float(eig[0].abs()) < 1e-6 * float(eig[-1])

    def held_error(sol) -> float:
        return float((xh @ sol.weight.t() + sol.beta - rh).pow(2).sum() / rh.pow(2).sum())

    untuned = Solution(W[:, kept].double(), torch.zeros(W.shape[0], dtype=torch.float64))
    proj = Projection(W[:, kept], torch.zeros(W.shape[0]), W[:, kept], torch.ones(len(kept)), 1)
    anchor = solve_masks(fit, proj, TuneOptions(), with_bias=True)  # what weights mode anchors
    assert not isinstance(anchor, str)
    scale = float(untuned.weight.norm())

    undamped = solve_weights(fit, anchor, 0.0)
    if undamped is not None:  # a failed solve would be as good an outcome of no damping
        assert float(undamped.weight.norm()) > 10 * scale
        assert held_error(undamped) > 10 * held_error(untuned) and held_error(undamped) > 1.0

    default = TuneOptions().weight_damp
    assert default == PruneOptions().tune.weight_damp > 0
    damped = solve_weights(fit, anchor, default)
    assert damped is not None
    assert torch.isfinite(damped.weight).all() and torch.isfinite(damped.beta).all()
    assert float((damped.weight - anchor.weight).norm()) < float(anchor.weight.norm())
    assert float(damped.weight.norm()) < 2 * scale
    assert held_error(damped) <= held_error(untuned)

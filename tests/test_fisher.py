import pytest
import torch
from conftest import inputs_of, tiny_batches, tiny_model
from torch.func import functional_call

from prune import compute_fisher, flops_cost, get_adapter, prune_masks, search_masks
from prune.fisher import autocast_dtype
from prune.pipeline import PruneOptions


def scaled_by_hand(model, adapter, batch, head_scale, neuron_scale, loss_of=None):
    """The model's loss with each head's output and each neuron's output scaled by hand: the
    output projection's input columns of head k, and the down projection's column of neuron n,
    multiplied by a variable (no masks, no hooks: ``functional_call`` with scaled weights)."""
    params = dict(model.named_parameters())
    prefix = {id(m): n for n, m in model.named_modules()}
    dh = adapter.head_size
    for l in range(adapter.num_layers):
        attn = adapter.module(model, l, "attn_out")
        down = adapter.module(model, l, "ffn_out")
        name = prefix[id(attn)] + ".weight"
        params[name] = params[name] * head_scale[l].repeat_interleave(dh)[None, :]
        name = prefix[id(down)] + ".weight"
        params[name] = params[name] * neuron_scale[l][None, :]
    out = functional_call(model, params, args=(), kwargs=batch)
    return out.loss if loss_of is None else loss_of(out)


def test_fisher_rows_are_the_gradients_of_outputs_scaled_by_hand(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    batches = tiny_batches(3)
    fisher = compute_fisher(model, adapter, batches, progress=False)
    assert fisher.head_grads.shape == (3, adapter.num_layers, adapter.num_heads)
    assert fisher.num_samples == 18 and fisher.rows == "batch"
    for b, batch in enumerate(batches):
        s = torch.ones(adapter.num_layers, adapter.num_heads, requires_grad=True)
        t = torch.ones(adapter.num_layers, adapter.intermediate_size, requires_grad=True)
        g_s, g_t = torch.autograd.grad(scaled_by_hand(model, adapter, batch, s, t), [s, t])
        assert torch.allclose(fisher.head_grads[b], g_s, rtol=1e-4, atol=1e-7)
        assert torch.allclose(fisher.neuron_grads[b], g_t, rtol=1e-4, atol=1e-7)
    assert torch.allclose(fisher.head_importance, fisher.head_grads.pow(2).sum(0))
    assert all(p.requires_grad for p in model.parameters()), "weights must be unfrozen after"


def test_same_seed_same_masks(family):
    results = []
    for _ in range(2):
        model = tiny_model(family, seed=0)
        adapter = get_adapter(model)
        r = prune_masks(model, adapter, tiny_batches(3, seed=7), flops_cost(adapter, 10),
                        0.5, PruneOptions(), progress=False)
        results.append(r.masks)
    assert torch.equal(results[0].head, results[1].head)
    assert torch.equal(results[0].neuron, results[1].neuron)


def test_bfloat16_autocast_fisher_ranks_units_like_float32(family):
    """``amp='bf16'`` (what ``auto`` picks on a bf16 GPU; forced here on CPU) keeps float32
    gradients and the same importance ranking to within bfloat16 noise; ``auto`` on CPU is exact
    float32."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    batches = tiny_batches(3)
    full = compute_fisher(model, adapter, batches, progress=False, amp="off")
    auto = compute_fisher(model, adapter, batches, progress=False, amp="auto")
    half = compute_fisher(model, adapter, batches, progress=False, amp="bf16")
    assert autocast_dtype("cpu", "auto") is None
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16
    assert torch.equal(full.neuron_grads, auto.neuron_grads)
    assert half.neuron_grads.dtype == torch.float32
    assert not torch.equal(full.neuron_grads, half.neuron_grads), "bf16 must actually run"
    for a, b in ((full.neuron_importance, half.neuron_importance),
                 (full.head_importance, half.head_importance)):
        ra, rb = a.flatten().argsort().argsort().float(), b.flatten().argsort().argsort().float()
        assert torch.corrcoef(torch.stack([ra, rb]))[0, 1] > 0.9


def one_sample_batches(batches):
    return [{k: v[i:i + 1] for k, v in b.items()} for b in batches
            for i in range(b["input_ids"].shape[0])]


@pytest.mark.parametrize("num_labels", [2, 3])
def test_unlabeled_fisher_is_the_expectation_over_the_models_labels(num_labels):
    """``fisher_unlabeled`` for classification is, per sample, the labelled Fisher with each
    class as the label, weighted by the model's probability of that class."""
    model = tiny_model("bert", num_labels=num_labels)
    adapter = get_adapter(model)
    batches = tiny_batches(2, num_labels=num_labels)
    unlabeled = compute_fisher(model, adapter, [inputs_of(b) for b in batches],
                               progress=False, importance="fisher_unlabeled")
    assert unlabeled.rows == "sample"
    expected_h = torch.zeros(adapter.num_layers, adapter.num_heads)
    expected_n = torch.zeros(adapter.num_layers, adapter.intermediate_size)
    for sample in one_sample_batches(batches):
        with torch.no_grad():
            p = torch.softmax(model(**inputs_of(sample)).logits, -1)[0]
        for c in range(num_labels):
            f = compute_fisher(model, adapter, [{**sample, "labels": torch.tensor([c])}],
                               progress=False)
            expected_h += p[c] * f.head_importance
            expected_n += p[c] * f.neuron_importance
    assert torch.allclose(unlabeled.head_importance, expected_h, rtol=1e-3, atol=1e-9)
    assert torch.allclose(unlabeled.neuron_importance, expected_n, rtol=1e-3, atol=1e-9)


def test_unlabeled_fisher_of_a_confident_model_prunes_like_the_predicted_labels():
    """A constructed confident model (every sample at the same confidence p ~ 1): the
    expectation form is the labelled Fisher with the predicted labels up to one constant factor
    ((1 - eps) / eps), so it searches the same masks. (With p ~ 1 the non-predicted classes
    still contribute at first order in eps while the predicted label's term is of second order:
    the two are proportional, not equal.)"""
    model = tiny_model("bert", num_labels=2)
    with torch.no_grad():
        model.classifier.weight.mul_(1e-3)
        model.classifier.bias.copy_(torch.tensor([0.0, 12.0]))
    adapter = get_adapter(model)
    batches = tiny_batches(3)
    samples = one_sample_batches(batches)
    with torch.no_grad():
        p = torch.cat([torch.softmax(model(**inputs_of(s)).logits, -1) for s in samples])
    assert p[:, 1].min() > 0.9999  # confident, and about equally so on every sample
    predicted = [{**s, "labels": torch.tensor([1])} for s in samples]
    labelled = compute_fisher(model, adapter, predicted, progress=False)
    unlabeled = compute_fisher(model, adapter, [inputs_of(b) for b in batches], progress=False,
                               importance="fisher_unlabeled")
    eps = float(p[:, 0].mean())
    for u, lab in ((unlabeled.neuron_importance, labelled.neuron_importance),
                   (unlabeled.head_importance, labelled.head_importance)):
        assert torch.allclose(u * eps / (1 - eps), lab, rtol=2e-2, atol=1e-3 * float(lab.max()))
    cost = flops_cost(adapter, 10)
    for c in (0.3, 0.5, 0.7):
        a = search_masks(labelled.head_importance, labelled.neuron_importance, cost, c)
        b = search_masks(unlabeled.head_importance, unlabeled.neuron_importance, cost, c)
        assert torch.equal(a.head, b.head) and torch.equal(a.neuron, b.neuron)


def test_unlabeled_fisher_for_regression_is_the_prediction_gradient():
    model = tiny_model("bert", num_labels=1)
    adapter = get_adapter(model)
    batches = tiny_batches(2, num_labels=1)
    unlabeled = compute_fisher(model, adapter, [inputs_of(b) for b in batches],
                               progress=False, importance="fisher_unlabeled")
    rows = []
    for s in one_sample_batches(batches):
        h = torch.ones(adapter.num_layers, adapter.num_heads, requires_grad=True)
        n = torch.ones(adapter.num_layers, adapter.intermediate_size, requires_grad=True)
        pred = scaled_by_hand(model, adapter, inputs_of(s), h, n,
                              loss_of=lambda out: out.logits.sum())
        rows.append(torch.autograd.grad(pred, [h, n]))
    assert torch.allclose(unlabeled.head_grads, torch.stack([r[0] for r in rows]), rtol=1e-4,
                          atol=1e-7)
    assert torch.allclose(unlabeled.neuron_grads, torch.stack([r[1] for r in rows]), rtol=1e-4,
                          atol=1e-7)


def padded_qa_inputs(n_batches: int = 2, batch: int = 6, length: int = 12,
                     seed: int = 0) -> list[dict]:
    """QA inputs whose samples have real lengths from 4 to ``length`` (right padding, token 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, 120, (batch, length), generator=g)
        real = torch.randint(4, length + 1, (batch,), generator=g)
        real[0], real[1] = 4, length  # the shortest and one without padding in every batch
        mask = (torch.arange(length)[None, :] < real[:, None]).long()
        ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def position_gradients(model, adapter, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """For one (padded) sample: the flattened mask gradient of ``-log q(s)`` for every real
    start position ``s``, and likewise for end positions, where ``q`` is the model's softmax
    over the sample's real tokens only (the logits of its padding cut off)."""
    real = int(sample["attention_mask"].sum())
    h = torch.ones(adapter.num_layers, adapter.num_heads, requires_grad=True)
    n = torch.ones(adapter.num_layers, adapter.intermediate_size, requires_grad=True)
    out = scaled_by_hand(model, adapter, sample, h, n, loss_of=lambda o: o)
    grads = []
    for logits in (out.start_logits, out.end_logits):
        logq = torch.log_softmax(logits[0, :real], dim=-1)
        rows = []
        for pos in range(real):
            g_h, g_n = torch.autograd.grad(-logq[pos], [h, n], retain_graph=True)
            rows.append(torch.cat([g_h.flatten(), g_n.flatten()]))
        grads.append(torch.stack(rows))
    return grads[0], grads[1]


def test_unlabeled_fisher_for_qa_draws_positions_among_each_samples_real_tokens():
    """Each sample's row is the gradient of ``-(log q(s) + log q(e)) / 2`` at a start ``s`` and
    an end ``e`` drawn from the model's distribution over that sample's REAL tokens: every row
    matches one such pair of real positions (a position drawn in the padding, or a distribution
    that includes the padding's logits, matches none). Samples are padded to different lengths,
    and the model puts real mass on the padding, so a sampler blind to the attention mask would
    land there."""
    model = tiny_model("bert", qa=True)
    adapter = get_adapter(model)
    batches = padded_qa_inputs()
    samples = one_sample_batches(batches)
    assert sum(int((s["attention_mask"] == 0).any()) for s in samples) >= 6
    with torch.no_grad():  # the model's unmasked softmax over the padding
        padded = [s for s in samples if (s["attention_mask"] == 0).any()]
        mass = [float(torch.softmax(model(**s).start_logits, -1)[s["attention_mask"] == 0].sum())
                for s in padded]
    assert sum(mass) / len(mass) > 0.1, mass
    candidates = [position_gradients(model, adapter, s) for s in samples]
    drawn = {}
    for seed in range(5):
        fisher = compute_fisher(model, adapter, batches, progress=False,
                                importance="fisher_unlabeled", seed=seed)
        assert fisher.rows == "sample" and fisher.head_grads.shape[0] == len(samples)
        rows = torch.cat([fisher.head_grads.flatten(1), fisher.neuron_grads.flatten(1)], dim=1)
        for i, (row, (starts, ends)) in enumerate(zip(rows, candidates, strict=True)):
            pairs = (starts[:, None, :] + ends[None, :, :]) / 2  # [real, real, units]
            distance = (pairs - row).norm(dim=-1)
            s, e = divmod(int(distance.argmin()), distance.shape[1])
            assert float(distance[s, e]) <= 1e-4 * float(row.norm()) + 1e-7, \
                f"sample {i} (seed {seed}): its row is no pair of real positions"
            assert samples[i]["attention_mask"][0, s] == 1 and \
                samples[i]["attention_mask"][0, e] == 1
            drawn.setdefault(i, set()).add((s, e))
    # positions are drawn, not the most likely ones: some sample gets different pairs
    assert max(len(pairs) for pairs in drawn.values()) > 1


def test_unlabeled_fisher_for_qa_samples_positions_and_is_seeded():
    model = tiny_model("bert", qa=True)
    adapter = get_adapter(model)
    batches = [inputs_of(b) for b in tiny_batches(2, qa=True)]
    a = compute_fisher(model, adapter, batches, progress=False, importance="fisher_unlabeled",
                       seed=3)
    b = compute_fisher(model, adapter, batches, progress=False, importance="fisher_unlabeled",
                       seed=3)
    c = compute_fisher(model, adapter, batches, progress=False, importance="fisher_unlabeled",
                       seed=4)
    assert a.head_grads.shape[0] == 12 and torch.equal(a.head_grads, b.head_grads)
    assert not torch.equal(a.head_grads, c.head_grads)
    assert a.neuron_importance.sum() > 0


def test_labelled_fisher_needs_labels():
    from prune import PruneError

    model = tiny_model("bert")
    with pytest.raises(PruneError, match="fisher_unlabeled"):
        compute_fisher(model, get_adapter(model), [inputs_of(tiny_batches(1)[0])],
                       progress=False)

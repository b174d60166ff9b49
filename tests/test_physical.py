import ast
import copy
import json

import pytest
import torch
from conftest import FAMILIES, FIXTURES, ROOT, inputs_of, outputs, tiny_batches, tiny_model
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

from prune import (
    Masks,
    PruneError,
    apply_masks,
    get_adapter,
    load_pruned,
    prune_model,
    save_pruned,
)


def tuned_looking_masks(adapter, seed=0) -> Masks:
    """Random kept sets with real-valued scales, a 0-head layer, a layer that keeps heads 1 and 3
    (not a prefix: MPNet must pick those heads' position bias) and a 1-neuron layer."""
    g = torch.Generator().manual_seed(seed)
    keep_h = (torch.rand(adapter.num_layers, adapter.num_heads, generator=g) > 0.4).float()
    keep_n = (torch.rand(adapter.num_layers, adapter.intermediate_size, generator=g) > 0.5).float()
    keep_h[0] = 0.0
    keep_h[1] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    keep_n[1] = 0.0
    keep_n[1, 5] = 1.0
    scale_h = 0.5 + torch.rand(keep_h.shape, generator=g)
    scale_n = 0.5 + torch.rand(keep_n.shape, generator=g)
    return Masks(keep_h * scale_h, keep_n * scale_n)


@pytest.mark.parametrize("qa", [False, True])
def test_physically_pruned_equals_masked_and_reloads(family, qa, tmp_path):
    model = tiny_model(family, qa=qa, layers=3)
    adapter = get_adapter(model)
    masks = tuned_looking_masks(adapter)
    batch = tiny_batches(1, qa=qa)[0]
    with apply_masks(model, adapter, masks):
        expected = outputs(model, batch)
    assert (expected - outputs(model, batch)).abs().max() > 1e-3, "masks must matter"
    pruned = prune_model(copy.deepcopy(model), masks)
    assert torch.allclose(outputs(pruned, batch), expected, atol=1e-4)
    n_before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in pruned.parameters()) < n_before
    assert adapter.heads_per_layer(pruned) == masks.heads_per_layer()
    assert adapter.neurons_per_layer(pruned) == masks.neurons_per_layer()
    assert adapter.heads_per_layer(pruned)[:2] == [0, 2]
    assert adapter.neurons_per_layer(pruned)[1] == 1
    assert pruned.config.fastprune_head_index[:2] == [[], [1, 3]]

    save_pruned(pruned, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "modeling_fastprune.py").exists()
    auto = AutoModelForQuestionAnswering if qa else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()
    assert type(reloaded).__name__.startswith("FastPrune")
    assert torch.allclose(outputs(reloaded, batch), expected, atol=1e-4)
    ours = load_pruned(tmp_path / "ckpt")
    assert torch.allclose(outputs(ours, batch), expected, atol=1e-4)
    for loaded in (reloaded, ours):
        assert get_adapter(loaded).heads_per_layer(loaded) == masks.heads_per_layer()
        assert get_adapter(loaded).neurons_per_layer(loaded) == masks.neurons_per_layer()


def test_remote_code_file_imports_only_torch_and_transformers():
    from prune.physical import REMOTE_FILE

    tree = ast.parse(REMOTE_FILE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "inspect", "torch", "transformers"}, imported


FRESH_CASES = [(family, False) for family in FAMILIES] + [("mpnet", True), ("roberta", True)]


def test_checkpoint_loads_in_a_fresh_interpreter_without_the_project(tmp_path):
    """Saved checkpoints are self-contained: load them with cwd and sys.path away from here.

    Every family's classifier and the MPNet and RoBERTa QA models, each with a layer that keeps
    heads 1 and 3 only, so that MPNet's position-bias head selection is rebuilt from the config.
    """
    import subprocess
    import sys

    cases = []
    for family, qa in FRESH_CASES:
        model = tiny_model(family, qa=qa, layers=2)
        pruned = prune_model(model, tuned_looking_masks(get_adapter(model), seed=3))
        name = f"{family}-{'qa' if qa else 'cls'}"
        save_pruned(pruned, tmp_path / name)
        batch = inputs_of(tiny_batches(1, qa=qa)[0])
        torch.save(batch, tmp_path / name / "batch.pt")
        torch.save(outputs(pruned, batch), tmp_path / name / "expected.pt")
        auto = "AutoModelForQuestionAnswering" if qa else "AutoModelForSequenceClassification"
        cases.append((name, auto))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    code = (
        "import json, sys, torch\n"
        "sys.path = [p for p in sys.path if p not in ('', '.', sys.argv[2])]\n"
        "import transformers\n"
        "for name, auto in json.load(open(sys.argv[1] + '/cases.json')):\n"
        "    path = sys.argv[1] + '/' + name\n"
        "    m = getattr(transformers, auto).from_pretrained(path, trust_remote_code=True)\n"
        "    assert type(m).__name__.startswith('FastPrune'), name\n"
        "    out = m.eval()(**torch.load(path + '/batch.pt'))\n"
        "    out = out.logits if 'Classification' in auto else \\\n"
        "        torch.cat([out.start_logits, out.end_logits], dim=-1)\n"
        "    assert torch.allclose(out, torch.load(path + '/expected.pt'), atol=1e-4), name\n"
        "assert 'prune' not in sys.modules\n"
        "print('ok', len(json.load(open(sys.argv[1] + '/cases.json'))))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(ROOT)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and f"ok {len(FRESH_CASES)}" in res.stdout, res.stderr[-2000:]


def test_pruning_twice_is_refused(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    prune_model(model, tuned_looking_masks(adapter))
    with pytest.raises(PruneError, match="already"):
        prune_model(model, tuned_looking_masks(adapter))
    # a model that lost only neurons, and a reloaded pruned checkpoint, are pruned too
    neurons_only = Masks.ones(adapter)
    neurons_only.neuron[0, :5] = 0.0
    model = prune_model(tiny_model(family), neurons_only)
    assert adapter.heads_per_layer(model) == [adapter.num_heads] * adapter.num_layers
    save_pruned(model, tmp_path / "ckpt")
    for pruned in (model, load_pruned(tmp_path / "ckpt")):
        with pytest.raises(PruneError, match="already"):
            prune_model(pruned, Masks.ones(adapter))


@pytest.mark.parametrize("tune,ckpt", [("bias", "cls2"), ("weights", "cls2"), ("weights", "qa")])
def test_masks_pt_rebuilds_the_evaluated_model_from_the_original_checkpoint(
        tune, ckpt, tiny_checkpoints, tmp_path):
    """A run's ``masks.pt`` is everything that turns the ORIGINAL checkpoint into the model it
    evaluated and saved: ``rebuild`` of a fresh load computes what ``pruned_model`` computes,
    while the final masks alone (without the tuned projections) compute something else."""
    from test_run import FAST, run

    from prune.pipeline import rebuild

    qa = ckpt == "qa"
    task = ["task=squad", f"paths.data_dir={FIXTURES}", "task.max_seq_length=64",
            "task.doc_stride=24"] if qa else []
    run([*task, f"model.path={tiny_checkpoints[ckpt]}", f"prune.tune={tune}", "constraint=0.5",
         "save_model=true", *FAST], tmp_path)
    state = torch.load(tmp_path / "masks.pt")
    assert state["format"] == 2
    weights = state["weights"]
    assert weights["bias"], "tuning must have moved some projection's bias"
    if tune == "weights":
        assert weights["weight"], "tune=weights must have rewritten some projection"
    else:
        assert not weights["weight"], "tune=bias rewrites biases only"
    auto = AutoModelForQuestionAnswering if qa else AutoModelForSequenceClassification

    def original():
        model = auto.from_pretrained(tiny_checkpoints[ckpt]).eval()
        assert not hasattr(model.config, "fastprune_heads")
        return model

    saved = load_pruned(tmp_path / "pruned_model")
    rebuilt = rebuild(original(), state)
    masks_only = rebuild(original(), {**state, "weights": {}})
    for model in (rebuilt, masks_only):
        assert get_adapter(model).heads_per_layer(model) == get_adapter(saved).heads_per_layer(
            saved)
        assert get_adapter(model).neurons_per_layer(model) == \
            get_adapter(saved).neurons_per_layer(saved)
    differences = []
    for batch in tiny_batches(3, batch=4, length=12, qa=qa, seed=11):
        expected = outputs(saved, batch)
        assert torch.allclose(outputs(rebuilt, batch), expected, atol=1e-4), \
            float((outputs(rebuilt, batch) - expected).abs().max())
        differences.append(float((outputs(masks_only, batch) - expected).abs().max()))
    assert min(differences) > 1e-3, f"the tuned weights must matter: {differences}"

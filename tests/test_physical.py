import copy

import pytest
import torch
from conftest import ROOT, outputs, tiny_batches, tiny_model
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

from prune import Masks, apply_masks, get_adapter, load_pruned, prune_model, save_pruned


def tuned_looking_masks(adapter, seed=0) -> Masks:
    """Random kept sets with real-valued scales, a 0-head layer and a 1-neuron layer."""
    g = torch.Generator().manual_seed(seed)
    keep_h = (torch.rand(adapter.num_layers, adapter.num_heads, generator=g) > 0.4).float()
    keep_n = (torch.rand(adapter.num_layers, adapter.intermediate_size, generator=g) > 0.5).float()
    keep_h[0] = 0.0
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
    assert adapter.heads_per_layer(pruned)[0] == 0
    assert adapter.neurons_per_layer(pruned)[1] == 1

    save_pruned(pruned, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "modeling_fastprune.py").exists()
    auto = AutoModelForQuestionAnswering if qa else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()
    assert type(reloaded).__name__.startswith("FastPrune")
    assert torch.allclose(outputs(reloaded, batch), expected, atol=1e-4)
    ours = load_pruned(tmp_path / "ckpt")
    assert torch.allclose(outputs(ours, batch), expected, atol=1e-4)


def test_remote_code_file_does_not_import_this_project():
    from prune.physical import REMOTE_FILE

    text = REMOTE_FILE.read_text()
    assert "import prune" not in text and "from prune" not in text


def test_checkpoint_loads_in_a_fresh_interpreter_without_the_project(tmp_path):
    """The saved checkpoint is self-contained: load it with cwd and sys.path away from here."""
    import subprocess
    import sys

    model = tiny_model("bert", layers=2)
    adapter = get_adapter(model)
    pruned = prune_model(copy.deepcopy(model), tuned_looking_masks(adapter, seed=3))
    save_pruned(pruned, tmp_path / "ckpt")
    batch = tiny_batches(1)[0]
    torch.save(batch, tmp_path / "batch.pt")
    torch.save(outputs(pruned, batch), tmp_path / "expected.pt")
    code = (
        "import sys, torch\n"
        "sys.path = [p for p in sys.path if p not in ('', '.', sys.argv[2])]\n"
        "from transformers import AutoModelForSequenceClassification as A\n"
        "m = A.from_pretrained(sys.argv[1] + '/ckpt', trust_remote_code=True).eval()\n"
        "b = torch.load(sys.argv[1] + '/batch.pt')\n"
        "b.pop('labels')\n"
        "out = m(**b).logits\n"
        "assert 'prune' not in sys.modules\n"
        "assert torch.allclose(out, torch.load(sys.argv[1] + '/expected.pt'), atol=1e-4)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(ROOT)], cwd=tmp_path,
                         env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_pruning_twice_is_refused():
    model = tiny_model("bert")
    adapter = get_adapter(model)
    prune_model(model, tuned_looking_masks(adapter))
    from prune import PruneError

    with pytest.raises(PruneError, match="already"):
        prune_model(model, tuned_looking_masks(adapter))

"""The library stands alone: ``prune`` imports and prunes a user's model with nothing but
torch, transformers and numpy: in a fresh interpreter, none of the harness's packages gets
imported (the real check in a venv with only those three is in the README's notes)."""

import subprocess
import sys

from conftest import ROOT

BLOCKED = ("hydra", "omegaconf", "scipy", "sklearn", "pandas", "wandb", "datasets",
           "matplotlib", "experiments", "analysis")

CODE = f"""
import sys
import copy, torch
from transformers import BertConfig, BertForSequenceClassification
torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32,
    num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, num_labels=2)).eval()
before = set(sys.modules)  # what torch and transformers import themselves
import prune
g = torch.Generator().manual_seed(0)
batches = [dict(input_ids=torch.randint(5, 100, (8, 12), generator=g),
                attention_mask=torch.ones(8, 12, dtype=torch.long),
                labels=torch.randint(0, 2, (8,), generator=g)) for _ in range(3)]
adapter = prune.get_adapter(model)
for tune in ("mask", "weights"):
    result = prune.prune_masks(model, adapter, batches, prune.flops_cost(adapter, 12),
                               0.5, prune.PruneOptions(tune=prune.TuneOptions(mode=tune)),
                               progress=False)
    small = prune.prune_model(copy.deepcopy(model), result.masks, adapter, result.weights)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
bad = sorted({{m.split('.')[0] for m in set(sys.modules) - before}} & set({BLOCKED!r}))
assert not bad, bad
print('ok')
"""


def test_prune_needs_only_torch_transformers_and_numpy():
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]

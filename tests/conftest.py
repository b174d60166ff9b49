"""Shared fixtures: tiny random encoder models of every supported family, built from configs,
offline."""

from __future__ import annotations

import os
from pathlib import Path

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
            "HF_EVALUATE_OFFLINE"):
    os.environ[var] = "1"
os.environ["WANDB_MODE"] = "disabled"
ROOT = Path(__file__).resolve().parents[1]
os.environ["FASTPRUNE_ROOT"] = str(ROOT)
SHARED = ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

import experiments.config  # noqa: E402,F401 - registers the structured config
from prune.hf_remote.modeling_fastprune import MODEL_CLASSES  # noqa: E402

# every supported family; RoBERTa, XLM-RoBERTa and ELECTRA share BERT's layer layout
FAMILIES = ["bert", "distilbert", "mpnet", "roberta", "xlm-roberta", "electra"]


def tiny_model(family: str = "bert", qa: bool = False, num_labels: int = 2, layers: int = 2,
               heads: int = 4, hidden: int = 32, ffn: int = 48, attn: str = "sdpa", seed: int = 0):
    """A tiny random model; a large init range so that every unit matters to the output.

    ``attn`` falls back to eager for a family without SDPA (MPNet). ELECTRA gets a smaller
    embedding size than its hidden size, so that its embedding projection is exercised.
    """
    torch.manual_seed(seed)
    common = dict(vocab_size=120, max_position_embeddings=128, num_labels=num_labels,
                  initializer_range=0.2)
    if family == "distilbert":
        config = AutoConfig.for_model(family, dim=hidden, n_layers=layers, n_heads=heads,
                                      hidden_dim=ffn, dropout=0.0, attention_dropout=0.0,
                                      **common)
    else:
        extra = {"embedding_size": hidden // 2} if family == "electra" else {}
        config = AutoConfig.for_model(family, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=ffn,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      **extra, **common)
    cls = MODEL_CLASSES[family][1 if qa else 0]
    config._attn_implementation = attn if cls._supports_sdpa else "eager"
    return cls(config).eval()


def tiny_batches(n_batches: int = 3, batch: int = 6, length: int = 10, qa: bool = False,
                 num_labels: int = 2, seed: int = 0) -> list[dict]:
    """Random token batches with some padding and labels of the right kind."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, 120, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[: batch // 2, length - 3:] = 0
        ids[mask == 0] = 0
        b = {"input_ids": ids, "attention_mask": mask}
        if qa:
            b["start_positions"] = torch.randint(0, length - 3, (batch,), generator=g)
            b["end_positions"] = b["start_positions"] + 1
        elif num_labels == 1:
            b["labels"] = torch.rand(batch, generator=g) * 5
        else:
            b["labels"] = torch.randint(0, num_labels, (batch,), generator=g)
        out.append(b)
    return out


def inputs_of(batch: dict) -> dict:
    return {k: v for k, v in batch.items()
            if k not in ("labels", "start_positions", "end_positions")}


def outputs(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs_of(batch))
    if hasattr(out, "logits"):
        return out.logits
    return torch.cat([out.start_logits, out.end_logits], dim=-1)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def write_tokenizer(path: Path) -> None:
    """A tiny WordPiece tokenizer whose vocabulary is the most common SST-2 words."""
    from collections import Counter

    from transformers import BertTokenizerFast

    counts = Counter()
    with open(SHARED / "glue" / "SST-2" / "dev.tsv", encoding="utf-8") as handle:
        for line in handle.read().split("\n")[1:]:
            counts.update(line.split("\t")[0].lower().split())
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [w for w, _ in counts.most_common(115 - len(specials))]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(specials + words) + "\n")
    BertTokenizerFast(vocab=str(path / "vocab.txt")).save_pretrained(path)  # not vocab_file: v5


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny checkpoints (with tokenizer) for end-to-end runs: 2-label and 1-label."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name, labels in (("cls2", 2), ("reg1", 1), ("cls3", 3), ("qa", 2), ("distil_qa", 2)):
        family = "distilbert" if name.startswith("distil") else "bert"
        model = tiny_model(family, qa=name.endswith("qa"), num_labels=labels, layers=2, heads=4,
                           hidden=32, ffn=48)
        model.config.vocab_size = 120
        model.save_pretrained(root / name)
        write_tokenizer(root / name)
        paths[name] = root / name
    return paths

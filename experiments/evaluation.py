"""Evaluate a (masked, pruned or original) classifier on batches of a task's dev set."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from experiments.data import TaskSpec
from experiments.metrics import compute_metrics
from prune.runtime import eval_mode, to_device


@torch.no_grad()
def predict(model: nn.Module, batches: list[dict], progress: bool = False):
    """Logits and gold labels over ``batches``, in batch order."""
    logits, labels = [], []
    with eval_mode(model) as device:
        for batch in tqdm(batches, desc="eval", disable=not progress, leave=False):
            inputs = {k: v for k, v in to_device(batch, device).items() if k != "labels"}
            logits.append(model(**inputs).logits.float().cpu())
            labels.append(batch["labels"])
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(model: nn.Module, batches: list[dict], spec: TaskSpec,
             progress: bool = False) -> dict[str, float]:
    logits, labels = predict(model, batches, progress)
    preds = logits[:, 0] if spec.kind == "regression" else np.argmax(logits, axis=-1)
    return compute_metrics(spec.metric, preds, labels)


@torch.no_grad()
def predict_qa(model: nn.Module, batches: list[dict], progress: bool = False):
    """Unpadded start and end logits per feature, in batch order."""
    starts, ends = [], []
    with eval_mode(model) as device:
        for batch in tqdm(batches, desc="eval", disable=not progress, leave=False):
            out = model(**to_device(batch, device))
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            for row, n in enumerate(lengths):
                starts.append(out.start_logits[row, :n].float().cpu().numpy())
                ends.append(out.end_logits[row, :n].float().cpu().numpy())
    return starts, ends

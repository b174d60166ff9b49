"""The output-level check of a tuning result on held-out samples (beyond the paper).

Tuning fits layer by layer, and with held-out samples each fit is kept only where it lowers
that layer's held-out error (``prune.tune``). A chain of fits that each lower their own layer's
error can still move the model's output away from the teacher's: on MPNet-base RTE, bias
compensation lowered every layer's held-out error and sent every seed to one class. This
module measures the end of the chain.

``output_error``: the squared distance of the pruned model's outputs (the logits; for question
answering the start and end logits of the real tokens) to the unpruned model's on the held-out
samples, relative to the spread of the unpruned model's outputs around their mean (0: the
teacher's outputs; 1: no better than one constant output, the mean).

The pipeline (``PruneOptions.tune_check``, on by default) measures it before tuning (the searched,
rearranged masks) and after; where tuning in ``bias`` or ``weights`` mode made it worse, the masks
are tuned again in the paper's ``mask`` mode and the result with the lower output error is kept.
It costs three forward passes over the held-out samples (and a second tuning where it falls
back).
"""

from __future__ import annotations

import torch
from torch import nn

from prune.arch import Adapter
from prune.masks import Masks, apply_masks
from prune.runtime import eval_mode, to_device, without_labels
from prune.tune import TunedWeights, applied_weights


@torch.no_grad()
def model_outputs(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """Per batch, the model's outputs as ``(rows, values)`` float32 on the CPU: the logits, or
    for question answering the start and end logits of the tokens the attention mask keeps."""
    outs = []
    with eval_mode(model) as device:
        for batch in batches:
            batch = to_device(without_labels(batch), device)
            out = model(**batch)
            if hasattr(out, "start_logits"):
                keep = batch["attention_mask"].bool() if "attention_mask" in batch else \
                    torch.ones_like(out.start_logits, dtype=torch.bool)
                value = torch.stack([out.start_logits[keep], out.end_logits[keep]], dim=1)
            else:
                value = out.logits.reshape(out.logits.shape[0], -1)
            outs.append(value.float().cpu())
    return outs


def relative_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """``sum ||o - r||^2 / sum ||r - mean(r)||^2`` over every row of every batch."""
    o, r = torch.cat(outputs).double(), torch.cat(reference).double()
    if o.shape != r.shape:
        raise ValueError(f"outputs of shape {tuple(o.shape)} against {tuple(r.shape)}")
    spread = float(((r - r.mean(dim=0)) ** 2).sum())
    return float(((o - r) ** 2).sum()) / max(spread, 1e-12)


def output_error(model: nn.Module, adapter: Adapter, batches: list[dict],
                 reference: list[torch.Tensor], masks: Masks,
                 weights: TunedWeights | None = None) -> float:
    """The relative output error of ``model`` under ``masks`` (and tuned ``weights``) against
    the ``reference`` outputs (``model_outputs`` of the unpruned model) on ``batches``."""
    with eval_mode(model) as device:
        masks = masks.to(device)
        with apply_masks(model, adapter, masks), \
                applied_weights(model, adapter, masks, weights or TunedWeights()):
            return relative_error(model_outputs(model, batches), reference)

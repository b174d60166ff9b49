"""Diagonal empirical Fisher information of the head and neuron masks (paper Sec. 4.1).

The task loss with the true labels is back-propagated to mask variables fixed at 1. As in the
official implementation, gradients are taken per mini-batch and their squares summed: the
importance of a unit is ``sum_b g_b^2``, the loss increase (to second order) if it is pruned. The
per-batch gradients are kept as well: mask rearrangement (Sec. 4.2) needs them to form each
layer's Fisher block.

Weights are frozen during the pass, so backward computes only activation gradients.

Mixed precision: ``amp="auto"`` runs the pass under bfloat16 autocast on a CUDA device that
supports it (mask gradients are still accumulated in float32); it stays in float32 on CPU and
on GPUs without bfloat16, where float16 without loss scaling could flush the small mask
gradients to zero. ``amp="bf16"`` forces bfloat16 autocast on any device, ``"off"`` disables it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from prune.arch import Adapter
from prune.errors import PruneError
from prune.masks import Masks, apply_masks


@dataclass
class Fisher:
    head_grads: torch.Tensor  # [num_batches, L, H]
    neuron_grads: torch.Tensor  # [num_batches, L, N]
    num_samples: int

    @property
    def head_importance(self) -> torch.Tensor:  # [L, H]
        return self.head_grads.pow(2).sum(dim=0)

    @property
    def neuron_importance(self) -> torch.Tensor:  # [L, N]
        return self.neuron_grads.pow(2).sum(dim=0)

    def state_dict(self) -> dict:
        return {"head_grads": self.head_grads, "neuron_grads": self.neuron_grads,
                "num_samples": self.num_samples}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Fisher":
        return cls(state["head_grads"], state["neuron_grads"], int(state["num_samples"]))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


AMP_MODES = ("auto", "bf16", "off")


def autocast_dtype(device: torch.device | str, amp: str) -> torch.dtype | None:
    """The autocast dtype ``amp`` selects on ``device`` (``None``: full precision)."""
    if amp not in AMP_MODES:
        raise PruneError(f"amp={amp!r}: use one of {', '.join(AMP_MODES)}")
    device = torch.device(device)
    if amp == "bf16":
        return torch.bfloat16
    if amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def compute_fisher(
    model: nn.Module,
    adapter: Adapter,
    batches: Iterable[dict],
    progress: bool = True,
    amp: str = "auto",
) -> Fisher:
    """Accumulate mask gradients over ``batches`` (dicts of model inputs including labels)."""
    device = next(model.parameters()).device
    dtype = autocast_dtype(device, amp)
    masks = Masks.ones(adapter, device)
    masks.head.requires_grad_(True)
    masks.neuron.requires_grad_(True)
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head_grads, neuron_grads, num_samples = [], [], 0
    try:
        with apply_masks(model, adapter, masks):
            for batch in tqdm(batches, desc="fisher", disable=not progress, leave=False):
                batch = to_device(batch, device)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = model(**batch).loss
                g_head, g_neuron = torch.autograd.grad(loss, [masks.head, masks.neuron])
                head_grads.append(g_head.detach().float().cpu())
                neuron_grads.append(g_neuron.detach().float().cpu())
                num_samples += int(batch["input_ids"].shape[0])
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    if not head_grads:
        raise ValueError("compute_fisher got no batches: the sample set is empty")
    return Fisher(torch.stack(head_grads), torch.stack(neuron_grads), num_samples)

"""Head and FFN-neuron masks (paper Sec. 3.1) and the hooks that apply them.

A head mask ``[L, H]`` scales each head's slice of the attention context before the attention
output projection; a neuron mask ``[L, N]`` scales the FFN activations before the down
projection. Both are forward pre-hooks, so they work with any attention implementation (eager or
SDPA) and do not need the ``head_mask`` argument that transformers 5 removed. A value of 0 means
the unit is pruned; mask tuning (Sec. 4.3) may set kept units to real values other than 1.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from prune.arch import Adapter


@dataclass
class Masks:
    head: torch.Tensor  # [L, H]
    neuron: torch.Tensor  # [L, N]

    @classmethod
    def ones(cls, adapter: Adapter, device: torch.device | str = "cpu") -> "Masks":
        return cls(
            head=torch.ones(adapter.num_layers, adapter.num_heads, device=device),
            neuron=torch.ones(adapter.num_layers, adapter.intermediate_size, device=device),
        )

    def clone(self) -> "Masks":
        return Masks(self.head.detach().clone(), self.neuron.detach().clone())

    def to(self, device: torch.device | str) -> "Masks":
        return Masks(self.head.to(device), self.neuron.to(device))

    def kept(self) -> "Masks":
        """The binary pattern: 1 where a unit is kept, 0 where it is pruned."""
        return Masks((self.head != 0).float(), (self.neuron != 0).float())

    def heads_per_layer(self) -> list[int]:
        return (self.head != 0).sum(dim=1).tolist()

    def neurons_per_layer(self) -> list[int]:
        return (self.neuron != 0).sum(dim=1).tolist()

    def summary(self) -> dict:
        return {
            "heads_per_layer": self.heads_per_layer(),
            "neurons_per_layer": self.neurons_per_layer(),
            "heads_kept": int((self.head != 0).sum()),
            "heads_total": int(self.head.numel()),
            "neurons_kept": int((self.neuron != 0).sum()),
            "neurons_total": int(self.neuron.numel()),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"head": self.head.detach().cpu(), "neuron": self.neuron.detach().cpu()}


def scale_units(x: torch.Tensor, mask_row: torch.Tensor, unit_size: int) -> torch.Tensor:
    """``x`` (B, T, units * unit_size) with each unit's slice scaled by ``mask_row``: one value
    per unit ``[units]``, or one per sample and unit ``[B, units]`` (per-sample gradients).

    Under reduced precision (bfloat16 autocast) the product is taken in float32, so that the
    mask's gradient, a sum over tokens and features, is reduced in float32.
    """
    shape = x.shape
    m = mask_row[:, None, :, None] if mask_row.dim() == 2 else mask_row[:, None]
    if x.dtype == mask_row.dtype:
        return (x.view(*shape[:-1], -1, unit_size) * m).view(shape)
    scaled = x.float().view(*shape[:-1], -1, unit_size) * m.float()
    return scaled.view(shape).to(x.dtype)


def _scale_hook(mask_row: torch.Tensor, unit_size: int):
    """A pre-hook applying ``scale_units`` to a module's first input."""

    def hook(module: nn.Module, args: tuple):
        return (scale_units(args[0], mask_row, unit_size), *args[1:])

    return hook


@contextmanager
def apply_masks(
    model: nn.Module,
    adapter: Adapter,
    masks: Masks | None,
    layers: list[int] | None = None,
) -> Iterator[None]:
    """Apply ``masks`` to ``model`` (all layers, or only ``layers``) inside the block.

    The hooks read the mask tensors at call time, so a mask with ``requires_grad`` receives
    gradients (the Fisher pass) and in-place edits take effect on the next forward. Masks may
    also carry a batch dimension, ``[L, B, H]`` and ``[L, B, N]``: one mask per sample, whose
    gradients are the per-sample gradients.

    On a physically pruned model (``prune.physical.prune_model``) a layer with ``h`` heads and
    ``n`` neurons left takes the first ``h`` and ``n`` entries of its mask rows (the kept units
    in their original order; ``spread_rows`` puts them back); a layer with none left takes
    none.
    """
    handles = []
    if masks is not None:
        for i in range(adapter.num_layers) if layers is None else layers:
            attn_out = adapter.module(model, i, "attn_out")
            ffn_out = adapter.module(model, i, "ffn_out")
            heads = attn_out.in_features // adapter.head_size
            if heads:
                handles.append(attn_out.register_forward_pre_hook(
                    _scale_hook(masks.head[i][..., :heads], adapter.head_size)))
            if ffn_out.in_features:
                handles.append(ffn_out.register_forward_pre_hook(
                    _scale_hook(masks.neuron[i][..., :ffn_out.in_features], 1)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def spread_rows(rows: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``rows`` ``[..., L, U]`` in a physically pruned model's layout (each layer's kept units
    first, in order) put back at the kept units' positions (``kept`` ``[L, U]`` nonzero), with
    zeros at the pruned ones."""
    out = torch.zeros_like(rows)
    for layer in range(kept.shape[0]):
        index = kept[layer].nonzero().flatten().to(rows.device)
        out[..., layer, index] = rows[..., layer, :index.numel()]
    return out

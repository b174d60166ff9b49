"""Importance of heads and neurons: the diagonal Fisher information of their masks (paper
Sec. 4.1).

The loss is back-propagated to mask variables fixed at 1; the importance of a unit is the sum
of its squared gradients over the rows of a ``Fisher`` (the loss increase if the unit is pruned,
to second order). The rows are kept too: mask rearrangement (Sec. 4.2) forms each layer's Fisher
block from them.

``importance="fisher"`` (the paper's empirical Fisher): the task loss with the true labels, one
gradient row per mini-batch, as in the official code.

``importance="fisher_unlabeled"``: the Fisher under the model's own predictive distribution,
which needs no labels (the sample set may be unlabeled text). One row per sample, computed in
one backward pass per batch with one mask per sample:

- classification: the exact expectation over classes, ``sum_c p_c g_c g_c^T`` with
  ``g_c = grad log p_c``. With the logit differences ``d_c = z_c - z_0`` (``c = 1..C-1``) it is
  ``J^T (diag(q) - q q^T) J`` (``q = p_1..p_{C-1}``, ``J`` the Jacobian of ``d``): ``C - 1``
  backward passes and ``C - 1`` rows per sample (one for a binary task);
- regression: the Gaussian model ``y ~ N(f(x), sigma^2)`` gives ``grad f grad f^T / sigma^2``:
  one row per sample, ``grad f`` (``sigma`` scales every unit alike and does not change masks);
- question answering: start and end positions drawn from the model's softmax over the window
  (seeded), then the usual loss: an unbiased estimate of the same Fisher.

Weights are frozen during the pass, so backward computes only activation gradients.

Precision: ``amp="auto"`` (the default) and ``"off"`` run the pass in float32 on every device
(``autocast_dtype`` says why: bfloat16 autocast was 12-17x slower on real, variable-length
batches on an H200). ``amp="bf16"`` asks for bfloat16 autocast; mask products and their
gradients then stay in float32 (``prune.masks.scale_units``) and rows are accumulated in
float32. float16 is never used: without loss scaling it could flush small mask gradients to
zero.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import torch
from torch import nn
from transformers.utils.logging import tqdm

from prune.arch import Adapter
from prune.errors import PruneError
from prune.masks import Masks, apply_masks, spread_rows
from prune.runtime import LABEL_KEYS, eval_mode, to_device, without_labels

AMP_MODES = ("auto", "bf16", "off")
IMPORTANCE = ("fisher", "fisher_unlabeled")


@dataclass
class Fisher:
    head_grads: torch.Tensor  # [rows, L, H]
    neuron_grads: torch.Tensor  # [rows, L, N]
    num_samples: int
    rows: str = "batch"  # what a row is: one mini-batch's gradient, or one sample's

    @property
    def head_importance(self) -> torch.Tensor:  # [L, H]
        return self.head_grads.pow(2).sum(dim=0)

    @property
    def neuron_importance(self) -> torch.Tensor:  # [L, N]
        return self.neuron_grads.pow(2).sum(dim=0)

    def check_finite(self) -> "Fisher":
        """Raise if any gradient is NaN or infinite (e.g. NaN labels): such a Fisher would
        prune every unit."""
        if not (torch.isfinite(self.head_grads).all() and torch.isfinite(self.neuron_grads).all()):
            raise PruneError("the Fisher information has NaN or infinite values: the loss was "
                             "not finite on the sample set (check for NaN labels or scores, or "
                             "a diverged model)")
        return self

    def state_dict(self) -> dict:
        return {"head_grads": self.head_grads, "neuron_grads": self.neuron_grads,
                "num_samples": self.num_samples, "rows": self.rows}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Fisher":
        return cls(state["head_grads"], state["neuron_grads"], int(state["num_samples"]),
                   state.get("rows", "batch"))

    def spread(self, kept: Masks) -> "Fisher":
        """The Fisher of a physically pruned model (each layer's kept units first,
        ``prune.masks.apply_masks``) in the unpruned model's layout: zero for pruned units."""
        return replace(self, head_grads=spread_rows(self.head_grads, kept.head),
                       neuron_grads=spread_rows(self.neuron_grads, kept.neuron))

    @classmethod
    def concat(cls, parts: list["Fisher"]) -> "Fisher":
        return replace(parts[0], head_grads=torch.cat([p.head_grads for p in parts]),
                       neuron_grads=torch.cat([p.neuron_grads for p in parts]),
                       num_samples=sum(p.num_samples for p in parts))


def autocast_dtype(device: torch.device | str, amp: str) -> torch.dtype | None:
    """The autocast dtype ``amp`` selects on ``device`` (``None``: full precision).

    ``auto`` is float32 on every device: on an H200 (torch 2.11), bfloat16 autocast made the
    Fisher pass 12-17x slower on real batches padded to each batch's longest sentence (15.4 s
    against 0.9 s on the MiniLM demo, SST-2), and only 1.2x faster on fixed 128-token batches;
    its masks matched float32's (Jaccard >= 0.99). ``bf16`` asks for autocast explicitly (it
    needs a device that supports it)."""
    if amp not in AMP_MODES:
        raise PruneError(f"amp={amp!r}: use one of {', '.join(AMP_MODES)}")
    device = torch.device(device)
    if amp == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise PruneError("amp=bf16: this GPU has no bfloat16; use amp=off or amp=auto")
        return torch.bfloat16
    return None


def _ones(adapter: Adapter, batch: int | None, device: torch.device) -> Masks:
    """Mask variables at 1 that require gradients: shared ``[L, H]``, or per sample."""
    lead = (adapter.num_layers,) if batch is None else (adapter.num_layers, batch)
    masks = Masks(torch.ones(*lead, adapter.num_heads, device=device),
                  torch.ones(*lead, adapter.intermediate_size, device=device))
    masks.head.requires_grad_(True)
    masks.neuron.requires_grad_(True)
    return masks


def _grads(output: torch.Tensor, masks: Masks, retain: bool = False):
    """The gradients of ``output`` to the masks (zero for a mask that no layer used: a
    physically pruned model with no head, or no neuron, left anywhere)."""
    grads = torch.autograd.grad(output, [masks.head, masks.neuron], retain_graph=retain,
                                allow_unused=True)
    g_head, g_neuron = (torch.zeros_like(m) if g is None else g
                        for g, m in zip(grads, (masks.head, masks.neuron), strict=True))
    return g_head.detach().float(), g_neuron.detach().float()


def _labelled_rows(model, adapter, batch, dtype, device, generator):
    """One row: the gradient of the mini-batch's mean loss with its true labels."""
    masks = _ones(adapter, None, device)
    with apply_masks(model, adapter, masks), _autocast(device, dtype):
        loss = model(**batch).loss
    g_head, g_neuron = _grads(loss, masks)
    return g_head[None].cpu(), g_neuron[None].cpu()


def _unlabeled_rows(model, adapter, batch, dtype, device, generator):
    """Rows whose outer products sum to each sample's Fisher under the model's predictions."""
    inputs = without_labels(batch)
    size = int(inputs["input_ids"].shape[0])
    masks = _ones(adapter, size, device)
    with apply_masks(model, adapter, masks), _autocast(device, dtype):
        out = model(**inputs)
    if hasattr(out, "start_logits"):
        return _sampled_positions_rows(model, adapter, inputs, out, masks, generator)
    logits = out.logits.float()  # (B, C)
    if logits.shape[-1] == 1:  # regression: grad of the prediction
        return tuple(g.transpose(0, 1).cpu() for g in _grads(logits.sum(), masks))
    p = torch.softmax(logits.detach(), dim=-1)
    q = p[:, 1:]  # (B, C-1)
    cov = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]  # (B, C-1, C-1)
    vals, vecs = torch.linalg.eigh(cov.double())
    root = (vecs * vals.clamp_min(0).sqrt()[:, None, :]).transpose(1, 2).float()  # R^T R = cov
    jac_h, jac_n = [], []
    for c in range(1, logits.shape[-1]):
        diff = (logits[:, c] - logits[:, 0]).sum()
        g_h, g_n = _grads(diff, masks, retain=c < logits.shape[-1] - 1)
        jac_h.append(g_h.transpose(0, 1))  # (B, L, H)
        jac_n.append(g_n.transpose(0, 1))
    jh, jn = torch.stack(jac_h, 1), torch.stack(jac_n, 1)  # (B, C-1, L, units)
    rows_h = torch.einsum("bkc,bclu->bklu", root, jh).flatten(0, 1)
    rows_n = torch.einsum("bkc,bclu->bklu", root, jn).flatten(0, 1)
    return rows_h.cpu(), rows_n.cpu()


def _sampled_positions_rows(model, adapter, inputs, out, masks, generator):
    """QA: per-sample gradients of the loss at start/end positions drawn from the model."""
    valid = inputs["attention_mask"].bool()
    total = 0.0
    for logits in (out.start_logits, out.end_logits):
        logits = logits.float().masked_fill(~valid, -1e4)
        probs = torch.softmax(logits.detach(), dim=-1).cpu()
        drawn = torch.multinomial(probs, 1, generator=generator).to(logits.device)
        total = total - torch.log_softmax(logits, dim=-1).gather(1, drawn).sum() / 2
    return tuple(g.transpose(0, 1).cpu() for g in _grads(total, masks))


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def fisher_chunks(
    model: nn.Module,
    adapter: Adapter,
    batches: Iterable[dict],
    importance: str = "fisher",
    amp: str = "auto",
    progress: bool = True,
    seed: int = 0,
) -> Iterator[Fisher]:
    """The Fisher rows of each batch in turn (``Fisher.concat`` joins them)."""
    if importance not in IMPORTANCE:
        raise PruneError(f"importance={importance!r}: use one of {', '.join(IMPORTANCE)}")
    rows_of = _labelled_rows if importance == "fisher" else _unlabeled_rows
    kind = "batch" if importance == "fisher" else "sample"
    generator = torch.Generator().manual_seed(seed)
    with eval_mode(model, freeze=True) as device:
        dtype = autocast_dtype(device, amp)
        for batch in tqdm(batches, desc="fisher", disable=not progress, leave=False):
            if importance == "fisher" and not any(k in batch for k in LABEL_KEYS):
                raise PruneError("the empirical Fisher needs labels in every batch; use "
                                 "importance='fisher_unlabeled' for unlabeled samples")
            g_head, g_neuron = rows_of(model, adapter, to_device(batch, device), dtype, device,
                                       generator)
            yield Fisher(g_head, g_neuron, int(batch["input_ids"].shape[0]), kind)


def compute_fisher(
    model: nn.Module,
    adapter: Adapter,
    batches: Iterable[dict],
    progress: bool = True,
    amp: str = "auto",
    importance: str = "fisher",
    seed: int = 0,
) -> Fisher:
    """The Fisher information of the masks over ``batches`` (dicts of model inputs; with
    labels for ``importance="fisher"``)."""
    parts = list(fisher_chunks(model, adapter, batches, importance, amp, progress, seed))
    if not parts:
        raise PruneError("compute_fisher got no batches: the sample set is empty")
    return Fisher.concat(parts)

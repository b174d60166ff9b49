"""Mask tuning: layer-wise least squares on the kept mask values (paper Sec. 4.3).

Layer by layer, the real-valued scales of the kept heads, then of the kept neurons, are fitted so
that the pruned layer's pre-LayerNorm sum (sublayer output + residual) reconstructs the
teacher's. The teacher is the unpruned model by default (``teacher=None``); passing the
"teacher-assistant" masks of the official code is an option. The student's layer inputs come from
the already-tuned pruned layers below it, so later layers correct earlier errors.

Each layer's inputs are cached once (teacher and student) and each layer is run alone on them:
the model is never re-run from the embeddings. Per layer the normal equations ``G m = c`` are
accumulated over the sample set and solved for ``delta = m - m_old`` with a ridge term
``damp * mean(diag G)`` (a pull towards the current values, like the official damped LSMR),
by Cholesky with a ``lstsq`` fallback. A solve that fails or gives a scale outside
``[-max_scale, max_scale]`` keeps that layer's old values, with a warning; unlike the official
code, tuning then goes on with the next layer. Layers with no kept unit are skipped; one kept unit
is an ordinary 1x1 solve.

Differences from the official code, deliberately: the target is the teacher's true pre-LN sum
(the official FFN target missed the teacher's neuron mask); the first layer's attention is tuned
too; no constant bias column is fitted. For sequence classification the last layer's FFN is fitted
on the [CLS] token only, as in the official code.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from prune.arch import Adapter
from prune.fisher import to_device
from prune.masks import Masks, apply_masks

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from a hook to end a forward pass early, once what is needed was captured."""


@dataclass
class TuneStats:
    """Relative reconstruction error ``||Y m - r||^2 / ||r||^2`` per layer, before and after."""

    attn_before: list[float] = field(default_factory=list)
    attn_after: list[float] = field(default_factory=list)
    ffn_before: list[float] = field(default_factory=list)
    ffn_after: list[float] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@contextmanager
def _capture(store: dict, hooks: list[tuple[nn.Module, str, str]], stop_at: str | None = None):
    """Record module inputs (``kind='in'``, before any mask hook) or outputs (``'out'``)."""
    handles = []
    for module, key, kind in hooks:
        if kind == "in":
            def pre(m, args, key=key):
                store[key] = args[0]
                if key == stop_at:
                    raise _Stop
            handles.append(module.register_forward_pre_hook(pre, prepend=True))
        else:
            def post(m, args, out, key=key):
                store[key] = out
            handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _layer_inputs(model: nn.Module, adapter: Adapter, batches: list[dict]) -> list[tuple]:
    """Run the embeddings once per batch and keep what the first layer receives."""
    first = adapter.layers(model)[0]
    cache: list[tuple] = []

    def grab(module, args, kwargs):
        cache.append((args[0], args[1:], kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items()
                      if k not in ("labels", "start_positions", "end_positions")}
            try:
                model(**inputs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return cache


def _run_layer(layer: nn.Module, hidden: torch.Tensor, extra: tuple) -> torch.Tensor | None:
    args, kwargs = extra
    try:
        out = layer(hidden, *args, **kwargs)
    except _Stop:
        return None
    return out[0] if isinstance(out, tuple) else out


def _solve(G: torch.Tensor, rhs: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Solve ``(G + damp * mean(diag G) I) x = rhs``; ``None`` if it cannot be solved."""
    n = G.shape[0]
    lam = damp * float(G.diagonal().mean().clamp_min(1e-12))
    A = G + lam * torch.eye(n, dtype=G.dtype)
    chol, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        x = torch.cholesky_solve(rhs[:, None], chol)[:, 0]
    else:
        x = torch.linalg.lstsq(A, rhs[:, None]).solution[:, 0]
    return x if torch.isfinite(x).all() else None


class _Normal:
    """Accumulates ``G = Y^T Y``, ``c = Y^T r`` and ``||r||^2`` (float64) for one solve."""

    def __init__(self, n: int):
        self.G = torch.zeros(n, n, dtype=torch.float64)
        self.c = torch.zeros(n, dtype=torch.float64)
        self.rr = 0.0

    def add(self, G: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> None:
        self.G += G.double().cpu()
        self.c += c.double().cpu()
        self.rr += float(r.double().pow(2).sum())

    def error(self, m: torch.Tensor) -> float:
        """Relative squared residual of scales ``m``."""
        m = m.double()
        err = float(m @ self.G @ m - 2 * self.c @ m) + self.rr
        return max(err, 0.0) / max(self.rr, 1e-30)


def _fit(normal: _Normal, old: torch.Tensor, damp: float, max_scale: float,
         what: str, stats: TuneStats) -> tuple[torch.Tensor, float, float]:
    old64 = old.double().cpu()
    before = normal.error(old64)
    delta = _solve(normal.G, normal.c - normal.G @ old64, damp)
    new = None if delta is None else old64 + delta
    if new is None or new.abs().max() > max_scale:
        reason = "solver failed" if new is None else f"scale {float(new.abs().max()):.3g}"
        log.warning("mask tuning of %s: %s; keeping its previous mask values", what, reason)
        stats.fallbacks.append(f"{what}: {reason}")
        return old, before, before
    return new.to(old.dtype).to(old.device), before, normal.error(new)


def _select(x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Flatten (B, T, ...) to the selected tokens (T', ...)."""
    return x[token_mask]


@torch.no_grad()
def tune_masks(
    model: nn.Module,
    adapter: Adapter,
    masks: Masks,
    batches: list[dict],
    teacher: Masks | None = None,
    damp: float = 1e-2,
    max_scale: float = 10.0,
    cls_only_last: bool = False,
    progress: bool = True,
) -> tuple[Masks, TuneStats]:
    """Fit the kept mask values of ``masks`` layer by layer; returns new masks and statistics."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = [to_device(b, device) for b in batches]
    masks = masks.clone().to(device)
    teacher = teacher.to(device) if teacher is not None else None
    stats = TuneStats()
    student_in = _layer_inputs(model, adapter, batches)
    teacher_in = list(student_in)
    token_masks = [b["attention_mask"].bool() for b in batches]
    layers = adapter.layers(model)
    try:
        for l in tqdm(range(adapter.num_layers), desc="tune", disable=not progress, leave=False):
            last = l == adapter.num_layers - 1
            ffn_tokens = token_masks
            if cls_only_last and last:
                ffn_tokens = [torch.zeros_like(t).index_fill_(1, torch.tensor([0], device=device),
                                                               True) for t in token_masks]
            targets = _teacher_pass(model, adapter, layers[l], l, teacher, teacher_in,
                                    token_masks, ffn_tokens)
            attn_normal = _attention_pass(model, adapter, layers[l], l, masks, student_in,
                                          token_masks, targets[0])
            kept = masks.head[l].nonzero().flatten()
            if kept.numel():
                new, before, after = _fit(attn_normal, masks.head[l, kept], damp, max_scale,
                                          f"layer {l} heads", stats)
                masks.head[l, kept] = new
                stats.attn_before.append(before)
                stats.attn_after.append(after)
            ffn_normal = _ffn_pass(model, adapter, layers[l], l, masks, student_in,
                                   ffn_tokens, targets[1])
            kept = masks.neuron[l].nonzero().flatten()
            if kept.numel():
                new, before, after = _fit(ffn_normal, masks.neuron[l, kept], damp, max_scale,
                                          f"layer {l} neurons", stats)
                masks.neuron[l, kept] = new
                stats.ffn_before.append(before)
                stats.ffn_after.append(after)
            if not last:
                with apply_masks(model, adapter, masks, layers=[l]):
                    student_in = [(_run_layer(layers[l], h, (a, k)), a, k)
                                  for h, a, k in student_in]
    finally:
        model.train(was_training)
    return masks, stats


def _teacher_pass(model, adapter, layer, l, teacher, teacher_in, token_masks, ffn_tokens):
    """Run the teacher's layer ``l``; keep its pre-LN sums and advance its inputs in place."""
    attn_targets, ffn_targets = [], []
    store: dict = {}
    hooks = [(adapter.module(model, l, "attn_norm"), "z_attn", "in"),
             (adapter.module(model, l, "ffn_norm"), "z_ffn", "in")]
    with apply_masks(model, adapter, teacher, layers=[l]), _capture(store, hooks):
        for b, (h, args, kwargs) in enumerate(teacher_in):
            out = _run_layer(layer, h, (args, kwargs))
            attn_targets.append(_select(store["z_attn"], token_masks[b]))
            ffn_targets.append(_select(store["z_ffn"], ffn_tokens[b]))
            teacher_in[b] = (out, args, kwargs)
    return attn_targets, ffn_targets


def _attention_pass(model, adapter, layer, l, masks, student_in, token_masks, targets):
    """Normal equations of the kept heads' scales of layer ``l`` (student stops at attn norm)."""
    kept = masks.head[l].nonzero().flatten()
    out_proj = adapter.module(model, l, "attn_out")
    dh = adapter.head_size
    W = out_proj.weight.view(out_proj.weight.shape[0], -1, dh)[:, kept]  # [D, K, dh]
    bias = out_proj.bias if out_proj.bias is not None else 0.0
    normal = _Normal(kept.numel())
    store: dict = {}
    hooks = [(out_proj, "u", "in"), (out_proj, "o", "out"),
             (adapter.module(model, l, "attn_norm"), "z", "in")]
    with apply_masks(model, adapter, masks, layers=[l]), _capture(store, hooks, stop_at="z"):
        for b, (h, args, kwargs) in enumerate(student_in):
            _run_layer(layer, h, (args, kwargs))
            if kept.numel() == 0:
                continue
            sel = token_masks[b]
            u = _select(store["u"], sel).view(-1, masks.head.shape[1], dh)[:, kept]  # [T, K, dh]
            residual = _select(store["z"] - store["o"], sel)  # [T, D]
            r = targets[b] - bias - residual  # [T, D]
            Y = torch.einsum("tkd,ekd->kte", u, W)  # [K, T, D]
            normal.add(torch.einsum("kte,jte->kj", Y, Y), torch.einsum("kte,te->k", Y, r), r)
    return normal


def _ffn_pass(model, adapter, layer, l, masks, student_in, ffn_tokens, targets):
    """Normal equations of the kept neurons' scales of layer ``l``."""
    kept = masks.neuron[l].nonzero().flatten()
    down = adapter.module(model, l, "ffn_out")
    W = down.weight[:, kept]  # [D, K]
    WtW = W.t() @ W  # [K, K]
    bias = down.bias if down.bias is not None else 0.0
    normal = _Normal(kept.numel())
    store: dict = {}
    hooks = [(down, "a", "in"), (down, "o", "out"),
             (adapter.module(model, l, "ffn_norm"), "z", "in")]
    with apply_masks(model, adapter, masks, layers=[l]), _capture(store, hooks, stop_at="z"):
        for b, (h, args, kwargs) in enumerate(student_in):
            _run_layer(layer, h, (args, kwargs))
            if kept.numel() == 0:
                continue
            sel = ffn_tokens[b]
            a = _select(store["a"], sel)[:, kept]  # [T, K]
            r = targets[b] - bias - _select(store["z"] - store["o"], sel)  # [T, D]
            normal.add((a.t() @ a) * WtW, (a * (r @ W)).sum(dim=0), r)
    return normal

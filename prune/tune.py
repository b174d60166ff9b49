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


def repack_by_length(batches: list[dict], batch_size: int | None = None) -> list[dict]:
    """The same samples regrouped by length, so that batches carry almost no padding.

    Least squares sums over tokens, so the grouping does not change the solution; it only
    removes the padded positions every layer would otherwise compute. Labels are dropped.
    """
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batches[0]]
    batch_size = batch_size or max(int(b["input_ids"].shape[0]) for b in batches)
    rows = [(int(b["attention_mask"][i].sum()), {k: b[k][i] for k in keys})
            for b in batches for i in range(b["input_ids"].shape[0])]
    rows.sort(key=lambda r: r[0])
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(n for n, _ in chunk)
        out.append({k: torch.stack([_fit_width(row[k], width) for _, row in chunk])
                    for k in keys})
    return out


def _fit_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Cut or zero-pad a 1-d row to ``width`` (positions past the length are padding)."""
    return x[:width] if x.numel() >= width else torch.nn.functional.pad(x, (0, width - x.numel()))


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
    activation_cache_bytes: int = 1 << 30,
) -> tuple[Masks, TuneStats]:
    """Fit the kept mask values of ``masks`` layer by layer; returns new masks and statistics.

    Per layer and batch: one teacher forward of the layer, one student pass up to the attention
    context, then the kept heads' output projection, the kept neurons' up projection and their
    down projection; the student layer is never run again whole. The kept neurons' activations
    are held for the layer's output when they fit in ``activation_cache_bytes`` (else they are
    recomputed), so at most about six activation caches of the tuning set are alive at once.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = [to_device(b, device) for b in repack_by_length(batches)]
    masks = masks.clone().to(device)
    teacher = teacher.to(device) if teacher is not None else None
    stats = TuneStats()
    student_in = _layer_inputs(model, adapter, batches)
    teacher_in = list(student_in)
    tokens = [b["attention_mask"].bool() for b in batches]
    positions = sum(t.numel() for t in tokens)
    try:
        for l in tqdm(range(adapter.num_layers), desc="tune", disable=not progress, leave=False):
            ffn_tokens = tokens
            if cls_only_last and l == adapter.num_layers - 1:
                ffn_tokens = [_first_token(t) for t in tokens]
            attn_targets, ffn_targets = _teacher_pass(model, adapter, l, teacher, teacher_in,
                                                      tokens, ffn_tokens)
            contexts, normal = _attention_pass(model, adapter, l, masks, student_in, tokens,
                                               attn_targets)
            del attn_targets  # consumed: keep peak memory to five activation caches
            _update(masks.head, l, normal, damp, max_scale, f"layer {l} heads",
                    stats.attn_before, stats.attn_after, stats)
            last = l == adapter.num_layers - 1
            kept = int(masks.neuron[l].count_nonzero())
            keep = not last and positions * kept * 4 <= activation_cache_bytes
            ffn_inputs, activations, normal = _ffn_pass(model, adapter, l, masks, student_in,
                                                        contexts, ffn_tokens, ffn_targets, keep)
            del contexts, ffn_targets
            _update(masks.neuron, l, normal, damp, max_scale, f"layer {l} neurons",
                    stats.ffn_before, stats.ffn_after, stats)
            if not last:
                student_in = [
                    (_ffn_block(model, adapter, l, y, masks.neuron[l],
                                activations[i] if activations else None), a, k)
                    for i, (y, (_, a, k)) in enumerate(zip(ffn_inputs, student_in,
                                                             strict=True))]
            del ffn_inputs, activations
    finally:
        model.train(was_training)
    return masks, stats


def _first_token(token_mask: torch.Tensor) -> torch.Tensor:
    first = torch.zeros_like(token_mask)
    first[:, 0] = True
    return first


def _update(mask: torch.Tensor, l: int, normal: "_Normal", damp: float, max_scale: float,
            what: str, before: list, after: list, stats: TuneStats) -> None:
    kept = mask[l].nonzero().flatten()
    if kept.numel() == 0:
        return
    new, err_before, err_after = _fit(normal, mask[l, kept], damp, max_scale, what, stats)
    mask[l, kept] = new
    before.append(err_before)
    after.append(err_after)


def _teacher_pass(model, adapter, l, teacher, teacher_in, tokens, ffn_tokens):
    """Run the teacher's layer ``l``; keep its pre-LN sums and advance its inputs in place."""
    attn_targets, ffn_targets = [], []
    store: dict = {}
    hooks = [(adapter.module(model, l, "attn_norm"), "z_attn", "in"),
             (adapter.module(model, l, "ffn_norm"), "z_ffn", "in")]
    layer = adapter.layers(model)[l]
    with apply_masks(model, adapter, teacher, layers=[l]), _capture(store, hooks):
        for b, (h, args, kwargs) in enumerate(teacher_in):
            out = _run_layer(layer, h, (args, kwargs))
            attn_targets.append(store["z_attn"][tokens[b]])
            ffn_targets.append(store["z_ffn"][ffn_tokens[b]])
            teacher_in[b] = (out, args, kwargs)
    return attn_targets, ffn_targets


def _kept_columns(kept: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Feature indices of the kept units when each unit spans ``unit_size`` features."""
    return (kept[:, None] * unit_size + torch.arange(unit_size, device=kept.device)).flatten()


def _attention_pass(model, adapter, l, masks, student_in, tokens, targets):
    """Normal equations of the kept heads' scales; also returns each batch's kept context.

    Head k contributes ``Y_k = u_k W_k^T`` (context slice times its block of the output
    projection) to every token, so ``G_kj = sum_t <Y_k, Y_j> = <W_k^T W_j, sum_t u_k^T u_j>``:
    the per-token work is one (K dh)^2 Gram of the kept contexts and one projection of the target,
    and ``Y`` (K x tokens x D) is never built.
    """
    kept = masks.head[l].nonzero().flatten()
    out_proj = adapter.module(model, l, "attn_out")
    dh = adapter.head_size
    cols = _kept_columns(kept, dh)
    W = out_proj.weight[:, cols]  # [D, K dh]
    bias = out_proj.bias if out_proj.bias is not None else 0.0
    normal = _Normal(kept.numel())
    S = torch.zeros(cols.numel(), cols.numel(), dtype=torch.float64)
    cu = torch.zeros(cols.numel(), dtype=torch.float64)
    contexts, store = [], {}
    layer = adapter.layers(model)[l]
    with _capture(store, [(out_proj, "u", "in")], stop_at="u"):
        for b, (h, args, kwargs) in enumerate(student_in):
            _run_layer(layer, h, (args, kwargs))
            u = store.pop("u")[..., cols]  # (B, T, K dh), before any mask
            contexts.append(u)
            if kept.numel() == 0:
                continue
            ut = u[tokens[b]]  # [T, K dh]
            r = targets[b] - bias - h[tokens[b]]  # [T, D]: what the kept heads must produce
            S += (ut.t() @ ut).double().cpu()
            cu += ((r @ W) * ut).sum(dim=0).double().cpu()
            normal.rr += float(r.double().pow(2).sum())
    if kept.numel():
        k = kept.numel()
        M = (W.double().t() @ W.double()).cpu()
        normal.G = (M * S).view(k, dh, k, dh).sum(dim=(1, 3))
        normal.c = cu.view(k, dh).sum(dim=1)
    return contexts, normal


def _ffn_pass(model, adapter, l, masks, student_in, contexts, ffn_tokens, targets,
              keep_activations: bool):
    """FFN inputs under the tuned head masks, and the normal equations of the kept neurons.

    Only the kept neurons' activations are computed (the activation is elementwise). With
    ``keep_activations`` they are returned for every position, so that the layer's output can
    be formed without recomputing them; otherwise only the fitted tokens' are computed.
    """
    kept_heads = masks.head[l].nonzero().flatten()
    out_proj = adapter.module(model, l, "attn_out")
    W_attn = out_proj.weight[:, _kept_columns(kept_heads, adapter.head_size)]
    head_scale = masks.head[l, kept_heads].repeat_interleave(adapter.head_size)
    attn_bias = out_proj.bias
    attn_norm = adapter.module(model, l, "attn_norm")
    kept = masks.neuron[l].nonzero().flatten()
    down = adapter.module(model, l, "ffn_out")
    W = down.weight[:, kept]  # [D, K]
    WtW = W.double().t() @ W.double()  # [K, K]
    bias = down.bias if down.bias is not None else 0.0
    normal = _Normal(kept.numel())
    AtA = torch.zeros(kept.numel(), kept.numel(), dtype=torch.float32, device=W.device)
    c = torch.zeros(kept.numel(), dtype=torch.float64)
    inputs, activations = [], []
    for b, ((h, _, _), u) in enumerate(zip(student_in, contexts, strict=True)):
        y = attn_norm(h + nn.functional.linear(u * head_scale, W_attn, attn_bias))  # (B, T, D)
        inputs.append(y)
        if kept.numel() == 0:
            continue
        sel = ffn_tokens[b]
        if keep_activations:
            a_all = _kept_activations(model, adapter, l, y, kept)  # (B, T, K)
            activations.append(a_all)
            a = a_all[sel]
        else:
            a = _kept_activations(model, adapter, l, y[sel], kept)  # [T, K]
        r = targets[b] - bias - y[sel]  # [T, D]
        AtA += a.t() @ a
        c += (a * (r @ W)).sum(dim=0).double().cpu()
        normal.rr += float(r.double().pow(2).sum())
    normal.G = (AtA.double() * WtW).cpu()
    normal.c = c
    return inputs, activations, normal


def _kept_activations(model, adapter, l, y: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``ffn_act(ffn_in(y))`` for the kept neurons only."""
    up = adapter.module(model, l, "ffn_in")
    b = up.bias[kept] if up.bias is not None else None
    return adapter.module(model, l, "ffn_act")(nn.functional.linear(y, up.weight[kept], b))


def _ffn_block(model, adapter, l, y: torch.Tensor, neuron_mask: torch.Tensor,
               activations: torch.Tensor | None) -> torch.Tensor:
    """The student layer's output from its FFN input ``y`` (post-LN residual block)."""
    down = adapter.module(model, l, "ffn_out")
    kept = neuron_mask.nonzero().flatten()
    a = activations if activations is not None else _kept_activations(model, adapter, l, y, kept)
    out = nn.functional.linear(a * neuron_mask[kept], down.weight[:, kept], down.bias)
    return adapter.module(model, l, "ffn_norm")(y + out)

"""Importance that counts what reconstruction recovers (beyond the paper; structured OBS).

The Fisher importance of a unit is the loss increase when it is removed and nothing else
changes. Weight reconstruction (``tune=weights``) then refits the layer's output projection on
the units it keeps, which recovers whatever part of the removed unit's contribution the kept
units can express linearly. Optimal Brain Surgeon, for a set ``Q`` of input columns of a linear
layer ``y = W x + b`` fitted by least squares on inputs with covariance ``C`` (the bias absorbs
the means), gives the error left after the optimal update of every other column:

    E_obs(Q) = tr(W_Q (C^-1)_QQ^-1 W_Q^T)

against ``E_plain(Q) = tr(W_Q H_QQ W_Q^T)`` with nothing refitted (``H`` the uncentred second
moment). ``unrecovered`` returns ``E_obs / E_plain`` per head (``Q`` its ``head_size`` context
columns of the attention output projection) and per FFN neuron (one column of the down
projection), in ``(0, 1]``: 1 for a unit nothing else can stand in for, near 0 for one the others
reproduce. ``discounted`` scales a ``Fisher``'s rows by its square root, so the search and the
rearrangement both rank units by their Fisher importance times the share reconstruction cannot
recover.

Each unit is judged with all the others present (one-at-a-time OBS); units that stand in for
each other are all discounted, which iterative pruning (``PruneOptions.steps``) re-measures on
the pruned model. ``greedy_unrecovered`` (``prune.obs_greedy``) removes that flaw as structured
OBS does: per layer it removes the units one block at a time, the lowest ``Fisher x share``
first, applies the optimal update of the rest after each removal (the weights and the inverse
covariance of the columns left), and gives each unit the share it had when it went: its error
after the updates so far over the error the Fisher importance measured (nothing refitted, the
original weights), which exceeds 1 for a unit that took over the work of units removed before
it. Of two copies, the first to go is free and the second then carries both. The moments come
from one forward pass (real tokens only) over the samples given; ``damp`` (relative to
``mean(diag C)``) conditions the inverse.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace

import torch
from torch import nn

from prune.arch import Adapter
from prune.fisher import Fisher
from prune.runtime import eval_mode, to_device, without_labels


class _Moments:
    """Sums over real tokens of ``x`` and ``x x^T`` (float64) of one projection's input."""

    def __init__(self, width: int, device: torch.device):
        self.n = 0
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.outer = torch.zeros(width, width, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        self.n += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x


@torch.no_grad()
def input_moments(model: nn.Module, adapter: Adapter,
                  batches: list[dict]) -> dict[tuple[int, str], _Moments]:
    """The moments of every layer's attention-output and FFN-output projection inputs."""
    stats: dict[tuple[int, str], _Moments] = {}
    tokens: list[torch.Tensor] = []

    def hook(key):
        def record(module, args):
            x = args[0]
            real = tokens[-1].reshape(-1)
            stats[key].add(x.reshape(-1, x.shape[-1])[real])
        return record

    with eval_mode(model) as device, ExitStack() as stack:
        for layer in range(adapter.num_layers):
            for part, name in (("attn", "attn_out"), ("ffn", "ffn_out")):
                module = adapter.module(model, layer, name)
                stats[(layer, part)] = _Moments(module.in_features, device)
                stack.callback(module.register_forward_pre_hook(hook((layer, part))).remove)
        for batch in batches:
            batch = to_device(without_labels(batch), device)
            tokens.append(batch["attention_mask"].bool())
            model(**batch)
    return stats


def _moments_and_inverse(m: _Moments, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The uncentred second moment ``H`` and the damped inverse covariance ``C^-1``."""
    n = max(m.n, 1)
    second = m.outer / n
    mean = m.sum / n
    cov = second - torch.outer(mean, mean)
    ridge = damp * float(cov.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return second, torch.linalg.inv(cov + ridge * eye)


def _head_shares(m: _Moments, weight: torch.Tensor, size: int, damp: float) -> torch.Tensor:
    """``E_obs / E_plain`` of each block of ``size`` columns (a head's context)."""
    second, inv = _moments_and_inverse(m, damp)
    w = weight.detach().double()
    out = torch.ones(second.shape[0] // size, dtype=torch.float64)
    for b in range(out.numel()):
        cols = slice(b * size, (b + 1) * size)
        wq = w[:, cols]
        plain = float(torch.einsum("oi,ij,oj->", wq, second[cols, cols], wq))
        if plain <= 0:
            continue  # a head whose output is always zero: nothing to lose or recover
        obs = float(torch.einsum("oi,ij,oj->", wq, torch.linalg.inv(inv[cols, cols]), wq))
        out[b] = min(max(obs / plain, 0.0), 1.0)
    return out


def _neuron_shares(m: _Moments, damp: float) -> torch.Tensor:
    """Single columns in closed form, whatever the weights: ``1 / (H_ii (C^-1)_ii)``."""
    second, inv = _moments_and_inverse(m, damp)
    denom = second.diagonal() * inv.diagonal()
    share = torch.where(denom > 0, 1.0 / denom.clamp_min(1e-30), torch.ones_like(denom))
    return share.clamp(0.0, 1.0).cpu()


def unrecovered(model: nn.Module, adapter: Adapter, batches: list[dict],
                damp: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """The share of each head's ``[L, H]`` and each neuron's ``[L, N]`` removal error that the
    least-squares update of the rest of its layer cannot recover."""
    stats = input_moments(model, adapter, batches)
    heads = torch.ones(adapter.num_layers, adapter.num_heads, dtype=torch.float64)
    neurons = torch.ones(adapter.num_layers, adapter.intermediate_size, dtype=torch.float64)
    for layer in range(adapter.num_layers):
        attn = adapter.module(model, layer, "attn_out").weight
        heads[layer] = _head_shares(stats[(layer, "attn")], attn, adapter.head_size, damp)
        neurons[layer] = _neuron_shares(stats[(layer, "ffn")], damp)
    return heads.float(), neurons.float()


def discounted(fisher: Fisher, heads: torch.Tensor, neurons: torch.Tensor) -> Fisher:
    """``fisher`` with each unit's rows scaled by ``sqrt(share)``: its importance (and its
    rearrangement block) times the share reconstruction cannot recover."""
    return replace(fisher, head_grads=fisher.head_grads * heads.sqrt()[None],
                   neuron_grads=fisher.neuron_grads * neurons.sqrt()[None])


def _block_forms(w: torch.Tensor, mat: torch.Tensor, cols: torch.Tensor,
                 invert: bool = False) -> torch.Tensor:
    """``tr(W_Q M_QQ W_Q^T)`` for each row ``Q`` of ``cols`` (``M_QQ^-1`` with ``invert``)."""
    inner = mat[cols[:, :, None], cols[:, None, :]]  # [blocks, size, size]
    if invert:
        inner = torch.linalg.inv(inner)
    wq = w[:, cols].permute(1, 0, 2)  # [blocks, out, size]
    return torch.einsum("boi,bij,boj->b", wq, inner, wq)


def _greedy_shares(m: _Moments, weight: torch.Tensor, size: int, importance: torch.Tensor,
                   damp: float, chunk: int = 1) -> torch.Tensor:
    """Greedy structured OBS over blocks of ``size`` columns (a head's context, or one FFN
    neuron): ``chunk`` blocks at a time, the lowest ``importance x share`` first, each block's
    share taken when it goes (its error after the updates so far over its plain error with the
    original weights), then the optimal update of the columns left and the Schur complement of
    the inverse covariance on them."""
    second, inv = _moments_and_inverse(m, damp)
    w = weight.detach().double().to(inv.device)  # [out, in]
    blocks = second.shape[0] // size
    cols = torch.arange(blocks * size, device=inv.device).reshape(blocks, size)
    plain = _block_forms(w, second, cols)
    score_of = importance.double().to(inv.device)
    shares = torch.ones(blocks, dtype=torch.float64, device=inv.device)
    alive = torch.arange(blocks, device=inv.device)  # original block ids, in local order
    while alive.numel():
        local = torch.arange(alive.numel() * size, device=inv.device).reshape(-1, size)
        left = _block_forms(w, inv, local, invert=True)
        known = plain[alive] > 0  # a block whose output is always zero keeps share 1
        share = torch.where(known, left / plain[alive].clamp_min(1e-300),
                            torch.ones_like(left)).clamp_min(0.0)
        pick = torch.topk(score_of[alive] * share, min(chunk, alive.numel()),
                          largest=False).indices
        shares[alive[pick]] = share[pick]
        gone = torch.zeros(alive.numel(), dtype=torch.bool, device=inv.device)
        gone[pick] = True
        q, s = local[gone].reshape(-1), local[~gone].reshape(-1)
        if s.numel():
            update = torch.linalg.solve(inv[q][:, q], inv[q][:, s])  # [q, s]
            w = w[:, s] - w[:, q] @ update
            inv = inv[s][:, s] - inv[s][:, q] @ update
        alive = alive[~gone]
    return shares.cpu()


def greedy_unrecovered(model: nn.Module, adapter: Adapter, batches: list[dict], fisher: Fisher,
                       damp: float = 1e-2, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's ``[L, H]`` and each neuron's ``[L, N]`` share in a greedy structured-OBS
    order per layer, ordered by ``fisher``'s importance (see the module docstring): heads one at
    a time, neurons ``chunk`` at a time (the search's granularity)."""
    stats = input_moments(model, adapter, batches)
    heads = torch.ones(adapter.num_layers, adapter.num_heads, dtype=torch.float64)
    neurons = torch.ones(adapter.num_layers, adapter.intermediate_size, dtype=torch.float64)
    head_imp, neuron_imp = fisher.head_importance, fisher.neuron_importance
    for layer in range(adapter.num_layers):
        attn = adapter.module(model, layer, "attn_out").weight
        heads[layer] = _greedy_shares(stats[(layer, "attn")], attn, adapter.head_size,
                                      head_imp[layer], damp)
        ffn = adapter.module(model, layer, "ffn_out").weight
        neurons[layer] = _greedy_shares(stats[(layer, "ffn")], ffn, 1, neuron_imp[layer], damp,
                                        chunk)
    return heads.float(), neurons.float()

"""Measured latency: timing a model, the per-layer latency lookup table, and the latency cost
model the search uses (paper Sec. 5, "latency constraint").

``measure_latency`` times forward passes with ``torch.utils.benchmark.Timer`` (thread count,
CUDA synchronisation, warm-up and blocked measurement) and reports the median and spread. The
lookup table times one encoder layer keeping ``h`` heads and no FFN, and ``n`` neurons and no
attention, on the machine at hand; each curve is fitted as the paper does, flat below a
threshold and linear above (``fit_piecewise``). ``latency_cost`` turns a table into a
``prune.cost.CostModel``: ``fixed + sum_l (layer_base + attn(h_l) + ffn(n_l))``, where
``fixed`` is the time outside the layers (embeddings, pooler, classifier) and ``layer_base``
an empty layer's (LayerNorms, residuals). Caching a table is the caller's business
(``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.benchmark import Timer

from prune.arch import Adapter
from prune.cost import CostModel, UnitCurve
from prune.hf_remote.modeling_fastprune import prune_layer
from prune.runtime import eval_mode, model_device


@dataclass
class Latency:
    median: float  # seconds per forward pass
    iqr: float  # interquartile range of the measurements
    measurements: int

    @classmethod
    def of(cls, fn, min_run_time: float) -> "Latency":
        """Time ``fn()`` with ``torch.utils.benchmark`` for at least ``min_run_time`` seconds."""
        timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        with torch.inference_mode():
            m = timer.blocked_autorange(min_run_time=min_run_time)
        return cls(float(m.median), float(m.iqr), len(m.times))


def dummy_inputs(model: nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    device = model_device(model)
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids.to(device),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device)}


def measure_latency(model: nn.Module, batch_size: int = 32, seq_len: int = 128,
                    min_run_time: float = 5.0) -> Latency:
    """Latency of ``model`` on random token ids (``batch_size`` x ``seq_len``)."""
    inputs = dummy_inputs(model, batch_size, seq_len)
    with eval_mode(model):
        return Latency.of(lambda: model(**inputs), min_run_time)


def compare_latency(baseline: Latency, pruned: Latency) -> dict:
    return {"baseline": asdict(baseline), "pruned": asdict(pruned),
            "ratio": pruned.median / baseline.median,
            "speedup": baseline.median / pruned.median}


def fit_piecewise(x: np.ndarray, y: np.ndarray) -> UnitCurve:
    """The least-squares curve ``flat + slope * max(x - threshold, 0)``: flat below a threshold
    (one of the ``x``), linear above (the paper's latency model of a layer)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    best = None
    for t in x:
        above = x >= t
        if above.sum() < 2:
            continue
        slope, intercept = np.polyfit(x[above], y[above], 1)
        slope = max(float(slope), 0.0)
        flat = max(slope * t + intercept, 0.0)
        err = float(((flat + slope * np.maximum(x - t, 0.0) - y) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, UnitCurve(slope=slope, flat=flat, threshold=int(t)))
    if best is None:
        return UnitCurve(slope=0.0, flat=max(float(np.mean(y)), 0.0), threshold=int(x[-1]))
    return best[1]


@dataclass
class LatencyTable:
    """Measured latency of one encoder layer by units kept, and what lies outside the layers
    (seconds)."""

    heads: list[int]
    attn: list[float]  # layer time with h heads and no FFN, minus the empty layer
    neurons: list[int]
    ffn: list[float]  # layer time with n neurons and no attention, minus the empty layer
    layer_base: float  # an empty layer (LayerNorms, residuals)
    fixed: float  # embeddings, pooler, classifier: model time minus its layers
    full: float  # the measured unpruned model
    num_layers: int
    num_heads: int
    num_neurons: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyTable":
        return cls(**data)


def latency_cost(table: LatencyTable) -> CostModel:
    """The cost model of a measured table (seconds)."""
    return CostModel(attn=fit_piecewise(table.heads, table.attn),
                     ffn=fit_piecewise(table.neurons, table.ffn),
                     num_layers=table.num_layers, num_heads=table.num_heads,
                     num_neurons=table.num_neurons,
                     fixed=table.fixed + table.num_layers * table.layer_base, unit="latency")


def _layer_time(layer: nn.Module, layout: dict, heads: int, neurons: int, head_size: int,
                hidden: torch.Tensor, min_run_time: float) -> float:
    part = copy.deepcopy(layer)
    with torch.no_grad():
        prune_layer(part, layout, torch.arange(heads), torch.arange(neurons), head_size)
    return Latency.of(lambda: part(hidden, None), min_run_time).median


def build_latency_table(model: nn.Module, adapter: Adapter, batch_size: int = 32,
                        seq_len: int = 128, points: int = 8,
                        min_run_time: float = 0.5) -> LatencyTable:
    """Time one layer over a grid of head and neuron counts, and the whole model."""
    layer = adapter.layers(model)[0]
    hidden = torch.randn(batch_size, seq_len, adapter.hidden_size, device=model_device(model))
    H, N = adapter.num_heads, adapter.intermediate_size
    heads = sorted({int(h) for h in np.linspace(1, H, min(points, H)).round()})
    neurons = sorted({int(n) for n in np.linspace(N / points, N, points).round()})

    def t(h: int, n: int) -> float:
        return _layer_time(layer, adapter.layout, h, n, adapter.head_size, hidden, min_run_time)

    with eval_mode(model):
        base = t(0, 0)
        attn = [max(t(h, 0) - base, 0.0) for h in heads]
        ffn = [max(t(0, n) - base, 0.0) for n in neurons]
        layer_full = t(H, N)
    full = measure_latency(model, batch_size, seq_len, min_run_time).median
    fixed = max(full - adapter.num_layers * layer_full, 0.0)
    return LatencyTable(heads, attn, neurons, ffn, base, fixed, full, adapter.num_layers, H, N)

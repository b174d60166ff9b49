"""Measured latency: timing a model, a per-layer latency lookup table, and the latency cost.

``measure_latency`` is the median of timed forward passes after warm-up, with CUDA
synchronisation when the model is on a GPU. The lookup table times one encoder layer with ``h``
heads and no FFN, and with ``n`` neurons and no attention, on the machine at hand (paper Sec. 5,
"latency constraint"); each curve is fitted as the paper does, flat below a threshold and linear
above, and cached per device, model shape, batch size and sequence length. ``LatencyCost``
then predicts a pruned model's latency from its per-layer counts:
``fixed + sum_l (layer_base + attn(h_l) + ffn(n_l))``.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prune.arch import Adapter
from prune.hf_remote.modeling_fastprune import prune_layer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    return times


def dummy_inputs(model: nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if model.config.vocab_size > 1000 else 1, model.config.vocab_size,
                        (batch_size, seq_len), generator=g)
    return {"input_ids": ids.to(device),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device)}


@dataclass
class Latency:
    median: float  # seconds per forward pass
    p10: float
    p90: float
    repeats: int

    @classmethod
    def of(cls, times: list[float]) -> "Latency":
        q = np.quantile(times, [0.1, 0.9])
        return cls(statistics.median(times), float(q[0]), float(q[1]), len(times))


def measure_latency(model: nn.Module, batch_size: int = 32, seq_len: int = 128,
                    warmup: int = 2, repeats: int = 10) -> Latency:
    """Median latency of ``model`` on random token ids (batch_size x seq_len)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    inputs = dummy_inputs(model, batch_size, seq_len)
    try:
        return Latency.of(_timed(lambda: model(**inputs), device, warmup, repeats))
    finally:
        model.train(was_training)


def compare_latency(baseline: Latency, pruned: Latency) -> dict:
    return {"baseline": asdict(baseline), "pruned": asdict(pruned),
            "ratio": pruned.median / baseline.median,
            "speedup": baseline.median / pruned.median}


def fit_piecewise(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(threshold, slope, intercept) of ``y = max(flat, slope * x + intercept)`` with the flat
    part the value at the threshold: flat below it, linear above (least squares over the
    threshold candidates)."""
    best = None
    for t in x:
        above = x >= t
        if above.sum() < 2:
            continue
        slope, intercept = np.polyfit(x[above], y[above], 1)
        slope = max(slope, 0.0)
        flat = slope * t + intercept
        pred = np.maximum(flat, slope * x + intercept)
        err = float(((pred - y) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, float(t), float(slope), float(intercept))
    if best is None:
        return float(x[0]), 0.0, float(np.mean(y))
    return best[1:]


@dataclass
class LatencyTable:
    """Latency curves of one encoder layer, and the fixed cost outside the layers (seconds)."""

    heads: list[int]
    attn: list[float]  # layer time with h heads and no FFN, minus the empty layer
    neurons: list[int]
    ffn: list[float]  # layer time with n neurons and no attention, minus the empty layer
    layer_base: float  # an empty layer (LayerNorms, residuals)
    fixed: float  # embeddings, pooler, classifier: model time minus its layers
    full: float  # the measured unpruned model
    key: dict

    def _curve(self, x: list[int], y: list[float], value: np.ndarray) -> np.ndarray:
        t, slope, intercept = fit_piecewise(np.asarray(x, float), np.asarray(y, float))
        flat = slope * t + intercept
        out = np.maximum(flat, slope * value + intercept)
        return np.where(value == 0, 0.0, np.maximum(out, 0.0))

    def attn_time(self, heads: np.ndarray) -> np.ndarray:
        return self._curve(self.heads, self.attn, np.asarray(heads, float))

    def ffn_time(self, neurons: np.ndarray) -> np.ndarray:
        return self._curve(self.neurons, self.ffn, np.asarray(neurons, float))

    def predict(self, heads_per_layer: list[int], neurons_per_layer: list[int]) -> float:
        return float(self.fixed + len(heads_per_layer) * self.layer_base
                     + self.attn_time(np.asarray(heads_per_layer)).sum()
                     + self.ffn_time(np.asarray(neurons_per_layer)).sum())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self), handle, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        return cls(**json.loads(Path(path).read_text()))


def table_key(model: nn.Module, adapter: Adapter, batch_size: int, seq_len: int) -> dict:
    device = next(model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() \
        or platform.machine()
    return {"device": f"{device.type}:{name}", "threads": torch.get_num_threads(),
            "family": adapter.family, "layers": adapter.num_layers, "heads": adapter.num_heads,
            "hidden": adapter.hidden_size, "ffn": adapter.intermediate_size,
            "batch_size": batch_size, "seq_len": seq_len, "torch": torch.__version__}


def _layer_time(layer: nn.Module, layout: dict, heads: int, neurons: int, head_size: int,
                hidden: torch.Tensor, warmup: int, repeats: int) -> float:
    part = copy.deepcopy(layer)
    with torch.no_grad():
        prune_layer(part, layout, torch.arange(heads), torch.arange(neurons), head_size)
    return statistics.median(_timed(lambda: part(hidden, None), hidden.device, warmup, repeats))


def build_latency_table(model: nn.Module, adapter: Adapter, batch_size: int = 32,
                        seq_len: int = 128, points: int = 8, warmup: int = 2,
                        repeats: int = 5) -> LatencyTable:
    """Time one layer over a grid of head and neuron counts, and the whole model."""
    device = next(model.parameters()).device
    layer = adapter.layers(model)[0]
    hidden = torch.randn(batch_size, seq_len, adapter.hidden_size, device=device)
    H, N = adapter.num_heads, adapter.intermediate_size
    heads = sorted({int(h) for h in np.linspace(1, H, min(points, H)).round()})
    neurons = sorted({int(n) for n in np.linspace(N / points, N, points).round()})
    t = lambda h, n: _layer_time(layer, adapter.layout, h, n, adapter.head_size, hidden,  # noqa
                                 warmup, repeats)
    base = t(0, 0)
    attn = [max(t(h, 0) - base, 0.0) for h in heads]
    ffn = [max(t(0, n) - base, 0.0) for n in neurons]
    full = measure_latency(model, batch_size, seq_len, warmup, repeats).median
    layer_full = t(H, N)
    fixed = max(full - adapter.num_layers * layer_full, 0.0)
    return LatencyTable(heads, attn, neurons, ffn, base, fixed, full,
                        table_key(model, adapter, batch_size, seq_len))


def cached_latency_table(model: nn.Module, adapter: Adapter, cache_dir: str | Path | None,
                         batch_size: int = 32, seq_len: int = 128, **kwargs) -> LatencyTable:
    """Load the table for this device / model shape / batch / length, or build and cache it."""
    key = table_key(model, adapter, batch_size, seq_len)
    if cache_dir is not None:
        from prune.cache import fisher_key

        path = Path(cache_dir) / f"latency-{fisher_key(**key)}.json"
        if path.exists():
            table = LatencyTable.load(path)
            if table.key == key:
                return table
    table = build_latency_table(model, adapter, batch_size, seq_len, **kwargs)
    if cache_dir is not None:
        table.save(path)
    return table

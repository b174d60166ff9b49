"""Measured latency: timing a model, the per-layer latency lookup table, and the latency cost
model the search uses (paper Sec. 5, "latency constraint").

``measure_latency`` times forward passes with ``torch.utils.benchmark.Timer`` (thread count,
CUDA synchronisation, warm-up and blocked measurement) and reports the median and spread. The
lookup table is measured in context, on whole models on the machine at hand: the model with
every layer emptied (no head, no neuron), every layer keeping ``h`` heads and no FFN, and every
layer keeping ``n`` neurons and no attention. A layer's attention curve is
``(T(h heads) - T(empty)) / L`` (the same for the FFN), so whatever a layer costs only inside
the model (the attention mask, memory traffic between layers) is in its curve, and the time
outside the prunable units is the empty model's, measured rather than inferred. Each curve is
fitted as the paper does, flat below a threshold and linear above (``fit_piecewise``).
``latency_cost`` turns a table into a ``prune.cost.CostModel``:
``empty + sum_l (attn(h_l) + ffn(n_l))``, exact at the emptied and the unpruned model.
Caching a table is the caller's business (``to_dict`` / ``from_dict``); a table that
``is_noise`` (the emptied model about as slow as the whole one, curves that do not rise with the
units kept, or timings whose spread is large) must not be cached. ``is_noisy`` says whether one
measurement's spread is too large to trust; ``compare_latency`` carries it as ``noisy``.

Precision: every measurement and table is taken in one of ``DTYPES``, the dtype the model is
deployed in, on a cast copy (the caller's model is never changed). ``float32`` is strict IEEE
float32 (TF32 matmuls and cuDNN off on CUDA), ``tf32`` allows TF32 on CUDA (on CPU it is
``float32``), ``float16`` and ``bfloat16`` cast the weights. A pruned model can be faster than
the unpruned one in float32 and slower in bfloat16 (FFN widths off the multiple of 8 leave the
tensor cores' fast path), so a speedup, a table and a latency budget hold for their dtype only;
each ``Latency`` and ``LatencyTable`` says its ``dtype``.

An earlier version timed one layer alone and took the rest (full model minus ``L`` lone
layers) as fixed. On the demo that put 26% of the model's time outside the layers while the
emptied model measures 1.6%, so every prediction was too high and the search left up to three
quarters of its budget unspent (asked 0.6, measured 0.52; asked 0.3, measured 0.07).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.benchmark import Timer

from prune.arch import Adapter
from prune.cost import CostModel, UnitCurve
from prune.errors import PruneError
from prune.masks import Masks
from prune.physical import prune_model
from prune.runtime import eval_mode, model_device

# the precisions a model is timed in: name -> the dtype of its weights
DTYPES = ("float32", "tf32", "float16", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


def check_dtype(dtype: str) -> str:
    """``dtype`` if it is one of ``DTYPES``, else a one-line ``PruneError``."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise PruneError(f"latency dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    return dtype


def cast_model(model: nn.Module, dtype: str) -> nn.Module:
    """``model`` itself when every floating-point weight already has ``dtype``'s type, else a
    copy cast to it: the caller's model is never changed."""
    target = TORCH_DTYPES[check_dtype(dtype)]
    floating = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if all(t.dtype == target for t in floating):
        return model
    return copy.deepcopy(model).to(target)


@contextmanager
def precision(dtype: str, device: torch.device) -> Iterator[None]:
    """On CUDA, TF32 matmuls and cuDNN ops allowed for ``tf32`` and forbidden for ``float32``
    inside the block (``torch.backends.cuda.matmul`` / ``cudnn.allow_tf32``), restored after;
    nothing to do for ``float16``, ``bfloat16`` or on CPU."""
    if device.type != "cuda" or check_dtype(dtype) not in ("float32", "tf32"):
        yield
        return
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    allow = dtype == "tf32"
    try:
        saved = [(f, "allow_tf32", f.allow_tf32) for f in flags]
    except RuntimeError:  # set through the newer fp32_precision API: reading the old one fails
        saved = [(f, "fp32_precision", f.fp32_precision) for f in flags]
    try:
        for f, name, _ in saved:
            if name == "allow_tf32":
                setattr(f, name, allow)
            else:
                setattr(f, name, "tf32" if allow else "ieee")
        yield
    finally:
        for f, name, value in saved:
            setattr(f, name, value)


@dataclass
class Latency:
    median: float  # seconds per forward pass
    iqr: float  # interquartile range of the measurements
    measurements: int
    dtype: str = "float32"  # the precision it was timed in (one of DTYPES)

    @classmethod
    def of(cls, fn, min_run_time: float, dtype: str = "float32") -> "Latency":
        """Time ``fn()`` with ``torch.utils.benchmark`` for at least ``min_run_time`` seconds
        (the timer synchronises CUDA around each block)."""
        timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        with torch.inference_mode():
            m = timer.blocked_autorange(min_run_time=min_run_time)
        return cls(float(m.median), float(m.iqr), len(m.times), dtype)


# a measurement whose interquartile range exceeds this fraction of its median is not trusted
NOISY_SPREAD = 0.25
# a curve whose rise over all layers (max - min, times L) is below this share of the whole
# model's time does not depend on the units kept
FLAT_RISE = 0.05


def spread(latency: Latency | Mapping) -> float:
    """Interquartile range over median of a ``Latency`` (or its ``asdict`` form)."""
    median, iqr = ((latency["median"], latency["iqr"]) if isinstance(latency, Mapping)
                   else (latency.median, latency.iqr))
    return float(iqr) / float(median) if median > 0 else float("inf")


def is_noisy(latency: Latency | Mapping, limit: float = NOISY_SPREAD) -> bool:
    """The measurement's spread (IQR) is more than ``limit`` times its median: another job on
    the cores, or too short a run; a speedup computed from it is not to be trusted."""
    return spread(latency) > limit


def dummy_inputs(model: nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    device = model_device(model)
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids.to(device),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device)}


def measure_latency(model: nn.Module, batch_size: int = 32, seq_len: int = 128,
                    min_run_time: float = 5.0, dtype: str = "float32") -> Latency:
    """Latency of ``model`` in ``dtype`` (one of ``DTYPES``; a cast copy when its weights have
    another type) on random token ids (``batch_size`` x ``seq_len``)."""
    timed = cast_model(model, dtype)
    inputs = dummy_inputs(timed, batch_size, seq_len)
    with eval_mode(timed) as device, precision(dtype, device):
        return Latency.of(lambda: timed(**inputs), min_run_time, dtype)


def compare_latency(baseline: Latency, pruned: Latency) -> dict:
    """Both measurements, the ratio and speedup of the medians, ``spread`` (the larger
    IQR / median of the two), ``noisy`` (``spread`` above ``NOISY_SPREAD``: do not trust the
    speedup) and ``dtype`` (both were timed in it; measurements in two dtypes are refused)."""
    if baseline.dtype != pruned.dtype:
        raise PruneError(f"the baseline was timed in {baseline.dtype} and the pruned model in "
                         f"{pruned.dtype}: time both in the same dtype")
    worst = max(spread(baseline), spread(pruned))
    return {"baseline": asdict(baseline), "pruned": asdict(pruned),
            "ratio": pruned.median / baseline.median,
            "speedup": baseline.median / pruned.median,
            "spread": worst, "noisy": worst > NOISY_SPREAD, "dtype": pruned.dtype}


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
    """Measured latency (seconds) of the whole model by units kept in every layer."""

    heads: list[int]
    attn: list[float]  # per layer: (every layer h heads and no FFN - empty model) / L
    neurons: list[int]
    ffn: list[float]  # per layer: (every layer n neurons and no attention - empty model) / L
    empty: float  # every layer emptied: embeddings, LayerNorms, residuals, pooler, classifier
    full: float  # the measured unpruned model
    num_layers: int
    num_heads: int
    num_neurons: int
    spread: float = 0.0  # the largest IQR / median among the table's measurements
    dtype: str = "float32"  # the precision it was timed in (one of DTYPES)

    def empty_share(self) -> float:
        """The emptied model's time as a share of the whole model's (1.6% on the demo)."""
        return self.empty / self.full if self.full > 0 else float("inf")

    def rise(self, curve: list[float]) -> float:
        """How much a curve's units change the whole model's time, as a share of it."""
        if not curve or self.full <= 0:
            return 0.0
        return self.num_layers * (max(curve) - min(curve)) / self.full

    def noise_reason(self, limit: float = 0.9) -> str | None:
        """Why the timings cannot support a cost model, or ``None``: the emptied model measured
        at ``limit`` or more of the whole model's time, no unit measured any cost, neither curve
        rises with the units kept, or the measurements' spread is large (another job on the
        cores, or a model so small that call overhead hides its compute)."""
        if self.empty_share() >= limit:
            return (f"the model with every layer emptied measured {100 * self.empty_share():.0f}% "
                    f"of the whole model's time")
        if sum(self.attn) + sum(self.ffn) <= 0:
            return "no head or neuron measured any cost"
        if max(self.rise(self.attn), self.rise(self.ffn)) < FLAT_RISE:
            return (f"its curves are flat (the units kept change the time by under "
                    f"{100 * FLAT_RISE:.0f}%; the emptied model measured "
                    f"{100 * self.empty_share():.0f}% of the whole)")
        if self.spread > NOISY_SPREAD:
            return (f"its timings spread by {100 * self.spread:.0f}% of their median "
                    f"(over {100 * NOISY_SPREAD:.0f}%)")
        return None

    def is_noise(self, limit: float = 0.9) -> bool:
        """The timings cannot support a cost model (``noise_reason``)."""
        return self.noise_reason(limit) is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyTable":
        return cls(**data)


def latency_cost(table: LatencyTable) -> CostModel:
    """The cost model of a measured table (seconds).

    Attention and FFN are timed apart, and a layer with both is a few percent slower than the
    sum of its parts (on the demo 7%); that remainder is spread over both curves in proportion,
    so the model predicts the unpruned model's measured time exactly, and the emptied model's."""
    attn = fit_piecewise(table.heads, table.attn)
    ffn = fit_piecewise(table.neurons, table.ffn)
    parts = table.num_layers * float(attn(table.num_heads) + ffn(table.num_neurons))
    scale = (table.full - table.empty) / parts if parts > 0 and table.full > table.empty else 1.0
    return CostModel(attn=replace(attn, slope=attn.slope * scale, flat=attn.flat * scale),
                     ffn=replace(ffn, slope=ffn.slope * scale, flat=ffn.flat * scale),
                     num_layers=table.num_layers, num_heads=table.num_heads,
                     num_neurons=table.num_neurons, fixed=table.empty, unit="latency")


def uniform_model(model: nn.Module, adapter: Adapter, heads: int, neurons: int) -> nn.Module:
    """A copy of ``model`` whose every layer keeps its first ``heads`` heads and first
    ``neurons`` FFN neurons, physically pruned."""
    part = copy.deepcopy(model)
    L, H, N = adapter.num_layers, adapter.num_heads, adapter.intermediate_size
    head = torch.zeros(L, H)
    head[:, :heads] = 1.0
    neuron = torch.zeros(L, N)
    neuron[:, :neurons] = 1.0
    return prune_model(part, Masks(head, neuron), adapter, allow_empty=True)


def build_latency_table(model: nn.Module, adapter: Adapter, batch_size: int = 32,
                        seq_len: int = 128, points: int = 8, min_run_time: float = 1.0,
                        dtype: str = "float32") -> LatencyTable:
    """Time the whole model in ``dtype`` (one of ``DTYPES``) over a grid of head and neuron
    counts kept in every layer. The pruned copies are cut from one copy cast to ``dtype``; the
    model itself is left whole and in its own dtype."""
    base = cast_model(model, dtype)
    H, N, L = adapter.num_heads, adapter.intermediate_size, adapter.num_layers
    heads = sorted({int(h) for h in np.linspace(1, H, min(points, H)).round()})
    neurons = sorted({int(n) for n in np.linspace(N / points, N, points).round()})

    spreads = []

    def t(h: int | None, n: int | None) -> float:
        part = base if h is None else uniform_model(base, adapter, h, n)
        lat = measure_latency(part, batch_size, seq_len, min_run_time, dtype)
        spreads.append(spread(lat))
        return lat.median

    with eval_mode(base):
        empty = t(0, 0)
        attn = [max(t(h, 0) - empty, 0.0) / L for h in heads]
        ffn = [max(t(0, n) - empty, 0.0) / L for n in neurons]
        full = t(None, None)
    return LatencyTable(heads, attn, neurons, ffn, empty, full, L, H, N, max(spreads), dtype)

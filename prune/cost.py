"""Cost models: what a pruned encoder costs as a function of the heads and neurons each layer
keeps (paper Sec. 3.2, and Sec. 5 / Appendix for latency).

Both constraints the paper uses have the same shape, so the mask search sees one interface,
``CostModel``: a fixed part, and per layer an attention curve and an FFN curve (``UnitCurve``)
of the number of units kept, each zero with no unit and ``flat + slope * max(n - threshold, 0)``
otherwise.

- FLOPs (``flops_cost``): linear, ``flat = threshold = 0``. For sequence length ``s``, hidden
  size ``d`` and head size ``d_h``: one head costs ``4*s*d*d_h`` MACs (Q, K, V and output
  projections) plus ``2*s^2*d_h`` (scores and context); one FFN neuron ``2*s*d`` (up and down
  projection). Embeddings, LayerNorm, biases, softmax, pooler and classifier are outside the
  budget, as in the paper. FLOPs are ``2 * MACs`` (``torch.utils.flop_counter``'s convention).
- Latency (``prune.latency.latency_cost``): measured curves, flat below a threshold and linear
  above, plus the measured time outside the prunable units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prune.arch import Adapter


@dataclass(frozen=True)
class UnitCurve:
    """Cost of one layer's attention (or FFN) keeping ``n`` units: 0 for ``n = 0``, else
    ``flat + slope * max(n - threshold, 0)``."""

    slope: float
    flat: float = 0.0
    threshold: int = 0

    def __call__(self, n) -> np.ndarray:
        n = np.asarray(n, dtype=float)
        value = self.flat + self.slope * np.maximum(n - self.threshold, 0.0)
        return np.where(n > 0, value, 0.0)


@dataclass(frozen=True)
class CostModel:
    """``fixed + sum_l attn(h_l) + ffn(n_l)`` for an encoder of ``num_layers`` layers with
    ``num_heads`` heads and ``num_neurons`` FFN neurons each; ``unit`` names what is counted."""

    attn: UnitCurve
    ffn: UnitCurve
    num_layers: int
    num_heads: int
    num_neurons: int
    fixed: float = 0.0
    unit: str = "MACs"

    def total(self, heads_per_layer: list[int], neurons_per_layer: list[int]) -> float:
        return float(self.fixed + self.attn(heads_per_layer).sum()
                     + self.ffn(neurons_per_layer).sum())

    @property
    def full(self) -> float:
        """The cost of the unpruned encoder."""
        return self.total([self.num_heads] * self.num_layers,
                          [self.num_neurons] * self.num_layers)

    def ratio(self, heads_per_layer: list[int], neurons_per_layer: list[int]) -> float:
        """The fraction of the unpruned cost kept."""
        return self.total(heads_per_layer, neurons_per_layer) / self.full


@dataclass(frozen=True)
class FlopsCost(CostModel):
    """The linear FLOPs model; ``seq_len`` is the (mean) sequence length it was built for."""

    seq_len: float = 0.0

    @property
    def head_macs(self) -> float:
        return self.attn.slope

    @property
    def neuron_macs(self) -> float:
        return self.ffn.slope

    @property
    def full_macs(self) -> float:
        return self.full

    def macs(self, heads_per_layer: list[int], neurons_per_layer: list[int]) -> float:
        return sum(heads_per_layer) * self.head_macs + sum(neurons_per_layer) * self.neuron_macs

    def flops(self, heads_per_layer: list[int], neurons_per_layer: list[int]) -> float:
        return 2.0 * self.macs(heads_per_layer, neurons_per_layer)


def flops_cost(adapter: Adapter, seq_len: float) -> FlopsCost:
    """The FLOPs model of ``adapter``'s architecture at (mean) sequence length ``seq_len``."""
    s, d, dh = float(seq_len), adapter.hidden_size, adapter.head_size
    if not s > 0:
        from prune.errors import PruneError

        raise PruneError(f"seq_len={seq_len!r}: the cost model needs a positive sequence length")
    return FlopsCost(
        attn=UnitCurve(slope=4 * s * d * dh + 2 * s * s * dh),
        ffn=UnitCurve(slope=2 * s * d),
        num_layers=adapter.num_layers,
        num_heads=adapter.num_heads,
        num_neurons=adapter.intermediate_size,
        seq_len=s,
    )

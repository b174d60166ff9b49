"""FLOPs cost model of the encoder as a function of the heads and neurons kept (paper Sec. 3.2).

Per layer, for sequence length ``s``, hidden size ``d`` and head size ``d_h``:

- one head: ``4*s*d*d_h`` MACs for the Q, K, V and output projections plus ``2*s^2*d_h`` for
  the attention scores and the context;
- one FFN neuron: ``2*s*d`` MACs (up and down projection).

Embeddings, LayerNorm, biases, softmax, pooler and classifier are outside the budget, as in the
paper. FLOPs are ``2 * MACs`` (the convention of ``torch.utils.flop_counter``).
"""

from __future__ import annotations

from dataclasses import dataclass

from prune.arch import Adapter


@dataclass(frozen=True)
class FlopsCost:
    """Linear cost: every head costs ``head_macs`` and every neuron ``neuron_macs``."""

    head_macs: float
    neuron_macs: float
    num_layers: int
    num_heads: int
    num_neurons: int
    seq_len: float

    @property
    def full_macs(self) -> float:
        return self.num_layers * (self.num_heads * self.head_macs
                                  + self.num_neurons * self.neuron_macs)

    def macs(self, heads_per_layer: list[int], neurons_per_layer: list[int]) -> float:
        return sum(heads_per_layer) * self.head_macs + sum(neurons_per_layer) * self.neuron_macs

    def flops(self, heads_per_layer: list[int], neurons_per_layer: list[int]) -> float:
        return 2.0 * self.macs(heads_per_layer, neurons_per_layer)


def flops_cost(adapter: Adapter, seq_len: float) -> FlopsCost:
    """The cost model of ``adapter``'s architecture at (average) sequence length ``seq_len``."""
    s, d, dh = float(seq_len), adapter.hidden_size, adapter.head_size
    return FlopsCost(
        head_macs=4 * s * d * dh + 2 * s * s * dh,
        neuron_macs=2 * s * d,
        num_layers=adapter.num_layers,
        num_heads=adapter.num_heads,
        num_neurons=adapter.intermediate_size,
        seq_len=s,
    )

"""fastprune: retraining-free structured pruning of Transformer encoders.

Reproduces Kwon et al., "A Fast Post-Training Pruning Framework for Transformers" (NeurIPS
2022), one module per stage of its Section 4 (see ``prune/README.md`` for the map):

- ``arch``: where the heads and FFN neurons of layer ``l`` live (one adapter, a table of module
  paths per family); ``masks``: head and neuron masks applied by hooks;
- ``cost``: the FLOPs cost model (``latency`` builds the measured one);
- ``fisher``: importance from the diagonal Fisher information of the masks;
- ``search``: Algorithm 1, the best split of the budget between heads and neurons;
- ``rearrange``: Algorithm 2, swaps inside a layer on its Fisher block;
- ``tune``: layer-wise least squares on the kept units (and, beyond the paper, their weights);
- ``physical``: remove the pruned units, save and load the smaller model;
- ``pipeline``: the stages in order, with ``PruneOptions``.

It needs only torch, transformers and numpy::

    from prune import PruneOptions, TuneOptions, flops_cost, get_adapter, prune_masks, prune_model
    adapter = get_adapter(model)
    result = prune_masks(model, adapter, sample_batches, flops_cost(adapter, seq_len=128), 0.6,
                         PruneOptions(tune=TuneOptions(mode="weights")))
    small = prune_model(model, result.masks, adapter, result.weights)
"""

from prune.arch import Adapter, get_adapter
from prune.cost import CostModel, FlopsCost, UnitCurve, flops_cost
from prune.errors import PruneError
from prune.fisher import Fisher, compute_fisher
from prune.masks import Masks, apply_masks
from prune.physical import load_pruned, prune_model, save_pruned
from prune.pipeline import PruneOptions, PruneResult, adaptive_fisher, prune_masks
from prune.rearrange import rearrange_masks
from prune.search import search_masks
from prune.tune import TunedWeights, TuneOptions, applied_weights, tune_masks

__version__ = "0.2.0"

__all__ = [
    "Adapter", "CostModel", "Fisher", "FlopsCost", "Masks", "PruneError", "PruneOptions",
    "PruneResult", "TuneOptions", "TunedWeights", "UnitCurve", "adaptive_fisher",
    "applied_weights", "apply_masks", "compute_fisher", "flops_cost", "get_adapter",
    "load_pruned", "prune_masks", "prune_model", "rearrange_masks", "save_pruned",
    "search_masks", "tune_masks",
]

"""fastprune: retraining-free structured pruning of Transformer encoders.

Reproduces Kwon et al., "A Fast Post-Training Pruning Framework for Transformers" (NeurIPS 2022):
Fisher-based mask search under a FLOPs budget, mask rearrangement, mask tuning by layer-wise
least squares, then physical removal of the pruned heads and neurons.

    from prune import get_adapter, flops_cost, PruneOptions, prune_masks, prune_model
    adapter = get_adapter(model)
    result = prune_masks(model, adapter, sample_batches, flops_cost(adapter, seq_len=128),
                         PruneOptions(constraint=0.6))
    small = prune_model(model, result.masks)
"""

from prune.arch import Adapter, get_adapter
from prune.cost import FlopsCost, flops_cost
from prune.errors import PruneError
from prune.fisher import Fisher, compute_fisher
from prune.masks import Masks, apply_masks
from prune.physical import load_pruned, prune_model, save_pruned
from prune.pipeline import PruneOptions, PruneResult, prune_masks
from prune.rearrange import rearrange_masks
from prune.search import search_masks
from prune.tune import tune_masks

__all__ = [
    "Adapter", "Fisher", "FlopsCost", "Masks", "PruneError", "PruneOptions", "PruneResult",
    "apply_masks", "compute_fisher", "flops_cost", "get_adapter", "load_pruned", "prune_masks",
    "prune_model", "rearrange_masks", "save_pruned", "search_masks", "tune_masks",
]

"""Architecture adapters: where the heads and FFN neurons of layer l live.

One ``Adapter`` serves every supported family; the family only chooses a row of module paths
(``LAYOUTS``, shared with the self-contained checkpoint code in ``hf_remote``). Supported:
Hugging Face ``BertFor*`` (BERT, MiniLM and other BERT-architecture checkpoints),
``DistilBertFor*``, ``MPNetFor*``, ``RobertaFor*``, ``XLMRobertaFor*`` and ``ElectraFor*``
(the discriminator); pruned models are saved and reloaded with sequence classification and
question answering heads. RoBERTa, XLM-RoBERTa and ELECTRA layers have BERT's modules and share
its row; MPNet's row also names the per-head relative position bias its layers receive.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prune.errors import PruneError
from prune.hf_remote.modeling_fastprune import LAYOUTS, get_module


@dataclass(frozen=True)
class Adapter:
    """Module paths of one architecture family, resolved against a concrete model."""

    family: str
    num_layers: int
    num_heads: int
    head_size: int
    hidden_size: int
    intermediate_size: int
    layout: dict[str, str]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model.base_model, self.layout["layers"])

    def module(self, model: nn.Module, layer: int, part: str) -> nn.Module:
        """``part`` is a layout key: query, key, value, attn_out, attn_norm, ffn_in, ffn_act,
        ffn_out, ffn_norm or attention."""
        return get_module(self.layers(model)[layer], self.layout[part])

    def heads_per_layer(self, model: nn.Module) -> list[int]:
        """Heads each layer has now (fewer than ``num_heads`` once physically pruned)."""
        return [self.module(model, i, "attn_out").in_features // self.head_size
                for i in range(self.num_layers)]

    def neurons_per_layer(self, model: nn.Module) -> list[int]:
        return [self.module(model, i, "ffn_out").in_features for i in range(self.num_layers)]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``; a clear error for an architecture we cannot prune."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in LAYOUTS:
        raise PruneError(
            f"architecture '{family or type(model).__name__}' is not supported; "
            "supported families: "
            f"{', '.join(sorted(LAYOUTS))} "
            "(BERT-architecture checkpoints such as MiniLM use 'bert')"
        )
    layout = LAYOUTS[family]
    num_heads = getattr(config, layout["num_heads_attr"])
    return Adapter(
        family=family,
        num_layers=config.num_hidden_layers,
        num_heads=num_heads,
        head_size=config.hidden_size // num_heads,
        hidden_size=config.hidden_size,
        intermediate_size=getattr(config, layout["intermediate_attr"]),
        layout=layout,
    )

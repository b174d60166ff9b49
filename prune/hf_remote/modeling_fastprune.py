"""Model code for checkpoints saved by fastprune (structured-pruned BERT / DistilBERT).

This file is copied next to every pruned checkpoint, so it must stay self-contained: it imports
only ``torch`` and ``transformers``, never the ``prune`` package. Pruned layers keep different
numbers of attention heads and FFN neurons, which a plain BERT config cannot describe; the config
therefore carries ``fastprune_heads`` and ``fastprune_neurons`` (one count per layer), and the
classes below build the stock Hugging Face model and then shrink each layer to those counts, so
``from_pretrained(path, trust_remote_code=True)`` loads the smaller weights as they were saved.

``LAYOUTS`` is the one table of module paths per architecture family; ``prune.arch`` builds its
adapters from it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
)

# Paths are relative to one encoder layer; ``layers`` is relative to ``model.base_model``.
# Every family is post-LN: ``attn_norm(x + attn_out(context))`` then
# ``ffn_norm(y + ffn_out(ffn_act(ffn_in(y))))``; mask tuning relies on that structure.
LAYOUTS: dict[str, dict[str, str]] = {
    "bert": {
        "layers": "encoder.layer",
        "attention": "attention.self",  # the part replaced when a layer keeps no head
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "ffn_in": "intermediate.dense",
        "ffn_act": "intermediate.intermediate_act_fn",  # elementwise activation of the FFN
        "ffn_out": "output.dense",
        "ffn_norm": "output.LayerNorm",
        "num_heads_attr": "num_attention_heads",
        "intermediate_attr": "intermediate_size",
    },
    "distilbert": {
        "layers": "transformer.layer",
        "attention": "attention",
        "query": "attention.q_lin",
        "key": "attention.k_lin",
        "value": "attention.v_lin",
        "attn_out": "attention.out_lin",
        "attn_norm": "sa_layer_norm",
        "ffn_in": "ffn.lin1",
        "ffn_act": "ffn.activation",
        "ffn_out": "ffn.lin2",
        "ffn_norm": "output_layer_norm",
        "num_heads_attr": "n_heads",
        "intermediate_attr": "hidden_dim",
    },
}


class NoHeadAttention(nn.Module):
    """Attention of a layer that keeps no head: the per-head context is empty, shape (B, T, 0).

    If the family's attention module owns its output projection (DistilBERT's ``out_lin``), it is
    kept under the same attribute name, so that its bias still reaches the residual sum.
    """

    def __init__(self, out_name: str | None = None, out_proj: nn.Linear | None = None):
        super().__init__()
        self.out_name = out_name
        if out_name is not None:
            self.add_module(out_name, out_proj)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)  # (B, T, 0)
        if self.out_name is not None:
            context = getattr(self, self.out_name)(context)
        return context, None


def get_module(root: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        root = getattr(root, name)
    return root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, module)


def shrink_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only ``index`` along the output (dim 0) or input (dim 1) features, in place."""
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index).clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        linear.out_features = int(index.numel())
        if linear.bias is not None:
            bias = linear.bias.detach().index_select(0, index).clone()
            linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    else:
        linear.in_features = int(index.numel())


def prune_layer(
    layer: nn.Module,
    layout: dict[str, str],
    keep_heads: torch.Tensor,
    keep_neurons: torch.Tensor,
    head_size: int,
) -> None:
    """Physically keep the heads ``keep_heads`` and FFN neurons ``keep_neurons`` of one layer."""
    keep_heads = keep_heads.long().flatten()
    rows = (keep_heads[:, None] * head_size + torch.arange(head_size)).flatten()
    for name in ("query", "key", "value"):
        shrink_linear(get_module(layer, layout[name]), rows, dim=0)
    shrink_linear(get_module(layer, layout["attn_out"]), rows, dim=1)
    attention = get_module(layer, layout["attention"])
    if hasattr(attention, "num_attention_heads"):
        attention.num_attention_heads = int(keep_heads.numel())
        attention.all_head_size = int(rows.numel())
    if hasattr(attention, "n_heads"):
        attention.n_heads = int(keep_heads.numel())
    if keep_heads.numel() == 0 and not isinstance(attention, NoHeadAttention):
        out_path = layout["attn_out"]
        owned = out_path.startswith(layout["attention"] + ".")
        out_name = out_path[len(layout["attention"]) + 1 :] if owned else None
        out_proj = get_module(layer, out_path) if owned else None
        set_module(layer, layout["attention"], NoHeadAttention(out_name, out_proj))
    keep_neurons = keep_neurons.long().flatten()
    shrink_linear(get_module(layer, layout["ffn_in"]), keep_neurons, dim=0)
    shrink_linear(get_module(layer, layout["ffn_out"]), keep_neurons, dim=1)


def resize_to_counts(model: nn.Module, family: str) -> None:
    """Shrink a freshly built model to the per-layer counts stored in its config."""
    config = model.config
    heads, neurons = config.fastprune_heads, config.fastprune_neurons
    layout = LAYOUTS[family]
    layers = get_module(model.base_model, layout["layers"])
    num_heads = getattr(config, layout["num_heads_attr"])
    head_size = config.hidden_size // num_heads
    if len(heads) != len(layers) or len(neurons) != len(layers):
        raise ValueError(
            f"fastprune_heads/fastprune_neurons list {len(heads)}/{len(neurons)} layers "
            f"but the model has {len(layers)}"
        )
    with torch.no_grad():
        for layer, h, n in zip(layers, heads, neurons, strict=True):
            prune_layer(layer, layout, torch.arange(int(h)), torch.arange(int(n)), head_size)


class FastPruneBertForSequenceClassification(BertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        resize_to_counts(self, "bert")


class FastPruneBertForQuestionAnswering(BertForQuestionAnswering):
    def __init__(self, config):
        super().__init__(config)
        resize_to_counts(self, "bert")


class FastPruneDistilBertForSequenceClassification(DistilBertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        resize_to_counts(self, "distilbert")


class FastPruneDistilBertForQuestionAnswering(DistilBertForQuestionAnswering):
    def __init__(self, config):
        super().__init__(config)
        resize_to_counts(self, "distilbert")


# (family, Auto class) -> class above; used to write ``auto_map`` into a saved config.
CLASSES = {
    ("bert", "AutoModelForSequenceClassification"): FastPruneBertForSequenceClassification,
    ("bert", "AutoModelForQuestionAnswering"): FastPruneBertForQuestionAnswering,
    ("distilbert", "AutoModelForSequenceClassification"):
        FastPruneDistilBertForSequenceClassification,
    ("distilbert", "AutoModelForQuestionAnswering"): FastPruneDistilBertForQuestionAnswering,
}

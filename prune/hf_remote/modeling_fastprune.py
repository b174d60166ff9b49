"""Model code for checkpoints saved by fastprune (structured-pruned Transformer encoders).

This file is copied next to every pruned checkpoint, so it must stay self-contained: it imports
only ``torch`` and ``transformers``, never the ``prune`` package. Pruned layers keep different
numbers of attention heads and FFN neurons, which a stock config cannot describe; the config
therefore carries ``fastprune_heads`` and ``fastprune_neurons`` (one count per layer) and
``fastprune_head_index`` (the original ids of the heads each layer kept). The ``FastPrune*``
classes below build the stock Hugging Face model and then shrink each layer to those counts, so
``from_pretrained(path, trust_remote_code=True)`` loads the smaller weights as they were saved.

``LAYOUTS`` is the one table of module paths per architecture family; ``prune.arch`` builds its
adapters from it. ``MODEL_CLASSES`` is the one table of Hugging Face classes per family; the
saved-model classes are generated from it.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraForQuestionAnswering,
    ElectraForSequenceClassification,
    ElectraModel,
    MPNetForQuestionAnswering,
    MPNetForSequenceClassification,
    MPNetModel,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaModel,
    XLMRobertaForQuestionAnswering,
    XLMRobertaForSequenceClassification,
    XLMRobertaModel,
)

# Paths are relative to one encoder layer; ``layers`` is relative to ``model.base_model``.
# Every family is post-LN: ``attn_norm(x + attn_out(context))`` then
# ``ffn_norm(y + ffn_out(ffn_act(ffn_in(y))))``; mask tuning relies on that structure.
# RoBERTa, XLM-RoBERTa and ELECTRA have BERT's layer modules, so they share its paths.
_BERT_LAYOUT = {
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
}
LAYOUTS: dict[str, dict[str, str]] = {
    "bert": _BERT_LAYOUT,
    "roberta": _BERT_LAYOUT,
    "xlm-roberta": _BERT_LAYOUT,
    "electra": _BERT_LAYOUT,
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
    "mpnet": {
        "layers": "encoder.layer",
        "attention": "attention.attn",  # owns its output projection ``o``
        "query": "attention.attn.q",
        "key": "attention.attn.k",
        "value": "attention.attn.v",
        "attn_out": "attention.attn.o",
        "attn_norm": "attention.LayerNorm",
        "ffn_in": "intermediate.dense",
        "ffn_act": "intermediate.intermediate_act_fn",
        "ffn_out": "output.dense",
        "ffn_norm": "output.LayerNorm",
        "num_heads_attr": "num_attention_heads",
        "intermediate_attr": "intermediate_size",
        # argument of ``attention`` carrying a per-head score bias (B, H, T, T) that the encoder
        # computes once for all layers (MPNet's relative position bias): a head-pruned layer
        # must see only its kept heads' rows of it
        "head_bias": "position_bias",
    },
}

# family -> its Hugging Face classes, in the order of ``AUTO_CLASSES``; the last is the bare
# encoder, which ``AutoModel`` loads from a task checkpoint
AUTO_CLASSES = ("AutoModelForSequenceClassification", "AutoModelForQuestionAnswering",
                "AutoModel")
MODEL_CLASSES: dict[str, tuple[type, type, type]] = {
    "bert": (BertForSequenceClassification, BertForQuestionAnswering, BertModel),
    "distilbert": (DistilBertForSequenceClassification, DistilBertForQuestionAnswering,
                   DistilBertModel),
    "mpnet": (MPNetForSequenceClassification, MPNetForQuestionAnswering, MPNetModel),
    "roberta": (RobertaForSequenceClassification, RobertaForQuestionAnswering, RobertaModel),
    "xlm-roberta": (XLMRobertaForSequenceClassification, XLMRobertaForQuestionAnswering,
                    XLMRobertaModel),
    "electra": (ElectraForSequenceClassification, ElectraForQuestionAnswering, ElectraModel),
}


class NoHeadAttention(nn.Module):
    """Attention of a layer that keeps no head: the per-head context is empty, shape (B, T, 0).

    If the family's attention module owns its output projection (DistilBERT's ``out_lin``,
    MPNet's ``o``), it is kept under the same attribute name, so that its bias still reaches the
    residual sum.
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


def _select_bias_heads(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a head-pruned attention: keep only its heads' rows of the per-head
    score bias (B, H, T, T) computed once by the encoder; ``module.fastprune_head_index`` holds
    the original ids of the kept heads."""
    name, position = module.fastprune_bias_arg
    index = module.fastprune_head_index
    if kwargs.get(name) is not None:
        kwargs = {**kwargs, name: kwargs[name][:, index]}
    elif len(args) > position and args[position] is not None:
        args = (*args[:position], args[position][:, index], *args[position + 1:])
    return args, kwargs


def _keep_bias_heads(attention: nn.Module, name: str, keep: list[int], before: int) -> None:
    """Make ``attention`` (which had ``before`` heads) select the rows ``keep`` of its bias."""
    previous = getattr(attention, "fastprune_head_index", None)
    if previous is None:
        previous = list(range(before))
    index = [previous[k] for k in keep]  # original head ids, also when pruned twice
    if not hasattr(attention, "fastprune_bias_arg"):
        if index == previous:
            return  # nothing removed: the full bias is the right one
        params = list(inspect.signature(attention.forward).parameters)
        attention.fastprune_bias_arg = (name, params.index(name))
        attention.register_forward_pre_hook(_select_bias_heads, with_kwargs=True)
    attention.fastprune_head_index = index


def prune_layer(
    layer: nn.Module,
    layout: dict[str, str],
    keep_heads: torch.Tensor | list[int],
    keep_neurons: torch.Tensor,
    head_size: int,
) -> None:
    """Physically keep the heads ``keep_heads`` and FFN neurons ``keep_neurons`` of one layer.

    ``keep_heads`` are ids among the layer's current heads; for a family with a per-head score
    bias (``layout["head_bias"]``) the attention then selects those heads' rows of it. Pass them
    as a list when building on the meta device (``from_pretrained``), where a tensor has no data.
    """
    if isinstance(keep_heads, torch.Tensor):
        keep_heads = keep_heads.flatten().tolist()
    head_ids = [int(k) for k in keep_heads]
    keep_heads = torch.tensor(head_ids, dtype=torch.long)
    heads_before = get_module(layer, layout["query"]).out_features // head_size
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
    elif keep_heads.numel() and "head_bias" in layout:
        _keep_bias_heads(attention, layout["head_bias"], head_ids, heads_before)
    keep_neurons = keep_neurons.long().flatten()
    shrink_linear(get_module(layer, layout["ffn_in"]), keep_neurons, dim=0)
    shrink_linear(get_module(layer, layout["ffn_out"]), keep_neurons, dim=1)


def resize_to_counts(model: nn.Module, family: str) -> None:
    """Shrink a freshly built model to the per-layer heads and neurons stored in its config.

    The kept heads are ``fastprune_head_index`` when the config has it (needed by families with
    a per-head score bias, where it matters which heads were kept), else the first ones.
    """
    config = model.config
    heads, neurons = config.fastprune_heads, config.fastprune_neurons
    layout = LAYOUTS[family]
    layers = get_module(model.base_model, layout["layers"])
    num_heads = getattr(config, layout["num_heads_attr"])
    head_size = config.hidden_size // num_heads
    index = getattr(config, "fastprune_head_index", None)
    if index is None:
        if "head_bias" in layout and any(int(h) != num_heads for h in heads):
            raise ValueError(f"a pruned {family} checkpoint needs fastprune_head_index in its "
                             "config (the original ids of the heads each layer kept)")
        index = [list(range(int(h))) for h in heads]
    if not len(heads) == len(neurons) == len(index) == len(layers):
        raise ValueError(
            f"fastprune_heads/fastprune_neurons/fastprune_head_index list {len(heads)}/"
            f"{len(neurons)}/{len(index)} layers but the model has {len(layers)}"
        )
    if any(len(i) != int(h) for i, h in zip(index, heads, strict=True)):
        raise ValueError("fastprune_head_index does not match the head counts fastprune_heads")
    with torch.no_grad():
        for layer, kept, n in zip(layers, index, neurons, strict=True):
            prune_layer(layer, layout, kept, torch.arange(int(n)), head_size)


def _saved_model_class(family: str, base: type) -> type:
    """``FastPrune<base>``: ``base`` built from a config, then shrunk to its stored counts."""

    def __init__(self, config):
        base.__init__(self, config)
        resize_to_counts(self, family)

    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses this from the class's source file, where ``NoHeadAttention``
        # would wrongly say no: the pruned model's attention is the base model's
        return base._can_set_attn_implementation()

    name = f"FastPrune{base.__name__}"
    doc = f"A pruned ``{base.__name__}``: the stock model shrunk to the counts in its config."
    return type(name, (base,), {
        "__init__": __init__, "__module__": __name__, "__qualname__": name, "__doc__": doc,
        "_can_set_attn_implementation": classmethod(_can_set_attn_implementation),
    })


# (family, Auto class) -> saved-model class; used to write ``auto_map`` into a saved config.
# Each class is also a module attribute (``FastPruneBertForSequenceClassification``, ...):
# a saved config's ``auto_map`` names it as ``modeling_fastprune.<class name>``.
CLASSES: dict[tuple[str, str], type] = {}
for _family, _bases in MODEL_CLASSES.items():
    for _auto, _base in zip(AUTO_CLASSES, _bases, strict=True):
        _cls = _saved_model_class(_family, _base)
        CLASSES[(_family, _auto)] = globals()[_cls.__name__] = _cls
del _family, _bases, _auto, _base, _cls

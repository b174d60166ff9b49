"""Physical pruning: remove pruned heads and neurons, fold tuned mask values into the weights,
and save / load the smaller model as a normal Hugging Face checkpoint.

Saved checkpoints carry ``fastprune_heads`` / ``fastprune_neurons`` (counts per layer) and
``fastprune_head_index`` (the original ids of each layer's kept heads, which MPNet needs to select
its relative position bias) in their config, an ``auto_map`` and the self-contained
``modeling_fastprune.py``, so that
``AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`` loads them
without this project installed; ``load_pruned(path)`` does the same without remote code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from prune.arch import Adapter, get_adapter
from prune.errors import PruneError
from prune.hf_remote import modeling_fastprune as remote
from prune.masks import Masks
from prune.tune import TunedWeights, set_weights

REMOTE_FILE = Path(remote.__file__)


@torch.no_grad()
def prune_model(model: nn.Module, masks: Masks, adapter: Adapter | None = None,
                weights: TunedWeights | None = None) -> nn.Module:
    """Fold ``masks`` into ``model`` and remove its zero-masked units, in place.

    The result computes what the masked model computes (up to float rounding) with fewer weights.
    ``weights`` (from ``tune=bias|weights``) are written into the projections first.
    """
    adapter = adapter or get_adapter(model)
    masks = masks.to("cpu")
    if tuple(masks.head.shape) != (adapter.num_layers, adapter.num_heads):
        raise PruneError(
            f"head mask has shape {tuple(masks.head.shape)} but the model has "
            f"{adapter.num_layers} layers x {adapter.num_heads} heads; use masks of this model"
        )
    if _is_pruned(model, adapter):
        raise PruneError("this model is already physically pruned; prune the original model")
    set_weights(model, adapter, masks, weights)  # tuned projections (tune=bias|weights)
    kept_heads = [masks.head[l].nonzero().flatten() for l in range(adapter.num_layers)]
    for l, layer in enumerate(adapter.layers(model)):
        out_proj = adapter.module(model, l, "attn_out")
        scale = masks.head[l].repeat_interleave(adapter.head_size)  # [H * dh]
        out_proj.weight.mul_(scale.to(out_proj.weight)[None, :])
        down = adapter.module(model, l, "ffn_out")
        down.weight.mul_(masks.neuron[l].to(down.weight)[None, :])
        remote.prune_layer(
            layer,
            adapter.layout,
            keep_heads=kept_heads[l],
            keep_neurons=masks.neuron[l].nonzero().flatten(),
            head_size=adapter.head_size,
        )
    model.config.fastprune_heads = adapter.heads_per_layer(model)
    model.config.fastprune_neurons = adapter.neurons_per_layer(model)
    model.config.fastprune_head_index = [k.tolist() for k in kept_heads]
    return model


def _is_pruned(model: nn.Module, adapter: Adapter) -> bool:
    """Whether ``model`` came out of ``prune_model`` (or a pruned checkpoint): its config says so
    or some layer has fewer heads or neurons than the architecture."""
    return (hasattr(model.config, "fastprune_heads")
            or adapter.heads_per_layer(model) != [adapter.num_heads] * adapter.num_layers
            or adapter.neurons_per_layer(model)
            != [adapter.intermediate_size] * adapter.num_layers)


def _auto_class(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForQuestionAnswering"):
        return "AutoModelForQuestionAnswering"
    if name.endswith("ForSequenceClassification"):
        return "AutoModelForSequenceClassification"
    raise PruneError(f"cannot save a pruned {name}: only sequence classification and question "
                     f"answering models are supported")


def save_pruned(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Save a physically pruned model (and its tokenizer) so that it reloads as a HF model."""
    path = Path(path)
    if not hasattr(model.config, "fastprune_heads"):
        raise PruneError("save_pruned expects a model returned by prune_model")
    family, auto = model.config.model_type, _auto_class(model)
    cls = remote.CLASSES[(family, auto)]
    model.config.auto_map = {auto: f"{REMOTE_FILE.stem}.{cls.__name__}"}
    model.save_pretrained(path)
    shutil.copyfile(REMOTE_FILE, path / REMOTE_FILE.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_pruned(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a checkpoint written by ``save_pruned`` (or any plain HF checkpoint)."""
    from transformers import (
        AutoConfig,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
    )

    path = Path(path)
    if not (path / "config.json").exists():
        raise PruneError(f"no config.json in {path}: pass a directory written by save_pruned")
    config = AutoConfig.from_pretrained(path)
    auto_map = getattr(config, "auto_map", None) or {}
    if hasattr(config, "fastprune_heads"):
        auto = next(iter(auto_map), "AutoModelForSequenceClassification")
        cls = remote.CLASSES[(config.model_type, auto)]
        return cls.from_pretrained(path).to(device).eval()
    auto_cls = (AutoModelForQuestionAnswering if "AutoModelForQuestionAnswering" in auto_map
                else AutoModelForSequenceClassification)
    return auto_cls.from_pretrained(path).to(device).eval()

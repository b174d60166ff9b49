"""Physical pruning: remove pruned heads and neurons, fold tuned mask values into the weights,
and save / load the smaller model as a normal Hugging Face checkpoint.

Saved checkpoints carry ``fastprune_heads`` / ``fastprune_neurons`` (counts per layer) and
``fastprune_head_index`` (the original ids of each layer's kept heads, which MPNet needs to select
its relative position bias) in their config, an ``auto_map`` and the self-contained
``modeling_fastprune.py``, so that
``AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`` (or
``AutoModel`` for the bare encoder) loads them without this project installed;
``load_pruned(path)`` does the same without remote code. A model pruned in float32 from a
float16 or bfloat16 checkpoint (``config.dtype`` says so) is saved in that dtype.

A pruned model cannot be masked as it is (its layers differ in width); ``expand_pruned`` puts it
back in its architecture's shape, the removed heads and neurons as zero weights, so that it can be
pruned again.
"""

from __future__ import annotations

import copy
import logging
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
HALF_DTYPES = (torch.float16, torch.bfloat16)
log = logging.getLogger(__name__)


@torch.no_grad()
def prune_model(model: nn.Module, masks: Masks, adapter: Adapter | None = None,
                weights: TunedWeights | None = None, allow_empty: bool = False) -> nn.Module:
    """Fold ``masks`` into ``model`` and remove its zero-masked units, in place.

    The result computes what the masked model computes (up to float rounding) with fewer weights.
    ``weights`` (from ``tune=bias|weights``) are written into the projections first. Masks that
    keep no head and no neuron at all are refused unless ``allow_empty``.
    """
    adapter = adapter or get_adapter(model)
    masks = masks.to("cpu")
    if tuple(masks.head.shape) != (adapter.num_layers, adapter.num_heads):
        raise PruneError(
            f"head mask has shape {tuple(masks.head.shape)} but the model has "
            f"{adapter.num_layers} layers x {adapter.num_heads} heads; use masks of this model"
        )
    if _is_pruned(model, adapter):
        raise PruneError("this model is already physically pruned; prune the original model, "
                         "or expand_pruned(model) first")
    if not allow_empty and not bool((masks.head != 0).any() or (masks.neuron != 0).any()):
        raise PruneError(
            "the masks keep no head and no neuron: the pruned model would be only its embeddings "
            "and classifier; raise the constraint (under a latency constraint, time the lookup "
            "table on a quiet machine or with a larger latency.batch_size / latency.seq_len)")
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


def _task_auto(auto_map: dict) -> str:
    """The task's Auto class among a saved ``auto_map`` (which also names ``AutoModel``)."""
    return next((a for a in auto_map if a != "AutoModel"), "AutoModelForSequenceClassification")


def save_pruned(model: nn.Module, path: str | Path, tokenizer=None,
                dtype: str | torch.dtype | None = None) -> Path:
    """Save a physically pruned model (and its tokenizer) so that it reloads as a HF model, with
    the task's Auto class and with ``AutoModel`` (the bare encoder).

    ``dtype`` (``float32``, ``tf32`` = float32 weights, ``float16``, ``bfloat16``): the weights'
    dtype on disk, the deployment dtype. Without it, a float32 model whose ``config.dtype`` is
    float16 or bfloat16 (a half-precision checkpoint loaded in float32 for pruning) is saved in
    that dtype. ``model`` itself is left as it is."""
    path = Path(path)
    if dtype is not None:
        if isinstance(dtype, str):
            names = {"float32": torch.float32, "tf32": torch.float32,
                     "float16": torch.float16, "bfloat16": torch.bfloat16}
            if dtype not in names:
                raise PruneError(f"dtype={dtype!r}: use one of {', '.join(names)}")
            dtype = names[dtype]
        if next(model.parameters()).dtype != dtype:
            model = copy.deepcopy(model).to(dtype)
        model.config.dtype = dtype
    if not hasattr(model.config, "fastprune_heads"):
        raise PruneError("save_pruned expects a model returned by prune_model")
    family, auto = model.config.model_type, _auto_class(model)
    cls, encoder = remote.CLASSES[(family, auto)], remote.CLASSES[(family, "AutoModel")]
    model.config.auto_map = {auto: f"{REMOTE_FILE.stem}.{cls.__name__}",
                             "AutoModel": f"{REMOTE_FILE.stem}.{encoder.__name__}"}
    saved = getattr(model.config, "dtype", None)
    if dtype is None and saved in HALF_DTYPES and next(model.parameters()).dtype == torch.float32:
        log.info("saving the pruned model in %s, the checkpoint's dtype",
                 str(saved).removeprefix("torch."))
        model = copy.deepcopy(model).to(saved)
    model.save_pretrained(path)
    shutil.copyfile(REMOTE_FILE, path / REMOTE_FILE.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_pruned(path: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> nn.Module:
    """Load a checkpoint written by ``save_pruned`` (or any plain HF checkpoint), in its saved
    dtype unless ``dtype`` is given."""
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
    options = {} if dtype is None else {"dtype": dtype}
    if hasattr(config, "fastprune_heads"):
        cls = remote.CLASSES[(config.model_type, _task_auto(auto_map))]
        return cls.from_pretrained(path, **options).to(device).eval()
    auto_cls = (AutoModelForQuestionAnswering if "AutoModelForQuestionAnswering" in auto_map
                else AutoModelForSequenceClassification)
    return auto_cls.from_pretrained(path, **options).to(device).eval()


@torch.no_grad()
def expand_pruned(model: nn.Module) -> nn.Module:
    """A physically pruned model back in its architecture's shape, so that it can be masked,
    scored and pruned again (by ``prune_model``, which removes the zero units once more).

    Each kept head goes back to its original position (``fastprune_head_index``: MPNet's position
    bias needs it), each layer's kept neurons to its first positions; the removed units come back
    with all-zero weights and biases, so they contribute exactly nothing, their Fisher
    importance is zero, and the result computes what ``model`` computes. A new stock model of the
    family's task class is returned; ``model`` is left as it is."""
    adapter = get_adapter(model)
    if not _is_pruned(model, adapter):
        return model
    config = copy.deepcopy(model.config)
    heads_index = getattr(config, "fastprune_head_index", None) or [
        list(range(h)) for h in adapter.heads_per_layer(model)]
    for name in ("fastprune_heads", "fastprune_neurons", "fastprune_head_index", "auto_map"):
        if hasattr(config, name):
            delattr(config, name)
    auto = _auto_class(model)
    base = remote.MODEL_CLASSES[adapter.family][remote.AUTO_CLASSES.index(auto)]
    dtype = next(model.parameters()).dtype
    full = base(config).to(dtype=dtype, device=next(model.parameters()).device).eval()
    ours, theirs = full.state_dict(), model.state_dict()
    full.load_state_dict({k: v for k, v in theirs.items()
                          if k in ours and ours[k].shape == v.shape}, strict=False)
    for l, kept in enumerate(heads_index):
        _expand_layer(adapter, model, full, l, kept)
    return full


def _expand_layer(adapter: Adapter, pruned: nn.Module, full: nn.Module, layer: int,
                  kept_heads: list[int]) -> None:
    """Copy one layer's kept units of ``pruned`` into ``full`` and zero the others."""
    dh = adapter.head_size
    rows = torch.tensor([k * dh + i for k in kept_heads for i in range(dh)], dtype=torch.long)
    n = adapter.neurons_per_layer(pruned)[layer]
    units = {"query": (rows, 0), "key": (rows, 0), "value": (rows, 0), "attn_out": (rows, 1),
             "ffn_in": (torch.arange(n), 0), "ffn_out": (torch.arange(n), 1)}
    for part, (index, dim) in units.items():
        target = adapter.module(full, layer, part)
        target.weight.zero_()
        if dim == 0 and target.bias is not None:
            target.bias.zero_()
        if index.numel() == 0:
            continue  # a layer that kept no head has no query, key or value to copy
        source = adapter.module(pruned, layer, part)
        target.weight.index_copy_(dim, index.to(target.weight.device), source.weight)
        if target.bias is not None:
            if dim == 0:
                target.bias.index_copy_(0, index.to(target.bias.device), source.bias)
            else:
                target.bias.copy_(source.bias)

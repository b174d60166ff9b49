"""Small helpers every stage shares: a model's device and its name, moving batches, and
evaluation mode with frozen weights, always restored afterwards."""

from __future__ import annotations

import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

LABEL_KEYS = ("labels", "start_positions", "end_positions")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def cpu_name() -> str:
    """The CPU model as the OS names it (``platform.processor()`` is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's (what a timing was taken on)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def without_labels(batch: dict) -> dict:
    """The model inputs of a batch (labels and answer positions dropped)."""
    return {k: v for k, v in batch.items() if k not in LABEL_KEYS}


@contextmanager
def eval_mode(model: nn.Module, freeze: bool = False) -> Iterator[torch.device]:
    """Eval mode inside the block (and, with ``freeze``, weights that need no gradient); the
    previous mode and flags are restored after. Yields the model's device."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    try:
        yield model_device(model)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)

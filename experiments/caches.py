"""A disk cache for the Fisher information, so that a sweep over constraints (same model, task,
seed and sample set) pays for the gradient pass once.

The key hashes everything the Fisher depends on: the checkpoint (its name and, for a local
directory, the size and modification time of its weight files), the task, the seed, the sample
count and drawing, the batch size and the maximum sequence length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from prune.fisher import Fisher

log = logging.getLogger(__name__)


def checkpoint_fingerprint(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.is_dir():
        return {"checkpoint": name_or_path}
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return {"checkpoint": str(path.resolve()),
            "files": [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]}


def fisher_key(**fields) -> str:
    """A short stable hash of the fields (JSON-serialisable values)."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_fisher(cache_dir: str | Path | None, key: str,
                  compute: Callable[[], Fisher]) -> tuple[Fisher, bool]:
    """(Fisher, hit): load ``<cache_dir>/<key>.pt`` or compute and store it atomically."""
    if cache_dir is None:
        return compute(), False
    path = Path(cache_dir) / f"{key}.pt"
    if path.exists():
        try:
            fisher = Fisher.from_state_dict(torch.load(path, map_location="cpu"))
            log.info("Fisher information from cache %s", path)
            return fisher, True
        except Exception as err:  # a damaged file is recomputed, not fatal
            log.warning("ignoring unreadable Fisher cache %s (%s)", path, err)
    fisher = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(fisher.state_dict(), tmp)
    os.replace(tmp, path)
    return fisher, False

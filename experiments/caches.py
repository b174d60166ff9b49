"""Disk caches of expensive intermediate results, and the fingerprints they are keyed on.

A cache answers only the question it was asked: each entry is keyed on everything that changes
its answer and stores that key beside the value, so a lookup with any other input (other data
content, task spec, checkpoint, device, dtype, measurement settings or code version) is a miss,
never a stale hit. Writing a cache entry is optional work: a failure warns and the run goes on.

- the Fisher information (a sweep over constraints pays for the gradient pass once);
- the latency lookup table of a model shape on a machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from experiments.records import WRITE_ERRORS, write_atomic, write_failure
from prune.arch import Adapter
from prune.fisher import Fisher
from prune.latency import LatencyTable, build_latency_table, check_dtype
from prune.runtime import device_name, model_device

log = logging.getLogger(__name__)


def key_hash(fields: dict) -> str:
    """A short stable hash of JSON-serialisable fields."""
    return hashlib.sha256(canonical(fields).encode()).hexdigest()[:16]


def canonical(fields: dict) -> str:
    return json.dumps(fields, sort_keys=True, default=str)


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            h.update(block)
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".txt", ".model")


def weights_fingerprint(name_or_path: str) -> dict:
    """A local checkpoint by the content of its files (weights, config, tokenizer); a hub id by
    its name."""
    path = Path(name_or_path)
    if not path.is_dir():
        return {"hub": name_or_path}
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                   and p.name != "finetune.json")
    return {"files": {p.name: file_digest(p) for p in files}}


def data_fingerprint(spec, split: str) -> dict:
    """The data of one split: the local file's name and content digest, or the hub dataset."""
    from experiments.data import find_local_file

    path = find_local_file(spec, split)
    if path is not None:
        return {"file": Path(path).name, "sha256": file_digest(path)}
    return {"hub": [spec.hub_path, spec.hub_name, spec.hub_split(split)]}


def _save_quietly(path: Path, write: Callable[[Path], None], what: str) -> None:
    try:
        write_atomic(path, write)
    except WRITE_ERRORS as err:
        log.warning("could not write the %s cache %s (%s); going on without it", what, path,
                    write_failure(err))


def cached_fisher(cache_dir: str | Path | None, key: dict,
                  compute: Callable[[], Fisher]) -> tuple[Fisher, bool]:
    """(Fisher, hit): the entry of ``key`` in ``cache_dir`` if there is one, else compute it
    (and store it if it is finite).

    Parallel jobs with the same key compute it once: the one that creates the lock file beside
    the entry (``<hash>.pt.lock``, holding ``host:pid``) computes, the others wait until the
    entry appears or the holder is gone (then one of them computes). A lock left by a dead
    process of this host is taken over; the lock is always removed when its holder is done."""
    if cache_dir is None:
        return compute(), False
    path = Path(cache_dir) / f"{key_hash(key)}.pt"
    lock = path.with_name(path.name + ".lock")
    waited = False
    while True:
        fisher = _read_fisher(path, key)
        if fisher is not None:
            return fisher, True
        if _take_lock(lock):
            break
        if not waited:
            log.info("waiting for %s, which computes the same Fisher information (lock %s; "
                     "remove it if that process is gone)", _lock_holder(lock), lock)
            waited = True
        time.sleep(LOCK_POLL_SECONDS)
    try:
        fisher = _read_fisher(path, key)  # written while this process took the lock
        if fisher is not None:
            return fisher, True
        fisher = compute()
        fisher.check_finite()
        state = {"key": canonical(key), "fisher": fisher.state_dict()}
        _save_quietly(path, lambda tmp: torch.save(state, tmp), "Fisher")
        return fisher, False
    finally:
        _release(lock)


LOCK_POLL_SECONDS = 2.0


def _read_fisher(path: Path, key: dict) -> Fisher | None:
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu")
        if saved.get("key") == canonical(key):
            log.info("Fisher information from cache %s", path)
            return Fisher.from_state_dict(saved["fisher"])
        log.warning("Fisher cache %s holds another key; recomputing", path)
    except Exception as err:  # a damaged file is recomputed, not fatal
        log.warning("ignoring unreadable Fisher cache %s (%s)", path, err)
    return None


def _take_lock(lock: Path) -> bool:
    """Create ``lock`` holding this process's ``host:pid``; ``False`` while a live process
    holds it. A lock of a dead process of this host is removed and taken. A cache directory
    that cannot be written is no reason to wait: the lock is then skipped."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # writing the entry will warn
        log.debug("no lock %s (%s); computing without one", lock, write_failure(err))
        return True
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _holder_alive(lock):
                return False
            log.warning("taking over the stale Fisher cache lock %s of %s", lock,
                        _lock_holder(lock))
            try:
                lock.unlink(missing_ok=True)
            except OSError:
                return True  # cannot be removed: compute without it
            continue
        except OSError as err:  # writing the entry will warn
            log.debug("no lock %s (%s); computing without one", lock, write_failure(err))
            return True
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{socket.gethostname()}:{os.getpid()}")
        return True
    return False


def _release(lock: Path) -> None:
    """Remove ``lock`` if this process holds it."""
    try:
        if lock.read_text().strip() == f"{socket.gethostname()}:{os.getpid()}":
            lock.unlink()
    except OSError:
        pass


def _lock_holder(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "an unknown process"
    except OSError:
        return "an unknown process"


def _holder_alive(lock: Path) -> bool:
    """Whether the process named in ``lock`` runs: one of another host is taken to be alive
    (its processes cannot be seen), an unreadable or empty lock that is not new is dead."""
    try:
        host, _, pid = lock.read_text().strip().rpartition(":")
        if host and host != socket.gethostname():
            return True
        os.kill(int(pid), 0)
    except PermissionError:
        return True  # alive, another user's
    except FileNotFoundError:
        return False  # released meanwhile
    except (ValueError, OSError):
        return _is_new(lock)  # being written by its holder, or left behind half-written
    return True


def _is_new(lock: Path, seconds: float = 10.0) -> bool:
    try:
        return time.time() - lock.stat().st_mtime < seconds
    except OSError:
        return False


def latency_table_key(model: nn.Module, adapter: Adapter, batch_size: int, seq_len: int,
                      points: int, min_run_time: float, dtype: str = "float32") -> dict:
    """Everything a measured latency table depends on. ``dtype`` is the precision it is timed
    in (``prune.latency.DTYPES``; the model is timed as a cast copy, so its own weights' dtype
    does not change the answer)."""
    device = model_device(model)
    name = device_name(device)
    return {"device": f"{device.type}:{name}", "threads": torch.get_num_threads(),
            "dtype": check_dtype(dtype),
            "attention": getattr(model.config, "_attn_implementation", None),
            "family": adapter.family, "layers": adapter.num_layers, "heads": adapter.num_heads,
            "hidden": adapter.hidden_size, "ffn": adapter.intermediate_size,
            "batch_size": batch_size, "seq_len": seq_len, "points": points,
            "min_run_time": min_run_time, "torch": torch.__version__, "version": 4}


def cached_latency_table(model: nn.Module, adapter: Adapter, cache_dir: str | Path | None,
                         batch_size: int = 32, seq_len: int = 128, points: int = 8,
                         min_run_time: float = 1.0, dtype: str = "float32") -> LatencyTable:
    """The table of this machine, model shape, measurement settings and precision (``dtype``,
    one of ``prune.latency.DTYPES``): cached or measured."""
    key = latency_table_key(model, adapter, batch_size, seq_len, points, min_run_time, dtype)
    path = Path(cache_dir) / f"latency-{key_hash(key)}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == json.loads(canonical(key)):
                cached = LatencyTable.from_dict(saved["table"])
                if not cached.is_noise():  # one cached before the noise rules it fails: re-time
                    return cached
        except (OSError, ValueError, TypeError) as err:
            log.warning("ignoring unreadable latency table %s (%s)", path, err)
    table = build_latency_table(model, adapter, batch_size, seq_len, points, min_run_time,
                                dtype)
    reason = table.noise_reason()
    if reason is not None:  # usable for this run, but never served to later ones
        log.warning("the latency lookup table looks like noise: %s (batch %d, %d tokens, %g s "
                    "per point, %s), so its budgets are not to be trusted. Time it on a quiet "
                    "machine or raise latency.batch_size, latency.seq_len or "
                    "latency.table_min_run_time; it was not cached", reason, batch_size, seq_len,
                    min_run_time, dtype)
    elif path is not None:
        text = json.dumps({"key": json.loads(canonical(key)), "table": table.to_dict()})
        _save_quietly(path, lambda tmp: tmp.write_text(text), "latency table")
    return table


"""What a result depends on: the one place that decides it.

A run's *identity* is everything its numbers depend on: the settings (the resolved config
without the neutral keys below, and without the options the run cannot depend on), the content
digests of its data files and of its checkpoint, the device it ran on, and the **code**, as a
digest of the source of the modules that compute numbers. No version is bumped by hand: a
change to one line of ``prune/tune.py`` changes the digest, so the next sweep re-runs instead
of serving the old record as finished, and ``make tables`` never pools the two.

The runner (skip-finished check), the caches (Fisher key) and ``analysis`` (which runs are seeds
of one setting) all use this module; ``analysis`` never imports the runner.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)

# Settings that do not change a run's result: where files live (their content is keyed
# separately), how it reports, re-run flags. The device is keyed as the device actually used.
NEUTRAL_KEYS = ("paths", "force", "progress", "save_model", "sweep_name", "device", "logger",
                "prune.fisher_cache_dir", "task.local_dir", "prune.sample_file", "model.path",
                "constraint")

# Options of the latency lookup table: they change a run's result only under a latency
# constraint, so a FLOPs-constrained run's identity leaves them out.
LATENCY_TABLE_KEYS = ("table_points", "table_min_run_time")

# Fine-tune options added after checkpoints were made, with their defaults: at the default they
# are left out of the fine-tune cache key and of a run's identity.
FINETUNE_ADDED = {"group_by_length": False}

# The source whose digest pins a record: the library, and the harness modules that compute
# numbers (data, batching, evaluation, metrics, loading, the run's stages). Modules that only
# report, cache or name things are left out, so a new log line re-runs nothing.
CODE_FILES = ("prune/*.py", "experiments/data.py", "experiments/tasks.py",
              "experiments/metrics.py", "experiments/evaluation.py", "experiments/squad.py",
              "experiments/checkpoints.py", "experiments/runner.py")
# What the Fisher information depends on (its cache key): the gradient pass, the masks and
# adapters, the samples and their batches; the adaptive pass also searches and rearranges.
FISHER_FILES = ("prune/fisher.py", "prune/masks.py", "prune/arch.py", "prune/runtime.py",
                "prune/pipeline.py", "prune/search.py", "prune/rearrange.py", "prune/cost.py",
                "experiments/data.py", "experiments/tasks.py", "experiments/checkpoints.py")
# What a fine-tuned checkpoint depends on besides its inputs (the fine-tune cache's key): the
# training loop, the data it reads and batches, the task specs. Evaluation only reports.
FINETUNE_FILES = ("experiments/finetune.py", "experiments/data.py", "experiments/tasks.py")
RECORD_SCHEMA = 3  # the layout of results.json (experiments.records.Record)


def canonical(value) -> str:
    """One text per value: sorted keys, anything else by ``str``."""
    return json.dumps(value, sort_keys=True, default=str)


def key_hash(value, n: int = 16) -> str:
    """A short stable hash of a JSON-serialisable value."""
    return hashlib.sha256(canonical(value).encode()).hexdigest()[:n]


def source_files(patterns: tuple[str, ...] = CODE_FILES, root: Path | None = None) -> list[Path]:
    root = ROOT if root is None else Path(root)
    files = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def code_digest(patterns: tuple[str, ...] = CODE_FILES, root: str | Path | None = None) -> str:
    """SHA-256 (16 hex digits) over the paths and bytes of the source files ``patterns`` under
    ``root`` (the project's root by default).

    Without ``root``, for the digests a record and the Fisher cache carry (``CODE_FILES``,
    ``FISHER_FILES``): the source as this process loaded it, taken when this module was
    imported (with the library, at the process's start), not as it is on disk now, so that a
    file edited while a sweep runs does not label the records of the code still running with
    the edit's digest; a warning says so once."""
    if root is None:
        loaded = _AT_IMPORT.get((tuple(patterns), str(ROOT)))
        if loaded is not None:
            digest, stamp = loaded
            if _stamp(patterns, ROOT) != stamp and (tuple(patterns),) not in _WARNED:
                _WARNED.add((tuple(patterns),))
                log.warning("the source changed on disk since this process started: its "
                            "records name the code it loaded (%s); a new process runs the "
                            "edit", digest)
            return digest
    root = Path(ROOT if root is None else root).resolve()
    return _digest(tuple(patterns), str(root), _stamp(patterns, root))


# (patterns, root) -> (digest, stamp) of the source this process loaded (``code_digest``)
_AT_IMPORT: dict[tuple, tuple[str, tuple]] = {}
_WARNED: set = set()


def _snapshot(patterns: tuple[str, ...]) -> None:
    stamp = _stamp(patterns, ROOT)
    _AT_IMPORT[(tuple(patterns), str(ROOT))] = (_digest(tuple(patterns), str(ROOT), stamp),
                                               stamp)


def _stamp(patterns, root: Path) -> tuple:
    """Sizes and modification times: an edited file misses the digest's cache."""
    return tuple((p.as_posix(), p.stat().st_mtime_ns, p.stat().st_size)
                 for p in source_files(tuple(patterns), root))


@cache
def _digest(patterns: tuple[str, ...], root: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    base = Path(root)
    for path in source_files(patterns, base):
        h.update(path.relative_to(base).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def code_identity() -> dict:
    """The ``code`` part of an identity."""
    return {"digest": code_digest(), "schema": RECORD_SCHEMA}


def settings_of(config: dict, prefix: str = "") -> dict:
    """The resolved config without ``NEUTRAL_KEYS``: the settings a result depends on."""
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if path in NEUTRAL_KEYS:
            continue
        out[key] = settings_of(value, path + ".") if isinstance(value, dict) else value
    return out


def without_added_defaults(block):
    """A fine-tune settings block without the ``FINETUNE_ADDED`` options left at their default
    (for the fine-tune cache key and for a run's identity alike)."""
    if not isinstance(block, dict):
        return block
    return {k: v for k, v in block.items()
            if not (k in FINETUNE_ADDED and v == FINETUNE_ADDED[k])}


def task_finetune(shared: dict, per_task, task: str | None) -> dict:
    """The fine-tune settings a task uses: the shared ``model.finetune`` block updated with the
    task's entry in ``model.finetune_tasks`` (epochs, samples, ...), if it has one."""
    own = per_task.get(task) if isinstance(per_task, dict) else None
    return {**shared, **own} if isinstance(own, dict) else dict(shared)


def used_settings(settings: dict) -> dict:
    """``settings`` without the options this run cannot depend on: the latency lookup table's
    unless ``constraint_kind`` is ``latency``; of the fine-tune settings, only this task's
    (``model.finetune`` updated with its ``model.finetune_tasks`` entry), without the options
    added later left at their defaults. Idempotent: stored identities of either form compare
    equal."""
    model = settings.get("model")
    if isinstance(model, dict):
        model = {**model}
        per_task = model.pop("finetune_tasks", None)
        task = settings.get("task", {}).get("name") if isinstance(settings.get("task"),
                                                                   dict) else None
        if isinstance(model.get("finetune"), dict):
            model["finetune"] = without_added_defaults(
                task_finetune(model["finetune"], per_task, task))
        settings = {**settings, "model": model}
    latency = settings.get("latency")
    if settings.get("constraint_kind", "flops") == "latency" or not isinstance(latency, dict):
        return settings
    return {**settings, "latency": {k: v for k, v in latency.items()
                                    if k not in LATENCY_TABLE_KEYS}}


def used_identity(identity: dict) -> dict:
    """An identity with ``used_settings``: how a stored one compares with one made now."""
    settings = identity.get("settings")
    return {**identity, "settings": used_settings(settings)} if isinstance(settings, dict) \
        else identity


def run_identity(config: dict, data: dict, checkpoint: dict, device: str,
                 adaptive_constraints: list[float] | None = None) -> dict:
    """Everything a run's result depends on except the constraint: ``config`` is the resolved
    run config, ``data`` the digests of its data files, ``checkpoint`` the checkpoint's."""
    identity = {"settings": used_settings(settings_of(copy.deepcopy(config))), "data": data,
                "checkpoint": checkpoint, "device": device, "code": code_identity()}
    if adaptive_constraints is not None:  # the adaptive pass stops on all their masks
        identity["adaptive_constraints"] = sorted(adaptive_constraints)
    return identity


def same_identity(a: dict, b: dict) -> bool:
    """Whether two identities (stored or new) name the same computation."""
    return json.loads(canonical(used_identity(a))) == json.loads(canonical(used_identity(b)))


def code_of(identity: dict) -> str | None:
    """The code digest an identity names; ``None`` for records made before it existed."""
    code = identity.get("code") if isinstance(identity, dict) else None
    return code.get("digest") if isinstance(code, dict) else None


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (nested) dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


for _patterns in (CODE_FILES, FISHER_FILES):  # the source as this process loaded it
    _snapshot(_patterns)

"""Which runs are the same experiment, and what to call them.

A run's *identity* is everything its result depends on (``experiments.identity``): the
settings (the resolved config without neutral keys), data and checkpoint digests, device, the
code digest, and the constraint. Runs whose identities differ only in the seed are seeds of
one *setting* (averaged); identical identities are repeats of one run (counted once). Records
written before the identity existed get one derived from their config and top-level fields.

Labels make a setting readable: its ``stage`` (how far the pipeline went, paper Table 3) and its
``variant`` (the prune options that depart from the schema's defaults, ``experiments.config``).
"""

from __future__ import annotations

import copy
import dataclasses
from functools import cache
from pathlib import Path

import yaml

from experiments.config import PruneConf
from experiments.identity import canonical, code_of, key_hash, settings_of, used_identity

STAGE_KEYS = ("rearrange", "tune", "tune_teacher")  # define the stage, not the variant
PATH_KEYS = ("fisher_cache_dir", "sample_file")  # where inputs live (their content is keyed)
STAGES = ["search", "+rearrange", "+mask", "+mask (TA)", "+bias", "+weights"]
DEFAULT_STAGE = "+mask"  # the paper's full pipeline, the library's default
OFFICIAL_PRESET = Path(__file__).resolve().parents[1] / "conf" / "preset" / "official.yaml"


@cache
def prune_defaults() -> dict:
    """Every ``prune.*`` option of the config schema with its default."""
    return {f.name: None if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(PruneConf)}


@cache
def official_prune() -> dict:
    """The ``prune.*`` values the official preset sets (``conf/preset/official.yaml``)."""
    try:
        return dict((yaml.safe_load(OFFICIAL_PRESET.read_text()) or {}).get("prune") or {})
    except OSError:
        return {}


def short_hash(value, n: int = 10) -> str:
    return key_hash(value, n)


def identity_of(record: dict) -> dict:
    """The record's identity; derived from its config for records written before it existed."""
    if record.get("identity"):
        identity = copy.deepcopy(record["identity"])
        identity.setdefault("constraint", float(record["constraint"]))
    else:
        identity = derived_identity(record)
    return used_identity(identity)  # as the runner compares them


def derived_identity(record: dict) -> dict:
    """An identity for an older record: its config without neutral keys, completed from the
    record's own fields (model, task, kind, seed, sample count; ``tune_samples`` unset meant
    tuning on all samples before the option existed), checkpoint, device and versions."""
    settings = settings_of(copy.deepcopy(record.get("config") or {}))
    fills = {"model.name": record["model"], "task.name": record["task"],
             "constraint_kind": record.get("constraint_kind", "flops"),
             "seed": record.get("seed", 0), "prune.num_samples": record.get("num_samples"),
             "prune.tune_samples": None}
    for dotted, value in fills.items():
        *parents, leaf = dotted.split(".")
        node = settings
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node.setdefault(leaf, value)
    return {"settings": settings, "data": record.get("data"),
            "checkpoint": record.get("checkpoint"), "device": record.get("device"),
            "code": record.get("versions"), "constraint": float(record["constraint"])}


def setting_of(identity: dict) -> dict:
    """The identity without the seed and the constraint: what seeds of one setting share."""
    out = {k: v for k, v in identity.items() if k != "constraint"}
    out["settings"] = {k: v for k, v in (identity.get("settings") or {}).items() if k != "seed"}
    return out


def without(identity: dict, dotted: tuple[str, ...]) -> dict:
    """A copy of ``identity`` without the given dotted keys (e.g. ``settings.prune.tune``)."""
    out = copy.deepcopy(identity)
    for key in dotted:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def prune_settings(settings: dict) -> dict:
    return settings.get("prune") or {}


def tune_mode(value) -> str:
    """``prune.tune``: older records stored a bool (true meant mask tuning)."""
    if value is True:
        return "mask"
    if value is False or value is None:
        return "off"
    return str(value)


def stage_of(settings: dict) -> str:
    """How far the pipeline went: search, +rearrange, +mask, +mask (TA), +bias, +weights."""
    p, defaults = prune_settings(settings), prune_defaults()
    tune = tune_mode(p.get("tune", defaults["tune"]))
    rearrange = p.get("rearrange", defaults["rearrange"])
    if tune == "off":
        return "+rearrange" if rearrange else "search"
    label = f"+{tune}" + (" (TA)" if p.get("tune_teacher") == "ta" else "")
    return label if rearrange else f"{label} (no rearrange)"


def _same(a, b) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def show(value) -> str:
    """A setting's value as one would type it in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def departures_of(settings: dict) -> dict:
    """The prune options (and ``eval.max_samples``) that differ from the schema's defaults, or
    from the official preset's values for a run made with ``preset=official``; stage keys,
    paths and the seed excluded."""
    p, defaults = prune_settings(settings), prune_defaults()
    reference = official_prune() if settings.get("preset") == "official" else {}
    out = {}
    for key in [*defaults, *sorted(set(p) - set(defaults))]:
        if key in STAGE_KEYS or key in PATH_KEYS:
            continue
        value = p.get(key, defaults.get(key))
        if not _same(value, reference.get(key, defaults.get(key))):
            out[key] = value
    max_samples = (settings.get("eval") or {}).get("max_samples")
    if max_samples is not None:
        out["eval.max_samples"] = max_samples
    return out


def variant_of(settings: dict) -> str:
    """``default``, ``official`` (``preset=official``), or ``key=value,...`` of the
    departures; a run of the official preset that departs from it shows both."""
    parts = [f"{k}={show(v)}" for k, v in departures_of(settings).items()]
    preset = settings.get("preset") or "none"
    if preset != "none":
        parts.insert(0, "official" if preset == "official" else f"preset={preset}")
    return ",".join(parts) or "default"


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: canonical(value) if isinstance(value, (list, dict)) else value}


def _part(identity: dict, key: str) -> str:
    """One distinguishing entry: a settings key with its value; the code by its source digest;
    data and checkpoint by a short digest of their whole content."""
    top = key.split(".")[0]
    if top == "code" and code_of(identity):  # the digest the run summary and demo table print
        return f"code={code_of(identity)[:6]}"
    if top in ("data", "checkpoint", "code"):
        return f"{top}={short_hash(identity.get(top), 6)}"
    flat = flatten(identity)
    value = show(flat[key]) if key in flat else "unset"
    label = key.removeprefix("settings.")
    return f"{label}={value[:16]}"


def differences(identities: dict[str, dict], limit: int = 3) -> dict[str, str]:
    """For identities that share their labels: what tells each apart (``""`` when alone)."""
    if len(identities) < 2:
        return {name: "" for name in identities}
    flats = {name: flatten(ident) for name, ident in identities.items()}
    keys = sorted({k for f in flats.values() for k in f})
    varying = [k for k in keys
               if len({canonical(f[k]) if k in f else "\0unset" for f in flats.values()}) > 1]
    out = {}
    for name, ident in identities.items():
        parts = list(dict.fromkeys(_part(ident, k) for k in varying))
        text = ",".join(parts[:limit]) + (f",+{len(parts) - limit} more" if len(parts) > limit
                                          else "")
        out[name] = text
    if len(set(out.values())) < len(out):  # a truncated description may not tell them apart
        out = {name: f"{text} #{short_hash(identities[name], 6)}" for name, text in out.items()}
    return out

"""The committed results: every run's record, compact, in ``analysis/results/records.jsonl``.

Run directories (``outputs/``) do not survive the machine; this file does. ``make tables`` adds
the records it finds under ``outputs/`` to it (a run already in the store is replaced by its
newer record; nothing else is dropped) and makes every table, and the README's result blocks,
from the store alone, so a fresh clone reproduces them byte for byte.

Records that a re-run on a new checkpoint replaced are moved by hand to ``superseded.jsonl``
beside it (not tabled, kept): the MiniLM SST-2 and CoLA records of another machine's fine-tunes
(replaced on 2026-12-01).

A stored record is the run's ``results.json`` (``experiments.records.Record``) without the
bulky parts no table reads (the resolved config is kept as its sweep name; the identity holds
the settings; of the tuning fits only the output check, ``tune_output``), plus where it came
from (``_source``) and when it was written (``_written``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

from analysis.identity import derived_identity, identity_of, setting_of, short_hash
from experiments.identity import canonical
from experiments.records import Record, write_atomic

log = logging.getLogger(__name__)

STORE = Path(__file__).with_name("results") / "records.jsonl"


def compact(record: dict, source: str, written: float) -> dict:
    """What the store keeps of a record."""
    out = {k: v for k, v in record.items() if k not in ("config", "tune")}
    check = (record.get("tune") or {}).get("output")
    if check:  # the output check of bias/weight tuning (prune.guard): small, and read back
        out["tune_output"] = check
    if not record.get("identity"):  # older records: the identity their config implies
        out["identity"] = derived_identity(record)
    out["config"] = {"sweep_name": (record.get("config") or {}).get("sweep_name")}
    out["_source"], out["_written"] = source, written
    return out


def run_key(record: dict) -> str:
    """One run: its identity (code digest included), seed and constraint."""
    identity = identity_of(record)
    seed = record.get("seed", (identity.get("settings") or {}).get("seed", 0))
    return short_hash({**setting_of(identity), "seed": seed,
                       "constraint": float(record["constraint"])}, 16)


def from_runs(*roots: str | Path) -> Iterator[dict]:
    """The records under run directories, compacted; unreadable ones warn and are skipped."""
    for root in roots:
        for path in sorted(Path(root).rglob("results.json")):
            try:
                record = json.loads(path.read_text())
                Record.from_dict(record)
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("skipping %s: %r", path, err)
                continue
            yield compact(record, str(path.parent), path.stat().st_mtime)


def read(path: str | Path = STORE) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sweeps_of(record: dict) -> list[str]:
    """The sweeps a stored run belongs to: its own, and those of the repeats it replaced."""
    own = (record.get("config") or {}).get("sweep_name")
    return sorted({*(record.get("_sweeps") or []), *([own] if own else [])})


def merge(stored: list[dict], new: list[dict]) -> list[dict]:
    """``stored`` with ``new`` added; of two records of one run, the newer one, which keeps the
    sweeps of both (``_sweeps``): a run repeated by another sweep still counts in the first."""
    runs: dict[str, dict] = {}
    for record in [*stored, *new]:
        key = run_key(record)
        if key not in runs:
            runs[key] = record
            continue
        newer, older = ((record, runs[key])
                        if record.get("_written", 0) >= runs[key].get("_written", 0)
                        else (runs[key], record))
        sweeps = sorted({*sweeps_of(newer), *sweeps_of(older)})
        runs[key] = {**newer, "_sweeps": sweeps} if len(sweeps) > 1 else newer
    return sorted(runs.values(), key=lambda r: (r["model"], r["task"], r.get("_source", ""),
                                                 float(r["constraint"])))


def write(records: list[dict], path: str | Path = STORE) -> Path:
    text = "".join(canonical(r) + "\n" for r in records)
    return write_atomic(path, lambda tmp: tmp.write_text(text))

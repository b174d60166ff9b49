"""Whether the Hugging Face hub may be used, and loading a dataset from it with one-line errors."""

from __future__ import annotations

import logging
import os

from experiments.errors import RunError

log = logging.getLogger(__name__)

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline() -> bool:
    """True when any of ``OFFLINE_VARS`` is set to 1 / true / yes / on (case-insensitive), the
    values huggingface_hub itself reads as true."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "TRUE", "YES", "ON")
               for v in OFFLINE_VARS)


def connection_errors() -> tuple[type[BaseException], ...]:
    """What the hub's clients raise when the hub cannot be reached: the built-in
    ``ConnectionError`` / ``TimeoutError`` (``datasets`` raises the former), requests' and
    httpx's transport errors, and huggingface_hub's "not in the local cache" error."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:
        pass
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError

        errors.append(LocalEntryNotFoundError)
    except ImportError:
        pass
    return tuple(errors)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def hub_dataset(path: str, name: str | None, split: str, fix: str):
    """``datasets.load_dataset(path, name, split=split)``; a missing ``datasets``, an unreachable
    hub or an unknown dataset is a ``RunError`` naming ``fix`` (where to put local files)."""
    where = f"{path}/{name or ''}:{split}"
    try:
        import datasets
    except ImportError:
        raise RunError(f"loading {where} from the hub needs the `datasets` package "
                       f"(pip install datasets); or {fix}") from None
    not_found = getattr(getattr(datasets, "exceptions", None), "DatasetNotFoundError", ())
    log.info("loading %s from the Hugging Face hub (no local file; to use one: %s)", where, fix)
    try:
        return datasets.load_dataset(path, name, split=split)
    except connection_errors() as err:
        raise RunError(
            f"cannot reach the Hugging Face hub for {where} ({_first_line(err)}); {fix}, or, if "
            f"the dataset is in the Hugging Face cache already, set HF_HUB_OFFLINE=1 "
            f"HF_DATASETS_OFFLINE=1 to use it without the network") from None
    except not_found as err:
        raise RunError(f"the hub has no dataset {where} ({_first_line(err)}); fix "
                       f"task.hub_path / task.hub_name, or {fix}") from None

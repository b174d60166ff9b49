"""Whether the Hugging Face hub may be used."""

from __future__ import annotations

import os

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline() -> bool:
    """True when any of ``OFFLINE_VARS`` is set to 1 / true / yes / on (case-insensitive), the
    values huggingface_hub itself reads as true."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "TRUE", "YES", "ON")
               for v in OFFLINE_VARS)

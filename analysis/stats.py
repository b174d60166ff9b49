"""Mean and spread over seeds, and when two settings differ at all.

One seed is not a result: every cell is ``mean ± sample std`` over seeds. A comparison of two
settings is **paired**: the per-seed differences on the seeds both ran (the seed draws the
sample set, so a seed's two runs share their samples), as ``mean ± sample std`` of those
differences; it reads "no difference" when ``|mean| <= std`` of the differences. With one
common seed there is no spread to judge by, and the cell says so; with none, ``--``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

N_SEEDS = 3  # the sweeps' seed count: cells with another count say so
NOTE = ("mean ± sample std over seeds; (n=k): k seeds, when not 3; comparisons (\"vs\") are "
        "paired on the seeds both settings ran: mean ± std of the per-seed differences; \"no "
        "difference\": |mean| <= that std; \"(n=1)\": one common seed, no spread to judge by")


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (ddof=1; nan for one seed) and count over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, row: pd.Series, value: str) -> Stat:
        """From a ``summarize`` row: ``<value>_mean``, ``_std``, ``_n``."""
        n = row.get(f"{value}_n")
        if n is None or pd.isna(n) or int(n) == 0:
            return cls(math.nan, math.nan, 0)
        return cls(float(row[f"{value}_mean"]), float(row[f"{value}_std"]), int(n))

    @classmethod
    def of_values(cls, values) -> Stat:
        """From the per-seed values themselves."""
        values = [float(v) for v in values if not pd.isna(v)]
        if not values:
            return cls(math.nan, math.nan, 0)
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) \
            if len(values) > 1 else math.nan
        return cls(mean, std, len(values))

    @classmethod
    def pooled(cls, stats: list[Stat]) -> Stat:
        """Several settings' seeds together (e.g. a baseline measured in every setting)."""
        stats = [s for s in stats if s.n]
        if not stats:
            return cls(math.nan, math.nan, 0)
        n = sum(s.n for s in stats)
        mean = sum(s.mean * s.n for s in stats) / n
        sq = sum((s.n - 1) * (0.0 if s.n == 1 else s.std) ** 2 + s.n * (s.mean - mean) ** 2
                 for s in stats)
        return cls(mean, math.sqrt(sq / (n - 1)) if n > 1 else math.nan, n)

    def fmt(self, digits: int = 2, show_n: bool = True) -> str:
        if self.n == 0:
            return "--"
        text = f"{self.mean:.{digits}f}"
        if self.n > 1:
            text += f" ± {self.std:.{digits}f}"
        if show_n and self.n != N_SEEDS:
            text += f" (n={self.n})"
        return text


def same(a: Stat, b: Stat) -> bool:
    """No difference: the means are within the larger spread (never with one seed each: there
    is no spread to judge by)."""
    if a.n == 1 and b.n == 1:
        return False
    spread = max((s.std for s in (a, b) if s.n > 1), default=0.0)
    return abs(b.mean - a.mean) <= spread


def difference(reference: Stat, other: Stat, digits: int = 2) -> str:
    """``other - reference``, e.g. ``+0.46``, ``no difference (+0.12)``, or ``+7.00 (n=1)``
    when each side has one seed."""
    if reference.n == 0 or other.n == 0:
        return "--"
    text = f"{other.mean - reference.mean:+.{digits}f}"
    if reference.n == 1 and other.n == 1:
        return f"{text} (n=1)"
    return f"no difference ({text})" if same(reference, other) else text


def paired(reference: dict, other: dict, digits: int = 2) -> str:
    """``other - reference`` paired on their common seeds (``{seed: value}`` each): ``+0.46 ±
    0.20``, ``no difference (+0.12 ± 0.30)``, ``+7.00 (n=1)``; ``(n=k)`` when k is not
    ``N_SEEDS``; ``--`` without a common seed."""
    seeds = sorted(set(reference) & set(other))
    diffs = [float(other[s]) - float(reference[s]) for s in seeds
             if not (math.isnan(float(other[s])) or math.isnan(float(reference[s])))]
    if not diffs:
        return "--"
    mean = sum(diffs) / len(diffs)
    if len(diffs) == 1:
        return f"{mean:+.{digits}f} (n=1)"
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    text = f"{mean:+.{digits}f} ± {std:.{digits}f}"
    n = f"n={len(diffs)}" if len(diffs) != N_SEEDS else ""
    if abs(mean) <= std:
        return f"no difference ({text}{', ' + n if n else ''})"
    return f"{text} ({n})" if n else text

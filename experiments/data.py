"""Task data: GLUE from local TSV files (the official GLUE distribution format) or the hub.

A ``TaskSpec`` names a task's columns, labels and metric for both sources. Local files are read
first when present; otherwise the hub is tried, unless the machine is offline, in which case the
error names both fixes. Examples are tokenised once without padding and batched with dynamic
padding (each batch padded to its longest sequence).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prune.errors import PruneError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """What a task is and where its data lives (one ``conf/task/*.yaml`` each)."""

    name: str
    kind: str  # "classification", "regression" or "qa"
    num_labels: int
    metric: str  # see prune.metrics.METRICS
    text_columns: tuple[str, ...]  # local TSV columns holding the text (1 or 2)
    label_column: str
    local_dir: str | None = None
    train_files: tuple[str, ...] = ("train.tsv",)  # the first that exists is used
    eval_files: tuple[str, ...] = ("dev.tsv",)
    extra_eval_files: dict = field(default_factory=dict)  # name -> files, e.g. MNLI mismatched
    label_values: tuple[str, ...] | None = None  # label strings in id order, if not integers
    header: bool = True
    column_names: tuple[str, ...] | None = None  # for header-less files (CoLA)
    hub_path: str | None = None
    hub_name: str | None = None
    hub_train_split: str = "train"
    hub_eval_split: str = "validation"
    hub_text_columns: tuple[str, ...] | None = None  # default: text_columns
    hub_extra_eval_splits: dict = field(default_factory=dict)
    hub_label_column: str = "label"
    max_seq_length: int = 128
    # question answering (kind "qa"): SQuAD version and the standard post-processing settings
    squad_version: int = 1
    doc_stride: int = 128
    n_best: int = 20
    max_answer_length: int = 30
    null_threshold: float = 0.0

    def __post_init__(self):
        if self.kind not in ("classification", "regression", "qa"):
            raise PruneError(f"task {self.name}: kind must be classification, regression or qa, "
                             f"not {self.kind!r}")

    def split_files(self, split: str) -> tuple[str, ...]:
        """Local file names of ``train``, ``eval`` or ``eval:<name>`` (an extra eval set)."""
        if split == "train":
            return tuple(self.train_files)
        if split == "eval":
            return tuple(self.eval_files)
        return tuple(self.extra_eval_files[split.split(":", 1)[1]])

    def hub_split(self, split: str) -> str:
        if split == "train":
            return self.hub_train_split
        if split == "eval":
            return self.hub_eval_split
        return self.hub_extra_eval_splits[split.split(":", 1)[1]]

    def eval_splits(self) -> list[str]:
        return ["eval", *(f"eval:{name}" for name in self.extra_eval_files)]


@dataclass
class Examples:
    texts: list[tuple[str, ...]]
    labels: np.ndarray  # int64 for classification, float32 for regression
    source: str  # the file or hub dataset they came from


def _offline() -> bool:
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def find_local_file(spec: TaskSpec, split: str) -> Path | None:
    if not spec.local_dir:
        return None
    for name in spec.split_files(split):
        path = Path(spec.local_dir) / name
        if path.exists():
            return path
    return None


def read_tsv(path: Path, header: bool = True,
             column_names: tuple[str, ...] | None = None) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of a GLUE TSV. Lines end at ``\n`` only: real GLUE files carry stray
    ``\r`` inside rows (SST-2 train), which csv/pandas readers take for line breaks. Fields are
    stripped; rows with the wrong number of fields are skipped with a warning."""
    with open(path, encoding="utf-8", newline="") as handle:
        lines = [line for line in handle.read().split("\n") if line.strip()]
    rows = [[field.strip() for field in line.split("\t")] for line in lines]
    columns = list(column_names) if column_names else (rows[0] if header and rows else [])
    body = rows[1:] if header else rows
    good = [r for r in body if len(r) == len(columns)]
    if len(good) < len(body):
        log.warning("%s: skipped %d malformed row(s)", path, len(body) - len(good))
    return columns, good


def _read_examples(path: Path, spec: TaskSpec) -> Examples:
    columns, rows = read_tsv(path, spec.header, spec.column_names)
    _check_columns(path, spec, columns)
    index = [columns.index(c) for c in spec.text_columns]
    texts = [tuple(row[i] for i in index) for row in rows]
    raw = [row[columns.index(spec.label_column)] for row in rows]
    return Examples(texts, _labels(raw, spec, str(path)), str(path))


def _check_columns(path: Path, spec: TaskSpec, columns: list[str]) -> None:
    missing = [c for c in (*spec.text_columns, spec.label_column) if c not in columns]
    if missing:
        raise PruneError(
            f"{path} lacks column(s) {missing} needed by task {spec.name} (has {columns}); "
            f"use the official GLUE file or fix task.text_columns/task.label_column"
        )


def _labels(raw: list, spec: TaskSpec, source: str) -> np.ndarray:
    if spec.kind == "regression":
        try:
            return np.asarray([float(v) for v in raw], dtype=np.float32)
        except ValueError as err:
            raise PruneError(
                f"{source}: non-numeric score in {spec.label_column} ({err})") from None
    if spec.label_values is not None and raw and isinstance(raw[0], str):
        lookup = {v: i for i, v in enumerate(spec.label_values)}
        bad = sorted({str(v) for v in raw if v not in lookup})
        if bad:
            raise PruneError(f"{source}: unknown labels {bad[:5]} for task {spec.name} "
                             f"(expected {list(spec.label_values)})")
        return np.asarray([lookup[v] for v in raw], dtype=np.int64)
    try:
        labels = np.asarray([int(v) for v in raw], dtype=np.int64)
    except ValueError:
        raise PruneError(f"{source}: labels of task {spec.name} are not integers; "
                         f"set task.label_values") from None
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_labels):
        raise PruneError(f"{source}: labels outside 0..{spec.num_labels - 1} for task {spec.name}")
    return labels


def _load_hub(spec: TaskSpec, split: str) -> Examples:
    hub_split = spec.hub_split(split)
    where = f"{spec.hub_path}/{spec.hub_name or ''}:{hub_split}"
    try:
        import datasets
    except ImportError:
        raise PruneError(f"loading {where} from the hub needs the `datasets` package "
                         f"(pip install datasets), or provide local files") from None
    data = datasets.load_dataset(spec.hub_path, spec.hub_name, split=hub_split)
    columns = spec.hub_text_columns or spec.text_columns
    texts = list(zip(*(data[c] for c in columns), strict=True))
    return Examples(texts, _labels(list(data[spec.hub_label_column]), spec, where), where)


def load_examples(spec: TaskSpec, split: str) -> Examples:
    """``split`` is ``train``, ``eval`` or ``eval:<name>``: local files when present, else
    the hub."""
    path = find_local_file(spec, split)
    if path is not None:
        return _read_examples(path, spec)
    require_hub(spec, split)
    return _load_hub(spec, split)


def require_hub(spec: TaskSpec, split: str) -> None:
    """Raise the explanatory error when ``split`` has no local file and the hub is unusable."""
    names = spec.split_files(split)
    local = f"{spec.local_dir}/{{{','.join(names)}}}" if spec.local_dir else "(no local dir set)"
    if spec.hub_path is None or _offline():
        why = "the hub is offline (HF_*_OFFLINE=1)" if spec.hub_path else "it has no hub dataset"
        raise PruneError(
            f"no {split} data for task {spec.name}: {local} not found and {why}; "
            f"put the files there or set paths.data_dir / task.local_dir"
        )


def check_data(spec: TaskSpec) -> None:
    """Fail fast: every split is findable and local files have the needed columns."""
    for split in ("train", *spec.eval_splits()):
        path = find_local_file(spec, split)
        if path is None:
            require_hub(spec, split)
            continue
        if spec.kind == "qa":
            continue  # SQuAD JSON is checked when read
        with open(path, encoding="utf-8") as handle:
            first = [c.strip() for c in handle.readline().rstrip("\n").split("\t")]
        _check_columns(path, spec, list(spec.column_names) if spec.column_names else first)


@dataclass
class Features:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    targets: dict[str, np.ndarray]  # per-row model targets: labels, or start/end positions

    @property
    def labels(self) -> np.ndarray:
        return self.targets["labels"]

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        return np.asarray([len(x) for x in self.input_ids])


def tokenize(examples: Examples, tokenizer, max_length: int) -> Features:
    columns = list(zip(*examples.texts, strict=True))
    encoded = tokenizer(*columns, truncation=True, max_length=max_length)
    return Features(encoded["input_ids"], encoded.get("token_type_ids"),
                    {"labels": examples.labels})


def sample_indices(total: int, count: int, seed: int, replace: bool = False) -> np.ndarray:
    """``count`` indices of ``total`` examples, seeded. Without replacement by default; the
    official code draws with replacement (``replace=True``)."""
    rng = np.random.default_rng(seed)
    if not replace and count > total:
        log.warning("asked for %d samples but the split has %d; using all", count, total)
        count = total
    return rng.choice(total, size=count, replace=replace)


def make_batches(features: Features, indices, batch_size: int, pad_id: int = 0,
                 with_labels: bool = True) -> list[dict]:
    """Batches of model inputs padded to each batch's longest sequence."""
    batches = []
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        width = max(len(features.input_ids[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        types = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            seq = features.input_ids[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            if features.token_type_ids is not None:
                types[row, : len(seq)] = torch.tensor(features.token_type_ids[i])
        batch = {"input_ids": ids, "attention_mask": mask}
        if features.token_type_ids is not None:
            batch["token_type_ids"] = types
        if with_labels:
            for key, values in features.targets.items():
                target = torch.as_tensor(values[chunk])
                batch[key] = target.float() if target.is_floating_point() else target.long()
        batches.append(batch)
    return batches

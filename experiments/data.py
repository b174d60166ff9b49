"""Task data: GLUE from local TSV files (the official GLUE distribution format) or the hub.

A ``TaskSpec`` names a task's columns, labels and metric for both sources. Local files are read
first when present; otherwise the hub is tried, unless the machine is offline, in which case the
error names both fixes. Files are read as GLUE distributes them (a leading UTF-8 byte-order
mark dropped, a last line without a newline kept) and validated as they are read (UTF-8, a header
with the needed columns, labels of the task's kind and range; a few rows with the wrong number of
fields or an empty text are skipped with their line numbers, mostly such rows is a re-saved file):
bad data stops the run with the file and line, before any weights are loaded. Examples are
tokenised once without padding and batched with dynamic padding (each batch padded to its longest
sequence).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from experiments.errors import RunError
from experiments.hub import hub_dataset, offline

log = logging.getLogger(__name__)

SAMPLING = ("without", "with", "official")


@dataclass(frozen=True)
class TaskSpec:
    """What a task is and where its data lives (one ``conf/task/*.yaml`` each)."""

    name: str
    kind: str  # "classification", "regression" or "qa"
    num_labels: int
    metric: str  # see experiments.metrics.METRICS
    text_columns: tuple[str, ...]  # local TSV columns holding the text (1 or 2)
    label_column: str
    local_dir: str | None = None
    train_files: tuple[str, ...] = ("train.tsv",)  # the first that exists is used
    eval_files: tuple[str, ...] = ("dev.tsv",)
    extra_eval_files: dict = field(default_factory=dict)  # name -> files, e.g. MNLI mismatched
    label_values: tuple[str, ...] | None = None  # label strings in id order, if not integers
    label_range: tuple[float, float] | None = None  # regression scores must lie in it (STS-B)
    header: bool = True
    column_names: tuple[str, ...] | None = None  # for header-less files (CoLA)
    hub_path: str | None = None
    hub_name: str | None = None
    hub_train_split: str = "train"
    hub_eval_split: str = "validation"
    hub_text_columns: tuple[str, ...] | None = None  # default: text_columns
    hub_extra_eval_splits: dict = field(default_factory=dict)
    hub_label_column: str = "label"
    max_seq_length: int = 128  # the official code's: 64 for SST-2 and CoLA, 128 for GLUE, 384 QA
    official_seq_len: float | None = None  # the official code's cost-model length for the task
    fisher_batch_size: int = 32  # the official code's mini-batch of the Fisher pass (SQuAD: 12)
    # question answering (kind "qa"): SQuAD version and the standard post-processing settings
    squad_version: int = 1
    doc_stride: int = 128
    n_best: int = 20
    max_answer_length: int = 30
    null_threshold: float = 0.0

    def __post_init__(self):
        if self.kind not in ("classification", "regression", "qa"):
            raise RunError(f"task {self.name}: kind must be classification, regression or qa, "
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
    labels: np.ndarray | None  # int64 for classification, float32 for regression; None: unlabeled
    source: str  # the file or hub dataset they came from


def find_local_file(spec: TaskSpec, split: str) -> Path | None:
    if not spec.local_dir:
        return None
    for name in spec.split_files(split):
        path = Path(spec.local_dir) / name
        if path.is_dir():
            raise RunError(f"{path} is a directory; task {spec.name} needs the GLUE file "
                           f"{name} there (task.local_dir= names the folder holding it)")
        if path.is_file():
            return path
    return None


BOM = "\ufeff"
MAX_LISTED = 5  # line numbers named in a warning or an error


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 file. Lines end at ``\\n`` only:
    real GLUE files carry stray ``\\r`` inside rows (SST-2 train in its older copies), which
    csv/pandas readers take for line breaks. A UTF-8 byte-order mark at the start (GLUE's own
    MRPC files) is dropped; a last line without a newline (GLUE's CoLA files) is kept."""
    path = Path(path)
    if path.is_dir():
        raise RunError(f"{path} is a directory, not a file; pass the file itself")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RunError(f"cannot read {path} ({err.strerror})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RunError(f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark); "
                       f"re-save the file as UTF-8")
    out = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RunError(f"{path}, line {number}: not UTF-8 text ({err.reason} at byte "
                           f"{err.start} of the line); re-save the file as UTF-8") from None
        if number == 1:  # a file re-saved by an editor may carry the mark twice
            line = line.lstrip(BOM)
        if line.strip():
            out.append((number, line))
    return out


def listed(numbers: list[int]) -> str:
    """``lines 3, 5, 9, ...``: the first ``MAX_LISTED`` line numbers."""
    more = ", ..." if len(numbers) > MAX_LISTED else ""
    word = "line" if len(numbers) == 1 else "lines"
    return f"{word} {', '.join(map(str, numbers[:MAX_LISTED]))}{more}"


def read_tsv(path: Path, header: bool = True, column_names: tuple[str, ...] | None = None,
             required: tuple[str, ...] = ()) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Columns and (line number, fields) rows of a GLUE TSV. Fields are stripped. A row with the
    wrong number of fields, or an empty field in a ``required`` column (the texts), is malformed:
    a few are skipped with a warning naming their lines; a file with no well-formed row, or
    with more malformed rows than good ones (rows split across lines by a re-save), is an
    error."""
    lines = read_lines(path)
    if not lines:
        raise RunError(f"{path} is empty; use the official file of the task")
    rows = [(n, [f.strip() for f in line.split("\t")]) for n, line in lines]
    columns = list(column_names) if column_names else (rows[0][1] if header else [])
    body = rows[1:] if header else rows
    if not body:
        raise RunError(f"{path} has a header but no data rows; use the official file")
    shaped = [(n, r) for n, r in body if len(r) == len(columns)]
    if not shaped:
        raise RunError(f"{path}: no row has the {len(columns)} tab-separated fields of its "
                       f"header (first bad row: line {body[0][0]}); use the official file")
    need = [columns.index(c) for c in required if c in columns]
    good = [(n, r) for n, r in shaped if all(r[i] for i in need)]
    bad = [n for n, r in body if len(r) != len(columns) or not all(r[i] for i in need)]
    if len(bad) > len(good):
        empty = f"or an empty {'/'.join(repr(columns[i]) for i in need)} " if need else ""
        raise RunError(
            f"{path}: {len(bad)} of {len(body)} rows are malformed (not {len(columns)} "
            f"tab-separated fields {empty}at {listed(bad)}); the file looks re-saved with its "
            f"rows split across lines (a carriage return turned into a line break); use the "
            f"task's official file as distributed, unedited")
    if bad:
        log.warning("%s: skipped %d malformed row(s) (not %d tab-separated fields%s) at %s",
                    path, len(bad), len(columns), ", or an empty text" if need else "",
                    listed(bad))
    return columns, good


def _check_columns(path: Path, spec: TaskSpec, columns: list[str]) -> None:
    missing = [c for c in (*spec.text_columns, spec.label_column) if c not in columns]
    if missing:
        raise RunError(
            f"{path} lacks column(s) {missing} needed by task {spec.name} (has {columns})"
            f"{_near_misses(missing, columns)}; "
            f"use the official GLUE file or fix task.text_columns/task.label_column"
        )


def _bare(name: str) -> str:
    """A column name without invisible characters, quotes or case."""
    return "".join(ch for ch in name if ch.isprintable()).strip().strip("\"'").lower()


def _near_misses(missing: list[str], columns: list[str]) -> str:
    """Names that ``missing`` columns would match but for a byte-order mark or other invisible
    character, quotes or case: said, since the list of columns hides them."""
    found = []
    for want in missing:
        for have in columns:
            if have != want and _bare(have) == _bare(want):
                what = ("a UTF-8 byte-order mark" if BOM in have else
                        "invisible characters" if any(not ch.isprintable() for ch in have)
                        else "quotes or case")
                found.append(f"column {want!r} is written {have!r} ({what})")
    return f" ({'; '.join(found)})" if found else ""


def _read_examples(path: Path, spec: TaskSpec) -> Examples:
    columns, rows = read_tsv(path, spec.header, spec.column_names, tuple(spec.text_columns))
    _check_columns(path, spec, columns)
    index = [columns.index(c) for c in spec.text_columns]
    texts = [tuple(row[i] for i in index) for _, row in rows]
    label = columns.index(spec.label_column)
    raw = [(n, row[label]) for n, row in rows]
    return Examples(texts, _labels(raw, spec, str(path)), str(path))


def _labels(raw: list[tuple[int | None, object]], spec: TaskSpec, source: str) -> np.ndarray:
    """Label ids (classification) or scores (regression) of ``(line, value)`` pairs."""
    where = (lambda n: f"{source}, line {n}") if raw and raw[0][0] is not None else \
        (lambda n: source)
    if spec.kind == "regression":
        return _scores(raw, spec, where)
    if spec.label_values is not None and raw and isinstance(raw[0][1], str):
        lookup = {v: i for i, v in enumerate(spec.label_values)}
        for n, v in raw:
            if v not in lookup:
                raise RunError(f"{where(n)}: unknown label {v!r} for task {spec.name} "
                               f"(expected one of {list(spec.label_values)})")
        return np.asarray([lookup[v] for _, v in raw], dtype=np.int64)
    labels = []
    for n, v in raw:
        try:
            labels.append(int(v))
        except (TypeError, ValueError):
            raise RunError(f"{where(n)}: label {v!r} of task {spec.name} is not an integer; "
                           f"set task.label_values to the label names") from None
        if not 0 <= labels[-1] < spec.num_labels:
            raise RunError(f"{where(n)}: label {v} outside 0..{spec.num_labels - 1} for task "
                           f"{spec.name}")
    return np.asarray(labels, dtype=np.int64)


def _scores(raw: list, spec: TaskSpec, where) -> np.ndarray:
    low, high = spec.label_range or (-math.inf, math.inf)
    scores = []
    for n, v in raw:
        try:
            score = float(v)
        except (TypeError, ValueError):
            raise RunError(f"{where(n)}: score {v!r} is not a number") from None
        if not (math.isfinite(score) and low <= score <= high):
            raise RunError(f"{where(n)}: score {v!r} is not a number in {low:g}..{high:g} "
                           f"(task {spec.name}); fix or remove that row")
        scores.append(score)
    return np.asarray(scores, dtype=np.float32)


def _load_hub(spec: TaskSpec, split: str) -> Examples:
    hub_split = spec.hub_split(split)
    where = f"{spec.hub_path}/{spec.hub_name or ''}:{hub_split}"
    data = hub_dataset(spec.hub_path, spec.hub_name, hub_split, local_fix(spec, split))
    columns = spec.hub_text_columns or spec.text_columns
    texts = list(zip(*(data[c] for c in columns), strict=True))
    raw = [(None, v) for v in data[spec.hub_label_column]]
    return Examples(texts, _labels(raw, spec, where), where)


def load_examples(spec: TaskSpec, split: str) -> Examples:
    """``split`` is ``train``, ``eval`` or ``eval:<name>``: local files when present, else
    the hub."""
    path = find_local_file(spec, split)
    if path is not None:
        return _read_examples(path, spec)
    require_hub(spec, split)
    return _load_hub(spec, split)


def local_fix(spec: TaskSpec, split: str) -> str:
    """Where the local files of ``split`` are looked for, and how to point there."""
    names = spec.split_files(split)
    local = f"{spec.local_dir}/{{{','.join(names)}}}" if spec.local_dir else "(no local dir set)"
    return f"put the task's files at {local} (paths.data_dir= or task.local_dir=)"


def require_hub(spec: TaskSpec, split: str) -> None:
    """Raise the explanatory error when ``split`` has no local file and the hub is unusable."""
    names = spec.split_files(split)
    local = f"{spec.local_dir}/{{{','.join(names)}}}" if spec.local_dir else "(no local dir set)"
    if spec.hub_path is None or offline():
        why = "the hub is offline (HF_*_OFFLINE=1)" if spec.hub_path else "it has no hub dataset"
        raise RunError(
            f"no {split} data for task {spec.name}: {local} not found and {why}; "
            f"put the files there or set paths.data_dir / task.local_dir"
        )


def check_data(spec: TaskSpec) -> None:
    """Fail fast: every split is findable, and local files read cleanly (encoding, columns, at
    least one row, labels of the right kind and range)."""
    for split in ("train", *spec.eval_splits()):
        path = find_local_file(spec, split)
        if path is None:
            require_hub(spec, split)
        elif spec.kind == "qa":
            from experiments.squad import read_squad_json

            read_squad_json(path)
        else:
            _read_examples(path, spec)


def read_text_samples(path: str | Path, spec: TaskSpec) -> Examples:
    """An unlabeled sample set: one example per line of a UTF-8 text file, the fields of a
    sentence-pair task separated by a tab."""
    path = Path(path)
    if path.is_dir():
        raise RunError(f"sample file {path} is a directory; pass a text file with one example "
                       f"per line (prune.sample_file=/path/to/samples.txt)")
    if not path.is_file():
        raise RunError(f"sample file {path} does not exist; pass a text file with one example "
                       f"per line (prune.sample_file=...)")
    if spec.kind == "qa":
        raise RunError("a text sample file is not supported for question answering; use the "
                       "task's training file")
    width = len(spec.text_columns)
    texts = []
    for n, line in read_lines(path):
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) != width or not all(fields):
            kind = "one text" if width == 1 else f"{width} texts separated by a tab"
            found = "an empty text" if len(fields) == width else f"{len(fields)} field(s)"
            raise RunError(f"{path}, line {n}: task {spec.name} needs {kind} per line, found "
                           f"{found}")
        texts.append(tuple(fields))
    if not texts:
        raise RunError(f"sample file {path} has no examples (one per line)")
    return Examples(texts, None, str(path))


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
    targets = {} if examples.labels is None else {"labels": examples.labels}
    return Features(encoded["input_ids"], encoded.get("token_type_ids"), targets)


def sample_indices(total: int, count: int, seed: int, sampling: str = "without") -> np.ndarray:
    """``count`` indices of ``total`` examples, seeded. ``without``: without replacement (the
    default here); ``with``: with replacement; ``official``: the official code's draw, the legacy
    global NumPy generator seeded with ``seed`` then ``np.random.choice(total, count)`` (with
    replacement)."""
    if sampling == "official":
        return np.random.RandomState(seed).choice(total, count)
    rng = np.random.default_rng(seed)
    if sampling == "without" and count > total:
        log.warning("asked for %d samples but the split has %d; using all", count, total)
        count = total
    return rng.choice(total, size=count, replace=sampling == "with")


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

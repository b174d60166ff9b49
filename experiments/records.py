"""Run records and the files a run leaves: written atomically (readers see the old file or the
whole new one), readable by others (mode 0644 under the usual umask), and the environment a
result came from."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from safetensors import SafetensorError

# What a failed write raises: OSError, or, on a full disk, torch.save's RuntimeError and
# safetensors' own error (the weights of save_pretrained).
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, then rename it
    over ``path``. On any failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: dict) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2, default=str))

    return write_atomic(path, write)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; when the block succeeds it replaces ``path``
    (an older ``path`` is removed only then), otherwise it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_failure(err: Exception) -> str:
    """Why a write failed, in one line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return (str(err).splitlines() or [type(err).__name__])[0]


def check_writable(directory: str | Path) -> None:
    """Fail now, not after the work, if ``directory`` cannot take the run's files."""
    from experiments.errors import RunError

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix=".write-test.")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise RunError(f"cannot write to the run directory {directory} ({err.strerror}); "
                       f"choose another with paths.output_dir=... or hydra.run.dir=...") from None


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


# the stages whose times a record's ``pruning_total`` sums (``obs``: reconstruction-aware
# importance, ``prune.obs``)
PRUNING_STAGES = ("fisher", "obs", "search", "rearrange", "tune", "physical")


@dataclasses.dataclass
class Record:
    """What a run writes to ``results.json`` and what ``run.py``, the runner and ``analysis``
    read: one schema (``schema``, ``experiments.identity.RECORD_SCHEMA``). Metrics are
    fractions keyed by name (``baseline[metric]``); ``identity`` is what the numbers depend on.
    """

    model: str
    task: str
    constraint: float
    metric: str
    baseline: dict
    pruned: dict
    flops: dict
    identity: dict
    checkpoint: str | None = None
    constraint_kind: str = "flops"
    seed: int = 0
    device: str | None = None
    num_samples: int | None = None
    num_eval: int | None = None
    seq_len: float | None = None
    seq_len_measured: float | None = None
    seq_len_official: float | None = None
    drop: float | None = None
    latency: dict | None = None
    params: dict | None = None
    fisher_cache: dict | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    masks: dict | None = None
    tune: dict | None = None
    align: dict | None = None
    config: dict | None = None
    git_commit: str | None = None
    versions: dict | None = None
    complete: bool = False  # True once the masks and the model are saved
    save_error: str | None = None
    schema: int = 0

    def __post_init__(self):
        if self.drop is None and self.metric in self.baseline and self.metric in self.pruned:
            self.drop = 100.0 * (self.baseline[self.metric] - self.pruned[self.metric])

    @property
    def code(self) -> str | None:
        """The code digest the record was made with (``None`` before digests existed)."""
        code = (self.identity or {}).get("code")
        return code.get("digest") if isinstance(code, dict) else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        """A record of any schema; fields it lacks take their defaults, unknown ones are
        dropped. Raises ``KeyError`` when a required field is missing."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for required in ("model", "task", "constraint", "metric", "baseline", "pruned",
                         "flops"):
            if required not in values:
                raise KeyError(required)
        values.setdefault("identity", {})
        values.setdefault("complete", True)  # records before the flag were written whole
        values["constraint"] = float(values["constraint"])
        return cls(**values)

    @classmethod
    def read(cls, path: str | Path) -> "Record":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def write(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

"""Run records and the files a run leaves: written atomically (readers see the old file or the
whole new one), readable by others (mode 0644 under the usual umask), and the environment a
result came from."""

from __future__ import annotations

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

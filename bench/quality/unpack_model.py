"""Reassemble the mini model from the ``mini.tar.NN`` parts that ``train_mini.py`` wrote to $OUT.

Checks the sha256 recorded in ``train_log.json`` and unpacks to ``<dest>/mini`` atomically
(a damaged or partial set of parts leaves ``dest`` untouched).

    python bench/quality/unpack_model.py <folder with mini.tar.NN + train_log.json> [--dest .carry/quality]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab  # noqa: E402

TAR_NAME = "mini.tar"


def unpack(parts_dir: Path, dest: Path = lab.DATA_DIR) -> Path:
    """Concatenate the parts, verify them, extract ``mini/`` into ``dest``; returns ``dest / "mini"``."""
    log = json.loads((parts_dir / "train_log.json").read_text())
    packed = log["packed"]
    data = b"".join((parts_dir / name).read_bytes() for name in packed["parts"])
    if len(data) != packed["bytes"] or hashlib.sha256(data).hexdigest() != packed["sha256"]:
        raise SystemExit(f"the parts in {parts_dir} do not add up to the packed model (size or sha256 differ); fetch them again")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-mini-", dir=dest))
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(tmp, filter="data")
        final = dest / "mini"
        if final.exists():
            shutil.rmtree(final)
        (tmp / "mini").rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parts", type=Path, help="folder with mini.tar.NN and train_log.json")
    parser.add_argument("--dest", type=Path, default=lab.DATA_DIR, help="the model goes to DEST/mini")
    args = parser.parse_args(argv)
    print(f"unpacked {unpack(args.parts, args.dest)}")


if __name__ == "__main__":
    main()

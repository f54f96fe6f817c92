"""Content-addressed caches that survive crashes.

Every cache entry (a preprocessed clip, a tuned model, a finished edit) is a folder. It is
built under a temporary name in the same parent and renamed into place only when complete,
with a ``MANIFEST.json`` listing the sha256 of each file. :func:`load_entry` checks those
hashes; an entry that fails the check is treated as absent (and removed), so a kill at any
moment can leave garbage in a ``.tmp-*`` folder but never a half-written entry that is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_TMP_PREFIX = ".tmp-"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (cache keys from settings)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def hash_path(path: str | os.PathLike) -> str:
    """Content hash of a file, or of a folder (relative names and file contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    Readers see the old file or the new one, never a partial one; on an exception (or a kill)
    the temporary file is removed (or left as ``.tmp-*``, which :func:`clean_stale_tmp` removes).
    ``suffix`` keeps the extension for writers that pick a format by it (ffmpeg).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file so that readers see the old content or the new, never a partial one."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_manifest(folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record the sha256 of every file in ``folder`` (except the manifest) plus ``meta``."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"files": files, "meta": meta or {}, "created": time.time()}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def verify_entry(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a complete, intact entry; ``None`` if missing, partial or corrupted."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, digest in manifest["files"].items():
            if sha256_file(folder / name) != digest:
                logger.warning("cache entry %s: %s does not match its hash", folder, name)
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def load_entry(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Like :func:`verify_entry`, but removes a damaged entry so it gets rebuilt; touches it for LRU."""
    folder = Path(folder)
    if not folder.exists():
        return None
    manifest = verify_entry(folder)
    if manifest is None:
        logger.warning("discarding damaged cache entry %s; it will be rebuilt", folder)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    with contextlib.suppress(OSError):
        os.utime(folder)
    return manifest


@contextlib.contextmanager
def building(final: str | os.PathLike, meta: dict[str, Any] | None = None) -> Iterator[Path]:
    """Build a cache entry in a temporary folder; on success write its manifest and rename it.

    Usage::

        with building(cache / key, meta={...}) as tmp:
            write files into tmp
        # now cache / key exists, complete, with MANIFEST.json

    On any exception (or a kill) the temporary folder is removed (or left as ``.tmp-*``,
    which :func:`clean_stale_tmp` removes) and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        yield tmp
        write_manifest(tmp, meta)
        if final.exists() and verify_entry(final) is None:  # a damaged entry: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # A concurrent builder (another rank or app worker) renamed a complete entry into
            # place first; entries are content-addressed, so theirs is as good as ours.
            if verify_entry(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_tmp(root: str | os.PathLike, older_than_s: float = 3600.0) -> int:
    """Remove ``.tmp-*`` leftovers of killed processes under ``root``; returns how many."""
    root = Path(root)
    if not root.exists():
        return 0
    now = time.time()
    removed = 0
    for p in root.rglob(f"{_TMP_PREFIX}*"):
        try:
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed += 1
        except OSError:
            pass
    return removed

"""Job folders, "in use" locks, a disk cap with least-recently-used eviction, and GPU OOM.

A public app runs many edits, some at once, and gets killed at any moment. This module keeps it
serving without losing finished work:

- every job gets its own folder (:func:`new_job`); its outputs are written only there
  (:meth:`Job.path` refuses names that escape it);
- a running job holds an exclusive ``flock`` on ``<job>/.lock``, and a shared one on the lock
  file of each cache entry it uses (:meth:`Job.pin`, or :func:`pinned` without a job). Locks
  held by a process vanish with it, even on SIGKILL, so "running" never outlives the process
  and no stale marker has to be guessed at;
- :func:`enforce_cap` keeps the jobs and cache folders under a size, removing the least
  recently used entries first and never an entry whose lock is held;
- :func:`oom_guard` turns a GPU out-of-memory error into an :class:`EymError` that names the
  setting to lower, after freeing the memory, so that the next job runs.

Entries are the direct children of each root folder (``jobs/<id>``, ``preprocess/<key>``,
``tuned/<key>``...). Names starting with ``.`` are bookkeeping (``.locks/``, ``.tmp-*`` of
:mod:`eym.cache`), not entries, except ``.partial-*`` (tuning checkpoints of an interrupted run,
evictable once untouched for an hour). Lock files live in ``<root>/.locks/<name>.lock`` so that
entries themselves (and their sha256 manifests) are never touched by locking.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import re
import secrets
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Iterator, Sequence

from eym.cache import _TMP_PREFIX, atomic_write_json, clean_stale_tmp
from eym.env import eym_home
from eym.errors import EymError
from eym.validate import safe_join

logger = logging.getLogger(__name__)

JOB_LOCK = ".lock"  # inside a job folder; held exclusively while the job runs
JOB_INFO = "job.json"  # id, pid, start/end time, state ("running" | "done" | "failed")
LOCKS_DIR = ".locks"  # in each root: one lock file per entry, held shared while it is used
# Sub-folders of eym_home() under the disk cap. Everything else there (the tiny bundle, pose
# annotator weights) is models, which may not be downloadable again: never evicted.
CACHE_KINDS = ("jobs", "preprocess", "tuned")
CAP_ENV = "EYM_DISK_CAP_GB"  # default cap for new_job(), in GB (unset: no cap)
# Resumable tuning checkpoints of eym.editor (``tuned/.partial-<key>``): evictable entries, but
# only once untouched this long, since a live tuning rewrites its checkpoint every K steps.
PARTIAL_PREFIX = ".partial-"
PARTIAL_GRACE_S = 3600.0
STALE_TMP_S = 3600.0  # a .tmp-* build folder untouched this long belongs to a killed process


# ---------------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------------
def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _try_lock(path: Path, mode: int) -> int | None:
    """An fd holding ``mode`` (LOCK_EX/LOCK_SH) on ``path``, or None if someone holds a conflicting lock."""
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the last fd of the open file releases its flock


def entry_lock_path(entry: str | os.PathLike) -> Path:
    """The lock file guarding a cache entry or job folder: ``<root>/.locks/<name>.lock``."""
    entry = Path(entry)
    return entry.parent / LOCKS_DIR / f"{entry.name}.lock"


def _pin(entry: Path) -> int:
    fd = _open_lock(entry_lock_path(entry))
    # Blocking: an eviction in progress holds the lock exclusively for a moment; after it the
    # entry is gone and the caller's load_entry() sees "absent" and rebuilds it.
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


@contextlib.contextmanager
def pinned(*entries: str | os.PathLike) -> Iterator[None]:
    """Keep cache entries (folders) from being evicted while the block runs.

    Usage::

        with pinned(cache / key):
            manifest = load_entry(cache / key)
            ...
    """
    fds = [_pin(Path(e)) for e in entries]
    try:
        yield
    finally:
        for fd in fds:
            _unlock(fd)


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One run of the app or CLI: a folder of its own, locked while the job runs.

    Use as a context manager (``with new_job() as job: ...``): the job is finished as "done",
    or as "failed" if the block raised.
    """

    id: str  # "<YYYYmmdd-HHMMSS>-<8 hex>": sorts by start time, unguessable
    folder: Path  # root / id; everything the job writes goes here
    _lock_fd: int | None = field(default=None, repr=False)
    _pins: list[int] = field(default_factory=list, repr=False)
    keep_failed: bool = True  # False: the context manager removes the folder of a job that raised

    @property
    def running(self) -> bool:
        return self._lock_fd is not None

    def path(self, name: str) -> Path:
        """``folder / name`` for an output file; names leaving the folder raise EymError."""
        out = safe_join(self.folder, name)
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def pin(self, entry: str | os.PathLike) -> Path:
        """Protect a cache entry from eviction until :meth:`finish`; returns it."""
        self._pins.append(_pin(Path(entry)))
        return Path(entry)

    def finish(self, ok: bool = True) -> None:
        """Record the outcome and release the job's locks (idempotent)."""
        if self._lock_fd is None:
            return
        info = _read_info(self.folder)
        info.update(state="done" if ok else "failed", ended=time.time())
        atomic_write_json(self.folder / JOB_INFO, info)
        for fd in self._pins:
            _unlock(fd)
        self._pins.clear()
        _unlock(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.finish(ok=exc_type is None)
        if exc_type is not None and not self.keep_failed:  # only complete results stay in the outputs folder
            shutil.rmtree(self.folder, ignore_errors=True)


def jobs_root() -> Path:
    """Default folder of job folders: ``eym_home()/jobs``."""
    return eym_home() / "jobs"


def new_job(root: str | os.PathLike | None = None, *, max_bytes: int | None = None, keep_failed: bool = True) -> Job:
    """Create and lock a fresh job folder under ``root``; evict old entries if over the cap.

    Args:
        root: folder holding job folders (default ``eym_home()/jobs``).
        max_bytes: disk cap applied over ``root`` and the cache folders of ``eym_home()``
            before the job starts (default: ``$EYM_DISK_CAP_GB`` if set, else no cap).
        keep_failed: keep the folder of a job that raised in its ``with`` block (False: removed).

    Returns:
        A running :class:`Job` whose folder exists and is locked.
    """
    root = Path(root) if root is not None else jobs_root()
    root.mkdir(parents=True, exist_ok=True)
    job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    folder = root / job_id
    folder.mkdir()  # a fresh random id: existing means a bug, so let it raise
    fd = _open_lock(folder / JOB_LOCK)
    fcntl.flock(fd, fcntl.LOCK_EX)
    atomic_write_json(folder / JOB_INFO, {"id": job_id, "pid": os.getpid(), "started": time.time(), "state": "running"})
    job = Job(id=job_id, folder=folder, _lock_fd=fd, keep_failed=keep_failed)
    if max_bytes is None:
        max_bytes = cap_from_env()
    if max_bytes is not None:
        enforce_cap(max_bytes, default_roots(extra=[root]))
    return job


def cap_from_env() -> int | None:
    """``$EYM_DISK_CAP_GB`` in bytes, or None if unset."""
    raw = os.environ.get(CAP_ENV, "").strip()
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError:
        raise EymError(f"{CAP_ENV}={raw!r} is not a number of GB; set e.g. {CAP_ENV}=20") from None
    if gb <= 0:
        raise EymError(f"{CAP_ENV}={raw!r} must be positive; set e.g. {CAP_ENV}=20")
    return int(gb * 2**30)


def _read_info(folder: Path) -> dict:
    try:
        return json.loads((folder / JOB_INFO).read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------
# Entries, disk usage and eviction
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One evictable unit: a job folder or a cache entry."""

    path: Path  # the folder (or file) itself
    kind: str  # name of its root folder: "jobs", "preprocess", "tuned", ...
    size: int  # bytes, summed over its files (symlinks not followed)
    last_used: float  # mtime (load_entry and jobs touch it), seconds since the epoch
    in_use: bool  # a running job holds it: never evicted
    state: str  # jobs: "running" | "done" | "failed" | "crashed"; caches: "ok" | "in use" | "partial"


def default_roots(home: str | os.PathLike | None = None, extra: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The folders under the cap: the :data:`CACHE_KINDS` folders of ``eym_home()`` that exist, plus ``extra``."""
    home = Path(home) if home is not None else eym_home()
    roots = [home / kind for kind in CACHE_KINDS if (home / kind).is_dir()]
    roots += [Path(e) for e in extra]
    unique: dict[Path, None] = {}
    for r in roots:
        unique.setdefault(r.resolve(), None)
    return list(unique)


def disk_usage(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (itself if a file); links are not followed."""
    path = Path(path)
    try:
        st = path.lstat()
    except OSError:
        return 0
    if not path.is_dir() or path.is_symlink():
        return st.st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _is_held(lock: Path) -> bool:
    if not lock.exists():
        return False
    fd = _try_lock(lock, fcntl.LOCK_EX)
    _unlock(fd)
    return fd is None


def list_entries(roots: Sequence[str | os.PathLike] | None = None) -> list[Entry]:
    """Every entry under ``roots`` (default :func:`default_roots`), least recently used first."""
    out = []
    for root in map(Path, roots if roots is not None else default_roots()):
        if not root.is_dir():
            continue
        for p in root.iterdir():
            partial = p.name.startswith(PARTIAL_PREFIX)
            if p.name.startswith(".") and not partial:
                continue
            job_running = _is_held(p / JOB_LOCK) if p.is_dir() else False
            pinned_now = _is_held(entry_lock_path(p))
            if partial:
                with contextlib.suppress(OSError):
                    pinned_now = pinned_now or time.time() - p.lstat().st_mtime < PARTIAL_GRACE_S
                state = "partial"
            elif (p / JOB_INFO).exists():
                recorded = _read_info(p).get("state", "crashed")
                state = "running" if job_running else ("crashed" if recorded == "running" else recorded)
            else:
                state = "in use" if pinned_now else "ok"
            with contextlib.suppress(OSError):
                out.append(
                    Entry(
                        path=p, kind=root.name, size=disk_usage(p), last_used=p.lstat().st_mtime,
                        in_use=job_running or pinned_now, state=state,
                    )  # fmt: skip
                )
    out.sort(key=lambda e: e.last_used)
    return out


def evict(entry: Entry | str | os.PathLike) -> bool:
    """Remove one entry unless it is in use; True if it was removed.

    The entry's lock is taken exclusively first (so nobody can pin it meanwhile), then it is
    renamed to a ``.tmp-*`` name (atomic: readers see it whole or absent) and deleted.
    """
    path = entry.path if isinstance(entry, Entry) else Path(entry)
    pin_fd = _try_lock(entry_lock_path(path), fcntl.LOCK_EX)
    if pin_fd is None:
        return False
    job_fd = None
    try:
        if path.is_dir() and not path.is_symlink() and (path / JOB_LOCK).exists():
            job_fd = _try_lock(path / JOB_LOCK, fcntl.LOCK_EX)
            if job_fd is None:
                return False
        if not os.path.lexists(path):
            return False
        doomed = path.parent / f"{_TMP_PREFIX}evict-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, doomed)
        _unlock(job_fd)
        job_fd = None
        if doomed.is_dir() and not doomed.is_symlink():
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            doomed.unlink(missing_ok=True)
        logger.info("evicted %s", path)
        return True
    finally:
        _unlock(job_fd)
        _unlock(pin_fd)


def enforce_cap(max_bytes: int, roots: Sequence[str | os.PathLike] | None = None) -> list[Entry]:
    """Evict least-recently-used entries until ``roots`` hold at most ``max_bytes``.

    Entries in use (running jobs, pinned cache entries) are skipped, so the total can stay
    above the cap while they run; a warning says so. Leftover ``.tmp-*`` folders of killed
    processes older than an hour are removed first.

    Args:
        max_bytes: the cap, in bytes.
        roots: folders under the cap (default :func:`default_roots`).

    Returns:
        The entries removed, oldest first.
    """
    roots = [Path(r) for r in (roots if roots is not None else default_roots())]
    for r in roots:
        clean_stale_tmp(r, older_than_s=STALE_TMP_S)
    entries = list_entries(roots)
    total = sum(disk_usage(r) for r in roots)
    removed = []
    for e in entries:
        if total <= max_bytes:
            break
        if not e.in_use and evict(e):
            total -= e.size
            removed.append(e)
    if total > max_bytes:
        logger.warning(
            "disk cap %.2f GB exceeded (%.2f GB) by entries in use; they will be evicted after they finish",
            max_bytes / 2**30, total / 2**30,
        )  # fmt: skip
    return removed


def clear(roots: Sequence[str | os.PathLike] | None = None, *, older_than_s: float | None = None) -> list[Entry]:
    """Remove every entry not in use (only those unused for ``older_than_s`` seconds, if given).

    Leftover ``.tmp-*`` build folders go too once stale (an hour, or ``older_than_s`` if longer).
    """
    roots = [Path(r) for r in (roots if roots is not None else default_roots())]
    now = time.time()
    removed = []
    for e in list_entries(roots):
        if older_than_s is not None and now - e.last_used < older_than_s:
            continue
        if not e.in_use and evict(e):
            removed.append(e)
    for r in roots:
        # A younger .tmp-* folder may be an entry another process is building right now.
        clean_stale_tmp(r, older_than_s=max(older_than_s or 0.0, STALE_TMP_S))
    return removed


def enforce_disk_cap(*roots: str | os.PathLike) -> list[Entry]:
    """Apply ``$EYM_DISK_CAP_GB`` (if set) to the cache folders and ``roots``, before new work."""
    cap = cap_from_env()
    if cap is None:
        return []
    return enforce_cap(cap, default_roots(extra=[r for r in roots if Path(r).is_dir()]))


def recover(root: str | os.PathLike) -> None:
    """At a server's start: remove what jobs killed mid-way in an earlier run left in ``root``."""
    clean_stale_tmp(root)
    remove_crashed([root])


def remove_crashed(roots: Sequence[str | os.PathLike] | None = None) -> list[Entry]:
    """Remove job folders whose process died mid-job ("crashed") or that failed; never a running one.

    A job's outputs are only useful once it finished: the app removes a failed job's folder
    itself, but a killed server leaves its running jobs behind as "crashed" folders.
    """
    removed = []
    for e in list_entries(roots):
        if e.state in ("crashed", "failed") and not e.in_use and evict(e):
            removed.append(e)
    return removed


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"30m"``, ``"12h"``, ``"7d"`` or ``"2w"``."""
    m = _DURATION.match(text.lower())
    if not m:
        raise EymError(f"duration {text!r} not understood; write e.g. 30m, 12h or 7d")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


# ---------------------------------------------------------------------------------------------
# GPU out of memory
# ---------------------------------------------------------------------------------------------
def is_oom(err: BaseException) -> bool:
    """True for torch.cuda.OutOfMemoryError and the RuntimeErrors backends raise when out of memory."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


class oom_guard(contextlib.AbstractContextManager):
    """Turn GPU out-of-memory inside the block into an EymError naming what to lower.

    The memory is released before the error propagates: the tensors that the failed frames
    referenced are dropped (their frames cleared) and the CUDA cache emptied, so the next job
    starts with a clean GPU.

    Args:
        frames: the frame count in use, quoted in the message.
        size: the resolution in use (pixels per side), quoted in the message.
    """

    def __init__(self, *, frames: int | None = None, size: int | None = None) -> None:
        self.frames = frames
        self.size = size

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if exc is None or not is_oom(exc):
            return False
        # The traceback keeps every frame of the failed call alive, and with them the tensors
        # that filled the GPU; clear them, then let the allocator give the memory back.
        traceback.clear_frames(tb)
        exc.__traceback__ = None
        del exc, tb
        free_accelerator_memory()
        settings = []
        if self.frames:
            settings.append(f"{self.frames} frames")
        if self.size:
            settings.append(f"{self.size} px")
        at = f" at {', '.join(settings)}" if settings else ""
        raise EymError(
            f"the GPU ran out of memory{at}; lower the number of frames (--frames) "
            "or the resolution (--size) and try again"
        ) from None


def free_accelerator_memory() -> None:
    """Collect garbage and return cached GPU memory to the driver (no-op without CUDA)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        with contextlib.suppress(RuntimeError):
            torch.cuda.ipc_collect()


# ---------------------------------------------------------------------------------------------
# One edit, in a job folder of its own
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EditJob:
    """What one finished edit left in its job folder."""

    id: str  # the job folder's name under the outputs folder
    video: Path  # the edited video
    side_by_side: Path  # source | target skeletons | edited
    source_video: Path  # the source frames as processed
    skeleton_video: Path  # the skeletons the editing branch was conditioned on
    downloads: list[Path]  # edited, side by side, and the tuned weights' zip when the editor keeps them
    seconds: float  # wall-clock time of the job
    reused_tuning: bool  # no tuning this time: the source's tuned weights were cached


def run_edit(editor, source, motion, prompts, settings, root: str | os.PathLike, *, callback=None) -> EditJob:
    """Run ``editor.edit`` in a fresh, locked job folder under ``root``; a failed or stopped job's
    folder is removed, so only complete results stay there.

    Args:
        editor: an :class:`~eym.editor.Editor` (or anything with its ``edit``; ``find_tuned`` optional).
        source: the source ``Clip``.  motion: the ``Motion`` that drives the edit.
        prompts: the three prompts.  settings: the ``EditConfig``.
        callback: progress ``(stage, step, total)``; raising from it stops the job.
    Raises:
        EymError: GPU out of memory (with the setting to lower), or the editor's own errors.
    """
    from eym.video import write_mp4

    started = time.perf_counter()
    with new_job(root, keep_failed=False) as job:
        with oom_guard(frames=len(source.frames), size=source.frames.shape[1]):
            result = editor.edit(source, motion, prompts, settings, out_dir=job.folder, callback=callback)
        source_mp4 = write_mp4(source.frames, job.path("source.mp4"), source.fps)
        skeleton_mp4 = write_mp4(result.skeletons, job.path("target_skeletons.mp4"), source.fps)
        downloads = [Path(result.video), Path(result.side_by_side)]
        tuned = editor.find_tuned(source, prompts, settings.tune) if hasattr(editor, "find_tuned") else None
        if tuned is not None:  # the tuned tensors leave the server as a download (and from there to the Hub)
            from eym.hub import TUNED_ZIP, pack_tuned

            downloads.append(pack_tuned(tuned.path, job.path(TUNED_ZIP)))
    seconds = time.perf_counter() - started
    logger.info("job %s done in %.1f s (reused tuning: %s)", job.id, seconds, result.reused_tuning)
    return EditJob(id=job.id, video=Path(result.video), side_by_side=Path(result.side_by_side), source_video=source_mp4,
                   skeleton_video=skeleton_mp4, downloads=downloads, seconds=seconds,
                   reused_tuning=bool(result.reused_tuning))

"""eym.jobs and eym.cache: job folders, locks, LRU disk cap, atomic verified caches, OOM guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path

import pytest
import torch

from eym import jobs
from eym.cache import building, clean_stale_tmp, load_entry, verify_entry
from eym.cli import main as cli_main
from eym.errors import EymError


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private EYM_HOME: eviction tests must never touch the session's shared caches."""
    monkeypatch.setenv("EYM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(jobs.CAP_ENV, raising=False)
    return tmp_path / "home"


def make_entry(root: Path, name: str, size: int, age_s: float) -> Path:
    """A verified cache entry of ``size`` bytes last used ``age_s`` seconds ago."""
    with building(root / name, meta={"name": name}) as tmp:
        (tmp / "data.bin").write_bytes(os.urandom(size))
    t = time.time() - age_s
    os.utime(root / name, (t, t))
    return root / name


# ---------------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------------
def test_new_job_folder_lock_and_states(home):
    with jobs.new_job() as job:
        assert job.folder == home / "jobs" / job.id and job.folder.is_dir() and job.running
        assert json.loads((job.folder / jobs.JOB_INFO).read_text())["state"] == "running"
        (entry,) = jobs.list_entries()
        assert entry.path == job.folder and entry.in_use and entry.state == "running"
        assert not jobs.evict(job.folder) and job.folder.exists()  # a running job is never evicted
    assert not job.running
    (entry,) = jobs.list_entries()
    assert entry.state == "done" and not entry.in_use
    with pytest.raises(RuntimeError), jobs.new_job() as failing:
        raise RuntimeError("boom")
    assert json.loads((failing.folder / jobs.JOB_INFO).read_text())["state"] == "failed"
    other = jobs.new_job()
    assert other.id != job.id and len(other.id.split("-")[-1]) == 8
    other.finish()
    other.finish()  # idempotent


def test_job_outputs_stay_in_the_job_folder(home):
    with jobs.new_job() as job:
        out = job.path("videos/edit.mp4")
        assert out == job.folder / "videos" / "edit.mp4" and out.parent.is_dir()
        for bad in ("../other/edit.mp4", "/tmp/edit.mp4", "videos/../../x"):
            with pytest.raises(EymError):
                job.path(bad)


def test_killed_job_is_released_and_reported_crashed(home):
    """flock dies with its process: a SIGKILLed job stops counting as running at once."""
    code = textwrap.dedent(
        """
        import time, sys
        from eym.jobs import new_job
        job = new_job()
        print(job.folder, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        folder = Path(proc.stdout.readline().strip())
        (entry,) = jobs.list_entries()
        assert entry.path == folder and entry.in_use and entry.state == "running"
        assert not jobs.evict(folder)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (entry,) = jobs.list_entries()
    assert not entry.in_use and entry.state == "crashed"
    assert jobs.evict(entry) and not folder.exists()


def test_remove_crashed_keeps_running_and_finished_jobs(home):
    """What a killed server left ("crashed") and failed jobs go at start-up; running and done ones stay."""
    root = home / "jobs"
    running = jobs.new_job(root)
    done = jobs.new_job(root)
    done.finish(ok=True)
    failed = jobs.new_job(root)
    failed.finish(ok=False)
    crashed = jobs.new_job(root)
    jobs._unlock(crashed._lock_fd)  # as if its process died: the lock is gone, the state says "running"
    crashed._lock_fd = None
    states = {e.path.name: e.state for e in jobs.list_entries([root])}
    assert states[crashed.id] == "crashed" and states[failed.id] == "failed"
    removed = {e.path.name for e in jobs.remove_crashed([root])}
    assert removed == {crashed.id, failed.id}
    assert running.folder.is_dir() and done.folder.is_dir()
    running.finish()


# ---------------------------------------------------------------------------------------------
# disk cap
# ---------------------------------------------------------------------------------------------
def test_enforce_cap_evicts_least_recently_used_first(home):
    pre = home / "preprocess"
    a = make_entry(pre, "a", 10_000, age_s=400)
    b = make_entry(pre, "b", 10_000, age_s=300)
    c = make_entry(home / "tuned", "c", 10_000, age_s=200)
    d = make_entry(home / "tuned", "d", 10_000, age_s=100)
    tiny = home / "tiny"
    tiny.mkdir()
    (tiny / "weights.bin").write_bytes(os.urandom(50_000))
    (home / "annotators").mkdir()
    roots = jobs.default_roots()
    assert {r.name for r in roots} == {"preprocess", "tuned"}  # model folders are not caches
    assert [e.path for e in jobs.list_entries(roots)] == [a, b, c, d]

    load_entry(a)  # using an entry makes it the most recently used
    removed = jobs.enforce_cap(25_000, roots)
    assert [e.path for e in removed] == [b, c]
    assert sum(jobs.disk_usage(r) for r in roots) <= 25_000
    assert a.exists() and d.exists() and not b.exists() and not c.exists()
    assert load_entry(a) is not None and load_entry(d) is not None  # survivors intact
    assert not list(pre.glob(".tmp-*")) and not list((home / "tuned").glob(".tmp-*"))
    assert (tiny / "weights.bin").exists()


def test_cap_never_evicts_running_jobs_or_pinned_entries(home):
    old = make_entry(home / "preprocess", "old", 20_000, age_s=1000)
    mid = make_entry(home / "tuned", "mid", 20_000, age_s=500)
    new = make_entry(home / "tuned", "new", 20_000, age_s=10)
    running = jobs.new_job()
    (running.path("out.bin")).write_bytes(os.urandom(20_000))
    t = time.time() - 2000  # the oldest of all, but running
    os.utime(running.folder, (t, t))
    running.pin(old)
    with jobs.pinned(mid):
        removed = jobs.enforce_cap(0)
        assert [e.path for e in removed] == [new]
        assert old.exists() and mid.exists() and running.folder.exists()
    running.finish()
    removed = jobs.enforce_cap(0)
    assert {e.path for e in removed} == {old, mid, running.folder}
    assert jobs.list_entries() == []


def test_new_job_applies_the_cap_from_the_environment(home, monkeypatch):
    make_entry(home / "preprocess", "stale", 50_000, age_s=1000)
    keep = make_entry(home / "preprocess", "fresh", 5_000, age_s=1)
    monkeypatch.setenv(jobs.CAP_ENV, str(30_000 / 2**30))
    with jobs.new_job() as job:
        assert not (home / "preprocess" / "stale").exists()
        assert keep.exists() and job.folder.exists()
    monkeypatch.setenv(jobs.CAP_ENV, "lots")
    with pytest.raises(EymError, match="EYM_DISK_CAP_GB='lots'"):
        jobs.cap_from_env()


def test_clear_older_than_and_stale_tmp(home):
    pre = home / "preprocess"
    old = make_entry(pre, "old", 1000, age_s=3 * 86400)
    new = make_entry(pre, "new", 1000, age_s=60)
    stale = pre / ".tmp-killed-build"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x" * 100)
    t = time.time() - 2 * 86400
    os.utime(stale, (t, t))
    live_build = pre / ".tmp-building-now"  # another process is writing this entry right now
    live_build.mkdir()
    removed = jobs.clear(older_than_s=jobs.parse_duration("1d"))
    assert [e.path for e in removed] == [old] and new.exists() and not stale.exists()
    assert [e.path for e in jobs.clear()] == [new]
    assert live_build.exists(), "a build in progress is never cleared"


def test_tuning_checkpoints_are_evicted_only_when_stale(home):
    tuned = home / "tuned"
    live = tuned / ".partial-live"
    dead = tuned / ".partial-dead"
    for folder in (live, dead):
        folder.mkdir(parents=True)
        (folder / "checkpoint.pt").write_bytes(b"c" * 1000)
    t = time.time() - 2 * jobs.PARTIAL_GRACE_S
    os.utime(dead, (t, t))
    states = {e.path.name: (e.state, e.in_use) for e in jobs.list_entries()}
    assert states == {".partial-live": ("partial", True), ".partial-dead": ("partial", False)}
    assert [e.path for e in jobs.enforce_cap(0)] == [dead] and live.exists()


def test_parse_duration():
    assert [jobs.parse_duration(s) for s in ("90", "90s", "30m", "12h", "7d", "2w", "1.5h")] == [
        90, 90, 1800, 43200, 604800, 1209600, 5400,
    ]  # fmt: skip
    with pytest.raises(EymError, match="'soon'"):
        jobs.parse_duration("soon")


# ---------------------------------------------------------------------------------------------
# eym cache (CLI)
# ---------------------------------------------------------------------------------------------
def test_cli_cache_list_and_clear(home, capsys):
    make_entry(home / "preprocess", "p1", 2 * 2**20, age_s=7200)
    make_entry(home / "tuned", "t1", 1 * 2**20, age_s=60)
    running = jobs.new_job()
    assert cli_main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "p1" in out and "t1" in out and running.id in out and "running" in out and "3 entries" in out

    assert cli_main(["cache", "clear", "--older-than", "1h"]) == 0
    assert "removed 1 entries (2.0 MB)" in capsys.readouterr().out
    assert cli_main(["cache", "clear", "--max-gb", "0"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 entries" in out and "kept 1 in use" in out
    assert [e.path for e in jobs.list_entries()] == [running.folder]
    running.finish()
    assert cli_main(["cache", "clear"]) == 0
    assert jobs.list_entries() == []

    assert cli_main(["cache", "clear", "--older-than", "yesterday"]) == 2
    assert "error: duration 'yesterday'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# eym.cache: atomic, verified entries
# ---------------------------------------------------------------------------------------------
def test_corrupted_entry_is_discarded(tmp_path):
    entry = tmp_path / "cache" / "key"
    with building(entry, meta={"v": 1}) as tmp:
        (tmp / "weights.bin").write_bytes(b"\x01" * 4096)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "frames.npy").write_bytes(b"\x02" * 100)
    assert load_entry(entry)["meta"] == {"v": 1}
    data = bytearray((entry / "sub" / "frames.npy").read_bytes())
    data[50] ^= 0xFF  # one flipped bit-pattern in one file
    (entry / "sub" / "frames.npy").write_bytes(bytes(data))
    assert verify_entry(entry) is None
    assert load_entry(entry) is None and not entry.exists()  # removed, so it gets rebuilt


@pytest.mark.parametrize("damage", ["truncate", "delete_file", "delete_manifest", "bad_manifest"])
def test_damaged_entries_never_load(tmp_path, damage):
    entry = tmp_path / "key"
    with building(entry) as tmp:
        (tmp / "a.bin").write_bytes(b"abc" * 1000)
    if damage == "truncate":
        (entry / "a.bin").write_bytes(b"abc")
    elif damage == "delete_file":
        (entry / "a.bin").unlink()
    elif damage == "delete_manifest":
        (entry / "MANIFEST.json").unlink()
    else:
        (entry / "MANIFEST.json").write_text("{not json")
    assert load_entry(entry) is None and not entry.exists()


def test_partial_builds_are_ignored_and_cleaned(tmp_path):
    root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt), building(root / "key") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # e.g. the user cancelled
    assert not (root / "key").exists() and list(root.iterdir()) == []
    # A SIGKILL leaves its .tmp-* folder behind: never loaded, cleaned once stale.
    leftover = root / ".tmp-key-abc123"
    leftover.mkdir()
    (leftover / "half.bin").write_bytes(b"x")
    assert load_entry(root / "key") is None
    assert clean_stale_tmp(root, older_than_s=3600) == 0 and leftover.exists()  # may be a live build
    t = time.time() - 7200
    os.utime(leftover, (t, t))
    assert clean_stale_tmp(root, older_than_s=3600) == 1 and not leftover.exists()


# ---------------------------------------------------------------------------------------------
# GPU out of memory
# ---------------------------------------------------------------------------------------------
def _fill_gpu_and_fail(refs: list, error: BaseException) -> None:
    activations = torch.zeros(1024, 1024)  # stands in for the tensors that filled the GPU
    refs.append(weakref.ref(activations))
    raise error


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("MPS backend out of memory"),
    ],
)
def test_oom_guard_names_the_settings_and_frees_memory(error):
    refs: list = []
    with pytest.raises(EymError) as err:
        with jobs.oom_guard(frames=16, size=512):
            _fill_gpu_and_fail(refs, error)
    msg = str(err.value)
    assert "out of memory at 16 frames, 512 px" in msg and "--frames" in msg and "--size" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert refs[0]() is None, "the failed call's tensors must be released"
    with jobs.oom_guard():  # the next job runs normally
        assert torch.ones(2).sum().item() == 2


def test_oom_guard_leaves_other_errors_alone():
    with pytest.raises(ValueError, match="unrelated"), jobs.oom_guard(frames=8):
        raise ValueError("unrelated")
    with pytest.raises(RuntimeError, match="shape mismatch"), jobs.oom_guard():
        raise RuntimeError("shape mismatch")


def test_a_job_that_raises_keeps_or_removes_its_folder_as_asked(tmp_path):
    from eym.jobs import new_job

    with pytest.raises(RuntimeError):
        with new_job(tmp_path, keep_failed=True) as kept:
            raise RuntimeError("boom")
    assert json.loads((kept.folder / "job.json").read_text())["state"] == "failed"
    with pytest.raises(KeyboardInterrupt):  # a stop of any kind, not only an Exception
        with new_job(tmp_path, keep_failed=False) as gone:
            (gone.folder / "partial.mp4").write_bytes(b"half")
            raise KeyboardInterrupt
    assert not gone.folder.exists() and not gone.running
    with new_job(tmp_path, keep_failed=False) as done:
        pass
    assert json.loads((done.folder / "job.json").read_text())["state"] == "done"

"""SIGKILL an edit during stage 1, stage 2 and sampling; the next run must finish and reuse.

One real ``python -m eym edit ... --model tiny`` process (tiny random-weight bundle, 4 frames of
64 px, checkpoints every 2 steps) is killed three times, each time at a later phase, and run
again after every kill:

1. killed in stage 1 once its first checkpoint exists -> the next run resumes stage 1 there;
2. that run is killed in stage 2 past a stage-2 checkpoint -> the next resumes stage 2 there,
   without redoing stage 1;
3. that run is killed during sampling, after the tuned weights were stored -> the last run
   reuses them (no tuning step at all) and writes a valid mp4.

Phases are detected from the checkpoint files appearing on disk and the progress bars the CLI
draws on stderr. Afterwards every cache entry must pass its sha256 check, and the result must
equal that of an uninterrupted run (tuning resumes bit-for-bit from its checkpoints).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.media

STEPS1, STEPS2, EVERY, DDIM = 6, 6, 2, 8
PROMPTS = dict(
    content="A man in a white tai chi suit",
    source="A man in a white tai chi suit is practicing tai chi",
    target="A man in a white tai chi suit is raising both arms",
)

_BAR = re.compile(r"(tuning stage1|tuning stage2|inversion|sampling):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


class EditProcess:
    """One ``python -m eym edit ... --model tiny`` run, its stderr (logs, tqdm bars) collected live."""

    def __init__(self, home: Path, media: Path, out: Path, settings: Path):
        cmd = [
            sys.executable, "-m", "eym", "edit",
            str(media / "taichi_hd/taichi_copart00.mp4"), str(media / "taichi_hd/taichi_copart05.mp4"),
            "--content-prompt", PROMPTS["content"], "--source-prompt", PROMPTS["source"],
            "--target-prompt", PROMPTS["target"], "--model", "tiny", "--device", "cpu",
            "--frames", "4", "--size", "64", "--steps1", str(STEPS1), "--steps2", str(STEPS2),
            "--ddim-steps", str(DDIM), "--settings", str(settings), "--out", str(out / "edited.mp4"),
        ]  # fmt: skip
        env = dict(os.environ, EYM_HOME=str(home), HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.text = ""
        self._new: queue.Queue = queue.Queue()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        # Raw chunks, not lines: tqdm redraws its bars with carriage returns.
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            self.text += chunk.decode(errors="replace")
            self._new.put(True)
        self._new.put(None)

    def progress(self, stage: str) -> list[int]:
        """Step counts the ``stage`` bar showed (a resumed tqdm bar starts at its initial step)."""
        return [int(m.group(2)) for m in _BAR.finditer(self.text) if m.group(1) == stage]

    def kill_when(self, ready, timeout: float = 240) -> None:
        """SIGKILL the process as soon as ``ready()`` is true (checked on output and every 20 ms)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
                self._pump_thread.join(timeout=10)
                return
            if self.proc.poll() is not None:
                raise AssertionError("the edit ended before the kill point:\n" + self.text[-3000:])
            try:
                self._new.get(timeout=0.02)
            except queue.Empty:
                pass
        self.proc.kill()
        raise AssertionError("kill point not reached in time:\n" + self.text[-3000:])

    def finish(self, timeout: float = 300) -> str:
        """Wait for a successful end; the edited video's path (the CLI's last stdout line)."""
        out = self.proc.stdout.read().decode()  # stderr belongs to the pump thread: not communicate()
        self.proc.wait(timeout=timeout)
        self._pump_thread.join(timeout=10)
        assert self.proc.returncode == 0, self.text[-4000:]
        self.stdout = out
        return out.strip().splitlines()[-1]


def _checkpoint(home: Path) -> dict | None:
    """Stage and step of the tuning checkpoint on disk, if any (written atomically, so whole)."""
    from eym.tuning import read_checkpoint

    for path in (home / "tuned").glob(".partial-*/checkpoint.pt"):
        try:
            ckpt = read_checkpoint(path)
        except (OSError, RuntimeError, EOFError):
            return None  # renamed away between glob and load
        if ckpt is None:
            return None
        return {"stage": int(ckpt["stage"]), "step": int(ckpt["step"])}
    return None


def _tuned_entries(home: Path) -> list[Path]:
    return [p for p in (home / "tuned").glob("*") if not p.name.startswith(".")] if (home / "tuned").exists() else []


def _check_caches(home: Path) -> None:
    """Every cache entry is complete and matches its sha256 manifest; no partial entry is live."""
    from eym.cache import verify_entry

    for kind in ("preprocess", "tuned"):
        for entry in (home / kind).iterdir():
            if not entry.name.startswith("."):
                assert verify_entry(entry) is not None, f"damaged cache entry {entry}"


def _frames(path: str) -> np.ndarray:
    from eym.video import read_video

    return read_video(path, num_frames=None, size=None).frames


def test_sigkill_at_each_phase_then_resume(media, tmp_path):
    from eym.video import count_frames

    home = tmp_path / "home"
    out = tmp_path / "out"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"tune": {"checkpoint_every": EVERY}}))

    # 1. killed during stage 1, right after its first checkpoint
    run = EditProcess(home, media, out, settings)
    run.kill_when(lambda: (c := _checkpoint(home)) is not None and c["stage"] == 1)
    killed_at_1 = _checkpoint(home)
    assert killed_at_1 and killed_at_1["stage"] == 1 and not _tuned_entries(home)

    # 2. resumes stage 1 from that checkpoint; killed during stage 2 past one of its checkpoints
    run = EditProcess(home, media, out, settings)
    run.kill_when(lambda: (c := _checkpoint(home)) is not None and c["stage"] == 2 and c["step"] >= EVERY)
    assert f"resuming tuning from stage 1 step {killed_at_1['step']}" in run.text, run.text[-3000:]
    assert "reusing preprocessed clip" in run.text
    stage1 = run.progress("tuning stage1")
    assert stage1 and min(stage1) == killed_at_1["step"], "stage 1 restarted below its checkpoint"
    killed_at_2 = _checkpoint(home)
    assert killed_at_2["stage"] == 2 and not _tuned_entries(home)

    # 3. resumes stage 2 (stage 1 not redone); killed during sampling
    run = EditProcess(home, media, out, settings)
    run.kill_when(lambda: bool(run.progress("sampling")))
    assert f"resuming tuning from stage 2 step {killed_at_2['step']}" in run.text, run.text[-3000:]
    assert not run.progress("tuning stage1"), "stage 1 ran again"
    assert min(run.progress("tuning stage2")) == killed_at_2["step"]
    (tuned,) = _tuned_entries(home)
    manifest = json.loads((tuned / "manifest.json").read_text())
    assert manifest["resumed_from"] == [2, killed_at_2["step"]]
    assert not (out / "edited.mp4").exists(), "killed before writing the result"

    # 4. reuses the tuned weights (no tuning step) and finishes
    run = EditProcess(home, media, out, settings)
    video = run.finish()
    assert "reusing tuned weights" in run.text and "reused cached tuned weights" in run.stdout
    assert not run.progress("tuning stage1") and not run.progress("tuning stage2")
    count, fps = count_frames(video)
    assert Path(video) == out / "edited.mp4" and count == 4 and fps > 0
    resumed = _frames(video)
    assert resumed.shape == (4, 64, 64, 3)
    _check_caches(home)
    assert not list((home / "tuned").glob(".partial-*")), "the checkpoint folder is removed once tuning is stored"

    # 5. the same edit uninterrupted, from cold caches: the same video
    clean = EditProcess(tmp_path / "clean_home", media, tmp_path / "clean_out", settings)
    clean_video = clean.finish()
    assert "tuned on the source" in clean.stdout
    np.testing.assert_allclose(_frames(clean_video).astype(float), resumed.astype(float), atol=2)

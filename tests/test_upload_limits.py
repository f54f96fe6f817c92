"""Limits no upload slips past: frames that change size mid-stream, peak memory, a plain checkout.

The streams are generated: MPEG-TS segments of different frame sizes concatenated into one
file, which is a valid transport stream whose header (and first frame) say 64x64.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from eym.errors import EymError

REPO = Path(__file__).resolve().parent.parent
# Peak RSS growth allowed while reading any upload at the default limits (docs/SECURITY.md):
# decoder threads x one max_side^2 frame in flight, one RGB frame, the kept output frames.
PREVIEW_RSS_BOUND_MB = 400


def _segment(path: Path, width: int, height: int, frames: int) -> bytes:
    import av

    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(frames):
            frame = av.VideoFrame(width, height, "yuv420p")
            for plane in frame.planes:  # flat grey levels: encodes to almost nothing at any size
                plane.update(bytes([(i * 40 + 16) % 256]) * plane.buffer_size)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


@pytest.fixture(scope="module")
def switching(tmp_path_factory) -> dict[str, Path]:
    """``huge``: 8 frames of 64x64 then 3 of 6000x6000; ``bigger``: 64x64 then 128x128 (within limits)."""
    root = tmp_path_factory.mktemp("switch")
    small = _segment(root / "a.ts", 64, 64, 8)
    out = {}
    for name, side in (("huge", 6000), ("bigger", 128)):
        path = root / f"{name}.ts"
        path.write_bytes(small + _segment(root / f"{name}-b.ts", side, side, 3))
        out[name] = path
    return out


def test_the_stream_really_switches_size(switching):
    """Guard on the fixture: without limits, a decoder sees both sizes (so the checks below mean something)."""
    import av

    with av.open(str(switching["bigger"])) as container:
        sizes = {(f.width, f.height) for f in container.decode(container.streams.video[0])}
    assert sizes == {(64, 64), (128, 128)}
    assert switching["huge"].stat().st_size < 2 * 2**20


def test_frames_over_the_limit_mid_stream_are_refused(switching):
    from eym.probe import probe
    from eym.video import read_video

    # The probe decodes the first frame only: the file passes as 64x64 there.
    assert (probe(switching["huge"]).width, probe(switching["huge"]).height) == (64, 64)
    with pytest.raises(EymError, match=r"6000x6000 is above the limit of 4096"):
        read_video(switching["huge"], num_frames=11, size=64)
    # A switch inside the limits is refused too: every frame must have the first frame's size.
    with pytest.raises(EymError, match=r"frame 8 is 128x128 but the video starts at 64x64"):
        read_video(switching["bigger"], num_frames=11, size=64)
    # Asking only for frames before the switch is fine: nothing past them is decoded.
    assert read_video(switching["bigger"], num_frames=4, start=0, stride=1, size=64).frames.shape == (4, 64, 64, 3)


def test_preprocess_refuses_the_switching_stream(switching, tmp_path):
    from eym.preprocess import PreprocessConfig, preprocess

    with pytest.raises(EymError, match="6000x6000|above the limit"):
        preprocess(switching["huge"], PreprocessConfig(num_frames=11, size=64), cache_dir=tmp_path, with_masks=False)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")], "nothing cached"


_RSS_SCRIPT = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from eym.errors import EymError
from eym.video import read_video
read_video(sys.argv[3], num_frames=2, stride=1, size=64)  # warm up: imports, decoder, allocator
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_video(sys.argv[2], num_frames=11, size=512)
    outcome = "read"
except EymError as err:
    outcome = str(err)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_mb": (after - before) / 1024, "outcome": outcome}))
"""


def test_peak_memory_of_reading_a_switching_stream_is_bounded(switching):
    """Peak RSS growth of a preview's read of the 6000x6000 stream, in a fresh process (ru_maxrss)."""
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(REPO), str(switching["huge"]), str(switching["bigger"])],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "above the limit" in report["outcome"]
    # One 6000x6000 RGB frame alone is 103 MB, the three of them 309 MB: none was allocated.
    assert report["grew_mb"] < PREVIEW_RSS_BOUND_MB, report


def _plain_python(root: Path) -> Path:
    """A Python that has the requirements (the system site-packages) but not ``pip install -e .``.

    A venv whose only .pth adds the system site-packages folder as a path: ``.pth`` files there
    (the editable install's finder among them) are not run, so ``eym`` is not importable.
    """
    import venv

    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    site = next((root / "lib").glob("python3*/site-packages"))
    (site / "requirements.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root / "bin" / "python"


def test_upload_checker_works_from_a_plain_checkout(tmp_path):
    """The probe process must import the checkout it belongs to, not an installed eym."""
    python = _plain_python(tmp_path / "venv")
    probe_eym = subprocess.run([str(python), "-I", "-c", "import eym"], capture_output=True, text=True)
    assert probe_eym.returncode != 0 and "No module named 'eym'" in probe_eym.stderr, "eym must not be installed here"
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "eym", checkout / "eym", ignore=shutil.ignore_patterns("__pycache__"))
    video = tmp_path / "clip.mp4"
    from eym.video import write_mp4

    write_mp4(np.full((8, 64, 64, 3), 128, np.uint8), video, 8.0)
    # `python app.py` from the checkout: its folder is on the path, the probe's child is isolated.
    script = "from eym.probe import probe; i = probe(__import__('sys').argv[1]); print(i.width, i.height, i.frame_count)"
    proc = subprocess.run([str(python), "-c", script, str(video)], capture_output=True, text=True, cwd=checkout,
                          timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["64", "64", "8"]


@pytest.mark.media
def test_upload_check_comes_before_the_cache(media, tmp_path):
    """Links out of a frame folder are refused even when a cached clip has the very same content."""
    from PIL import Image

    from eym.preprocess import PreprocessConfig, preprocess
    from eym.video import read_video

    frames = read_video(media / "taichi_hd/taichi_copart00.mp4", num_frames=4, size=64).frames
    real = tmp_path / "real"
    real.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(real / f"{i:04d}.png")
    config = PreprocessConfig(num_frames=4, size=64)
    cache = tmp_path / "cache"
    preprocess(real, config, cache_dir=cache, with_masks=False)  # now cached by content
    linked = tmp_path / "upload"
    linked.mkdir()
    for p in sorted(real.iterdir()):
        (linked / p.name).symlink_to(p)  # same bytes, but outside the uploaded folder
    with pytest.raises(EymError, match="links outside its folder"):
        preprocess(linked, config, cache_dir=cache, with_masks=False)


def test_disk_cap_counts_gradio_upload_copies(tmp_path, monkeypatch):
    """Previews and edits apply the cap to Gradio's copies of uploads too, oldest first."""
    import time as _time

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import app

    uploads = tmp_path / "gradio"
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for k in range(5):
        folder = uploads / f"hash{k}"
        folder.mkdir(parents=True)
        (folder / "clip.mp4").write_bytes(b"x" * 300_000)
        os.utime(folder, (_time.time() - 1000 + k, _time.time() - 1000 + k))
    monkeypatch.setenv("EYM_HOME", str(tmp_path / "home"))  # never the session's caches
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    monkeypatch.setenv("EYM_DISK_CAP_GB", str(1_000_000 / 2**30))
    from eym import server
    from eym.jobs import enforce_disk_cap

    enforce_disk_cap(*server.disk_roots(outputs))  # what the preview and the edit apply
    left = sorted(p.name for p in uploads.iterdir() if not p.name.startswith("."))
    assert left == ["hash2", "hash3", "hash4"], left  # the two oldest went, down to 0.9 MB


def _counting_worker(monkeypatch) -> list:
    """Count the probe processes started (each a separate, limited Python process)."""
    import eym.probe as probe_module

    runs = []
    real = probe_module._run_worker

    def counted(path, kind, limits):
        runs.append((Path(path).name, limits.max_bytes))
        return real(path, kind, limits)

    monkeypatch.setattr(probe_module, "_run_worker", counted)
    monkeypatch.setattr(probe_module, "_PROBED", {})
    return runs


def test_an_upload_is_probed_once_until_it_changes(tmp_path, monkeypatch):
    from eym.preprocess import PreprocessConfig
    from eym.probe import ProbeLimits, check_upload
    from eym.video import write_mp4

    runs = _counting_worker(monkeypatch)
    video = write_mp4(np.full((8, 64, 64, 3), 128, np.uint8), tmp_path / "clip.mp4", 8.0)
    limits = ProbeLimits(max_bytes=2**20)
    for frames in (4, 8, 4):  # preview events: other settings, the same upload
        check_upload(video, PreprocessConfig(num_frames=frames, size=64), limits)
    assert runs == [("clip.mp4", 2**20)]
    with pytest.raises(EymError, match="has 8 frame"):  # the frame count is checked on the kept result too
        check_upload(video, PreprocessConfig(num_frames=9, size=64), limits)
    check_upload(video, PreprocessConfig(num_frames=4, size=64), ProbeLimits(max_bytes=2**21))  # other limits
    assert len(runs) == 2
    write_mp4(np.full((6, 64, 64, 3), 90, np.uint8), video, 8.0)  # a new file at the same path
    with pytest.raises(EymError, match="has 6 frame"):
        check_upload(video, PreprocessConfig(num_frames=8, size=64), limits)
    assert len(runs) == 3
    bad = tmp_path / "notes.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)  # passes the sniff, fails in the worker
    for _ in range(2):  # a refusal is not kept: the next try probes again
        with pytest.raises(EymError):
            check_upload(bad, PreprocessConfig(num_frames=4, size=64), limits)
    assert len(runs) == 5


def test_preprocess_probes_with_the_limits_it_is_given(tmp_path, monkeypatch):
    """The page's upload limits reach preprocessing, so it reuses the page's probe instead of a second one."""
    import eym.preprocess as pre
    from eym.probe import ProbeLimits

    seen = []

    class Stop(Exception):
        pass

    def probe(path, *, limits, min_frames=1):
        seen.append(limits)
        raise Stop

    monkeypatch.setattr(pre, "probe", probe)
    (tmp_path / "clip.mp4").write_bytes(b"x")
    upload = ProbeLimits(max_bytes=5 * 2**20)
    for given in (upload, None):
        with pytest.raises(Stop):
            pre.preprocess(tmp_path / "clip.mp4", pre.PreprocessConfig(num_frames=4, size=64), probe_limits=given,
                           cache_dir=tmp_path / "cache")
    assert seen[0] is upload and seen[1].max_bytes == pre._MAX_INPUT_BYTES


@pytest.mark.media
def test_previews_of_one_upload_start_one_probe(media, tmp_path, monkeypatch):
    """Preview events (frames, stride, motion changed) reuse the upload's probe; the edit would too."""
    from eym.request import MOTION_PRESET, PreviewRequest, preview, upload_limits

    runs = _counting_worker(monkeypatch)
    source = tmp_path / "upload.mp4"
    shutil.copyfile(media / "taichi_hd/taichi_copart00.mp4", source)
    limits = upload_limits(20)
    for frames, preset in ((4, None), (4, "wave"), (5, "wave")):
        shown = preview(PreviewRequest(source=str(source), mode=MOTION_PRESET, preset=preset, num_frames=frames,
                                       size=64), limits)
        assert shown.frames.ndim == 3 and (shown.motion is None) == (preset is None)
        assert f"{frames} frames" in shown.info
    assert runs == [("upload.mp4", 20 * 2**20)], runs

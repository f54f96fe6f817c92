"""Check an upload before any work: is it a video (or frame folder) we can read, within limits?

Every file a user hands us goes through :func:`probe` before it is decoded for real. The probe

1. checks the size on disk and the first bytes against an allowlist of container signatures
   (mp4/mov, mkv/webm, avi, gif, mpeg-ps/ts, ogg; png/jpeg/bmp/webp for frame folders). This
   is what stops text playlists (HLS, ffconcat) renamed ``.mp4`` from making the demuxer open
   other files, and still images posing as videos;
2. opens the file with that container forced, in a **separate Python process** with a CPU and
   memory limit, no right to write files and a wall-clock timeout, reads the declared width,
   height, fps, frame count and duration, refuses anything over :class:`ProbeLimits` *before*
   decoding a single frame (a PNG or GIF declaring 60000x60000 never reaches the decoder), then
   decodes the first frame to prove the codec works, and counts packets where the container
   does not say how many frames it holds. Frames after the first are checked where they are
   decoded for real (:func:`eym.video.read_video`: the decoder refuses frames over the size
   limit, and any frame of another size than the first is refused);
3. turns every failure (unreadable, over a limit, decoder crash, hang) into an
   :class:`~eym.errors.EymError` with a one-line message naming the file and what to do.

A decoder that segfaults or spins on a hostile file takes down only the probe process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from eym.errors import EymError

logger = logging.getLogger(__name__)

# Video codecs we let the decoder near (ffmpeg decoder names); anything else is refused, which
# keeps rarely-used (and rarely-fuzzed) decoders away from uploads.
DEFAULT_CODECS: tuple[str, ...] = (
    "h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "libaom-av1", "mpeg4", "mpeg2video",
    "mpeg1video", "mjpeg", "gif", "prores", "theora", "h263", "msmpeg4v2", "msmpeg4v3",
    "wmv2", "wmv3", "vc1", "png", "apng", "dnxhd", "ffv1", "qtrle", "rawvideo",
)  # fmt: skip
# Image formats (Pillow names) accepted inside a folder of numbered frames.
FRAME_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "WEBP")
FRAME_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# A folder of frames carries no frame rate; this is the one we assume (the paper's clips are
# 8-frame sequences played at 8 fps).
FRAMES_FPS = 8.0
SNIFF_BYTES = 512  # how much of a file's start the container check reads


@dataclass(frozen=True)
class ProbeLimits:
    """What an upload may be. The defaults suit a public Space; the CLI may raise them."""

    max_bytes: int = 200 * 2**20  # file (or whole frame folder) size on disk
    max_seconds: float = 60.0  # declared or measured duration
    max_side: int = 4096  # width and height, each, in pixels
    max_frames: int = 7200  # frames in the file or images in the folder (60 s at 120 fps)
    timeout_s: float = 20.0  # wall-clock limit of the probe process
    max_memory_mb: int = 3072  # address-space limit of the probe process
    codecs: tuple[str, ...] = DEFAULT_CODECS  # decoder names allowed for video streams

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "codecs" and not value > 0:
                raise EymError(f"probe limit {f.name}={value!r} must be positive")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProbeLimits":
        """Build from a settings dict; unknown keys are an error (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EymError(f"unknown probe limit(s) {unknown}; known: {sorted(known)}")
        data = dict(data)
        if "codecs" in data:
            data["codecs"] = tuple(data["codecs"])
        return cls(**data)


@dataclass(frozen=True)
class ProbeInfo:
    """What :func:`probe` found out about an upload that passed."""

    path: Path  # the probed file or folder
    kind: Literal["video", "frames"]  # a video file, or a folder of numbered images
    width: int  # pixels, of the first frame
    height: int  # pixels, of the first frame
    fps: float  # frames per second (FRAMES_FPS for a folder)
    frame_count: int  # frames in the file, images in the folder
    duration: float  # seconds
    codec: str  # ffmpeg decoder name, or the image format of a folder ("png", "jpeg")
    size_bytes: int  # on disk, summed over a folder


def probe(path: str | os.PathLike, *, limits: ProbeLimits = ProbeLimits(), min_frames: int = 1) -> ProbeInfo:
    """Check that ``path`` is a readable video or frame folder within ``limits``.

    Args:
        path: a video file, or a folder of numbered images (``0000.png``, ``frame_12.jpg``...).
        limits: size, duration, resolution, frame-count and time limits (:class:`ProbeLimits`).
        min_frames: the number of frames the caller is going to sample; fewer is refused.

    Returns:
        :class:`ProbeInfo` of the upload.

    Raises:
        EymError: for anything that is not a readable video within the limits, including a
            decoder that crashed or timed out. The message names the file and what to change.
    """
    path = Path(path)
    name = path.name or str(path)
    if not path.exists():
        raise EymError(f"{name}: no such file or folder; check the path")
    if path.is_dir():
        kind = "frames"
    elif path.is_file():
        kind = "video"
        size = path.stat().st_size
        if size == 0:
            raise EymError(f"{name} is empty (0 bytes); upload the video again")
        if size > limits.max_bytes:
            raise EymError(
                f"{name} is {size / 2**20:.0f} MB, over the {limits.max_bytes / 2**20:.0f} MB limit; "
                "upload a shorter or more compressed clip"
            )
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
        if sniff_container(head) is None:
            raise EymError(
                f"{name} is not a video this tool reads (mp4, mov, mkv, webm, avi, gif, mpeg, ogg); "
                "convert it to mp4 (H.264)"
            )
    else:
        raise EymError(f"{name} is not a regular file or folder; upload a video file")

    result = _probe_worker_cached(path, kind, limits)
    info = ProbeInfo(
        path=path,
        kind=kind,
        width=int(result["width"]),
        height=int(result["height"]),
        fps=float(result["fps"]),
        frame_count=int(result["frame_count"]),
        duration=float(result["duration"]),
        codec=str(result["codec"]),
        size_bytes=int(result["size_bytes"]),
    )
    if info.frame_count < min_frames:
        raise EymError(
            f"{name} has {info.frame_count} frame(s) but {min_frames} are needed; "
            "ask for fewer frames (--frames) or a smaller stride, or use a longer clip"
        )
    logger.debug("probed %s: %s", path, info)
    return info


# Results of the probe process for files that passed, by (path, inode, mtime, size, limits, the
# interpreter that runs the probe process): an
# upload is probed once however many previews and edits use it. Bounded; a changed file has
# another key. Folders are not cached (an image can change without the folder's mtime moving).
_PROBED: dict[tuple, dict[str, Any]] = {}
_PROBED_MAX = 64


def _probe_worker_cached(path: Path, kind: str, limits: ProbeLimits) -> dict[str, Any]:
    if kind != "video":
        return _run_worker(path, kind, limits)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size, limits, sys.executable)
    if key not in _PROBED:
        result = _run_worker(path, kind, limits)  # raises for a refused file: failures are not kept
        while len(_PROBED) >= _PROBED_MAX:
            _PROBED.pop(next(iter(_PROBED)))
        _PROBED[key] = result
    return _PROBED[key]


def sniff_container(head: bytes) -> str | None:
    """The av/ffmpeg demuxer for a file starting with ``head`` (:data:`SNIFF_BYTES` bytes), or None if not allowed."""
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"):
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpeg"
    if head.startswith(b"OggS"):
        return "ogg"
    if len(head) >= 377 and head[0] == head[188] == head[376] == 0x47:
        return "mpegts"  # a sync byte at the start of three 188-byte transport packets
    return None


# ---------------------------------------------------------------------------------------------
# The probe process. Everything below runs in a child (:data:`_BOOT`), so that a decoder
# crash, hang or memory blow-up on a hostile file cannot hurt the caller.
# ---------------------------------------------------------------------------------------------


_PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # the folder holding eym/
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from eym.probe import _worker_main; raise SystemExit(_worker_main(sys.argv[2]))"


def _run_worker(path: Path, kind: str, limits: ProbeLimits) -> dict[str, Any]:
    """Run the probe in a child process with a timeout; its one JSON line of output, or EymError."""
    name = path.name
    # Absolute: the child runs in "/" so that nothing of the caller's working folder is in reach.
    request = json.dumps({"path": os.path.abspath(path), "kind": kind, "limits": asdict(limits)})
    # -I: ignore PYTHON* variables, the user site and the working folder; -B: write no bytecode
    # (it may not write). Isolated mode cannot see this checkout, so the package's own parent
    # folder goes on the path explicitly: the probe runs this very code, installed or not.
    cmd = [sys.executable, "-I", "-B", "-c", _BOOT, str(_PACKAGE_PARENT), request]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, timeout=limits.timeout_s, stdin=subprocess.DEVNULL, cwd="/"
        )
    except subprocess.TimeoutExpired:
        raise EymError(
            f"reading {name} took longer than {limits.timeout_s:g} s; the file is probably damaged, "
            "re-encode it to mp4 (H.264)"
        ) from None
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = (
            f"the decoder crashed ({signal.Signals(-proc.returncode).name})"
            if proc.returncode < 0 and -proc.returncode in signal.valid_signals()
            else "the reader failed"
        )
        logger.warning(
            "probe of %s failed (rc=%s): %s", path, proc.returncode, proc.stderr[-2000:].decode(errors="replace")
        )
        raise EymError(f"{name} could not be read: {why}; the file is damaged or not a video, re-encode it to mp4")
    reply = json.loads(lines[-1])
    if not reply["ok"]:
        raise EymError(reply["error"])
    return reply["info"]


def _limit_self(limits: dict[str, Any]) -> None:
    """Limits of the probe process itself: memory, CPU seconds, no files written, no core dumps."""
    import resource

    mem = int(limits["max_memory_mb"]) * 2**20
    cpu = int(limits["timeout_s"]) + 2
    for res, value in (
        (resource.RLIMIT_AS, mem),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, 0),  # the probe only reads; a decoder has no business writing
        (resource.RLIMIT_CORE, 0),  # a crash must not leave a core file behind
    ):
        soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, hard))


class _Refused(Exception):
    """Raised inside the worker; its message goes back to the caller as an EymError."""


def _probe_video(path: Path, lim: dict[str, Any]) -> dict[str, Any]:
    import av  # imported here: only the probe process loads the decoders

    name = path.name
    with open(path, "rb") as f:
        fmt = sniff_container(f.read(SNIFF_BYTES))
    size = path.stat().st_size
    if fmt == "gif":
        # ffmpeg leaves the size of an over-large GIF canvas blank; the header states it plainly.
        with open(path, "rb") as f:
            width, height = struct.unpack("<HH", f.read(10)[6:10])
        _check_side(name, width, height, lim)
    try:
        # The container is forced to what the signature says, so a file cannot talk the demuxer
        # into another format (e.g. a playlist that opens other files). Only file:// is allowed.
        container = av.open(
            str(path), format=fmt, options={"protocol_whitelist": "file", "probesize": "5000000"},
            timeout=lim["timeout_s"],
        )
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as err:
        raise _Refused(f"{name} is not a readable video ({type(err).__name__}); re-encode it to mp4 (H.264)") from None
    with container:
        if not container.streams.video:
            raise _Refused(f"{name} has no video stream; upload a video")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        codec = ctx.name if ctx is not None else "unknown"  # None: ffmpeg has no decoder for it
        if ctx is None or codec not in lim["codecs"]:
            raise _Refused(f"{name} uses the {codec!r} codec, which is not accepted; re-encode it to mp4 (H.264)")
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        _check_side(name, width, height, lim)

        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if not 0.1 <= fps <= 1000.0:  # absent or absurd: count frames over the duration later
            fps = 0.0
        duration = 0.0
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1e6
        if duration > lim["max_seconds"]:
            raise _Refused(
                f"{name} lasts {duration:.0f} s, over the {lim['max_seconds']:g} s limit; trim the clip"
            )
        declared = int(stream.frames or 0)
        if declared > lim["max_frames"]:
            raise _Refused(f"{name} has {declared} frames, over the {lim['max_frames']} limit; trim the clip")

        # Decode one frame: proves the codec works and the real size matches the declared one.
        ctx.thread_count = 1  # one decoder thread keeps memory predictable under the limit
        first = None
        packets = 0
        for packet in container.demux(stream):
            if packet.size:
                packets += 1
            try:
                frames = packet.decode()
            except (av.FFmpegError, ValueError):
                continue
            if frames:
                first = frames[0]
                break
            if packets > 64:
                break
        if first is None:
            raise _Refused(f"{name}: no frame could be decoded; the file is damaged, re-encode it to mp4 (H.264)")
        width, height = first.width, first.height
        _check_side(name, width, height, lim)

        count = declared
        if count <= 0:
            # The container does not say: count the remaining packets (no decoding, cheap).
            for packet in container.demux(stream):
                if packet.size:
                    packets += 1
                if packets > lim["max_frames"]:
                    raise _Refused(
                        f"{name} has more than {lim['max_frames']} frames, over the limit; trim the clip"
                    )
            count = packets
    if fps == 0.0:
        fps = count / duration if duration > 0 else FRAMES_FPS
    # Frames over the rate is what the reader will see; container durations of streams without
    # an index (mpeg-ps, ts) are estimates. The limit applies to the larger of the two.
    declared_duration, duration = duration, count / fps
    longest = max(duration, declared_duration)
    if longest > lim["max_seconds"]:
        raise _Refused(f"{name} lasts {longest:.0f} s, over the {lim['max_seconds']:g} s limit; trim the clip")
    return {
        "width": width, "height": height, "fps": fps, "frame_count": count, "duration": duration,
        "codec": codec, "size_bytes": size,
    }  # fmt: skip


def _frame_number(p: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", p.stem)
    return (int(digits[-1]) if digits else -1, p.name)


def _probe_frames(folder: Path, lim: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    name = folder.name
    root = folder.resolve()
    images = []
    for p in folder.iterdir():
        if p.suffix.lower() not in FRAME_EXTENSIONS or p.name.startswith("."):
            continue
        if p.is_symlink() and root not in p.resolve().parents:
            raise _Refused(f"{name}/{p.name} links outside its folder; upload plain image files")
        if not p.is_file():
            continue
        images.append(p)
        if len(images) > lim["max_frames"]:
            raise _Refused(f"{name} holds more than {lim['max_frames']} images, over the limit; use fewer frames")
    if not images:
        raise _Refused(f"{name} holds no images ({', '.join(FRAME_EXTENSIONS)}); upload a video or numbered frames")
    if not all(re.search(r"\d", p.stem) for p in images):
        bad = next(p.name for p in images if not re.search(r"\d", p.stem))
        raise _Refused(f"{name}/{bad} is not numbered; name frames 0000.png, 0001.png, ...")
    images.sort(key=_frame_number)

    total = 0
    width = height = 0
    fmt = ""
    # Pillow refuses to open anything larger than this (decompression-bomb guard).
    Image.MAX_IMAGE_PIXELS = lim["max_side"] ** 2
    for i, p in enumerate(images):
        total += p.stat().st_size
        if total > lim["max_bytes"]:
            raise _Refused(f"{name} is over the {lim['max_bytes'] / 2**20:.0f} MB limit; use fewer or smaller frames")
        try:
            with Image.open(p) as im:  # reads the header only
                if im.format not in FRAME_FORMATS:
                    raise _Refused(f"{name}/{p.name} is {im.format}, not one of {FRAME_FORMATS}; convert it to PNG")
                _check_side(f"{name}/{p.name}", im.width, im.height, lim)
                if i == 0:
                    width, height, fmt = im.width, im.height, im.format.lower()
                    im.load()  # decode the first frame fully: the codec must work
                else:
                    im.verify()  # cheap structural check (chunk CRCs for PNG)
        except _Refused:
            raise
        except Image.DecompressionBombError:
            raise _Refused(
                f"{name}/{p.name} declares a size over the {lim['max_side']} px limit per side; downscale it"
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise _Refused(
                f"{name}/{p.name} is not a readable image ({type(err).__name__}); replace or remove it"
            ) from None
    count = len(images)
    duration = count / FRAMES_FPS
    if duration > lim["max_seconds"]:
        raise _Refused(f"{name} holds {count} frames ({duration:.0f} s at {FRAMES_FPS:g} fps), over the limit")
    return {
        "width": width, "height": height, "fps": FRAMES_FPS, "frame_count": count,
        "duration": duration, "codec": fmt, "size_bytes": total,
    }  # fmt: skip


def _check_side(name: str, width: int, height: int, lim: dict[str, Any]) -> None:
    if width <= 0 or height <= 0:
        raise _Refused(f"{name} declares no frame size; the file is damaged, re-encode it to mp4 (H.264)")
    if max(width, height) > lim["max_side"]:
        raise _Refused(
            f"{name} is {width}x{height}, over the {lim['max_side']} px limit per side; downscale it"
        )


def _worker_main(request: str) -> int:
    """Entry point of the probe process: one JSON request in argv, one JSON line on stdout."""
    req = json.loads(request)
    _limit_self(req["limits"])
    path = Path(req["path"])
    try:
        probe_one = _probe_frames if req["kind"] == "frames" else _probe_video
        reply = {"ok": True, "info": probe_one(path, req["limits"])}
    except _Refused as err:
        reply = {"ok": False, "error": str(err)}
    except MemoryError:
        reply = {"ok": False, "error": f"{path.name} needs too much memory to read; downscale or re-encode it"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1]))


def check_upload(path: str | Path, config, limits) -> None:
    """Probe an upload (size, container, codec, frame count) before any decoding work or cache lookup.

    Args:
        path: the uploaded file.
        config: the ``PreprocessConfig`` it will be sampled with (the frames it must have).
        limits: :class:`ProbeLimits`.
    """
    from eym.errors import EymError

    if not Path(path).is_file():  # the page takes video files; a folder of frames is a CLI input
        raise EymError(f"{Path(path).name} is not a video file; upload one video (mp4, mov, webm...)")
    needed = config.start + (config.num_frames - 1) * config.stride + 1 if config.stride else config.num_frames
    probe(path, limits=limits, min_frames=needed)

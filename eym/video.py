"""Video in and out: read a video or a numbered-frame folder, sample frames, resize to SxS; write mp4.

Reading goes through PyAV (FFmpeg's demuxers and decoders), so anything ffmpeg reads works:
mp4, mov, webm, avi, mkv, gif. A folder of images is a video too; its frames are sorted by the
number in their names (``frame_2`` before ``frame_10``) and play at :data:`FOLDER_FPS`.

Sampling: every ``stride``-th frame from ``start``. By default (no stride) the step is
:func:`natural_stride`: consecutive frames at the small stride that keeps the edit playing near
:data:`TARGET_FPS`, as Tune-A-Video and MotionEditor sample (frames spread over a whole clip play
as a slideshow). The sampled sequence keeps real time: its fps is the source fps divided by the
(mean) step between taken frames.

Writing: :func:`write_mp4` pipes raw RGB into the ffmpeg binary that imageio-ffmpeg ships and
encodes H.264 yuv420p with ``+faststart``, the one mp4 flavour every browser plays; it writes
under a temporary name and renames, so a reader never sees half a file.

Composition and sound go through moviepy: :func:`labelled_side_by_side` (panels with labels) and
:func:`mux_audio` (the source's soundtrack over the span the sampled frames cover).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from eym.cache import atomic_output
from eym.errors import EymError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # as eym.probe.FRAME_EXTENSIONS (no TIFF: a risky decoder)
FOLDER_FPS = 8.0  # a frame folder carries no timing; 8 fps is what MotionEditor-style 8-frame clips use
RESIZE_MODES = ("crop", "pad")
DECODE_THREADS = 2  # decoder threads; bounds the frames in flight (peak memory) on many-core servers


@dataclass(frozen=True)
class VideoLimits:
    """What :func:`read_video` accepts before doing any decoding work (protects a shared server)."""

    max_side: int = 4096  # longest side of the source frames, pixels
    max_duration_s: float = 600.0  # source duration, seconds
    max_source_frames: int = 36_000  # frames in the source (10 min at 60 fps)


@dataclass
class Video:
    """Sampled, resized frames of one video.

    Attributes:
        frames: ``(F, H, W, 3)`` uint8 RGB.
        fps: fps of the sampled sequence (``source_fps / step``), so it plays in real time.
        source_fps: fps of the source video (:data:`FOLDER_FPS` for a frame folder).
        indices: which source frames were taken, 0-based.
        path: the file or folder read.
    """

    frames: np.ndarray
    fps: float
    source_fps: float
    indices: list[int]
    path: str


# ---------------------------------------------------------------------------------------------
# Sources: a frame folder or a container file
# ---------------------------------------------------------------------------------------------
def _natural_key(path: Path) -> tuple:
    """Sort key that orders the numbers inside names numerically: frame_2 < frame_10."""
    parts = re.split(r"(\d+)", path.name)
    return tuple((0, int(p)) if p.isdigit() else (1, p.lower()) for p in parts)


def list_frame_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a frame folder in numeric order.

    Raises:
        EymError: if the folder holds no images.
    """
    folder = Path(folder)
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not files:
        raise EymError(f"{folder}: folder has no image frames ({', '.join(IMAGE_SUFFIXES)}); point at a video or a folder of numbered frames")
    return files


def _read_image(path: Path) -> np.ndarray:
    try:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    except cv2.error:  # e.g. a header declaring a size over OpenCV's pixel limit
        image = None
    if image is None:
        raise EymError(f"{path}: cannot read this image; re-save it as PNG or JPEG")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise EymError(f"{path}: no such file or folder; check the path")
    if path.is_file() and path.stat().st_size == 0:
        raise EymError(f"{path}: file is empty; upload or point at a real video")


def _open(path: Path):
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise EymError(f"{path}: not a readable video ({type(err).__name__}); use a format ffmpeg reads (mp4, mov, webm, avi, gif)") from None
    if not container.streams.video:
        container.close()
        raise EymError(f"{path}: has no video stream; use a file with video in it")
    return container


def _stream_fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return FOLDER_FPS


def _count_packets(path: Path) -> int:
    """Frame count for containers without one in their header (webm, some gifs): demux, don't decode."""
    import av

    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.FFmpegError as err:
            raise EymError(f"{path}: video is damaged ({err}); re-encode it (e.g. with ffmpeg -i IN -c:v libx264 OUT.mp4)") from None


def count_frames(path: str | os.PathLike) -> tuple[int, float]:
    """Number of frames and fps of a video file or frame folder, without decoding pixels.

    Args:
        path: video file or folder of numbered frames.

    Returns:
        ``(frame count, fps)``; a folder reports :data:`FOLDER_FPS`. The count comes from the
        container header when it has one, so it can be off by a frame for some files;
        :func:`read_video` corrects for that.
    """
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        return len(list_frame_files(path)), FOLDER_FPS
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        count = int(stream.frames or 0)
    if count <= 0:
        count = _count_packets(path)
    if count <= 0:
        raise EymError(f"{path}: video has no frames; use a non-empty video")
    return count, fps


def _check_limits(path: Path, width: int, height: int, count: int, fps: float, limits: VideoLimits) -> None:
    if max(width, height) > limits.max_side:
        raise EymError(f"{path}: resolution {width}x{height} is above the limit of {limits.max_side} px; downscale the video first")
    if count > limits.max_source_frames:
        raise EymError(f"{path}: {count} frames is above the limit of {limits.max_source_frames}; trim the video first")
    duration = count / fps
    if duration > limits.max_duration_s:
        raise EymError(f"{path}: {duration:.0f} s is longer than the limit of {limits.max_duration_s:.0f} s; trim the video first")


# ---------------------------------------------------------------------------------------------
# Sampling and geometry
# ---------------------------------------------------------------------------------------------
TARGET_FPS = 12.0  # the default sampling keeps the edit near this rate (peers: stride 1-2 at 24-30 fps)
MAX_NATURAL_STRIDE = 3  # never skip more than 2 frames by default, however fast the source


def natural_stride(fps: float, total: int, num_frames: int, start: int = 0) -> int:
    """The default step between sampled frames: ``round(fps / TARGET_FPS)``, 1 to 3, lowered until
    ``num_frames`` frames from ``start`` fit in the clip.

    At 30 fps that is 2 (the edit plays at 15 fps); at 24 fps 2 (12 fps); at 12 fps or less, 1.
    """
    stride = max(1, min(MAX_NATURAL_STRIDE, round(fps / TARGET_FPS))) if fps > 0 else 1
    while stride > 1 and start + stride * (num_frames - 1) >= total:
        stride -= 1
    return stride


def describe_span(indices: list[int], total: int, source_fps: float) -> str:
    """``"frames 0-14 of 237 (stride 2), 0.53 s, plays at 15 fps"``: the stretch of the source an edit covers."""
    if not indices:
        return f"no frames of {total}"
    step = (indices[-1] - indices[0]) / (len(indices) - 1) if len(indices) > 1 else 1.0
    text = f"frames {indices[0]}-{indices[-1]} of {total} (stride {step:.3g})"
    if source_fps > 0:
        text += f", {len(indices) * step / source_fps:.2f} s, plays at {source_fps / step:.3g} fps"
    return text


def sample_indices(total: int, num_frames: int | None, start: int = 0, stride: int | None = None,
                   fps: float | None = None) -> list[int]:
    """Which source frames to take.

    Args:
        total: frames in the source.
        num_frames: how many to take; ``None`` takes every ``stride``-th frame (default 1) to the end.
        start: first source frame, 0-based.
        stride: step between taken frames; ``None``: :func:`natural_stride` for the source's
            ``fps``, or, when no fps is given, ``num_frames`` spread evenly to the last frame.
        fps: the source's frame rate (what the default stride is chosen for).

    Returns:
        Increasing 0-based indices.

    Raises:
        EymError: if the source has too few frames for the request.
    """
    if num_frames is not None and num_frames < 1:
        raise EymError(f"frames={num_frames}: ask for at least 1 frame")
    if stride is not None and stride < 1:
        raise EymError(f"stride={stride}: use a stride of at least 1")
    if start < 0:
        raise EymError(f"start={start}: use a start frame of 0 or more")
    available = total - start
    if available < 1:
        raise EymError(f"start={start} is past the last frame ({total} frames); use a smaller start")
    if num_frames is None:
        return list(range(start, total, stride or 1))
    if stride is None and num_frames > available:
        raise EymError(f"asked for {num_frames} frames but only {available} are available from frame {start}; ask for fewer frames or a smaller start")
    if stride is None and fps is not None:
        stride = natural_stride(fps, total, num_frames, start)
    if stride is None:
        return [int(i) for i in np.round(np.linspace(start, total - 1, num_frames)).astype(int)]
    last = start + stride * (num_frames - 1)
    if last >= total:
        raise EymError(f"{num_frames} frames with stride {stride} from frame {start} need {last + 1} frames, the video has {total}; lower frames, stride or start")
    return list(range(start, last + 1, stride))


def resize_square(image: np.ndarray, size: int, mode: str = "crop") -> np.ndarray:
    """Fit one ``(H, W, C)`` image into ``size x size``.

    ``crop`` scales the short side to ``size`` and cuts the long side in the middle; ``pad``
    scales the long side to ``size`` and centres the image on black.
    """
    height, width = image.shape[:2]
    scale = size / min(height, width) if mode == "crop" else size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    # INTER_AREA avoids aliasing when shrinking; cubic keeps edges when enlarging small clips.
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(image, (new_w, new_h), interpolation=interp) if (new_w, new_h) != (width, height) else image
    if mode == "crop":
        top, left = (new_h - size) // 2, (new_w - size) // 2
        return np.ascontiguousarray(resized[top : top + size, left : left + size])
    out = np.zeros((size, size) + image.shape[2:], dtype=image.dtype)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def _apply_rotation(image: np.ndarray, degrees: int) -> np.ndarray:
    """Phone videos store a display rotation instead of rotated pixels; apply it."""
    turns = (-int(round(degrees / 90))) % 4  # PyAV reports counter-clockwise degrees
    return np.ascontiguousarray(np.rot90(image, k=-turns)) if turns else image


def _decode(path: Path, wanted: list[int], limits: VideoLimits,
            fit: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[dict[int, np.ndarray], int]:
    """Decode ``path`` sequentially and keep the ``wanted`` frames (each passed through ``fit``); also return how many were decoded.

    Every frame is checked, not only the first: the decoder itself refuses frames over
    ``limits.max_side`` squared pixels before allocating them (its ``max_pixels`` option), and
    a frame whose size differs from the first one's is refused before it is converted or kept,
    so a stream that switches from 64x64 to 16000x16000 mid-way costs no more memory than its
    small frames. Kept frames are fitted right away, so memory holds ``len(wanted)`` output-sized
    frames, not source-sized ones.
    """
    import av

    keep = set(wanted)
    last = max(wanted)
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    first: tuple[int, int] | None = None
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = DECODE_THREADS  # frames in flight: each up to max_side^2 pixels
        declared = stream.codec_context
        if declared.width and declared.height:  # the container's header, before any decoding
            _check_limits(path, declared.width, declared.height, 0, 1.0, limits)
        stream.codec_context.options = {"max_pixels": str(limits.max_side**2)}
        try:
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                first = _check_frame(path, index, frame.width, frame.height, first, limits)
                if index in keep:
                    image = _apply_rotation(frame.to_ndarray(format="rgb24"), getattr(frame, "rotation", 0) or 0)
                    frames[index] = fit(image) if fit is not None else image
                del frame
                if index >= last:
                    break
        except av.FFmpegError as err:
            # The decoder refused a frame: if the stream now declares another size, say so.
            ctx = stream.codec_context
            if ctx.width and ctx.height and (ctx.width, ctx.height) != first:
                _check_frame(path, decoded, ctx.width, ctx.height, first, limits)
            if not frames:
                raise EymError(f"{path}: video cannot be decoded ({err}); re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)") from None
            logger.warning("%s: decoding stopped early at frame %d (%s)", path, decoded, err)
    return frames, decoded


def _check_frame(path: Path, index: int, width: int, height: int, first: tuple[int, int] | None,
                 limits: VideoLimits) -> tuple[int, int]:
    """The first frame's size; EymError for a frame over the limits or of another size than the first."""
    if first is None:
        _check_limits(path, width, height, 0, 1.0, limits)
        return (width, height)
    if (width, height) != first:
        _check_limits(path, width, height, 0, 1.0, limits)
        raise EymError(
            f"{path}: frame {index} is {width}x{height} but the video starts at {first[0]}x{first[1]}; "
            "a video must keep one frame size, re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)"
        )
    return first


def _sample_for(path: Path, total: int, num_frames: int | None, start: int, stride: int | None, fps: float) -> list[int]:
    """:func:`sample_indices` with the file named in its error."""
    try:
        return sample_indices(total, num_frames, start, stride, fps=fps)
    except EymError as err:
        raise EymError(f"{path}: {err}") from None


def read_video(
    path: str | os.PathLike,
    *,
    num_frames: int | None = 8,
    size: int | None = 512,
    start: int = 0,
    stride: int | None = None,
    resize_mode: str = "crop",
    limits: VideoLimits = VideoLimits(),
) -> Video:
    """Read, sample and resize a video file or a folder of numbered frames.

    Args:
        path: any video ffmpeg reads, or a folder of numbered images.
        num_frames: frames to take (see :func:`sample_indices`); ``None`` takes all.
        size: output side ``S`` (a multiple of 8); frames become ``S x S``. ``None`` keeps the
            source size.
        start: first source frame, 0-based.
        stride: step between frames; ``None``: :func:`natural_stride` (consecutive frames that play
            near :data:`TARGET_FPS`).
        resize_mode: ``"crop"`` (centre crop) or ``"pad"`` (letterbox on black).
        limits: resolution and duration caps, checked before decoding the pixels.

    Returns:
        :class:`Video` with frames ``(F, S, S, 3)`` uint8 RGB.

    Raises:
        EymError: for a missing, empty, unreadable or oversized input, too few frames, or a
            bad ``size``/``resize_mode``.
    """
    path = Path(path)
    if size is not None and (size < 8 or size % 8):
        raise EymError(f"size={size}: use a positive multiple of 8 (e.g. 512)")
    if resize_mode not in RESIZE_MODES:
        raise EymError(f"resize_mode={resize_mode!r}: use one of {', '.join(RESIZE_MODES)}")
    total, source_fps = count_frames(path)

    fitted = False
    if path.is_dir():
        files = list_frame_files(path)
        indices = _sample_for(path, total, num_frames, start, stride, source_fps)
        images = [_read_image(files[i]) for i in indices]
        height, width = images[0].shape[:2]
        _check_limits(path, width, height, total, source_fps, limits)
        if any(im.shape != images[0].shape for im in images):
            logger.info("%s: frames differ in size; each is fitted to the output square on its own", path)
            if size is None:
                raise EymError(f"{path}: frames have different sizes; give a size so they can be resized")
    else:
        _check_limits(path, 0, 0, total, source_fps, limits)
        indices = _sample_for(path, total, num_frames, start, stride, source_fps)
        fit = (lambda im: resize_square(im, size, resize_mode)) if size is not None else None
        decoded_frames, decoded = _decode(path, indices, limits, fit)
        if len(decoded_frames) < len(indices):
            # The header over-counted (common with variable-frame-rate files): sample again from
            # the true count, which the first pass has just measured.
            logger.info("%s: header says %d frames, %d decode; resampling", path, total, decoded)
            total = decoded
            indices = _sample_for(path, total, num_frames, start, stride, source_fps)
            decoded_frames, decoded = _decode(path, indices, limits, fit)
            if len(decoded_frames) < len(indices):
                raise EymError(f"{path}: only {decoded} frames could be decoded; ask for fewer frames or re-encode the video")
        images = [decoded_frames[i] for i in indices]
        fitted = size is not None

    if size is not None and not fitted:
        images = [resize_square(im, size, resize_mode) for im in images]
    frames = np.stack(images).astype(np.uint8)  # (F, H, W, 3)
    step = (indices[-1] - indices[0]) / (len(indices) - 1) if len(indices) > 1 else 1.0
    fps = source_fps / max(step, 1e-6)
    logger.info("%s: %d of %d frames (%s), %.3g fps -> %.3g fps", path, len(indices), total, frames.shape[1:3], source_fps, fps)
    return Video(frames=frames, fps=float(fps), source_fps=float(source_fps), indices=list(indices), path=str(path))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _even(frames: np.ndarray) -> np.ndarray:
    """H.264 yuv420p needs even sides: repeat the last row/column where a side is odd."""
    _, height, width, _ = frames.shape
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: float, *, crf: int = 18) -> Path:
    """Write frames as an H.264 yuv420p mp4 that browsers play, atomically.

    Args:
        frames: ``(F, H, W, 3)`` uint8 RGB; odd sides are padded by one pixel.
        path: output file (``.mp4``); parent folders are created.
        fps: frames per second (any positive float).
        crf: x264 quality, lower is better (18 is visually lossless).

    Returns:
        ``path`` as a :class:`Path`.
    """
    import imageio_ffmpeg

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (F, H, W, 3) with F >= 1, got {frames.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = _even(np.ascontiguousarray(frames, dtype=np.uint8))
    _, height, width, _ = frames.shape
    path = Path(path)
    with atomic_output(path, suffix=".mp4") as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            (width, height),
            fps=float(fps),
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=1,
            output_params=["-crf", str(crf), "-movflags", "+faststart"],
            ffmpeg_log_level="error",
        )
        writer.send(None)  # start ffmpeg
        for frame in frames:
            writer.send(frame)
        writer.close()
    return path


def _to_height(video: np.ndarray, height: int) -> np.ndarray:
    """Scale ``(F, h, w, 3)`` frames to ``height`` rows, aspect kept."""
    if video.shape[1] == height:
        return video
    width = max(1, round(video.shape[2] * height / video.shape[1]))
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in video])


def side_by_side(*videos: np.ndarray) -> np.ndarray:
    """Put videos next to each other: ``(F, H, W_i, 3)`` each -> ``(F, H, sum W_i, 3)``.

    Videos of another height are scaled to the first one's height (aspect kept).
    """
    if not videos:
        raise ValueError("side_by_side needs at least one video")
    num_frames, height = videos[0].shape[0], videos[0].shape[1]
    for video in videos:
        if video.shape[0] != num_frames:
            raise ValueError(f"all videos need {num_frames} frames, got {video.shape[0]}")
    return np.concatenate([_to_height(video, height) for video in videos], axis=2)


def thumbnail_strip(frames, *, height: int, width: int | None = None, per_row: int | None = None,
                    gap: int = 4) -> np.ndarray:
    """Frames side by side on white, wrapping every ``per_row``: the one tiling of the app's
    preview, the gallery thumbnails and :func:`contact_sheet`.

    Args:
        frames: (F, H, W, 3) uint8, or a list of frames of different sizes.
        height: tile height in pixels.
        width: tile width; None keeps each frame's aspect ratio.
        per_row: tiles per row (default: all in one row).
        gap: white pixels between tiles and rows.
    Returns:
        (rows * (height + gap) - gap, widest row, 3) uint8 image.
    """
    frames = list(frames)
    if not frames:
        raise ValueError("thumbnail_strip needs at least one frame")
    per_row = per_row or len(frames)
    tiles = [cv2.resize(np.ascontiguousarray(f), (width or max(1, round(f.shape[1] * height / f.shape[0])), height),
                        interpolation=cv2.INTER_AREA) for f in frames]
    rows = [tiles[i:i + per_row] for i in range(0, len(tiles), per_row)]
    row_widths = [sum(t.shape[1] for t in row) + gap * (len(row) - 1) for row in rows]
    out = np.full((len(rows) * (height + gap) - gap, max(row_widths), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        x = 0
        for tile in row:
            out[r * (height + gap):r * (height + gap) + height, x:x + tile.shape[1]] = tile
            x += tile.shape[1] + gap
    return out


def mask_overlay(frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The person in full colour, the background dimmed and tinted: what stage 1 trains on.

    Args:
        frames: (F, H, W, 3) uint8.  masks: (F, H, W) bool.
    """
    tint = np.array([40, 40, 70], np.float32)
    dim = frames.astype(np.float32) * 0.25 + tint
    return np.where(masks[..., None], frames, dim).clip(0, 255).astype(np.uint8)


def contact_sheet(rows: dict[str, np.ndarray], *, cell: int = 160, label_width: int = 96) -> np.ndarray:
    """Stack videos as labelled rows of frames: one row per video, one column per frame.

    Args:
        rows: label -> (F, H, W, 3) uint8 frames; every video has the same F.
        cell: side of each (square) cell in pixels; frames are resized to fit it.
        label_width: width of the label strip on the left; 0 for none (the labels are then unused).
    Returns:
        (len(rows) * cell, label_width + F * cell, 3) uint8 RGB image.
    """
    counts = {label: len(v) for label, v in rows.items()}
    if len(set(counts.values())) != 1:
        raise EymError(f"contact sheet rows have different frame counts {counts}")
    strips = []
    for label, frames in rows.items():
        strip = np.full((cell, label_width, 3), 255, np.uint8)
        scale = 0.4 * cell / 160
        for i, word in enumerate(label.split() if label_width else []):  # one word per line keeps labels inside the strip
            cv2.putText(strip, word, (6, int(cell * 0.4) + i * int(22 * cell / 160)), cv2.FONT_HERSHEY_SIMPLEX,
                        scale, (0, 0, 0), 1, cv2.LINE_AA)
        strips.append(np.concatenate([strip, thumbnail_strip(frames, height=cell, width=cell, gap=0)], axis=1))
    return np.concatenate(strips, axis=0)


# ---------------------------------------------------------------------------------------------
# Composition and sound (moviepy)
# ---------------------------------------------------------------------------------------------
def labelled_side_by_side(videos: dict[str, np.ndarray], fps: float) -> np.ndarray:
    """:func:`side_by_side` with each panel's label (e.g. "source", "motion", "edit") in its top-left corner.

    moviepy lays the panels out (``clips_array``) and renders the labels (``TextClip``, Pillow's
    scalable default font, white on black); the frames come back as an array so that
    :func:`write_mp4` encodes them.

    Args:
        videos: label -> ``(F, H_i, W_i, 3)`` uint8 frames, in panel order; heights are scaled to the first's.
        fps: frames per second of the videos (sets the clips' timing only).

    Returns:
        ``(F, H, sum W_i, 3)`` uint8: outside its label every panel is its video, unchanged.
    """
    from moviepy import CompositeVideoClip, ImageSequenceClip, TextClip, clips_array

    if not videos:
        raise ValueError("labelled_side_by_side needs at least one video")
    first = next(iter(videos.values()))
    num_frames, height = first.shape[0], first.shape[1]
    panels = []
    for label, video in videos.items():
        if video.shape[0] != num_frames:
            raise ValueError(f"all videos need {num_frames} frames, got {video.shape[0]} for {label!r}")
        clip = ImageSequenceClip(list(_to_height(np.asarray(video, np.uint8), height)), fps=fps)
        font_size = max(10, height // 18)
        pad = max(2, font_size // 4)  # Pillow's metrics leave no room above the caps: pad, or they are cut
        text = TextClip(text=label, font_size=font_size, color="white", bg_color="black", margin=(pad, pad, pad, 2 * pad))
        panels.append(CompositeVideoClip([clip, text.with_duration(clip.duration).with_position((0, 0))]))
    grid = clips_array([panels])
    # Sample the middle of each frame's display interval: t = i / fps can land on the previous frame.
    frames = [grid.get_frame((i + 0.5) / fps) for i in range(num_frames)]
    return np.stack(frames).astype(np.uint8)


def sampled_span(indices: list[int], fps: float) -> tuple[float, float]:
    """The stretch of the source, in seconds, that a sampled sequence plays: ``(start_s, duration_s)``.

    Args:
        indices: the source frames taken (:attr:`Video.indices`), increasing.
        fps: fps of the sampled sequence (:attr:`Video.fps`), which plays in real time.

    Returns:
        Start of the first taken frame and the sequence's duration ``len(indices) / fps``.
    """
    if not indices or not fps > 0:
        raise ValueError(f"need taken frames and a positive fps, got {len(indices)} frames at {fps}")
    step = (indices[-1] - indices[0]) / (len(indices) - 1) if len(indices) > 1 else 1.0
    source_fps = fps * max(step, 1e-6)
    return indices[0] / source_fps, len(indices) / fps


def has_audio(path: str | os.PathLike) -> bool:
    """Whether a file has an audio stream (a frame folder or an unreadable file has none)."""
    import av

    path = Path(path)
    if not path.is_file():
        return False
    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio)
    except (av.FFmpegError, OSError, UnicodeDecodeError):
        return False


def mux_audio(video: str | os.PathLike, source: str | os.PathLike, start_s: float, duration_s: float) -> bool:
    """Give ``video`` the soundtrack of ``source`` from ``start_s`` for ``duration_s`` seconds, atomically.

    moviepy cuts the span out of the source's audio and encodes it as AAC; ffmpeg then copies the
    video stream as it is next to it (no second H.264 encode, ``+faststart`` kept). A source
    without audio, or audio that cannot be read, leaves ``video`` as it was (silent).

    Args:
        video: an mp4 written by :func:`write_mp4`; replaced in place.
        source: the video the frames were sampled from.
        start_s, duration_s: the span, e.g. from :func:`sampled_span`.

    Returns:
        True when a soundtrack was added.
    """
    import subprocess
    import tempfile

    import imageio_ffmpeg
    from moviepy import AudioFileClip

    video = Path(video)
    if not has_audio(source):
        return False
    with tempfile.TemporaryDirectory(prefix="eym-audio-") as tmp_dir:
        track = Path(tmp_dir) / "track.m4a"
        try:
            with AudioFileClip(str(source)) as audio:
                end_s = min(start_s + duration_s, audio.duration)
                if end_s - start_s <= 1e-3:
                    logger.info("%s: no sound in %.2f-%.2f s; %s stays silent", source, start_s, start_s + duration_s, video.name)
                    return False
                audio.subclipped(start_s, end_s).write_audiofile(str(track), codec="aac", bitrate="192k", logger=None)
        except (OSError, ValueError, KeyError) as err:  # moviepy's reader raises these for unreadable audio
            logger.warning("%s: soundtrack not readable (%s); %s stays silent", source, err, video.name)
            return False
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-i", str(video), "-i", str(track),
                   "-map", "0:v:0", "-map", "1:a:0", "-c", "copy", "-movflags", "+faststart"]
        try:
            with atomic_output(video, suffix=".mp4") as out:
                subprocess.run([*command, str(out)], capture_output=True, text=True, check=True)
        except subprocess.CalledProcessError as err:  # the temporary file is gone; video is untouched
            logger.warning("%s: soundtrack not added (%s); %s stays silent", source, err.stderr.strip()[:200], video.name)
            return False
    return True

"""A video becomes a :class:`Clip`: frames, keypoints, skeleton images, masks, fps, content hash.

:func:`preprocess` reads and samples the video (:mod:`eym.video`), detects the person
(:mod:`eym.pose`), fills frames where nobody was found from the nearest frame (reported in
``Clip.missing``), draws the skeletons and segments the person (:mod:`eym.masks`). Results are
cached under ``eym_home()/preprocess/<key>``, the key being a hash of the input's bytes and the
settings, so a second run on the same input and settings does no detection. A clip folder (cache
entry or ``--out``) holds::

    frames/0000.png ...     the processed SxS frames
    skeletons/0000.png ...  ControlNet-openpose condition images
    masks/0000.png ...      person masks, 0/255 (absent without masks)
    keypoints.json          {"names": [...], "keypoints": (F, 18, 3) nested lists, "missing": [...]}
    clip.json               fps, source fps, indices, settings, content hash
    preview.png             a strip: frames over skeletons over masks
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from eym.cache import building, hash_path, load_entry, sha256_bytes, stable_hash
from eym.errors import EymError
from eym.validate import check_ranges
from eym.env import eym_home
from eym.masks import fill_empty_masks, get_mask_backend
from eym.probe import ProbeLimits, probe
from eym.pose import KEYPOINT_NAMES, NUM_KEYPOINTS, draw_skeletons, empty_frames, fill_missing, get_pose_backend
from eym.progress import ProgressCallback
from eym.video import RESIZE_MODES, VideoLimits, contact_sheet, list_frame_files, read_video, write_mp4

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the output of preprocessing changes, so old entries are not reused
POSE_BACKENDS = ("auto", "mediapipe", "openpose")
MASK_BACKENDS = ("mediapipe", "rembg")
PREVIEW_FRAMES = 8  # frames shown in preview.png
PREVIEW_SIDE = 128  # thumbnail side in preview.png
_MAX_INPUT_BYTES = 4 * 2**30  # local inputs (CLI, library); the app probes uploads with its own, lower limit


@dataclass(frozen=True)
class PreprocessConfig:
    """How to turn a video into a clip."""

    num_frames: int = 8  # frames to sample (MotionEditor's 8; the paper does not say)
    size: int = 512  # output side S, a multiple of 8 (SD 1.5 works at 512)
    start: int = 0  # first source frame, 0-based
    stride: int | None = None  # step between sampled frames; None: eym.video.natural_stride (plays near 12 fps)
    resize_mode: str = "crop"  # "crop" (centre crop) or "pad" (letterbox) to S x S
    pose: str = "auto"  # pose backend: "auto" | "mediapipe" | "openpose"
    mask: str = "mediapipe"  # mask backend: "mediapipe" | "rembg"

    def __post_init__(self) -> None:
        check_ranges(self)  # types, finiteness and bounds of eym.validate.RANGES
        if self.num_frames < 1:
            raise EymError(f"num_frames={self.num_frames}: ask for at least 1 frame")
        if self.size < 64 or self.size % 8:
            raise EymError(f"size={self.size}: use a multiple of 8 of at least 64 (e.g. 512)")
        if self.start < 0:
            raise EymError(f"start={self.start}: use 0 or more")
        if self.stride is not None and self.stride < 1:
            raise EymError(f"stride={self.stride}: use 1 or more, or leave it unset")
        if self.resize_mode not in RESIZE_MODES:
            raise EymError(f"resize_mode={self.resize_mode!r}: use one of {', '.join(RESIZE_MODES)}")
        if self.pose not in POSE_BACKENDS:
            raise EymError(f"pose={self.pose!r}: use one of {', '.join(POSE_BACKENDS)}")
        if self.mask not in MASK_BACKENDS:
            raise EymError(f"mask={self.mask!r}: use one of {', '.join(MASK_BACKENDS)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        """Build from a dict (e.g. clip.json); unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EymError(f"unknown preprocess setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Clip:
    """A preprocessed video (or a preset motion).

    Attributes:
        frames: ``(F, S, S, 3)`` uint8 RGB. A preset has no video; its frames are its skeleton images.
        keypoints: ``(F, 18, 3)`` float32, missing frames already filled.
        skeletons: ``(F, S, S, 3)`` uint8, ControlNet-openpose condition images.
        masks: ``(F, S, S)`` bool person masks; ``(F, 0, 0)`` when not computed (see :attr:`has_masks`).
        fps: frames per second of the sampled sequence.
        content_hash: sha256 of frames, keypoints, masks and fps (what the editor keys its caches on).
        missing: frames where no person was found (filled from the nearest frame).
        path: the clip folder it was loaded from or written to, if any.
        config: the settings that made it.
    """

    frames: np.ndarray
    keypoints: np.ndarray
    skeletons: np.ndarray
    masks: np.ndarray
    fps: float
    content_hash: str
    missing: list[int]
    path: Path | None
    config: PreprocessConfig
    source: str = ""  # the input video or folder ("" for presets)
    indices: list[int] = field(default_factory=list)  # source frames taken
    fitted_to: str = ""  # content hash of the source person this motion is already fitted to (presets); "" = not fitted

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def has_masks(self) -> bool:
        return self.masks.ndim == 3 and self.masks.shape[1] > 0


def content_hash(frames: np.ndarray, keypoints: np.ndarray, masks: np.ndarray, fps: float) -> str:
    """sha256 over the arrays (shape, dtype, bytes) and fps: equal content, equal hash."""
    parts = []
    for array in (frames, keypoints, masks):
        array = np.ascontiguousarray(array)
        parts.append(f"{array.shape}{array.dtype}".encode() + sha256_bytes(array.tobytes()).encode())
    parts.append(f"{float(fps):.6f}".encode())
    return sha256_bytes(b"|".join(parts))


# ---------------------------------------------------------------------------------------------
# Clip folders
# ---------------------------------------------------------------------------------------------
def _write_images(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(folder / f"{i:04d}.png"), image)


def _read_images(folder: Path, color: bool) -> np.ndarray:
    images = []
    for path in list_frame_files(folder):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise EymError(f"{path}: cannot read this image; preprocess the video again")
        images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if color else image)
    return np.stack(images)


def save_keypoints(path: str | os.PathLike, keypoints: np.ndarray, missing: list[int] | None = None) -> None:
    """Write ``(F, 18, 3)`` keypoints as JSON (with the point names and the filled frames)."""
    from eym.cache import atomic_write_json

    data = {"names": list(KEYPOINT_NAMES), "keypoints": np.asarray(keypoints, np.float32).tolist(), "missing": list(missing or [])}
    atomic_write_json(path, data)


def load_keypoints(path: str | os.PathLike) -> tuple[np.ndarray, list[int]]:
    """Read keypoints JSON written by :func:`save_keypoints`: ``((F, 18, 3) float32, missing)``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        keypoints = np.asarray(data["keypoints"], np.float32)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EymError(f"{path}: not a keypoints file ({type(err).__name__}); write it with eym preprocess") from None
    if keypoints.ndim != 3 or keypoints.shape[1:] != (NUM_KEYPOINTS, 3):
        raise EymError(f"{path}: keypoints have shape {keypoints.shape}, expected (frames, 18, 3)")
    return keypoints, [int(i) for i in data.get("missing", [])]


def preview_strip(clip: Clip, count: int = PREVIEW_FRAMES, side: int = PREVIEW_SIDE) -> np.ndarray:
    """Up to ``count`` thumbnails side by side: frames over skeletons over masks. ``(rows*side, n*side, 3)``."""
    picks = np.unique(np.round(np.linspace(0, clip.num_frames - 1, min(count, clip.num_frames))).astype(int))
    rows = {"frames": clip.frames[picks], "skeletons": clip.skeletons[picks]}
    if clip.has_masks:
        rows["masks"] = np.repeat(clip.masks[picks, :, :, None].astype(np.uint8) * 255, 3, axis=-1)
    return contact_sheet(rows, cell=side, label_width=0)


def write_clip(clip: Clip, folder: str | os.PathLike) -> Path:
    """Write a clip folder (layout in the module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_images(folder / "frames", clip.frames)
    _write_images(folder / "skeletons", clip.skeletons)
    if clip.has_masks:
        _write_images(folder / "masks", clip.masks.astype(np.uint8) * 255)
    save_keypoints(folder / "keypoints.json", clip.keypoints, clip.missing)
    meta = {
        "fps": clip.fps,
        "content_hash": clip.content_hash,
        "config": clip.config.to_dict(),
        "source": clip.source,
        "indices": clip.indices,
        "missing": clip.missing,
        "num_frames": clip.num_frames,
    }
    (folder / "clip.json").write_text(json.dumps(meta, indent=2) + "\n")
    cv2.imwrite(str(folder / "preview.png"), cv2.cvtColor(preview_strip(clip), cv2.COLOR_RGB2BGR))
    return folder


def load_clip(folder: str | os.PathLike) -> Clip:
    """Load a clip folder written by :func:`preprocess` (a cache entry or an ``--out`` folder).

    Raises:
        EymError: if the folder is not a clip folder.
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / "clip.json").read_text())
    except (OSError, ValueError) as err:
        raise EymError(f"{folder}: not a clip folder (clip.json: {type(err).__name__}); run eym preprocess on the video") from None
    keypoints, missing = load_keypoints(folder / "keypoints.json")
    frames = _read_images(folder / "frames", color=True)
    skeletons = _read_images(folder / "skeletons", color=True)
    if (folder / "masks").is_dir():
        masks = _read_images(folder / "masks", color=False) > 127
    else:
        masks = np.zeros((len(frames), 0, 0), bool)
    if not len(frames) == len(skeletons) == len(keypoints):
        raise EymError(f"{folder}: frames, skeletons and keypoints disagree in count; preprocess the video again")
    return Clip(
        frames=frames,
        keypoints=keypoints,
        skeletons=skeletons,
        masks=masks,
        fps=float(meta["fps"]),
        content_hash=content_hash(frames, keypoints, masks, float(meta["fps"])),
        missing=missing,
        path=folder,
        config=PreprocessConfig.from_dict(meta["config"]),
        source=meta.get("source", ""),
        indices=[int(i) for i in meta.get("indices", [])],
    )


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------
def cache_key(video: str | os.PathLike, config: PreprocessConfig, pose_backend: str, with_masks: bool) -> str:
    """Hash of the input's bytes, the settings (with ``auto`` resolved) and :data:`CACHE_VERSION`."""
    settings = config.to_dict() | {"pose": pose_backend}
    if not with_masks:
        settings["mask"] = None
    return stable_hash({"version": CACHE_VERSION, "input": hash_path(video), "settings": settings})


def preprocess(
    video: str | Path,
    config: PreprocessConfig = PreprocessConfig(),
    *,
    cache_dir: Path | None = None,
    out_dir: Path | None = None,
    with_masks: bool = True,
    callback: ProgressCallback | None = None,
    limits: VideoLimits = VideoLimits(),
    probe_limits: ProbeLimits | None = None,
    progress: bool = False,
) -> Clip:
    """Turn a video or frame folder into a :class:`Clip`, reusing the cache when possible.

    Args:
        video: a video file ffmpeg reads, or a folder of numbered frames.
        config: sampling, size and backends.
        cache_dir: cache root (default ``eym_home()/"preprocess"``).
        out_dir: also copy the clip folder here, with ``frames.mp4`` and ``skeletons.mp4``.
        with_masks: compute person masks (a reference clip does not need them).
        callback: ``callback("preprocess", step, total)`` after each stage.
        limits: resolution and duration caps for the input.
        probe_limits: what the input may be (:class:`~eym.probe.ProbeLimits`); default: the
            limits of a local input, from ``limits``. The app passes its upload limits, so an
            upload it already checked is not probed a second time.
        progress: show tqdm bars while detecting.

    Returns:
        The :class:`Clip`; ``clip.path`` is its cache entry.

    Raises:
        EymError: bad input (missing, empty, unreadable, too short, too large), no person in
            any frame, or a backend whose weights are missing.
    """
    video = Path(video)
    cache_root = Path(cache_dir) if cache_dir else eym_home() / "preprocess"
    total_steps = 5
    step = 0

    def report() -> None:
        nonlocal step
        step += 1
        if callback is not None:
            callback("preprocess", step, total_steps)

    # 1. Check the input, then look in the cache (a clip with masks also serves a request
    #    without). The probe runs in a separate, time- and memory-limited process, so a hostile
    #    or broken file fails there with a clear message instead of crashing or hanging this
    #    one; it runs before the cache lookup, so a cached clip never vouches for an input
    #    (an outside symlink, a damaged copy) that would not pass on its own.
    if not video.exists():
        raise EymError(f"{video}: no such file or folder; check the path")
    probe(video, limits=probe_limits or ProbeLimits(
        max_bytes=_MAX_INPUT_BYTES, max_seconds=limits.max_duration_s, max_side=limits.max_side,
        max_frames=limits.max_source_frames,
    ))
    pose_backend = get_pose_backend(config.pose, progress=progress)
    keys = [cache_key(video, config, pose_backend.name, True)]
    if not with_masks:
        keys.insert(0, cache_key(video, config, pose_backend.name, False))
    for key in keys:
        if load_entry(cache_root / key) is not None:
            logger.info("%s: reusing preprocessed clip %s", video, cache_root / key)
            clip = load_clip(cache_root / key)
            step = total_steps - 1
            report()
            return _export(clip, out_dir)
    key = keys[0]
    mask_backend = get_mask_backend(config.mask, progress=progress) if with_masks else None

    # 2. Read and sample.
    clip_video = read_video(
        video,
        num_frames=config.num_frames,
        size=config.size,
        start=config.start,
        stride=config.stride,
        resize_mode=config.resize_mode,
        limits=limits,
    )
    frames = clip_video.frames
    report()

    # 3. Pose, with frames where nobody was found filled from the nearest frame.
    raw = pose_backend.detect(frames)
    if len(empty_frames(raw)) == len(raw):
        raise EymError(f"{video}: no person found in any of the {len(raw)} sampled frames; use a video with one clearly visible person")
    keypoints, missing = fill_missing(raw)
    if missing:
        logger.warning("%s: no person found in frame(s) %s; filled from the nearest frame", video, missing)
    report()
    skeletons = draw_skeletons(keypoints, config.size, config.size)
    report()

    # 4. Person masks.
    if mask_backend is not None:
        masks, empty = fill_empty_masks(mask_backend.segment(frames))
        if empty:
            logger.warning("%s: empty person mask in frame(s) %s; filled from the nearest frame", video, empty)
    else:
        masks = np.zeros((len(frames), 0, 0), bool)
    report()

    # 5. Write the cache entry atomically (a crash leaves no half entry) and load it back.
    clip = Clip(
        frames=frames,
        keypoints=keypoints,
        skeletons=skeletons,
        masks=masks,
        fps=clip_video.fps,
        content_hash=content_hash(frames, keypoints, masks, clip_video.fps),
        missing=missing,
        path=None,
        config=config,
        source=str(video),
        indices=clip_video.indices,
    )
    with building(cache_root / key, meta={"kind": "preprocess", "source": str(video)}) as tmp:
        write_clip(clip, tmp)
    clip.path = cache_root / key
    report()
    return _export(clip, out_dir)


def _export(clip: Clip, out_dir: Path | None) -> Clip:
    """Copy the clip folder to ``out_dir`` and add browser-playable mp4s of frames and skeletons."""
    if out_dir is None:
        return clip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("frames", "skeletons", "masks"):
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)  # no stale frames from an earlier, longer clip
    write_clip(clip, out_dir)
    write_mp4(clip.frames, out_dir / "frames.mp4", clip.fps)
    write_mp4(clip.skeletons, out_dir / "skeletons.mp4", clip.fps)
    return clip


def clip_span(clip: Clip) -> str:
    """The stretch of its video a clip covers, e.g. ``"frames 0-14 of 237 (stride 2), 0.53 s, plays at 15 fps"``."""
    from eym.video import count_frames, describe_span

    indices = clip.indices or list(range(clip.num_frames))
    step = (indices[-1] - indices[0]) / (len(indices) - 1) if len(indices) > 1 else 1.0
    total = indices[-1] + 1
    if clip.source and Path(clip.source).exists():
        try:
            total = count_frames(clip.source)[0]
        except EymError:
            pass  # the span is informative only; the clip itself is already made
    return describe_span(indices, total, clip.fps * step)


def clip_from_keypoints(
    keypoints: np.ndarray, size: int, fps: float, *, config: PreprocessConfig | None = None, fitted_to: str = ""
) -> Clip:
    """A clip made of skeletons only (preset motions): frames are the skeleton images, no masks.

    Args:
        keypoints: ``(F, 18, 3)``.
        size: image side ``S`` (a multiple of 8).
        fps: playback fps.
        fitted_to: the content hash of the source the keypoints were fitted to, if they were
            (then an edit of that source uses them as they are, without retargeting again).
    """
    keypoints = np.asarray(keypoints, np.float32)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"keypoints must be (F, 18, 3), got {keypoints.shape}")
    config = config or PreprocessConfig(num_frames=len(keypoints), size=size)
    skeletons = draw_skeletons(keypoints, size, size)
    masks = np.zeros((len(keypoints), 0, 0), bool)
    return Clip(
        frames=skeletons,
        keypoints=keypoints,
        skeletons=skeletons,
        masks=masks,
        fps=float(fps),
        content_hash=content_hash(skeletons, keypoints, masks, fps),
        missing=[],
        path=None,
        config=config,
        fitted_to=fitted_to,
    )

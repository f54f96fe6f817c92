"""Synthetic footage for tests that must run without ../shared/media.

A stick person (thick limbs, a head, a shirt colour) moves over a textured background. Its
OpenPose-18 keypoints are known exactly, so a synthetic clip is what :func:`eym.preprocess.preprocess`
would return for it: frames, keypoints, the skeleton images drawn by :func:`eym.pose.draw_skeletons`,
and the person masks (the pixels the person was drawn on). The video writer gives the same frames
as a real mp4, optionally with a soundtrack of known tones.
"""

from __future__ import annotations

import math
import subprocess
import wave
from pathlib import Path

import cv2
import numpy as np

from eym.pose import LIMBS, NUM_KEYPOINTS, draw_skeletons
from eym.preprocess import Clip, PreprocessConfig, content_hash

# A person standing upright, (x, y) as fractions of the frame, OpenPose-18 order.
_STANDING = np.array([
    (0.50, 0.16),  # nose
    (0.50, 0.27),  # neck
    (0.42, 0.28), (0.38, 0.40), (0.36, 0.52),  # right shoulder, elbow, wrist
    (0.58, 0.28), (0.62, 0.40), (0.64, 0.52),  # left shoulder, elbow, wrist
    (0.45, 0.52), (0.45, 0.68), (0.45, 0.84),  # right hip, knee, ankle
    (0.55, 0.52), (0.55, 0.68), (0.55, 0.84),  # left hip, knee, ankle
    (0.48, 0.14), (0.52, 0.14), (0.46, 0.15), (0.54, 0.15),  # eyes, ears
], np.float32)  # fmt: skip
MOTIONS = ("wave", "squat", "sway")


def stick_keypoints(num_frames: int, motion: str = "wave", *, phase: float = 0.0) -> np.ndarray:
    """(F, 18, 3) keypoints of the stick person doing ``motion`` over one period, all visible.

    ``wave`` swings both forearms up and down, ``squat`` bends the knees, ``sway`` moves the whole
    body sideways.
    """
    if motion not in MOTIONS:
        raise ValueError(f"motion {motion!r}: use one of {MOTIONS}")
    out = np.ones((num_frames, NUM_KEYPOINTS, 3), np.float32)
    for f in range(num_frames):
        angle = 2 * math.pi * (f / max(num_frames, 1) + phase)
        points = _STANDING.copy()
        if motion == "wave":
            lift = 0.5 + 0.5 * math.sin(angle)  # 0: arms down, 1: arms up
            for shoulder, elbow, wrist, side in ((2, 3, 4, -1), (5, 6, 7, 1)):
                points[elbow] = points[shoulder] + (side * 0.06, 0.12 - 0.22 * lift)
                points[wrist] = points[elbow] + (side * 0.04, 0.12 - 0.26 * lift)
        elif motion == "squat":
            depth = 0.08 * (0.5 - 0.5 * math.cos(angle))
            points[:14] += (0.0, depth)  # everything above the ankles drops (eyes and ears below)
            points[14:] += (0.0, depth)
            points[[9, 12]] += ((-0.05 * depth / 0.08, -depth / 2), (0.05 * depth / 0.08, -depth / 2))
            points[[10, 13]] -= (0.0, depth)  # the feet stay on the ground
        else:
            points[:, 0] += 0.12 * math.sin(angle)
        out[f, :, :2] = points
    return out


def render_person(keypoints: np.ndarray, size: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw the stick person of ``keypoints`` on a textured background.

    Returns:
        ``(frames (F, S, S, 3) uint8, masks (F, S, S) bool)``: the masks are the person's pixels.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    background = np.stack([90 + 80 * xx, 140 + 60 * yy, 200 - 70 * xx * yy], -1)
    background += rng.normal(0, 6, background.shape)  # texture, fixed per seed
    background = np.clip(background, 0, 255).astype(np.uint8)
    thickness = max(2, size // 16)
    frames, masks = [], []
    for points in keypoints:
        mask = np.zeros((size, size), np.uint8)
        pixels = np.round(points[:, :2] * (size - 1)).astype(int)
        for a, b in LIMBS[:12]:  # arms, body and legs; the face limbs are too small to draw
            cv2.line(mask, tuple(map(int, pixels[a])), tuple(map(int, pixels[b])), 1, thickness, cv2.LINE_8)
        cv2.circle(mask, tuple(map(int, pixels[0])), max(3, size // 12), 1, -1)  # head
        frame = background.copy()
        frame[mask > 0] = (200, 40, 60)  # a red shirt all over
        frames.append(frame)
        masks.append(mask > 0)
    return np.stack(frames), np.stack(masks)


def synthetic_clip(
    num_frames: int = 4, size: int = 64, fps: float = 8.0, motion: str = "wave", *, seed: int = 0,
    source: str | Path = "",
) -> Clip:
    """The :class:`eym.preprocess.Clip` preprocessing would give for a stick-person video.

    Args:
        num_frames, size, fps: the clip's frame count, side (a multiple of 8, at least 64) and fps.
        motion: one of :data:`MOTIONS`.
        seed: background texture.
        source: the video file the clip stands for (:func:`write_video` of the same arguments),
            so that an edit can read its soundtrack; ``""`` for none.
    """
    keypoints = stick_keypoints(num_frames, motion)
    frames, masks = render_person(keypoints, size, seed=seed)
    skeletons = draw_skeletons(keypoints, size, size)
    return Clip(
        frames=frames,
        keypoints=keypoints,
        skeletons=skeletons,
        masks=masks,
        fps=float(fps),
        content_hash=content_hash(frames, keypoints, masks, fps),
        missing=[],
        path=None,
        config=PreprocessConfig(num_frames=num_frames, size=size),
        source=str(source),
        indices=list(range(num_frames)),
    )


def write_tones(path: Path, tones: list[tuple[float, float]], rate: int = 16_000) -> Path:
    """A mono 16-bit WAV of sine tones played one after another: ``[(frequency_hz, seconds), ...]``."""
    parts = [0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate) for hz, seconds in tones]
    samples = (np.concatenate(parts) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return path


def write_video(path: Path, frames: np.ndarray, fps: float, *, tones: list[tuple[float, float]] | None = None) -> Path:
    """Frames as an H.264 mp4 (:func:`eym.video.write_mp4`), with an AAC soundtrack of ``tones`` if given."""
    import imageio_ffmpeg

    from eym.video import write_mp4

    path = Path(path)
    if not tones:
        return write_mp4(frames, path, fps)
    silent = write_mp4(frames, path.with_suffix(".silent.mp4"), fps)
    wav = write_tones(path.with_suffix(".wav"), tones)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-i", str(silent), "-i", str(wav),
                    "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", str(path)], check=True)
    silent.unlink()
    wav.unlink()
    return path


def dominant_frequency(path: Path) -> tuple[float, float]:
    """(frequency in Hz with the most energy, duration in s) of a file's first audio stream."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        samples = np.concatenate([frame.to_ndarray().mean(axis=0) for frame in container.decode(stream)])
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)]), len(samples) / rate

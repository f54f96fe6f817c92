"""Body pose: detection backends, OpenPose-18 keypoints, drawing, retargeting, gap filling.

Keypoints are ``(F, 18, 3)`` float32: x, y in [0, 1] of the square frame and a confidence in
[0, 1], 0 meaning "not detected", in the OpenPose COCO-18 order of :data:`KEYPOINT_NAMES`.

Backends (:func:`get_pose_backend`):

- ``mediapipe``: BlazePose "full" (``model_complexity=1``, the model that ships inside the
  mediapipe 0.10.21 wheel; "heavy" would need a download) in video mode, mapped from its 33
  landmarks to the 18 OpenPose points, with the neck as the midpoint of the shoulders.
- ``openpose``: controlnet_aux's OpenPose body network, when its weights are on disk.
- ``auto``: openpose when its weights are present, else mediapipe.

Skeletons are drawn with controlnet_aux's own ``draw_bodypose``, so ControlNet-openpose sees
the colours, limb widths and joint dots it was trained on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
from tqdm.auto import tqdm

from eym.errors import EymError

logger = logging.getLogger(__name__)

KEYPOINT_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)  # fmt: skip
NUM_KEYPOINTS = 18

# The limbs controlnet_aux draws, 0-based, in its drawing (and colour) order.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
# controlnet_aux's colours (RGB); limb i is drawn in 0.6 * LIMB_COLORS[i], joint k in LIMB_COLORS[k].
LIMB_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip

# The same limbs as a tree rooted at the neck, parents before children (for retargeting).
BONES = tuple(LIMBS)
ROOT = 1  # neck
R_HIP, L_HIP = 8, 11

# BlazePose landmark index for each OpenPose point (the neck is computed, hence None).
_BLAZEPOSE_TO_OPENPOSE = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
_BLAZE_L_SHOULDER, _BLAZE_R_SHOULDER = 11, 12

MIN_CONFIDENCE = 0.3  # BlazePose visibility below this counts as "not detected", like OpenPose's threshold
DETECT_SIDE = 512  # frames are enlarged to this before detection: small (256 px) people get missed otherwise
DETECT_MARGIN = 0.2  # black border added around each frame: BlazePose misses people whose head touches the edge

OPENPOSE_REPO = "lllyasviel/Annotators"
OPENPOSE_FILE = "body_pose_model.pth"


@runtime_checkable
class PoseBackend(Protocol):
    """Detects one person's OpenPose-18 keypoints in each frame."""

    name: str

    def detect(self, frames: np.ndarray) -> np.ndarray:
        """Args: frames ``(F, H, W, 3)`` uint8 RGB. Returns ``(F, 18, 3)`` float32 keypoints."""
        ...


# ---------------------------------------------------------------------------------------------
# mediapipe (BlazePose)
# ---------------------------------------------------------------------------------------------
def blazepose_pass(frames: np.ndarray, *, segmentation: bool, progress: bool = False) -> tuple[list, list]:
    """Run BlazePose full over a clip in video mode (tracking from frame to frame).

    Each frame is enlarged to :data:`DETECT_SIDE` and framed with a black margin of
    :data:`DETECT_MARGIN`; results are mapped back to the input frame.

    Args:
        frames: ``(F, H, W, 3)`` uint8 RGB.
        segmentation: also return the person segmentation.
        progress: show a tqdm bar.

    Returns:
        ``(landmarks, masks)``: per frame, a ``(33, 3)`` array of x, y (normalised to the input
        frame) and visibility, or ``None`` where nobody was found; and per frame a float
        ``(H, W)`` person probability (zeros where nobody was found), or ``[]`` without
        ``segmentation``.
    """
    import mediapipe as mp

    num_frames, height, width, _ = frames.shape
    scale = DETECT_SIDE / max(height, width)
    scaled_w, scaled_h = round(width * scale), round(height * scale)
    margin = round(DETECT_MARGIN * DETECT_SIDE)
    padded_w, padded_h = scaled_w + 2 * margin, scaled_h + 2 * margin
    landmarks: list = []
    masks: list = []
    # A fresh tracker per clip: video mode carries the person from one frame to the next.
    with mp.solutions.pose.Pose(
        static_image_mode=False, model_complexity=1, enable_segmentation=segmentation, smooth_segmentation=True
    ) as pose:
        for frame in tqdm(frames, desc="pose (mediapipe)", disable=not progress, leave=False):
            interp = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
            image = cv2.resize(frame, (scaled_w, scaled_h), interpolation=interp)
            image = cv2.copyMakeBorder(image, margin, margin, margin, margin, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            result = pose.process(image)
            if result.pose_landmarks is None:
                landmarks.append(None)
            else:
                points = np.array([(lm.x, lm.y, lm.visibility) for lm in result.pose_landmarks.landmark], np.float32)
                points[:, 0] = (points[:, 0] * padded_w - margin) / scaled_w
                points[:, 1] = (points[:, 1] * padded_h - margin) / scaled_h
                landmarks.append(points)
            if segmentation:
                if result.segmentation_mask is None:
                    masks.append(np.zeros((height, width), np.float32))
                else:
                    inner = result.segmentation_mask[margin : margin + scaled_h, margin : margin + scaled_w]
                    masks.append(cv2.resize(inner, (width, height), interpolation=cv2.INTER_LINEAR))
    return landmarks, masks


def blazepose_to_openpose(points: np.ndarray | None) -> np.ndarray:
    """Map BlazePose's 33 landmarks ``(33, 3)`` to OpenPose-18 ``(18, 3)``; ``None`` -> all zeros."""
    out = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    if points is None:
        return out
    for k, b in enumerate(_BLAZEPOSE_TO_OPENPOSE):
        if b is not None:
            out[k] = points[b]
    l_sh, r_sh = points[_BLAZE_L_SHOULDER], points[_BLAZE_R_SHOULDER]
    out[ROOT, :2] = (l_sh[:2] + r_sh[:2]) / 2
    out[ROOT, 2] = min(l_sh[2], r_sh[2])
    # OpenPose reports nothing for a point it cannot see or that is outside the frame.
    inside = (out[:, 0] >= 0) & (out[:, 0] <= 1) & (out[:, 1] >= 0) & (out[:, 1] <= 1)
    out[:, 2] = np.where(inside & (out[:, 2] >= MIN_CONFIDENCE), np.clip(out[:, 2], 0, 1), 0)
    out[out[:, 2] == 0] = 0
    return out


class MediaPipePose:
    """BlazePose full (ships with mediapipe; no download), mapped to OpenPose-18."""

    name = "mediapipe"

    def __init__(self, *, progress: bool = False) -> None:
        self.progress = progress

    def detect(self, frames: np.ndarray) -> np.ndarray:
        """Args: frames ``(F, H, W, 3)`` uint8 RGB. Returns ``(F, 18, 3)`` float32 keypoints."""
        landmarks, _ = blazepose_pass(frames, segmentation=False, progress=self.progress)
        return np.stack([blazepose_to_openpose(p) for p in landmarks]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# openpose (controlnet_aux)
# ---------------------------------------------------------------------------------------------
def find_openpose_weights() -> Path | None:
    """The OpenPose body weights on disk, or ``None``.

    Looked for in ``$EYM_OPENPOSE_DIR``, ``eym_home()/annotators`` and the Hugging Face cache of
    ``lllyasviel/Annotators`` (never downloaded from here).
    """
    from eym.env import eym_home

    folders = [os.environ.get("EYM_OPENPOSE_DIR"), eym_home() / "annotators"]
    for folder in folders:
        if folder and (Path(folder) / OPENPOSE_FILE).is_file():
            return Path(folder) / OPENPOSE_FILE
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(OPENPOSE_REPO, OPENPOSE_FILE)
    except (ImportError, ValueError, OSError):
        cached = None
    return Path(cached) if isinstance(cached, str) and Path(cached).is_file() else None


class OpenPosePose:
    """controlnet_aux's OpenPose body network (the annotator ControlNet-openpose was trained with)."""

    name = "openpose"

    def __init__(self, weights: str | os.PathLike | None = None, *, progress: bool = False) -> None:
        weights = Path(weights) if weights else find_openpose_weights()
        if weights is None or not weights.is_file():
            raise EymError(
                f"OpenPose weights ({OPENPOSE_FILE}) not found; download it from "
                f"https://huggingface.co/{OPENPOSE_REPO} into $EYM_OPENPOSE_DIR, or use --pose mediapipe"
            )
        from controlnet_aux.open_pose import OpenposeDetector
        from controlnet_aux.open_pose.body import Body

        # Body only: the hand and face networks are not needed for body skeletons.
        self.detector = OpenposeDetector(Body(str(weights)))
        self.progress = progress

    def detect(self, frames: np.ndarray) -> np.ndarray:
        """Args: frames ``(F, H, W, 3)`` uint8 RGB. Returns ``(F, 18, 3)`` float32 keypoints."""
        out = np.zeros((len(frames), NUM_KEYPOINTS, 3), np.float32)
        for f, frame in enumerate(tqdm(frames, desc="pose (openpose)", disable=not self.progress, leave=False)):
            height, width = frame.shape[:2]
            scale = DETECT_SIDE / max(height, width)
            if scale > 1:  # the network was trained on ~368-px people; enlarge small clips
                frame = cv2.resize(frame, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_CUBIC)
            poses = self.detector.detect_poses(frame)
            if not poses:
                continue
            body = max(poses, key=lambda p: p.body.total_score).body  # one person: the most confident
            for k, point in enumerate(body.keypoints[:NUM_KEYPOINTS]):
                if point is not None:
                    out[f, k] = (point.x, point.y, max(float(np.clip(point.score, 0, 1)), 1e-3))  # detected: never 0
        return out


def get_pose_backend(name: str = "auto", *, progress: bool = False) -> PoseBackend:
    """A pose backend by name.

    Args:
        name: ``"auto"`` (openpose if its weights are present, else mediapipe), ``"mediapipe"``
            or ``"openpose"``.
        progress: show tqdm bars while detecting.

    Raises:
        EymError: for an unknown name, or ``openpose`` without its weights.
    """
    if name == "auto":
        name = "openpose" if find_openpose_weights() is not None else "mediapipe"
        logger.info("pose backend: %s", name)
    if name == "mediapipe":
        return MediaPipePose(progress=progress)
    if name == "openpose":
        return OpenPosePose(progress=progress)
    raise EymError(f"pose backend {name!r} is unknown; use auto, mediapipe or openpose")


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
def draw_skeletons(keypoints: np.ndarray, height: int, width: int) -> np.ndarray:
    """Render keypoints as ControlNet-openpose condition images (black background).

    Args:
        keypoints: ``(F, 18, 3)``; points with confidence 0 are left out, as are limbs touching them.
        height, width: image size in pixels.

    Returns:
        ``(F, height, width, 3)`` uint8 RGB, drawn by ``controlnet_aux.open_pose.util.draw_bodypose``.
    """
    from controlnet_aux.open_pose.body import Keypoint
    from controlnet_aux.open_pose.util import draw_bodypose

    keypoints = np.asarray(keypoints, np.float32)
    out = np.zeros((len(keypoints), height, width, 3), np.uint8)
    for f, frame in enumerate(keypoints):
        points = [Keypoint(float(x), float(y)) if c > 0 else None for x, y, c in frame]
        out[f] = draw_bodypose(out[f], points)
    return out


# ---------------------------------------------------------------------------------------------
# Missing frames
# ---------------------------------------------------------------------------------------------
def empty_frames(keypoints: np.ndarray) -> list[int]:
    """Frames in which no keypoint was detected."""
    return [int(f) for f in np.flatnonzero(~(np.asarray(keypoints)[:, :, 2] > 0).any(axis=1))]


def fill_missing(keypoints: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Fill frames without a person from the nearest frame with one (the earlier one on a tie).

    Args:
        keypoints: ``(F, 18, 3)``.

    Returns:
        ``(filled keypoints (F, 18, 3), indices of the frames that were empty)``.

    Raises:
        EymError: if no frame has a person.
    """
    keypoints = np.array(keypoints, np.float32, copy=True)
    missing = empty_frames(keypoints)
    if len(missing) == len(keypoints):
        raise EymError(f"no person found in any of the {len(keypoints)} frames; use a video with one clearly visible person")
    present = np.array(sorted(set(range(len(keypoints))) - set(missing)))
    for f in missing:
        nearest = present[np.argmin(np.abs(present - f))]  # argmin takes the first, i.e. earlier, on a tie
        keypoints[f] = keypoints[nearest]
    return keypoints, missing


# ---------------------------------------------------------------------------------------------
# Retargeting (not in the paper; see docs/PREPROCESSING.md)
# ---------------------------------------------------------------------------------------------
def bone_lengths(keypoints: np.ndarray) -> np.ndarray:
    """Median length of each bone of :data:`BONES` over the frames where both ends are detected.

    Args:
        keypoints: ``(F, 18, 3)``.

    Returns:
        ``(len(BONES),)`` float64, NaN for a bone never seen.
    """
    keypoints = np.asarray(keypoints, np.float64)
    lengths = np.full(len(BONES), np.nan)
    for b, (parent, child) in enumerate(BONES):
        seen = (keypoints[:, parent, 2] > 0) & (keypoints[:, child, 2] > 0)
        if seen.any():
            lengths[b] = np.median(np.linalg.norm(keypoints[seen, child, :2] - keypoints[seen, parent, :2], axis=-1))
    return lengths


def hip_centers(keypoints: np.ndarray) -> np.ndarray:
    """``(F, 2)`` midpoint of the hips per frame; NaN where a hip is missing."""
    keypoints = np.asarray(keypoints, np.float64)
    both = (keypoints[:, R_HIP, 2] > 0) & (keypoints[:, L_HIP, 2] > 0)
    center = (keypoints[:, R_HIP, :2] + keypoints[:, L_HIP, :2]) / 2
    center[~both] = np.nan
    return center


def _anchor(keypoints: np.ndarray) -> np.ndarray:
    """Where a person is: mean hip centre, falling back to the mean of all detected points."""
    centers = hip_centers(keypoints)
    if np.isfinite(centers[:, 0]).any():
        return np.nanmean(centers, axis=0)
    detected = keypoints[keypoints[:, :, 2] > 0][:, :2]
    return detected.mean(axis=0) if len(detected) else np.array([0.5, 0.5])


def retarget(reference: np.ndarray, source: np.ndarray, *, reference_bones: np.ndarray | None = None) -> np.ndarray:
    """Give the reference motion the source person's body: bone lengths and hip position.

    Notation: ``ratio[b] = L_src[b] / L_ref[b]`` with ``L`` the median length of bone ``b`` over
    each clip, ``s`` the median of ``ratio`` (the overall size ratio), ``a_src``/``a_ref`` the
    mean hip centres.

    1. Walk the tree from the neck; each detected bone keeps the reference direction and its
       per-frame length times ``ratio[b]`` (so foreshortening in the reference is kept).
    2. The reference's hip path is scaled by ``s`` and moved to the source:
       ``hip'(t) = a_src + s * (hip_ref(t) - a_ref)``; each frame is shifted to put its hips there.
    Points whose parent is missing follow that similarity transform directly.
    ``retarget(x, x) == x``.

    Args:
        reference: ``(F, 18, 3)`` keypoints of the motion to copy.
        source: ``(F_s, 18, 3)`` keypoints of the person who should perform it (any frame count).
        reference_bones: the reference body's true bone lengths ``(len(BONES),)`` when known
            (a preset's rest pose); default: measured from ``reference``.

    Returns:
        ``(F, 18, 3)`` float32, with the reference's confidences.
    """
    reference = np.asarray(reference, np.float64)
    source = np.asarray(source, np.float64)
    ref_len = bone_lengths(reference) if reference_bones is None else np.asarray(reference_bones, np.float64)
    src_len = bone_lengths(source)
    valid = np.isfinite(ref_len) & np.isfinite(src_len) & (ref_len > 1e-6)
    ratio = np.ones(len(BONES))
    ratio[valid] = src_len[valid] / ref_len[valid]
    scale = float(np.median(ratio[valid])) if valid.any() else 1.0
    ratio[~valid] = scale
    a_ref, a_src = _anchor(reference), _anchor(source)

    xy, conf = reference[:, :, :2], reference[:, :, 2]
    base = a_src + scale * (xy - a_ref)  # (F, 18, 2) similarity transform of the whole reference
    out = base.copy()
    for b, (parent, child) in enumerate(BONES):
        linked = (conf[:, parent] > 0) & (conf[:, child] > 0)
        out[linked, child] = out[linked, parent] + ratio[b] * (xy[linked, child] - xy[linked, parent])

    # Put each frame's hips where the scaled reference hip path says.
    built, target = hip_centers(np.concatenate([out, conf[..., None]], -1)), a_src + scale * (hip_centers(reference) - a_ref)
    shift = np.where(np.isfinite(built) & np.isfinite(target), target - built, 0.0)
    out += shift[:, None, :]
    result = np.concatenate([out, conf[..., None]], axis=-1).astype(np.float32)
    result[conf == 0] = 0
    return result

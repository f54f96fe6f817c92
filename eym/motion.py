"""What motion drives an edit: one resolver for the app, the CLI, the suite, the metrics and the Editor.

The caller says which kind of motion it has (a reference video or a preset name); nothing is
guessed from a string. Retargeting happens here only, once per edit, and the :class:`Motion`
travels with the edit (``EditResult.motion``), so no caller draws the skeletons a second time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eym.errors import EymError
from eym.progress import ProgressCallback

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Motion:
    """The motion of one edit, resolved for one source clip."""

    keypoints: np.ndarray | None  # (F, 18, 3) the driving keypoints (retargeted if asked), None if the reference has none
    skeletons: np.ndarray  # (F, H, W, 3) uint8, the skeletons S_rf that drive the editing branch
    label: str  # what the user chose: the reference's path, "preset:<name>", or "clip"
    reference: Any  # the reference Clip (preprocessed video or preset fitted to the source)


def resolve_motion(
    source: Any,
    *,
    reference: Any = None,
    preset: str | None = None,
    config: Any,
    retarget: bool,
    limits: Any = None,
    callback: ProgressCallback | None = None,
) -> Motion:
    """The motion that drives the edit of ``source``: from a reference video or a preset, never both.

    Args:
        source: the source :class:`~eym.preprocess.Clip` (frames, keypoints, fps, content_hash).
        reference: a reference video / frame folder, or an already preprocessed reference Clip.
        preset: a preset motion name (:data:`eym.presets.PRESETS`), fitted to the source person once.
        config: the ``PreprocessConfig`` the source used (same frame count and size).
        retarget: fit a reference video's motion to the source person's body.
        limits: ``ProbeLimits`` to probe a reference upload with before decoding it (the app's uploads).
        callback: preprocessing progress.
    """
    if (reference is None) == (preset is None):
        raise EymError("give either a reference video or a preset motion (not both, not neither)")
    if preset is not None:
        from eym.presets import PRESETS, preset_clip

        if preset not in PRESETS:
            raise EymError(f"unknown preset motion {preset!r}; choose one of {', '.join(PRESETS)}")
        clip, label = preset_clip(preset, source, config=config), f"preset:{preset}"
    elif isinstance(reference, (str, Path)):
        from eym.preprocess import preprocess

        if not Path(reference).exists():
            raise EymError(f"reference {str(reference)!r} is not a video file or frame folder")
        if limits is not None:
            from eym.probe import check_upload

            check_upload(reference, config, limits)
        clip = preprocess(Path(reference), config, with_masks=False, callback=callback, probe_limits=limits)
        label = str(reference)
    else:
        clip, label = reference, str(getattr(reference, "source", "") or getattr(reference, "path", "") or "clip")
    return Motion(keypoints=motion_keypoints(source, clip, retarget=retarget),
                  skeletons=motion_skeletons(source, clip, retarget=retarget), label=label, reference=clip)


def motion_keypoints(source, reference, *, retarget: bool = True) -> np.ndarray | None:
    """The keypoints of the motion that drives the editing branch, (F, 18, 3), or None if the reference has none.

    Retargeting fits the reference motion to the source person's bone lengths and hip position
    (not in the paper, expected by users); it needs keypoints of both clips and happens here
    only, once per edit. A motion already fitted to this source (a preset,
    ``reference.fitted_to``) is used as it is.
    """
    from eym.pose import retarget as retarget_keypoints

    fitted_to = getattr(reference, "fitted_to", "")
    if fitted_to and fitted_to != source.content_hash:
        raise EymError("the preset motion was fitted to another source video; choose the preset again for this one")
    source_kps, ref_kps = getattr(source, "keypoints", None), getattr(reference, "keypoints", None)
    if ref_kps is None:
        return None
    if retarget and not fitted_to and source_kps is not None:
        return retarget_keypoints(np.asarray(ref_kps), np.asarray(source_kps))
    return np.asarray(ref_kps, np.float32)


def motion_skeletons(source, reference, *, retarget: bool = True) -> np.ndarray:
    """The skeleton images S_rf that drive the editing branch, (F, H, W, 3) uint8; the app's preview shows these.

    Retargeted (:func:`motion_keypoints`) and drawn when asked and both clips have keypoints;
    else the reference's own skeleton images.
    """
    from eym.pose import draw_skeletons

    frames = np.asarray(source.frames)
    F, H, W, _ = frames.shape
    ref_skeletons = np.asarray(reference.skeletons)
    if len(ref_skeletons) != F:
        raise EymError(
            f"the reference has {len(ref_skeletons)} frames and the source {F}; "
            "preprocess both with the same --frames"
        )
    fitted = bool(getattr(reference, "fitted_to", ""))
    keypoints = motion_keypoints(source, reference, retarget=retarget)
    if retarget and not fitted:
        if keypoints is not None and getattr(source, "keypoints", None) is not None:
            return draw_skeletons(keypoints, H, W)
        logger.warning("retargeting needs keypoints of both clips; using the reference skeletons as they are")
    if ref_skeletons.shape[1:3] != (H, W):
        raise EymError(f"the reference is {ref_skeletons.shape[2]}x{ref_skeletons.shape[1]} and the source {W}x{H}; preprocess both at the same --size")
    return ref_skeletons.astype(np.uint8)



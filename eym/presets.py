"""Built-in reference motions, defined in code: a reference video is not always at hand.

Each preset is a function of the phase ``t`` in [0, 1) (one loop of the motion) that poses a
front-facing body built from bone angles (forward kinematics in the image plane, y down).
Depth is faked by foreshortening: a limb pointing at the camera is drawn shorter. With a
``source`` the motion is retargeted to that person (:func:`eym.pose.retarget`), so it has the
source's proportions and stands where the source stands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from eym.errors import EymError
from eym.pose import NUM_KEYPOINTS, bone_lengths, retarget

PRESETS: dict[str, str] = {
    "wave": "waves the right hand above the shoulder",
    "raise_arms": "raises both arms overhead and lowers them",
    "squat": "bends the knees into a squat and stands up, arms forward",
    "step": "steps in place, lifting the knees in turn",
    "tai_chi": "draws a large circle with both arms, tai chi style",
}

# Default body, in units of the frame side: about 0.8 of the frame tall, hips at the middle.
_HIP_CENTER = np.array([0.5, 0.52])
_TORSO = 0.26  # hip centre to neck
_SHOULDER = 0.085  # neck to each shoulder
_HIP = 0.055  # hip centre to each hip
_UPPER_ARM, _FOREARM = 0.13, 0.12
_THIGH, _SHIN = 0.19, 0.18
_NOSE = 0.075  # neck to nose
_EYE = (0.022, 0.025)  # eye offset from the nose: sideways, up
_EAR = (0.045, 0.012)  # ear offset from the nose: sideways, up


@dataclass(frozen=True)
class _Pose:
    """Bone angles (radians from straight down, positive towards the image's right) and foreshortening."""

    r_upper: float = 0.15  # right upper arm (on the image's left for a front-facing body)
    r_fore: float = 0.1
    l_upper: float = -0.15
    l_fore: float = -0.1
    r_thigh: float = 0.05
    r_shin: float = 0.0
    l_thigh: float = -0.05
    l_shin: float = 0.0
    arm_depth: float = 1.0  # length factor of both arms (<1: pointing at the camera)
    r_thigh_depth: float = 1.0
    l_thigh_depth: float = 1.0
    drop: float = 0.0  # how far the hips sink, in frame units


def _direction(angle: float) -> np.ndarray:
    """Unit vector at ``angle`` from straight down, towards image-right for positive angles."""
    return np.array([math.sin(angle), math.cos(angle)])


def _build(pose: _Pose) -> np.ndarray:
    """Forward kinematics of the default body: ``(18, 3)`` keypoints, all detected."""
    p = np.zeros((NUM_KEYPOINTS, 2))
    hip = _HIP_CENTER + np.array([0.0, pose.drop])
    # The person faces the camera, so their right side is on the image's left.
    p[8], p[11] = hip + [-_HIP, 0], hip + [_HIP, 0]
    p[1] = hip - [0, _TORSO]
    p[2], p[5] = p[1] + [-_SHOULDER, 0], p[1] + [_SHOULDER, 0]
    # Arm angles mirror: a positive r_upper swings the right arm outwards (image-left).
    p[3] = p[2] + _UPPER_ARM * pose.arm_depth * _direction(-pose.r_upper)
    p[4] = p[3] + _FOREARM * pose.arm_depth * _direction(-pose.r_fore)
    p[6] = p[5] + _UPPER_ARM * pose.arm_depth * _direction(-pose.l_upper)
    p[7] = p[6] + _FOREARM * pose.arm_depth * _direction(-pose.l_fore)
    p[9] = p[8] + _THIGH * pose.r_thigh_depth * _direction(-pose.r_thigh)
    p[10] = p[9] + _SHIN * _direction(-pose.r_shin)
    p[12] = p[11] + _THIGH * pose.l_thigh_depth * _direction(-pose.l_thigh)
    p[13] = p[12] + _SHIN * _direction(-pose.l_shin)
    p[0] = p[1] - [0, _NOSE]
    p[14], p[15] = p[0] + [-_EYE[0], -_EYE[1]], p[0] + [_EYE[0], -_EYE[1]]
    p[16], p[17] = p[0] + [-_EAR[0], -_EAR[1]], p[0] + [_EAR[0], -_EAR[1]]
    return np.concatenate([p, np.ones((NUM_KEYPOINTS, 1))], axis=1)


def _bump(t: float) -> float:
    """0 -> 1 -> 0 over one loop, smooth at both ends."""
    return 0.5 - 0.5 * math.cos(2 * math.pi * t)


def _wave(t: float) -> _Pose:
    # Right arm raised sideways, forearm up and swinging twice per loop.
    swing = 0.45 * math.sin(4 * math.pi * t)
    return _Pose(r_upper=1.9, r_fore=math.pi - 0.2 + swing)


def _raise_arms(t: float) -> _Pose:
    lift = _bump(t) * (math.pi - 0.3)  # from hanging to almost straight up, sideways
    return _Pose(r_upper=0.15 + lift, r_fore=0.1 + lift * 1.05, l_upper=-0.15 - lift, l_fore=-0.1 - lift * 1.05)


def _squat(t: float) -> _Pose:
    depth = _bump(t)
    # Thighs point at the camera as the knees bend (foreshortened), knees open a little,
    # shins stay near vertical so the feet keep their place; arms go forward for balance.
    thigh_depth = 1.0 - 0.65 * depth
    return _Pose(
        r_upper=0.15 + 0.1 * depth, l_upper=-0.15 - 0.1 * depth, r_fore=0.1, l_fore=-0.1,
        arm_depth=1.0 - 0.7 * depth,
        r_thigh=0.05 + 0.35 * depth, l_thigh=-0.05 - 0.35 * depth, r_shin=-0.1 * depth, l_shin=0.1 * depth,
        r_thigh_depth=thigh_depth, l_thigh_depth=thigh_depth,
        drop=_THIGH * (1.0 - thigh_depth) * 0.9,
    )  # fmt: skip


def _step(t: float) -> _Pose:
    # Knees lift in turn: first half the right leg, second half the left.
    right = max(0.0, math.sin(2 * math.pi * t))
    left = max(0.0, -math.sin(2 * math.pi * t))
    return _Pose(
        r_thigh_depth=1.0 - 0.7 * right, l_thigh_depth=1.0 - 0.7 * left,
        r_upper=0.15 - 0.3 * left + 0.1 * right, l_upper=-0.15 + 0.3 * right - 0.1 * left,  # arms swing opposite
        r_fore=0.1 - 0.5 * left, l_fore=-0.1 + 0.5 * right,
    )  # fmt: skip


def _tai_chi(t: float) -> _Pose:
    # Both arms sweep one full circle: out to the side, overhead, crossing in front, down.
    angle = 0.15 + (math.pi - 0.35) * _bump(t)
    cross = 0.5 * math.sin(2 * math.pi * t)  # arms lead on the way up, trail on the way down
    return _Pose(
        r_upper=angle + cross, r_fore=angle + cross + 0.4, l_upper=-(angle - cross), l_fore=-(angle - cross + 0.4),
        arm_depth=0.9 + 0.1 * math.cos(2 * math.pi * t), drop=0.03,
        r_thigh=0.12, l_thigh=-0.12, r_shin=0.05, l_shin=-0.05,
    )  # fmt: skip


_MOTIONS = {"wave": _wave, "raise_arms": _raise_arms, "squat": _squat, "step": _step, "tai_chi": _tai_chi}


def preset_motion(name: str, num_frames: int, source: np.ndarray | None = None) -> np.ndarray:
    """Keypoints of a built-in motion.

    Args:
        name: one of :data:`PRESETS`.
        num_frames: ``F``; the frames cover one loop of the motion.
        source: ``(F_s, 18, 3)`` keypoints of the source person; when given, the motion is
            retargeted to that person's bone lengths and position.

    Returns:
        ``(F, 18, 3)`` float32 keypoints.

    Raises:
        EymError: for an unknown name or ``num_frames < 1``.
    """
    if name not in _MOTIONS:
        raise EymError(f"motion preset {name!r} is unknown; use one of {', '.join(PRESETS)}")
    if num_frames < 1:
        raise EymError(f"frames={num_frames}: ask for at least 1 frame")
    motion = np.stack([_build(_MOTIONS[name](i / num_frames)) for i in range(num_frames)]).astype(np.float32)
    if source is not None:
        # The preset's bones are foreshortened in some frames; its rest pose has their true length.
        rest = _build(_Pose())[None].astype(np.float32)
        motion = retarget(motion, source, reference_bones=bone_lengths(rest))
    return motion


def preset_clip(name: str, source, *, config=None):
    """A preset motion as a reference :class:`~eym.preprocess.Clip` for ``source``, fitted to its person once.

    The clip is marked ``fitted_to=source.content_hash``, so the edit uses its skeletons as they
    are (retargeting them a second time would move the joints). Without source keypoints the
    preset keeps its default body.

    Args:
        name: one of :data:`PRESETS`.
        source: the source clip (frames, keypoints, fps, content_hash).
        config: the ``PreprocessConfig`` to record on the clip (default: the source's frame count and size).
    """
    from eym.preprocess import clip_from_keypoints

    frames = np.asarray(source.frames)
    source_keypoints = getattr(source, "keypoints", None)
    keypoints = preset_motion(name, len(frames), source_keypoints)
    fitted = source.content_hash if source_keypoints is not None else ""
    return clip_from_keypoints(keypoints, frames.shape[1], float(source.fps), config=config, fitted_to=fitted)

"""The one motion resolver: the caller's explicit choice, retargeting once, the skeletons that drive the edit."""

from __future__ import annotations

import numpy as np
import pytest

from eym.errors import EymError
from eym.motion import Motion, motion_keypoints, motion_skeletons, resolve_motion
from eym.pose import draw_skeletons, retarget
from eym.presets import preset_clip, preset_motion
from eym.preprocess import PreprocessConfig

from tests.synthetic import synthetic_clip

F, SIZE = 4, 64
CONFIG = PreprocessConfig(num_frames=F, size=SIZE)


def test_preset_is_fitted_to_the_source_once():
    source = synthetic_clip(F, SIZE, motion="wave")
    motion = resolve_motion(source, preset="raise_arms", config=CONFIG, retarget=True)
    expected = preset_motion("raise_arms", F, source.keypoints)
    assert isinstance(motion, Motion) and motion.label == "preset:raise_arms"
    assert np.allclose(motion.keypoints, expected)
    assert np.array_equal(motion.skeletons, draw_skeletons(expected, SIZE, SIZE))
    assert motion.reference.fitted_to == source.content_hash
    assert np.array_equal(motion.skeletons, motion_skeletons(source, preset_clip("raise_arms", source, config=CONFIG)))


def test_reference_clip_is_retargeted_only_when_asked():
    source = synthetic_clip(F, SIZE, motion="wave")
    reference = synthetic_clip(F, SIZE, motion="squat", seed=1)
    fitted = resolve_motion(source, reference=reference, config=CONFIG, retarget=True)
    expected = retarget(np.asarray(reference.keypoints), np.asarray(source.keypoints))
    assert np.allclose(fitted.keypoints, expected)
    assert np.array_equal(fitted.skeletons, draw_skeletons(expected, SIZE, SIZE))
    as_detected = resolve_motion(source, reference=reference, config=CONFIG, retarget=False)
    assert np.array_equal(as_detected.skeletons, reference.skeletons)
    assert np.allclose(as_detected.keypoints, motion_keypoints(source, reference, retarget=False))
    assert as_detected.reference is reference


def test_choice_is_explicit_never_guessed(tmp_path, monkeypatch):
    source = synthetic_clip(F, SIZE)
    with pytest.raises(EymError, match="either a reference video or a preset"):
        resolve_motion(source, config=CONFIG, retarget=True)
    with pytest.raises(EymError, match="either a reference video or a preset"):
        resolve_motion(source, reference=source, preset="wave", config=CONFIG, retarget=True)
    monkeypatch.chdir(tmp_path)  # a preset's name given as a reference is a missing file, not the preset
    with pytest.raises(EymError, match="not a video file or frame folder"):
        resolve_motion(source, reference="wave", config=CONFIG, retarget=True)
    with pytest.raises(EymError, match="unknown preset"):
        resolve_motion(source, preset="no-such-motion", config=CONFIG, retarget=True)

"""eym.presets: built-in motions are well-formed, actually move, loop, and retarget to a source person."""

from __future__ import annotations

import numpy as np
import pytest

from eym.errors import EymError
from eym.pose import bone_lengths, draw_skeletons, hip_centers
from eym.presets import PRESETS, preset_motion

# The joints each preset is about (OpenPose-18 indices) and which coordinate must move.
_MOVING = {"wave": ([4], 0), "raise_arms": ([4, 7], 1), "squat": ([8, 11], 1), "step": ([9, 12], 1), "tai_chi": ([4, 7], 1)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_a_valid_moving_skeleton(name):
    keypoints = preset_motion(name, 16)
    assert keypoints.shape == (16, 18, 3) and keypoints.dtype == np.float32
    assert (keypoints[..., 2] == 1).all()
    assert (keypoints[..., :2] > 0).all() and (keypoints[..., :2] < 1).all()  # whole body in frame
    joints, axis = _MOVING[name]
    assert keypoints[:, joints, axis].std(axis=0).min() > 0.01, "the named joints should move"
    # One loop: sampling twice as densely gives the same poses at the shared phases.
    np.testing.assert_allclose(preset_motion(name, 32)[::2], keypoints, atol=1e-6)
    images = draw_skeletons(keypoints[:2], 64, 64)
    assert images.shape == (2, 64, 64, 3) and images.any()


def test_squat_lowers_the_hips_and_keeps_the_feet():
    keypoints = preset_motion("squat", 8)
    hips = hip_centers(keypoints)[:, 1]
    assert hips[4] > hips[0] + 0.05  # y grows downwards: the hips sink mid-loop
    feet = keypoints[:, [10, 13], 1]
    assert np.abs(feet - feet[0]).max() < 0.03


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_takes_the_source_body(name):
    source = preset_motion("wave", 2)
    source[:, :, :2] = 0.5 + 0.6 * (source[:, :, :2] - 0.5) + np.array([0.15, 0.1])  # small, lower right
    keypoints = preset_motion(name, 8, source=source)
    assert keypoints.shape == (8, 18, 3)
    # Bone lengths as drawn in the source frame; the preset's own foreshortening changes them
    # per frame, so compare at the frame where the preset stands straightest (frame 0).
    np.testing.assert_allclose(bone_lengths(keypoints[:1]), bone_lengths(source), rtol=1e-3)
    np.testing.assert_allclose(np.nanmean(hip_centers(keypoints), 0)[0], np.nanmean(hip_centers(source), 0)[0], atol=1e-3)


def test_unknown_preset_and_bad_frame_count():
    with pytest.raises(EymError, match="moonwalk"):
        preset_motion("moonwalk", 8)
    with pytest.raises(EymError, match="frames=0"):
        preset_motion("wave", 0)

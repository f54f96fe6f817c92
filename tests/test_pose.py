"""eym.pose: BlazePose -> OpenPose mapping, drawing format (vs MotionEditor's PNGs), gaps, retargeting, backends."""

from __future__ import annotations


import numpy as np
import pytest

from eym.errors import EymError
from eym.pose import (
    BONES,
    LIMB_COLORS,
    LIMBS,
    NUM_KEYPOINTS,
    blazepose_to_openpose,
    bone_lengths,
    draw_skeletons,
    fill_missing,
    get_pose_backend,
    hip_centers,
    retarget,
)
from eym.presets import preset_motion


def _walker(num_frames: int = 6, scale: float = 1.0, offset=(0.0, 0.0)) -> np.ndarray:
    """A rigid-limbed synthetic person (a preset) scaled about the frame centre and moved."""
    keypoints = preset_motion("tai_chi", num_frames)
    keypoints[:, :, :2] = 0.5 + scale * (keypoints[:, :, :2] - 0.5) + np.asarray(offset)
    return keypoints


# ---------------------------------------------------------------------------------------------
# BlazePose mapping
# ---------------------------------------------------------------------------------------------
def test_blazepose_mapping_and_neck():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.uniform(0.1, 0.9, (33, 2)), np.full((33, 1), 0.9)], axis=1).astype(np.float32)
    out = blazepose_to_openpose(points)
    assert out.shape == (NUM_KEYPOINTS, 3)
    np.testing.assert_allclose(out[1, :2], (points[11, :2] + points[12, :2]) / 2, atol=1e-6)  # neck
    np.testing.assert_allclose(out[2], points[12])  # right shoulder is BlazePose 12
    np.testing.assert_allclose(out[7], points[15])  # left wrist is BlazePose 15
    np.testing.assert_allclose(out[16], points[8])  # right ear
    points[16, 2] = 0.1  # right wrist barely visible
    points[27, 0] = 1.2  # left ankle outside the frame
    points[11, 2] = 0.0  # left shoulder unseen -> no neck either
    out = blazepose_to_openpose(points)
    assert (out[4] == 0).all() and (out[13] == 0).all() and (out[5] == 0).all() and (out[1] == 0).all()
    assert (blazepose_to_openpose(None) == 0).all()


# ---------------------------------------------------------------------------------------------
# Drawing: controlnet_aux's colours and limb layout
# ---------------------------------------------------------------------------------------------
def test_limbs_are_drawn_in_openpose_colours():
    keypoints = preset_motion("raise_arms", 1)
    keypoints[0, :, :2] = 0.5 + 1.1 * (keypoints[0, :, :2] - 0.5)
    image = draw_skeletons(keypoints, 256, 256)[0]
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    for i, (a, b) in enumerate(LIMBS):
        if i >= 13:  # face limbs are short and covered by joint dots
            continue
        # A point 40% along the limb (away from joint dots) has the limb's colour, at 0.6 intensity.
        x, y = keypoints[0, a, :2] + 0.4 * (keypoints[0, b, :2] - keypoints[0, a, :2])
        pixel = image[int(y * 256), int(x * 256)]
        np.testing.assert_array_equal(pixel, [int(c * 0.6) for c in LIMB_COLORS[i]], err_msg=f"limb {i}")
    for k in (4, 7, 10, 13):  # joint dots: full colour of their index
        x, y = keypoints[0, k, :2]
        np.testing.assert_array_equal(image[int(y * 256), int(x * 256)], LIMB_COLORS[k])


def test_undetected_points_are_not_drawn():
    keypoints = preset_motion("wave", 1)
    keypoints[0, 3:5] = 0  # right elbow and wrist not detected
    image = draw_skeletons(keypoints, 128, 128)[0]
    for i in (2, 3):  # shoulder-elbow and elbow-wrist limbs
        assert not (image == [int(c * 0.6) for c in LIMB_COLORS[i]]).all(-1).any()
    assert (draw_skeletons(np.zeros((2, 18, 3), np.float32), 64, 64) == 0).all()


@pytest.fixture(scope="module")
def motioneditor_detections(media):
    from eym.video import read_video

    backend = get_pose_backend("mediapipe")
    cases = {}
    for case in sorted((media / "MotionEditor").glob("case-*")):
        if case.name == "case-3":  # same source frames as case-2
            continue
        frames = read_video(case / "images", num_frames=None, size=512).frames
        references = read_video(case / "source_condition" / "openposefull", num_frames=None, size=None).frames
        cases[case.name] = (backend.detect(frames), references)
    return cases


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


@pytest.mark.media
def test_skeletons_match_motioneditor_reference_pngs(motioneditor_detections):
    """Each limb colour sits where the reference OpenPose rendering puts that limb."""
    for name, (keypoints, references) in motioneditor_detections.items():
        # Pack RGB into one int per pixel so each colour is a single comparison.
        drawn = _pack(draw_skeletons(keypoints, 512, 512))
        references = _pack(references)
        compared = 0
        for i in range(len(LIMBS)):
            colour = _pack(np.array([int(c * 0.6) for c in LIMB_COLORS[i]]))
            ours, theirs = drawn == colour, references == colour
            if ours.sum() < 30 or theirs.sum() < 30:  # limb hidden in one of them (e.g. under face dots)
                continue
            centroid_ours = np.argwhere(ours)[:, 1:].mean(0)  # (y, x) over all frames
            centroid_theirs = np.argwhere(theirs)[:, 1:].mean(0)
            distance = np.linalg.norm(centroid_ours - centroid_theirs)
            assert distance < 20, f"{name} limb {i}: {distance:.1f} px from the reference"
            compared += 1
        assert compared >= 14, f"{name}: only {compared} of 17 limbs comparable"


# ---------------------------------------------------------------------------------------------
# Missing frames
# ---------------------------------------------------------------------------------------------
def test_fill_missing_takes_the_nearest_frame():
    keypoints = _walker(7)
    for f in (0, 3, 4, 6):
        keypoints[f] = 0
    filled, missing = fill_missing(keypoints)
    assert missing == [0, 3, 4, 6]
    np.testing.assert_array_equal(filled[0], keypoints[1])
    np.testing.assert_array_equal(filled[3], keypoints[2])  # 3 is nearer 2 than 5
    np.testing.assert_array_equal(filled[4], keypoints[5])
    np.testing.assert_array_equal(filled[6], keypoints[5])
    np.testing.assert_array_equal(filled[[1, 2, 5]], keypoints[[1, 2, 5]])


def test_fill_missing_tie_prefers_earlier_and_all_empty_is_an_error():
    keypoints = _walker(3)
    keypoints[1] = 0
    filled, _ = fill_missing(keypoints)
    np.testing.assert_array_equal(filled[1], keypoints[0])
    with pytest.raises(EymError, match="no person found"):
        fill_missing(np.zeros((4, 18, 3), np.float32))


# ---------------------------------------------------------------------------------------------
# Retargeting
# ---------------------------------------------------------------------------------------------
def test_retarget_identity():
    x = _walker(5)
    x[2, 4] = 0  # a missing wrist
    np.testing.assert_allclose(retarget(x, x), x, atol=1e-6)


def test_retarget_takes_source_bone_lengths_and_hip():
    reference = _walker(8, scale=1.4, offset=(0.1, -0.05))  # a bigger person, elsewhere, moving
    source = preset_motion("wave", 3)  # the person who should move like the reference
    source[:, :, :2] = 0.5 + 0.7 * (source[:, :, :2] - 0.5) + np.array([-0.1, 0.08])
    out = retarget(reference, source)
    assert out.shape == reference.shape and out.dtype == np.float32
    np.testing.assert_allclose(bone_lengths(out), bone_lengths(source), rtol=1e-4)
    np.testing.assert_allclose(np.nanmean(hip_centers(out), 0), np.nanmean(hip_centers(source), 0), atol=1e-6)
    # The motion is the reference's: each bone keeps its direction in every frame.
    for parent, child in BONES:
        d_ref = reference[:, child, :2] - reference[:, parent, :2]
        d_out = out[:, child, :2] - out[:, parent, :2]
        cos = (d_ref * d_out).sum(-1) / np.linalg.norm(d_ref, axis=-1) / np.linalg.norm(d_out, axis=-1)
        np.testing.assert_allclose(cos, 1.0, atol=1e-5)
    np.testing.assert_array_equal(out[:, :, 2], reference[:, :, 2])


def test_retarget_scales_the_hip_path():
    reference = _walker(4)
    shift = np.linspace(0, 0.2, 4)
    reference[:, :, 0] += shift[:, None]  # the reference walks right by 0.2
    source = _walker(2, scale=0.5)
    out = retarget(reference, source)
    path = hip_centers(out)[:, 0]
    np.testing.assert_allclose(path - path[0], 0.5 * shift, atol=1e-5)  # half the size, half the way


def test_retarget_keeps_missing_points_missing():
    reference = _walker(3)
    reference[1, 6:8] = 0
    out = retarget(reference, _walker(2, scale=0.8))
    assert (out[1, 6:8] == 0).all() and (out[0, 6:8, 2] > 0).all()


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
def test_unknown_backend_and_openpose_without_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("EYM_OPENPOSE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("eym.pose.find_openpose_weights", lambda: None)
    with pytest.raises(EymError, match="unknown"):
        get_pose_backend("posenet")
    with pytest.raises(EymError, match=r"body_pose_model\.pth.*not found"):
        get_pose_backend("openpose")
    assert get_pose_backend("auto").name == "mediapipe"


@pytest.fixture
def random_openpose_weights(tmp_path):
    """A body_pose_model.pth with random weights, in the original checkpoint's key names."""
    import torch
    from controlnet_aux.open_pose.model import bodypose_model

    torch.manual_seed(0)
    state = bodypose_model().state_dict()
    # controlnet_aux's loader drops the first name component of each key (util.transfer)
    torch.save({k.split(".", 1)[1]: v for k, v in state.items()}, tmp_path / "body_pose_model.pth")
    return tmp_path


def test_openpose_backend_with_local_weights(random_openpose_weights, monkeypatch):
    monkeypatch.setenv("EYM_OPENPOSE_DIR", str(random_openpose_weights))
    backend = get_pose_backend("auto")
    assert backend.name == "openpose"  # auto prefers openpose when its weights are there
    frames = np.random.default_rng(0).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)
    keypoints = backend.detect(frames)
    assert keypoints.shape == (1, 18, 3) and keypoints.dtype == np.float32
    assert ((keypoints[..., 2] >= 0) & (keypoints[..., 2] <= 1)).all()


def test_mediapipe_detects_a_drawn_free_frame_as_empty():
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    keypoints = get_pose_backend("mediapipe").detect(frames)
    assert keypoints.shape == (2, 18, 3) and (keypoints == 0).all()

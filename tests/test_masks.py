"""eym.masks: mask quality on MotionEditor's ground truth, gap filling, backend selection."""

from __future__ import annotations

import numpy as np
import pytest

from eym.errors import EymError
from eym.masks import fill_empty_masks, get_mask_backend


@pytest.mark.media
def test_mediapipe_masks_match_motioneditor_ground_truth(media):
    from eym.video import read_video

    backend = get_mask_backend("mediapipe")
    ious = []
    for case in sorted((media / "MotionEditor").glob("case-*")):
        if case.name == "case-3":  # same source frames (and masks) as case-2
            continue
        frames = read_video(case / "images", num_frames=None, size=512).frames
        truth = read_video(case / "man.mask", num_frames=None, size=512).frames[..., 0] > 127  # 0/255 PNGs
        masks = backend.segment(frames)
        assert masks.shape == truth.shape and masks.dtype == bool
        for mask, gt in zip(masks, truth):
            ious.append((mask & gt).sum() / (mask | gt).sum())
    assert np.mean(ious) >= 0.90, f"mean IoU {np.mean(ious):.3f}"
    assert min(ious) >= 0.75


def test_no_person_gives_empty_masks():
    masks = get_mask_backend("mediapipe").segment(np.zeros((2, 48, 64, 3), np.uint8))
    assert masks.shape == (2, 48, 64) and not masks.any()


def test_fill_empty_masks_uses_nearest_frame():
    masks = np.zeros((5, 4, 4), bool)
    masks[1, 0, 0] = True
    masks[4, 3, 3] = True
    filled, empty = fill_empty_masks(masks)
    assert empty == [0, 2, 3]
    assert filled[0, 0, 0] and filled[2, 0, 0] and filled[3, 3, 3]
    assert filled[0].sum() == filled[2].sum() == filled[3].sum() == 1
    none, all_empty = fill_empty_masks(np.zeros((2, 3, 3), bool))
    assert all_empty == [0, 1] and not none.any()


def test_unknown_and_missing_rembg(monkeypatch, tmp_path):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    with pytest.raises(EymError, match="unknown"):
        get_mask_backend("sam")
    with pytest.raises(EymError, match=r"u2net\.onnx not found; download"):
        get_mask_backend("rembg")
    (tmp_path / "u2net.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(EymError, match="cannot be loaded"):
        get_mask_backend("rembg")

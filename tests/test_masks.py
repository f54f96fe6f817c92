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


def _write_red_detector(path) -> None:
    """A one-layer ONNX model in U^2-Net's interface: (1, 3, 320, 320) -> (1, 1, 320, 320), red minus green."""
    import onnx  # a test dependency (requirements-dev.txt)
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [1.0, -1.0, 0.0])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "w"], ["d0"])],
        "red_detector",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 320, 320])],
        [helper.make_tensor_value_info("d0", TensorProto.FLOAT, [1, 1, 320, 320])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what onnxruntime reads
    onnx.save(model, str(path))


def test_rembg_masks_through_rembgs_api(monkeypatch, tmp_path):
    # Any U^2-Net-shaped model runs through rembg's session and remove(); this one marks red pixels.
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    _write_red_detector(tmp_path / "u2net.onnx")
    frames = np.zeros((2, 96, 128, 3), np.uint8)
    frames[..., 1] = 255  # green background
    truth = np.zeros((2, 96, 128), bool)
    truth[0, 20:60, 30:70] = True
    truth[1, 40:90, 60:120] = True
    frames[truth] = (255, 0, 0)
    backend = get_mask_backend("rembg")
    assert backend.name == "rembg"
    masks = backend.segment(frames)
    assert masks.shape == truth.shape and masks.dtype == bool
    for mask, gt in zip(masks, truth):
        assert (mask & gt).sum() / (mask | gt).sum() > 0.95  # only resampling blurs the edges

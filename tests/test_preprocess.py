"""eym.preprocess: caching, clip folders, missing frames, bad input, CLI; detection rates on real footage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eym import preprocess as pp
from eym.cli import main
from eym.errors import EymError
from eym.preprocess import (
    Clip,
    PreprocessConfig,
    clip_from_keypoints,
    load_clip,
    load_keypoints,
    preprocess,
    save_keypoints,
)
from eym.presets import preset_motion
from eym.video import VideoLimits, count_frames, write_mp4

DARK = 20  # frames darker than this have "nobody" in them for the fake backends


class CountingPose:
    """Fake pose backend: a fixed skeleton wherever the frame is bright; counts its calls."""

    name = "mediapipe"

    def __init__(self):
        self.calls = 0

    def detect(self, frames: np.ndarray) -> np.ndarray:
        self.calls += 1
        keypoints = np.repeat(preset_motion("wave", 1), len(frames), axis=0)
        keypoints[:, :, 0] += np.arange(len(frames))[:, None] * 0.01  # each frame its own pose
        keypoints[frames.mean(axis=(1, 2, 3)) < DARK] = 0
        return keypoints


class CountingMask:
    name = "mediapipe"

    def __init__(self):
        self.calls = 0

    def segment(self, frames: np.ndarray) -> np.ndarray:
        self.calls += 1
        return frames[..., 0] > 100


@pytest.fixture
def fakes(monkeypatch):
    pose, mask = CountingPose(), CountingMask()
    monkeypatch.setattr(pp, "get_pose_backend", lambda name, progress=False: pose)
    monkeypatch.setattr(pp, "get_mask_backend", lambda name, progress=False: mask)
    return pose, mask


def _video(path: Path, dark: tuple[int, ...] = (), num_frames: int = 12) -> Path:
    frames = np.full((num_frames, 40, 48, 3), 90, np.uint8)
    frames[:, 10:30, 20:30] = 200  # the "person" (mask = red channel > 100)
    for f in dark:
        frames[f] = 0
    return write_mp4(frames, path, fps=10)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def test_config_round_trip_and_validation():
    config = PreprocessConfig(num_frames=4, size=64, stride=2, pose="mediapipe")
    assert PreprocessConfig.from_dict(config.to_dict()) == config
    with pytest.raises(EymError, match="unknown preprocess setting.*frame_count"):
        PreprocessConfig.from_dict({"frame_count": 3})
    for bad in (dict(size=500), dict(num_frames=0), dict(pose="posenet"), dict(mask="sam"), dict(resize_mode="fit"), dict(stride=0)):
        with pytest.raises(EymError):
            PreprocessConfig(**bad)


# ---------------------------------------------------------------------------------------------
# Pipeline with fake backends (fast)
# ---------------------------------------------------------------------------------------------
def test_preprocess_writes_clip_and_reuses_cache(tmp_path, fakes):
    pose, mask = fakes
    video = _video(tmp_path / "v.mp4", dark=(0, 5))
    config = PreprocessConfig(num_frames=6, size=64, stride=1)
    steps = []
    clip = preprocess(video, config, cache_dir=tmp_path / "cache", out_dir=tmp_path / "out",
                      callback=lambda stage, i, n: steps.append((stage, i, n)))  # fmt: skip
    assert (pose.calls, mask.calls) == (1, 1)
    assert steps == [("preprocess", i, 5) for i in range(1, 6)]
    assert clip.frames.shape == (6, 64, 64, 3) and clip.skeletons.shape == (6, 64, 64, 3)
    assert clip.masks.shape == (6, 64, 64) and clip.masks.dtype == bool and clip.has_masks
    assert clip.keypoints.shape == (6, 18, 3) and clip.fps == pytest.approx(10.0)
    assert clip.missing == [0, 5]  # dark frames, filled from their neighbours
    np.testing.assert_array_equal(clip.keypoints[0], clip.keypoints[1])
    np.testing.assert_array_equal(clip.keypoints[5], clip.keypoints[4])
    assert clip.masks[0].any()  # the dark frame's empty mask was filled too
    for name in ("frames/0005.png", "skeletons/0000.png", "masks/0003.png", "keypoints.json", "clip.json",
                 "preview.png", "frames.mp4", "skeletons.mp4"):  # fmt: skip
        assert (tmp_path / "out" / name).is_file(), name

    again = preprocess(video, config, cache_dir=tmp_path / "cache")
    assert (pose.calls, mask.calls) == (1, 1)  # no detection the second time
    assert again.content_hash == clip.content_hash and again.missing == [0, 5]
    np.testing.assert_array_equal(again.frames, clip.frames)
    np.testing.assert_array_equal(again.masks, clip.masks)
    np.testing.assert_allclose(again.keypoints, clip.keypoints)
    # A reference (no masks) reuses the entry that has masks.
    preprocess(video, config, cache_dir=tmp_path / "cache", with_masks=False)
    assert pose.calls == 1
    # Other settings: a new entry.
    preprocess(video, PreprocessConfig(num_frames=4, size=64), cache_dir=tmp_path / "cache")
    assert pose.calls == 2


def test_corrupted_cache_entry_is_rebuilt(tmp_path, fakes):
    pose, _ = fakes
    video = _video(tmp_path / "v.mp4")
    config = PreprocessConfig(num_frames=3, size=64)
    clip = preprocess(video, config, cache_dir=tmp_path / "cache")
    (clip.path / "frames" / "0001.png").write_bytes(b"damaged")
    rebuilt = preprocess(video, config, cache_dir=tmp_path / "cache")
    assert pose.calls == 2 and rebuilt.content_hash == clip.content_hash
    assert load_clip(rebuilt.path).content_hash == clip.content_hash


def test_changed_input_is_a_new_entry(tmp_path, fakes):
    pose, _ = fakes
    video = _video(tmp_path / "v.mp4")
    preprocess(video, PreprocessConfig(num_frames=3, size=64), cache_dir=tmp_path / "cache")
    _video(tmp_path / "v.mp4", dark=(11,))  # same name, other bytes
    preprocess(video, PreprocessConfig(num_frames=3, size=64), cache_dir=tmp_path / "cache")
    assert pose.calls == 2


def test_load_clip_round_trip(tmp_path, fakes):
    clip = preprocess(_video(tmp_path / "v.mp4", dark=(3,)), PreprocessConfig(num_frames=4, size=64, stride=1),
                      cache_dir=tmp_path / "cache", out_dir=tmp_path / "out")  # fmt: skip
    for folder in (clip.path, tmp_path / "out"):
        loaded = load_clip(folder)
        assert isinstance(loaded, Clip) and loaded.content_hash == clip.content_hash
        assert loaded.missing == [3] and loaded.config == clip.config and loaded.indices == [0, 1, 2, 3]
        np.testing.assert_array_equal(loaded.skeletons, clip.skeletons)
    with pytest.raises(EymError, match="not a clip folder"):
        load_clip(tmp_path)


def test_keypoints_json_round_trip(tmp_path):
    keypoints = np.random.default_rng(0).random((5, 18, 3)).astype(np.float32)
    save_keypoints(tmp_path / "k.json", keypoints, missing=[2])
    loaded, missing = load_keypoints(tmp_path / "k.json")
    np.testing.assert_array_equal(loaded, keypoints)
    assert missing == [2] and json.loads((tmp_path / "k.json").read_text())["names"][1] == "neck"
    (tmp_path / "bad.json").write_text(json.dumps({"keypoints": [[1, 2]]}))
    with pytest.raises(EymError, match="expected \\(frames, 18, 3\\)"):
        load_keypoints(tmp_path / "bad.json")


def test_clip_from_keypoints():
    keypoints = preset_motion("squat", 4)
    clip = clip_from_keypoints(keypoints, 64, fps=8)
    assert clip.skeletons.shape == (4, 64, 64, 3) and not clip.has_masks and clip.missing == []
    assert clip.content_hash == clip_from_keypoints(keypoints, 64, fps=8).content_hash
    assert clip.content_hash != clip_from_keypoints(preset_motion("wave", 4), 64, fps=8).content_hash


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing left in the cache
# ---------------------------------------------------------------------------------------------
def _cache_is_empty(cache: Path) -> bool:
    return not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "too_short", "nobody", "too_large", "too_long"])
def test_bad_input(tmp_path, fakes, case):
    video = tmp_path / "in.mp4"
    config, limits = PreprocessConfig(num_frames=4, size=64), VideoLimits()
    # empty, garbage, too large and too long are refused by eym.probe before any decoding
    expected = {"missing": "no such file", "empty": "is empty", "garbage": "not a video this tool reads",
                "too_short": "asked for 40 frames", "nobody": "no person found", "too_large": "over the 32 px limit",
                "too_long": "over the 1 s limit"}[case]  # fmt: skip
    if case == "empty":
        video.touch()
    elif case == "garbage":
        video.write_bytes(b"\x00garbage" * 50)
    elif case == "too_short":
        _video(video)
        config = PreprocessConfig(num_frames=40, size=64)
    elif case == "nobody":
        _video(video, dark=tuple(range(12)))
    elif case == "too_large":
        _video(video)
        limits = VideoLimits(max_side=32)
    elif case == "too_long":
        _video(video)
        limits = VideoLimits(max_duration_s=1.0)
    with pytest.raises(EymError, match=expected) as info:
        preprocess(video, config, cache_dir=tmp_path / "cache", limits=limits)
    assert "in.mp4" in str(info.value) and "\n" not in str(info.value)
    assert _cache_is_empty(tmp_path / "cache")


def test_cli_preprocess(tmp_path, fakes, capsys):
    video = _video(tmp_path / "v.mp4")
    rc = main(["-q", "preprocess", str(video), "--frames", "3", "--size", "64", "--out", str(tmp_path / "out"), "--resize", "pad"])
    assert rc == 0 and (tmp_path / "out" / "preview.png").is_file()
    assert json.loads((tmp_path / "out" / "clip.json").read_text())["config"]["resize_mode"] == "pad"
    rc = main(["preprocess", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "nope.mp4: no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Real footage: a person is found in (almost) every sampled frame
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_clips(media, tmp_path_factory):
    cache = tmp_path_factory.mktemp("preprocess_cache")
    paths = sorted((media / "taichi_hd").glob("*.mp4")) + sorted((media / "clips").iterdir())
    clips = {}
    for path in paths:
        if path.suffix == ".mp4" or path.is_dir():
            # 16 frames each (the 8-frame folder gives all it has)
            config = PreprocessConfig(num_frames=min(16, count_frames(path)[0]), size=256, pose="mediapipe")
            clips[path.name] = preprocess(path, config, cache_dir=cache, with_masks=False)
    return clips


@pytest.mark.media
def test_person_found_in_real_footage(real_clips):
    assert len(real_clips) >= 16
    found = {name: 1 - len(clip.missing) / clip.num_frames for name, clip in real_clips.items()}
    worst = min(found, key=found.get)
    assert found[worst] >= 0.9, f"{worst}: person found in only {found[worst]:.0%} of frames"
    overall = 1 - sum(len(c.missing) for c in real_clips.values()) / sum(c.num_frames for c in real_clips.values())
    assert overall >= 0.97, f"person found in {overall:.1%} of all frames"


@pytest.mark.media
def test_real_clips_are_well_formed(real_clips):
    for name, clip in real_clips.items():
        assert clip.frames.shape[1:] == (256, 256, 3), name
        detected = clip.keypoints[..., 2] > 0
        # Core body points (neck, shoulders, hips) are found in most frames.
        assert detected[:, [1, 2, 5, 8, 11]].mean() > 0.8, name
        assert clip.skeletons.reshape(len(clip.skeletons), -1).any(axis=1).all(), name

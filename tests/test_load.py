"""The running app under load, and what its file route serves.

The real page (``app.build_demo`` + ``app.launch_demo``, tiny random-weight bundle, tiny
settings) is served from a thread on a free port. Three gradio_client clients submit six edits
at once; all must finish, in the order they joined the queue, each with its own output in its
own job folder, while ``GET /healthz`` keeps answering. The file route must refuse anything
outside the outputs folder.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import app  # noqa: E402

pytestmark = pytest.mark.media
TARGETS = ("raising both arms", "bowing deeply", "stepping forward", "kneeling down", "waving", "jumping")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def server(tiny_bundle, media, tmp_path_factory):
    from eym.editor import Editor
    from eym.models import load_components

    # own components: the Editor inflates its UNet in place, the session's tiny_components stays 2D
    components = load_components(str(tiny_bundle), device="cpu")

    root = tmp_path_factory.mktemp("load")
    outputs = root / "outputs"
    outputs.mkdir()
    demo = app.build_demo(Editor(components), gallery_dir=None, outputs_dir=outputs, max_upload_mb=5)
    port = _free_port()
    app.launch_demo(demo, host="127.0.0.1", port=port, outputs_dir=outputs, max_upload_mb=5, queue_size=10,
                    concurrency=1, block=False, quiet=True)  # fmt: skip
    yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}/", root=root, outputs=outputs, media=media)
    demo.close()


def test_file_route_serves_only_the_outputs_folder(server):
    job = server.outputs / "20260101-000000-deadbeef"
    job.mkdir()
    (job / "edited.txt").write_text("result")
    secret = server.root / "secret.txt"
    secret.write_text("SECRET")
    (job / "link.txt").symlink_to(secret)  # a link inside outputs pointing out
    base = server.url + "gradio_api/file="
    assert _get(base + str(job / "edited.txt")) == (200, b"result")
    refused = [
        "/etc/passwd",
        str(secret),
        f"{server.outputs}/../secret.txt",
        f"{job}/%2e%2e/%2e%2e/secret.txt",
        urllib.parse.quote(f"{server.outputs}/../secret.txt", safe=""),
        str(job / "link.txt"),
        str(Path(app.__file__).resolve()),  # the code, in the working directory
        "app.py",
        str(Path.home() / ".bashrc"),
    ]
    for target in refused:
        code, body = _get(base + target)
        assert code in (403, 404), (target, code)
        assert b"SECRET" not in body and b"root:" not in body and b"import" not in body


def _edit_args(media: Path, target: str, seed: int) -> dict:
    from gradio_client import handle_file

    return dict(
        source=handle_file(str(media / "taichi_hd/taichi_copart00.mp4")), mode=app.MOTION_REFERENCE,
        reference=handle_file(str(media / "taichi_hd/taichi_copart05.mp4")), preset=None,
        num_frames=4, start=0, stride=0, size=64, retarget=True,
        subject="A man in a white tai chi suit", source_motion="practicing tai chi", target_motion=target,
        p_c="", p_s="", p_t="", seed=seed, stage1_steps=1, stage2_steps=1, ddim_steps=2,
        inject_layers="all", inject_start=0, inject_end=None,
    )  # fmt: skip


class HealthPoller(threading.Thread):
    """GET /healthz every ``period`` s until stopped; records (time, ok, latency)."""

    def __init__(self, url: str, period: float = 0.25):
        super().__init__(daemon=True)
        self.url, self.period = url + "healthz", period
        self.stop = threading.Event()
        self.polls: list[tuple[float, bool, float]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.time()
            try:
                code, body = _get(self.url, timeout=10)
                ok = code == 200 and json.loads(body)["status"] == "ok"
            except (OSError, ValueError):
                ok = False
            self.polls.append((t0, ok, time.time() - t0))
            self.stop.wait(self.period)


def test_six_jobs_from_three_clients(server):
    from gradio_client import Client
    from gradio_client.utils import Status

    from eym.video import count_frames

    # three clients as a proxy reports them (each within its queue share of two edits)
    clients = [Client(server.url, verbose=False, headers={"X-Forwarded-For": f"10.1.0.{k}"}) for k in range(3)]
    health = HealthPoller(server.url)
    health.start()
    t_start = time.time()
    jobs = []
    try:
        for k, target in enumerate(TARGETS):
            job = clients[k % 3].submit(*_edit_args(server.media, target, seed=k).values(), api_name="/edit")
            # Wait until this one has joined the queue, so the queue order is the submission order.
            deadline = time.time() + 60
            while job.status().code in (Status.STARTING, Status.JOINING_QUEUE) and time.time() < deadline:
                time.sleep(0.05)
            jobs.append(job)
        results = [job.result(timeout=600) for job in jobs]
    finally:
        t_end = time.time()
        health.stop.set()
        health.join()

    spans = []
    for k, (target, (edited, source, skeleton, side, files, status)) in enumerate(zip(TARGETS, results)):
        assert count_frames(edited)[0] == 4 and count_frames(side)[0] == 4, target
        job_id = re.search(r"Saved to `([^`]+)`", status).group(1)
        folder = server.outputs / job_id
        info = json.loads((folder / "job.json").read_text())
        assert info["state"] == "done"
        # Its own output: the job folder holds an edited video and settings naming this target and seed.
        assert [p for p in folder.glob("*.mp4")], folder
        settings = [json.loads(p.read_text()) for p in folder.glob("*.json") if p.name != "job.json"]
        assert any(target in json.dumps(s) for s in settings), (target, folder)
        assert Path(edited).name in {p.name for p in folder.glob("*.mp4")}
        spans.append((info["started"], info["ended"], job_id))
    assert len({s[2] for s in spans}) == 6, "every job has its own folder"
    # Queue order, one at a time: job k starts after job k-1 ended.
    for (s0, e0, _), (s1, e1, _) in zip(spans, spans[1:]):
        assert s0 < s1 and e0 <= s1 + 0.05, spans
    # Health answered throughout the run, quickly.
    during = [p for p in health.polls if t_start <= p[0] <= t_end]
    assert len(during) >= max(4, (t_end - t_start) / 2), f"{len(during)} polls in {t_end - t_start:.0f} s"
    assert all(ok for _, ok, _ in during), [p for p in during if not p[1]]
    assert max(latency for *_, latency in during) < 5.0

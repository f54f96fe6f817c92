"""The job runner: one job per model copy, first come first served, shares, stops at the next step."""

from __future__ import annotations

import threading
import time
import types

import pytest

from eym.errors import EymError
from eym.runner import JobCancelled, JobRunner, RunnerLimits, Ticket, check_work, client_key, job_work


class Model:
    """A stand-in model copy that notices overlapping jobs (what corrupted autograd and hooks)."""

    def __init__(self):
        self.components = types.SimpleNamespace(unet=object())
        self.active = 0
        self.overlaps = 0
        self.log: list[tuple[str, str]] = []

    def edit(self, name: str, steps: int, ticket: Ticket, step_s: float = 0.01) -> str:
        self.active += 1
        self.overlaps += self.active > 1
        self.log.append(("start", name))
        try:
            report = ticket.callback()
            for i in range(steps):
                time.sleep(step_s)
                report("stage1", i + 1, steps)
            return name
        finally:
            self.active -= 1
            self.log.append(("end", name))


def _run(runner: JobRunner, ticket: Ticket, name: str, steps: int, out: dict, step_s: float = 0.01) -> None:
    try:
        with runner.slot(ticket) as model:
            out[name] = model.edit(name, steps, ticket, step_s)
    except JobCancelled as stop:
        out[name] = f"stopped: {stop.reason}"


def test_jobs_from_many_threads_never_overlap_and_run_in_ticket_order():
    model = Model()
    runner = JobRunner([model], RunnerLimits(max_per_client=10))
    tickets = [runner.ticket(f"client{i % 3}") for i in range(6)]
    out: dict[str, str] = {}
    threads = [threading.Thread(target=_run, args=(runner, t, f"job{i}", 5, out)) for i, t in reversed(list(enumerate(tickets)))]
    for th in threads:  # started in reverse: the ticket, not the thread start, decides the order
        th.start()
    for th in threads:
        th.join(30)
    assert out == {f"job{i}": f"job{i}" for i in range(6)}
    assert model.overlaps == 0
    assert [name for what, name in model.log if what == "start"] == [f"job{i}" for i in range(6)]
    assert runner.busy == 0 and runner.position(runner.ticket("x")) == 0


def test_two_copies_run_two_jobs_at_once_each_on_its_own():
    a, b = Model(), Model()
    runner = JobRunner([a, b], RunnerLimits(max_per_client=10))
    out: dict[str, str] = {}
    tickets = [runner.ticket("c") for _ in range(4)]
    threads = [threading.Thread(target=_run, args=(runner, t, f"j{i}", 10, out)) for i, t in enumerate(tickets)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert len(out) == 4 and a.overlaps == b.overlaps == 0
    assert a.log and b.log, "both copies worked"


def test_editors_sharing_a_model_are_refused():
    a = Model()
    twin = Model()
    twin.components = a.components
    with pytest.raises(EymError, match="own model copy"):
        JobRunner([a, twin])


def test_concurrency_needs_as_many_copies_and_a_factory_serves_one():
    with pytest.raises(EymError, match="--concurrency 2 needs 2 model copies, got 1"):
        JobRunner([Model()], concurrency=2)
    assert JobRunner([Model(), Model()], concurrency=2).workers == 2
    lazy = JobRunner(lambda: Model(), concurrency=1)  # a factory (a class has an `edit` attribute)
    assert lazy.lazy and lazy.editors() == [] and not JobRunner([Model()]).lazy
    with pytest.raises(EymError, match="lazily loaded model serves one job"):
        JobRunner(lambda: Model(), concurrency=2)


def test_describe_editor_names_the_models_of_real_and_stand_in_editors(tiny_components):
    from eym.runner import describe_editor

    line, tiny = describe_editor(types.SimpleNamespace(components=tiny_components))
    assert tiny and "tiny random-weight" in line
    stand_in = types.SimpleNamespace(components=types.SimpleNamespace(model_id="m", controlnet_id="c", is_tiny=False))
    assert describe_editor(stand_in) == ("m + ControlNet c", False)
    assert describe_editor(object()) == ("unknown model", False)


def test_per_client_share_and_queue_size():
    runner = JobRunner([Model()], RunnerLimits(max_per_client=2, max_waiting=3))
    first, second = runner.ticket("1.2.3.4"), runner.ticket("1.2.3.4")
    with pytest.raises(EymError, match="already have 2 edit"):
        runner.ticket("1.2.3.4")
    other = runner.ticket("5.6.7.8")
    with pytest.raises(EymError, match="queue is full"):
        runner.ticket("9.9.9.9")
    runner.release(first)
    runner.ticket("1.2.3.4")  # a share frees when a ticket ends
    runner.release(second), runner.release(other)


def test_cancel_stops_the_running_job_at_its_next_step_and_frees_the_model():
    model = Model()
    runner = JobRunner([model], RunnerLimits())
    long, nxt = runner.ticket("a", session="s1"), runner.ticket("b", session="s2")
    out: dict[str, str] = {}
    t1 = threading.Thread(target=_run, args=(runner, long, "long", 100_000, out, 0.005))
    t2 = threading.Thread(target=_run, args=(runner, nxt, "next", 3, out))
    t1.start(), t2.start()
    while long.steps < 5:
        time.sleep(0.01)
    assert runner.cancel_session("s1") == 1
    t1.join(10), t2.join(10)
    assert out == {"long": "stopped: cancelled", "next": "next"}
    assert long.steps - long.steps_at_cancel <= 1, "the job must end at its next step"
    assert model.overlaps == 0 and model.log[1] == ("end", "long") and model.log[2] == ("start", "next")
    assert long.released_at <= next(t for t in runner.finished if t is nxt).started


def test_a_waiting_job_can_be_cancelled_and_a_closed_client_stops_its_job():
    model = Model()
    runner = JobRunner([model], RunnerLimits())
    gone = threading.Event()
    running = runner.ticket("a", session="s1", alive=lambda: not gone.is_set())
    waiting = runner.ticket("b", session="s2")
    out: dict[str, str] = {}
    t1 = threading.Thread(target=_run, args=(runner, running, "running", 100_000, out, 0.005))
    t1.start()
    while running.steps < 3:
        time.sleep(0.01)
    t2 = threading.Thread(target=_run, args=(runner, waiting, "waiting", 3, out))
    t2.start()
    time.sleep(0.3)
    runner.cancel_session("s2")  # cancelled while it waits: never gets the model
    t2.join(10)
    assert out == {"waiting": "stopped: cancelled"}
    gone.set()  # the requester disconnected
    t1.join(10)
    assert out["running"] == "stopped: client gone"
    assert [n for _, n in model.log] == ["running", "running"]


def test_time_limit_stops_a_job():
    runner = JobRunner([Model()], RunnerLimits(time_limit_s=0.2))
    ticket = runner.ticket("a")
    out: dict[str, str] = {}
    _run(runner, ticket, "slow", 100_000, out, 0.01)
    assert out == {"slow": "stopped: time limit"}


def test_processors_set_by_a_job_are_restored_after_it(tiny_components):
    """Per-request attention processors never outlive the job, even when it fails."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_components.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    editor = types.SimpleNamespace(components=types.SimpleNamespace(unet=unet))
    runner = JobRunner([editor])
    with pytest.raises(RuntimeError):
        with runner.slot(runner.ticket("a")):
            unet.set_attn_processor(AttnProcessor())
            raise RuntimeError("job failed")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_copies_line_names_their_memory(tiny_components):
    from eym.runner import check_copies_fit, model_bytes

    per_copy = model_bytes(tiny_components)
    assert per_copy == sum(p.numel() * p.element_size() for m in (tiny_components.unet, tiny_components.controlnet,
                                                                  tiny_components.vae, tiny_components.text_encoder)
                           for p in m.parameters())
    assert check_copies_fit(tiny_components, 2).startswith("2 model copies, ")


def test_work_cap_and_limits_from_the_environment(monkeypatch):
    config = types.SimpleNamespace(preprocess=types.SimpleNamespace(num_frames=8),
                                   tune=types.SimpleNamespace(steps1=300, steps2=300),
                                   infer=types.SimpleNamespace(ddim_steps=50))
    assert job_work(8, 300, 300, 50) == 8 * 700 == check_work(config, 10_000)
    with pytest.raises(EymError, match="over this server's limit"):
        check_work(config, 5_000)
    monkeypatch.setenv("EYM_JOB_TIME_LIMIT", "30m")
    monkeypatch.setenv("EYM_JOBS_PER_CLIENT", "3")
    limits = RunnerLimits.from_env(max_work=123)
    assert (limits.time_limit_s, limits.max_per_client, limits.max_work) == (1800.0, 3, 123)
    monkeypatch.setenv("EYM_JOBS_PER_CLIENT", "lots")
    with pytest.raises(EymError, match="EYM_JOBS_PER_CLIENT"):
        RunnerLimits.from_env()
    with pytest.raises(EymError, match="time_limit_s"):
        RunnerLimits(time_limit_s=float("nan"))


def test_client_key_takes_the_address_the_proxy_saw():
    assert client_key("10.0.0.1") == "10.0.0.1"
    assert client_key("10.0.0.1", "6.6.6.6, 1.2.3.4") == "1.2.3.4"  # the first entry can be forged
    assert client_key(None) == "unknown"


def test_two_real_model_copies_tune_at_once_and_equal_lone_runs(tiny_bundle, tmp_path):
    """Finding 3: two jobs tuning at the same time, each on its own copy, give the lone-run results."""
    import numpy as np

    from eym.config import from_dict
    from eym.editor import EditConfig, Editor
    from eym.prompts import derive_prompts
    from eym.models import load_components
    from eym.preprocess import clip_from_keypoints
    from eym.presets import preset_motion

    def editor(name: str) -> Editor:
        return Editor(load_components(str(tiny_bundle), device="cpu"), cache_dir=tmp_path / name, disable_progress=True)

    source = clip_from_keypoints(preset_motion("tai_chi", 4), 64, 8.0)
    jobs = {
        "a": (clip_from_keypoints(preset_motion("wave", 4), 64, 8.0), 0),
        "b": (clip_from_keypoints(preset_motion("squat", 4), 64, 8.0), 1),
    }
    prompts = derive_prompts("A person", "doing tai chi", "moving")
    config = lambda seed: from_dict(EditConfig, {  # noqa: E731
        "preprocess": {"num_frames": 4, "size": 64}, "tune": {"steps1": 3, "steps2": 3, "seed": seed},
        "infer": {"ddim_steps": 3}})
    runner = JobRunner([editor("w1"), editor("w2")], RunnerLimits(max_per_client=4))
    out: dict[str, object] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        reference, seed = jobs[name]
        ticket = runner.ticket("c")
        try:
            with runner.slot(ticket) as ed:
                out[name] = ed.edit(source, reference, prompts, config(seed), out_dir=tmp_path / f"out-{name}",
                                    callback=ticket.callback()).frames
        except BaseException as err:  # noqa: BLE001 - reported below with the job's name
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors
    spans = sorted((t.started, t.released_at) for t in runner.finished)
    assert spans[1][0] < spans[0][1], "the two jobs ran at the same time"
    lone = editor("lone")
    for name, (reference, seed) in jobs.items():
        alone = lone.edit(source, reference, prompts, config(seed), out_dir=tmp_path / f"lone-{name}").frames
        assert np.array_equal(out[name], alone), name

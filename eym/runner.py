"""The one owner of the models: jobs run one at a time per model copy, stop when asked, stay bounded.

A public app gets edits from many clients at once, and the UNet, ControlNet and VAE of an
:class:`~eym.editor.Editor` are mutable shared state (tuned tensors swapped in, attention
processors installed per request, autograd graphs during tuning). Two jobs on one copy corrupt
each other, so every path that touches the models goes through a :class:`JobRunner`:

- a job first takes a :class:`Ticket` (:meth:`JobRunner.ticket`): admission. A client (see
  :func:`client_key`) may hold at most ``max_per_client`` tickets, waiting or running, and the
  runner at most ``max_waiting``; more is refused at once with a message;
- :meth:`JobRunner.slot` waits first-come first-served for a free model copy, then yields its
  editor exclusively for the whole job. Attention processors are snapshotted on entry and
  restored in ``finally``, memory is freed, and only then is the copy handed to the next job;
- a ticket stops its job cooperatively: :meth:`Ticket.check` runs at every step (the editor's
  progress callback) and raises :class:`JobCancelled` when the ticket was cancelled (Cancel
  button, closed tab, disconnected API client), its time limit passed, or its ``alive`` probe
  says the requester is gone. Waiting in the queue is checked the same way;
- :func:`job_work` is the work a job asks for, capped by ``max_work`` (:func:`check_work`),
  so a request for 10^9 steps is refused before it starts.

With several model copies (``--concurrency N``) each worker owns its own copy; nothing is
shared between copies except the on-disk caches, which are safe across processes already.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from eym.errors import EymError

logger = logging.getLogger(__name__)

TIME_LIMIT_ENV = "EYM_JOB_TIME_LIMIT"  # seconds (or 30m, 2h) a job may run, waiting excluded
PER_CLIENT_ENV = "EYM_JOBS_PER_CLIENT"  # tickets (waiting + running) one client may hold
MAX_WORK_ENV = "EYM_MAX_WORK"  # cap on job_work(config) of one job
POLL_S = 0.2  # how often a waiting job re-checks its ticket


class JobCancelled(Exception):
    """A job stopped at a step boundary because it was cancelled, timed out or lost its client."""

    def __init__(self, reason: str = "cancelled"):
        super().__init__(reason)
        self.reason = reason  # "cancelled" | "time limit" | "client gone"


@dataclass(frozen=True)
class RunnerLimits:
    """Operator settings of the job runner (flags of app.py, or the environment)."""

    max_per_client: int = 2  # tickets (waiting + running) one client may hold at once
    max_waiting: int = 20  # tickets in the whole runner, waiting or running
    time_limit_s: float = 3600.0  # wall-clock seconds one job may run once it has the models
    max_work: int = 32 * (300 + 300 + 2 * 50)  # frames x (stage 1 + stage 2 + 2 x DDIM steps): the paper's settings at 32 frames

    def __post_init__(self) -> None:
        for name in ("max_per_client", "max_waiting", "max_work"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EymError(f"runner limit {name}={value!r} must be a whole number of at least 1")
        if not (isinstance(self.time_limit_s, (int, float)) and 0 < self.time_limit_s < float("inf")):
            raise EymError(f"runner limit time_limit_s={self.time_limit_s!r} must be a positive number of seconds")

    @classmethod
    def from_env(cls, **overrides: Any) -> "RunnerLimits":
        """Defaults, then ``$EYM_JOB_TIME_LIMIT``/``$EYM_JOBS_PER_CLIENT``/``$EYM_MAX_WORK``, then ``overrides`` (not None)."""
        from eym.jobs import parse_duration

        values: dict[str, Any] = {}
        if os.environ.get(TIME_LIMIT_ENV, "").strip():
            values["time_limit_s"] = parse_duration(os.environ[TIME_LIMIT_ENV])
        for env, name in ((PER_CLIENT_ENV, "max_per_client"), (MAX_WORK_ENV, "max_work")):
            raw = os.environ.get(env, "").strip()
            if raw:
                if not raw.isdigit():
                    raise EymError(f"{env}={raw!r} is not a whole number; set e.g. {env}=2")
                values[name] = int(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def job_work(num_frames: int, steps1: int, steps2: int, ddim_steps: int) -> int:
    """Work units of one edit: frames x (stage 1 + stage 2 + inversion + sampling steps).

    Every step of each phase runs the UNet over all frames once (sampling runs two branches,
    inversion one; counted alike), so this is proportional to the GPU time the job asks for.
    """
    return int(num_frames) * (int(steps1) + int(steps2) + 2 * int(ddim_steps))


def check_work(config, max_work: int) -> int:
    """``job_work`` of an ``EditConfig``; EymError (before any work) when over ``max_work``."""
    work = job_work(config.preprocess.num_frames, config.tune.steps1, config.tune.steps2, config.infer.ddim_steps)
    if work > max_work:
        raise EymError(
            f"this edit asks for {work:,} units of work (frames x (stage 1 + stage 2 + 2 x DDIM steps)), "
            f"over this server's limit of {max_work:,}; use fewer frames or steps"
        )
    return work


def client_key(host: str | None, forwarded_for: str | None = None) -> str:
    """Who a request comes from: the address the nearest proxy saw, else the socket's.

    Behind one reverse proxy (a Hugging Face Space) every socket comes from the proxy, which
    appends the real client to ``X-Forwarded-For``; the last entry is the one it wrote (earlier
    entries come from the client and can be forged).
    """
    if forwarded_for:
        last = forwarded_for.split(",")[-1].strip()
        if last:
            return last
    return host or "unknown"


@dataclass
class Ticket:
    """One job's place in the runner: admission, cancellation, time limit."""

    id: int  # increasing: the queue order
    client: str  # client_key of the requester (per-client share)
    session: str | None  # the page session that may cancel it (Cancel button, closed tab)
    alive: Callable[[], bool] | None = None  # False once the requester is gone (disconnected)
    time_limit_s: float = 3600.0
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    reason: str | None = None  # why it was cancelled
    started: float | None = None  # monotonic time it got the models
    stopped_at: float | None = None  # monotonic time cancel() was called
    released_at: float | None = None  # monotonic time it gave the models back
    steps: int = 0  # check() calls so far: one per step of the job
    steps_at_cancel: int | None = None  # steps when cancel() was called (the job then ends at its next)

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._cancelled.is_set():
            self.reason = reason
            self.stopped_at = time.monotonic()
            self.steps_at_cancel = self.steps
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise :class:`JobCancelled` if the job should stop now (called at every step)."""
        self.steps += 1
        if self.alive is not None and not self._cancelled.is_set():
            with contextlib.suppress(Exception):  # a failing probe must not kill a healthy job
                if not self.alive():
                    self.cancel("client gone")
        if self.started is not None and time.monotonic() - self.started > self.time_limit_s:
            self.cancel("time limit")
        if self._cancelled.is_set():
            raise JobCancelled(self.reason or "cancelled")

    def callback(self, inner: Callable[[str, int, int], None] | None = None) -> Callable[[str, int, int], None]:
        """A progress callback ``(stage, step, total)`` that checks the ticket, then calls ``inner``."""

        def report(stage: str, step: int, total: int) -> None:
            self.check()
            if inner is not None:
                inner(stage, step, total)

        return report


class JobRunner:
    """Runs jobs on model copies, one job per copy at a time, first come first served.

    Args:
        editors: one ``Editor`` per worker (each over its own components), or a zero-argument
            factory returning one (called once, on the first job: one worker).
        limits: :class:`RunnerLimits`.
        concurrency: jobs that may run at once, if the caller set it: needs that many editors.

    Usage::

        ticket = runner.ticket(client="1.2.3.4", session="abc")   # may raise EymError (share used)
        with runner.slot(ticket) as editor:                        # waits; JobCancelled if cancelled
            editor.edit(..., callback=ticket.callback(progress))
    """

    def __init__(self, editors: Sequence[Any] | Callable[[], Any], limits: RunnerLimits = RunnerLimits(), *,
                 concurrency: int | None = None):
        self.lazy = callable(editors) and not hasattr(editors, "edit")  # a factory, called on the first job
        if self.lazy:
            if concurrency not in (None, 1):
                raise EymError("a lazily loaded model serves one job at a time; use --concurrency 1")
            self._factory: Callable[[], Any] | None = editors
            self._free: list[Any] = []
            self.workers = 1
        else:
            editors = list(editors) if isinstance(editors, (list, tuple)) else [editors]
            if not editors:
                raise EymError("a job runner needs at least one model copy")
            if concurrency is not None and len(editors) != concurrency:
                raise EymError(f"--concurrency {concurrency} needs {concurrency} model copies, got {len(editors)}; "
                               "each job that runs at once needs its own")
            unets = {id(getattr(getattr(e, "components", None), "unet", e)) for e in editors}
            if len(unets) != len(editors):
                raise EymError("each worker needs its own model copy; two editors share one UNet")
            self._factory = None
            self._free = list(editors)
            self.workers = len(editors)
        self.limits = limits
        self._cond = threading.Condition()
        self._tickets: dict[int, Ticket] = {}  # waiting or running, by id (insertion = queue order)
        self._running: set[int] = set()
        self._ids = itertools.count(1)
        self.finished: collections.deque[Ticket] = collections.deque(maxlen=100)  # recent jobs that held a model

    # -- admission -----------------------------------------------------------------------------
    def ticket(self, client: str, session: str | None = None, *, alive: Callable[[], bool] | None = None) -> Ticket:
        """A place in the queue for ``client``; EymError when its share or the queue is full."""
        with self._cond:
            mine = sum(1 for t in self._tickets.values() if t.client == client)
            if mine >= self.limits.max_per_client:
                raise EymError(
                    f"you already have {mine} edit(s) queued or running (the limit per user is "
                    f"{self.limits.max_per_client}); wait for one to finish or cancel it"
                )
            if len(self._tickets) >= self.limits.max_waiting:
                raise EymError("the queue is full; try again in a few minutes")
            ticket = Ticket(id=next(self._ids), client=client, session=session, alive=alive,
                            time_limit_s=self.limits.time_limit_s)
            self._tickets[ticket.id] = ticket
            return ticket

    def release(self, ticket: Ticket) -> None:
        """Give a ticket back without running (idempotent; :meth:`slot` does it itself)."""
        with self._cond:
            self._tickets.pop(ticket.id, None)
            self._cond.notify_all()

    def cancel_session(self, session: str | None, reason: str = "cancelled") -> int:
        """Cancel every job of a page session (Cancel button, closed tab); how many there were."""
        if not session:
            return 0
        with self._cond:
            mine = [t for t in self._tickets.values() if t.session == session]
            for t in mine:
                t.cancel(reason)
            self._cond.notify_all()
            return len(mine)

    # -- running -------------------------------------------------------------------------------
    def position(self, ticket: Ticket) -> int:
        """Jobs ahead of ``ticket`` (running ones included); 0 when it runs."""
        with self._cond:
            if ticket.id in self._running:
                return 0
            return sum(1 for i in self._tickets if i < ticket.id)

    def snapshot(self) -> list[Ticket]:
        """The tickets waiting or running now, in queue order."""
        with self._cond:
            return list(self._tickets.values())

    @property
    def busy(self) -> int:
        """Jobs holding a model copy now."""
        with self._cond:
            return len(self._running)

    def _next_waiting(self) -> int | None:
        return next((i for i in self._tickets if i not in self._running), None)

    @contextlib.contextmanager
    def slot(self, ticket: Ticket, *, on_wait: Callable[[int], None] | None = None) -> Iterator[Any]:
        """Wait for a model copy (FIFO), hold it for the block, restore and free it after.

        Args:
            ticket: from :meth:`ticket`; released when the block ends, however it ends.
            on_wait: called with the number of jobs ahead while waiting (progress display).

        Raises:
            JobCancelled: the ticket was cancelled (or its requester left) while waiting or running.
        """
        editor = None
        try:
            with self._cond:
                while True:
                    ticket.check()
                    can_make = self._factory is not None and not self._running
                    if self._next_waiting() == ticket.id and (self._free or can_make):
                        break
                    if on_wait is not None:
                        ahead = sum(1 for i in self._tickets if i < ticket.id)
                        self._cond.release()
                        try:
                            on_wait(ahead)
                        finally:
                            self._cond.acquire()
                    self._cond.wait(POLL_S)
                self._running.add(ticket.id)
                if self._free:
                    editor = self._free.pop(0)
            if editor is None:
                editor = self._make()
            ticket.started = time.monotonic()
            with _restored_processors(editor):
                yield editor
        finally:
            if editor is not None:
                _free_memory(editor)
                if ticket.stopped_at is not None:
                    logger.info("job %d stopped (%s) %.2f s after the request", ticket.id, ticket.reason,
                                time.monotonic() - ticket.stopped_at)
            with self._cond:
                self._running.discard(ticket.id)
                self._tickets.pop(ticket.id, None)
                if editor is not None:
                    self._free.append(editor)
                    ticket.released_at = time.monotonic()
                    self.finished.append(ticket)
                self._cond.notify_all()

    def _make(self) -> Any:
        factory = self._factory
        if factory is None:  # not reached: slot() only calls this for a factory
            raise EymError("no model copy available")
        editor = factory()
        self._factory = None
        return editor

    def editors(self) -> list[Any]:
        """The model copies not in use now (for labels and tests)."""
        with self._cond:
            return list(self._free)


@contextlib.contextmanager
def _restored_processors(editor: Any) -> Iterator[None]:
    """Per-request attention processors (injection layers, weighting) never outlive the job."""
    unet = getattr(getattr(editor, "components", None), "unet", None)
    if unet is None or not hasattr(unet, "attn_processors"):
        yield
        return
    from eym.spacetime import attention_processors

    with attention_processors(unet, dict(unet.attn_processors)):
        yield


def request_client(request: Any) -> tuple[str, str | None]:
    """(client key for the per-client share, session hash) of a web request (a ``gr.Request``; None: local)."""
    if request is None:
        return "local", None
    headers = getattr(request, "headers", None) or {}
    host = getattr(getattr(request, "client", None), "host", None)
    return client_key(host, headers.get("x-forwarded-for")), getattr(request, "session_hash", None)


def _free_memory(editor: Any) -> None:
    """Drop a finished (or stopped) job's tensors before the next job gets the copy."""
    import gc

    for p in _parameters(editor):
        p.grad = None  # a tuning stopped mid-step leaves gradients behind
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a requirement
        pass


def _parameters(editor: Any):
    components = getattr(editor, "components", None)
    for name in ("unet", "controlnet", "vae", "text_encoder"):
        module = getattr(components, name, None)
        if module is not None and hasattr(module, "parameters"):
            yield from module.parameters()


def model_bytes(components: Any) -> int:
    """Bytes of the weights of one model copy (UNet, ControlNet, VAE, text encoder)."""
    total = 0
    for name in ("unet", "controlnet", "vae", "text_encoder"):
        module = getattr(components, name, None)
        if module is not None:
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


def check_copies_fit(components: Any, copies: int) -> str:
    """Refuse ``copies`` model copies that do not fit the device; a line saying the memory they take.

    One copy needs its weights plus working memory (tuning's activations and optimizer state);
    counted here as three times the weights, a floor measured on SD 1.5 at 512 px with gradient
    checkpointing.
    """
    per_copy = model_bytes(components)
    need = copies * per_copy * 3
    device = getattr(components, "device", None)
    line = f"{copies} model cop{'y' if copies == 1 else 'ies'}, {per_copy / 2**30:.2f} GB of weights each"
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        more = (copies - 1) * per_copy * 3  # the first copy is loaded already
        if more > free:
            raise EymError(
                f"--concurrency {copies} needs about {need / 2**30:.0f} GB of GPU memory, "
                f"{more / 2**30:.0f} GB more than the {free / 2**30:.0f} GB free; use a lower --concurrency"
            )
        line += f"; {free / 2**30:.1f} GB of GPU memory left"
    return line


def load_editors(model: str | None, controlnet: str | None, *, device: str | None, dtype: str, copies: int) -> list:
    """One :class:`~eym.editor.Editor` per worker, each over its own model copy (refused if they do not fit).

    SD 1.5 from the local cache, else (with no ``model``) the tiny random-weight model
    (:meth:`Editor.from_pretrained` with ``tiny_fallback``).
    """
    from eym.editor import Editor

    def load():
        return Editor.from_pretrained(model, controlnet, device=device, dtype=dtype, tiny_fallback=True)

    first = load()
    logger.info("job runner: %s", check_copies_fit(first.components, copies))
    return [first] + [load() for _ in range(copies - 1)]


def describe_editor(editor: Any) -> tuple[str, bool]:
    """(one line naming an editor's models, whether they are the tiny random-weight bundle)."""
    components = getattr(editor, "components", None)
    if components is None:
        return "unknown model", False
    try:
        from eym.models import describe

        line = describe(components)
    except (ImportError, AttributeError):  # a stand-in editor with a partial components object
        line = f"{components.model_id} + ControlNet {components.controlnet_id}"
    return line, bool(getattr(components, "is_tiny", False))

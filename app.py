"""Gradio app for Edit-Your-Motion: give a source video and a motion, get the source person moving.

The page walks a user through the method (docs/APP.md has screenshots and the API):

1. a source video, and a motion: a reference video, a built-in preset, or a gallery pair;
2. a preview of what preprocessing extracted (frames, skeletons, person masks, reference
   skeletons retargeted to the source person), refreshed when frames/start/stride/size change;
3. the subject and the two motions, composed into P_c, P_s, P_t (editable in "Advanced");
4. one queued job, with one progress bar naming the stage, and a Cancel button;
5. the edited video beside the source and the reference skeletons, with downloads.

This file only wires the page to the ``eym`` library: preprocessing, prompts and editing are
library calls, and the models are loaded once, in :func:`main`. ``import app`` loads no
weights and reads no argv; :func:`build_demo` builds the page without launching it, from an
``Editor`` (or anything with its ``edit`` method) or a factory that returns one.
"""

from __future__ import annotations

import os

# Set before gradio is imported: it reads this at import time and would otherwise phone home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from eym.env import allow_cpu_from_env  # noqa: E402
from eym.errors import EymError, without_paths  # noqa: E402
from eym.injection import DEFAULT_PRESET as DEFAULT_INJECTION, INJECTION_PRESETS  # noqa: E402
from eym.runner import JobCancelled, JobRunner, RunnerLimits, Ticket, client_key  # noqa: E402

logger = logging.getLogger("eym.app")

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"
DEFAULT_GALLERY = HERE / "examples"

# The stages the library reports through callback(stage, step, total), in the order they run,
# with the label the progress bar shows. One bar walks through all of them.
STAGES: dict[str, str] = {
    "preprocess": "Preprocessing",
    "stage1": "Stage 1 - learning the person (RC-Attn)",
    "stage2": "Stage 2 - learning motion and background",
    "inversion": "DDIM inversion",
    "sampling": "Two-branch sampling",
    "decode": "Decoding",
}
MOTION_REFERENCE = "Reference video"
MOTION_PRESET = "Preset motion"
SIZES = (64, 128, 256, 384, 512)  # multiples of 64 keep SD's 8x latent grid even at every level


@dataclass(frozen=True)
class AppOptions:
    """Per-process page options (never per request)."""

    outputs_dir: Path  # every job writes to outputs_dir/<job id>/; the only folder served to users
    gallery_dir: Path | None = None  # gallery folder or manifest; None hides the gallery
    max_upload_mb: int = 200  # uploads over this are refused by the browser and the server
    model_line: str | None = None  # "what is loaded", shown at the top; default from the editor
    is_tiny: bool | None = None  # tiny random-weight bundle: shows the "results are noise" banner
    defaults: dict[str, Any] = field(default_factory=dict)  # initial values of the controls


def default_controls(is_tiny: bool) -> dict[str, Any]:
    """Initial control values: the paper's settings, or seconds-long ones on the tiny bundle."""
    if is_tiny:
        # 128 px: mediapipe finds the person in the README's TaiChi-HD clips (at 64 px it misses some frames)
        return {"num_frames": 8, "size": 128, "stage1_steps": 2, "stage2_steps": 2, "ddim_steps": 3}
    return {"num_frames": 8, "size": 512, "stage1_steps": 300, "stage2_steps": 300, "ddim_steps": 50}


# ---------------------------------------------------------------------------------------------
# Library calls (the only place the app touches eym's preprocessing and editing APIs)
# ---------------------------------------------------------------------------------------------
def _preprocess_config(num_frames: int, start: int, stride: int, size: int):
    from eym.preprocess import PreprocessConfig
    from eym.validate import as_whole

    stride = as_whole(stride if stride is not None else 0, "stride")
    return PreprocessConfig(
        num_frames=as_whole(num_frames, "frames"), size=as_whole(size, "resolution"), start=as_whole(start, "start frame"),
        stride=stride or None,
    )


def load_source(path: str | Path, config, limits, *, callback=None):
    """Probe, then preprocess the source (frames, keypoints, skeletons, masks); cached by content."""
    from eym.preprocess import preprocess
    from eym.probe import check_upload

    check_upload(path, config, limits)
    return preprocess(path, config, with_masks=True, callback=callback)


def load_motion(mode: str, reference: str | None, preset: str | None, source, config, limits, *, retarget: bool,
                callback=None):
    """The motion that drives the edit (:func:`eym.motion.resolve_motion`): the uploaded reference
    video (probed first) or the chosen preset (fitted to the source once).

    Args:
        mode: :data:`MOTION_REFERENCE` or :data:`MOTION_PRESET`.
        reference: path of the reference video (reference mode).
        preset: preset name (preset mode).
        source: the source ``Clip``; presets take the source person's body.
        config: the ``PreprocessConfig`` the source used (same frame count and size).
        limits: ``ProbeLimits`` for the upload.
        retarget: fit the reference video's motion to the source person.
    Returns:
        An ``eym.motion.Motion``: the preview shows its skeletons, the edit uses them as they are.
    """
    from eym.motion import resolve_motion

    if mode == MOTION_PRESET:
        if not preset:
            raise EymError("choose a preset motion, or switch to 'Reference video'")
        return resolve_motion(source, preset=preset, config=config, retarget=retarget)
    if not reference:
        raise EymError("upload a reference video (the motion to copy), or switch to 'Preset motion'")
    # probed against the upload limits before any decoding
    return resolve_motion(source, reference=reference, config=config, retarget=retarget, limits=limits, callback=callback)


def preview_motion(mode: str, reference: str | None, preset: str | None, source, config, limits, *,
                   retarget: bool) -> np.ndarray:
    """The skeletons the preview shows for the motion: exactly those that will drive the edit."""
    return load_motion(mode, reference, preset, source, config, limits, retarget=retarget).skeletons


def compose_prompts(subject: str, source_motion: str, target_motion: str, p_c: str = "", p_s: str = "", p_t: str = ""):
    """P_c, P_s, P_t from the subject and the two motions; non-empty explicit prompts win."""
    from eym.editor import derive_prompts
    from eym.validate import check_prompt

    subject = check_prompt(subject, what="subject description")
    source_motion = check_prompt(source_motion, what="source motion")
    target_motion = check_prompt(target_motion, what="target motion")
    p_c = check_prompt(p_c, what="content prompt P_c")
    p_s = check_prompt(p_s, what="source prompt P_s")
    p_t = check_prompt(p_t, what="target prompt P_t")
    if not (subject or p_c or p_s):
        raise EymError("the subject description is empty: describe the person, e.g. 'A man in a white tai chi suit'")
    prompts = derive_prompts(subject or None, source_motion or None, target_motion or None,
                             content=p_c or None, source=p_s or None, target=p_t or None)
    if not prompts.target:
        raise EymError("the target motion is empty: say what the person should do, e.g. 'raising both arms'")
    return prompts


def edit_config(preprocess_config, *, seed: int, stage1_steps: int, stage2_steps: int, ddim_steps: int,
                inject_layers: str, inject_start, inject_end, retarget: bool):
    """The library's ``EditConfig`` from the page's settings (the seed is tuning's; inference is deterministic).

    ``inject_start``/``inject_end`` are denoising step indices (0 = the noisiest); an empty end
    means to the last step.
    """
    from eym.config import from_dict
    from eym.editor import EditConfig
    from eym.validate import as_whole

    seed = as_whole(seed, "seed")
    end = None if inject_end in (None, "") else as_whole(inject_end, "injection until step")
    injection = {"layers": str(inject_layers or "").strip() or "all",
                 "start_step": as_whole(inject_start or 0, "injection from step"), "end_step": end}
    return from_dict(EditConfig, {
        "preprocess": preprocess_config,
        "tune": {"steps1": as_whole(stage1_steps, "stage 1 steps"), "steps2": as_whole(stage2_steps, "stage 2 steps"),
                 "seed": seed},
        "infer": {"ddim_steps": as_whole(ddim_steps, "DDIM steps"), "injection": injection, "retarget": bool(retarget)},
    }, where="settings")


def gradio_upload_dir() -> Path:
    """Where Gradio keeps its copies of uploads (and of files it serves)."""
    import tempfile

    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def enforce_disk_cap(outputs_dir: Path) -> None:
    """Apply ``$EYM_DISK_CAP_GB`` to job folders, caches and Gradio's upload copies, before new work."""
    from eym.jobs import cap_from_env, default_roots, enforce_cap

    cap = cap_from_env()
    if cap is not None:
        uploads = gradio_upload_dir()
        enforce_cap(cap, default_roots(extra=[outputs_dir] + ([uploads] if uploads.is_dir() else [])))


def injection_fields(preset: str) -> tuple[str, int, int | None]:
    """The advanced injection fields (layers, from step, until step) a preset fills in."""
    from eym.injection import injection_preset

    schedule = injection_preset(preset)
    if schedule.start or schedule.end != 1.0:
        raise EymError(f"the injection preset {preset!r} is given in fractions; the page takes step numbers")
    return schedule.layers, int(schedule.start_step or 0), schedule.end_step


def write_video(frames: np.ndarray, path: Path, fps: float) -> Path:
    from eym.video import write_mp4

    return write_mp4(frames, path, fps)


# ---------------------------------------------------------------------------------------------
# Preview images
# ---------------------------------------------------------------------------------------------
def strip(frames: np.ndarray, *, height: int = 112, per_row: int = 8) -> np.ndarray:
    """Frames side by side (wrapping every ``per_row``), scaled to ``height`` px, 4 px gaps.

    Args:
        frames: (F, H, W, 3) uint8.
    Returns:
        (rows * (height + 4) - 4, cols * (w + 4) - 4, 3) uint8 image.
    """
    import cv2

    num, h, w = frames.shape[:3]
    width = max(1, round(w * height / h))
    cols = min(num, per_row)
    rows = -(-num // per_row)
    gap = 4
    out = np.full((rows * (height + gap) - gap, cols * (width + gap) - gap, 3), 255, np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, per_row)
        tile = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
        out[r * (height + gap):r * (height + gap) + height, c * (width + gap):c * (width + gap) + width] = tile
    return out


def mask_overlay(frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The person in full colour, the background dimmed and tinted: what stage 1 trains on.

    Args:
        frames: (F, H, W, 3) uint8.  masks: (F, H, W) bool.
    """
    tint = np.array([40, 40, 70], np.float32)
    dim = frames.astype(np.float32) * 0.25 + tint
    m = masks[..., None]
    return np.where(m, frames, dim).clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------
class ProgressRelay:
    """Turns the library's callback(stage, step, total) into one gr.Progress bar; stops a stopped job.

    ``ticket.check()`` runs first at every step, so Cancel, a closed tab or the time limit stop
    the job at its next step (:class:`eym.runner.Ticket`). The bar is weighted by each stage's
    expected time (``eym.estimate.WeightedProgress``) and its label shows the elapsed time and an ETA.
    """

    def __init__(self, progress: Callable[..., Any] | None, ticket: Ticket | None,
                 expected: dict[str, float] | None = None):
        from eym.estimate import STAGE_ORDER, WeightedProgress

        self.progress = progress
        self.ticket = ticket
        self.seen: list[str] = []  # stages in the order they reported (for the status line)
        self.plan = WeightedProgress(expected if expected is not None else {s: 1.0 for s in STAGE_ORDER})

    def __call__(self, stage: str, step: int, total: int) -> None:
        from eym.estimate import format_seconds

        if self.ticket is not None:
            self.ticket.check()
        if stage not in self.seen:
            self.seen.append(stage)
        fraction, elapsed, left = self.plan.update(stage, step, total)
        label = STAGES.get(stage, stage)
        clock = f"{format_seconds(elapsed)} elapsed" + (f", about {format_seconds(left)} left" if left is not None else "")
        if self.progress is not None:
            self.progress(fraction, desc=f"{label} ({step}/{max(int(total), 1)}) - {clock}")


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------
def _is_factory(obj: Any) -> bool:
    """A zero-argument factory, as opposed to an editor (editors have ``edit`` and are not callable)."""
    return callable(obj) and not hasattr(obj, "edit")


def _model_info(editor: Any) -> tuple[str, bool]:
    components = getattr(editor, "components", None)
    if components is None:
        return "unknown model", False
    try:
        from eym.models import describe

        line = describe(components)
    except (ImportError, AttributeError):
        line = f"{components.model_id} + ControlNet {components.controlnet_id}"
    return line, bool(getattr(components, "is_tiny", False))


def _device_banner(device: Any, allow_cpu: bool) -> str:
    """The "no usable GPU" banner for a real model on the CPU (empty when there is a GPU)."""
    if device is None or device.gpu:
        return ""
    why = device.reason or "this machine has no CUDA GPU"
    consequence = ("It runs on the CPU, as its operator chose: an edit takes hours, not minutes."
                   if allow_cpu else "Edits are switched off here, because on the CPU one would take hours.")
    return ('<div id="device-banner" class="eym-banner eym-banner-warn">'
            f"<b>No usable GPU.</b> {_escape(why[0].upper() + why[1:])}. {consequence} "
            "If you run this app: start it on a GPU with a torch build that matches the driver "
            "(docs/DEPLOY.md), or allow the CPU explicitly with <code>--allow-cpu</code> "
            "(<code>EYM_ALLOW_CPU=1</code>).</div>")


def _header_html(model_line: str, is_tiny: bool, device_banner: str = "") -> str:
    banner = device_banner
    if is_tiny:
        banner = (
            '<div id="tiny-banner" class="eym-banner">'
            "<b>Demo mode: tiny random-weight model.</b> No Stable Diffusion weights were found, so "
            "this app runs a tiny random model: everything works end to end, but the edited videos "
            "are noise. To edit for real, start it with <code>--model</code> (a hub id, a diffusers "
            "folder or a .safetensors file of SD 1.5) and <code>--controlnet</code> (openpose), or "
            "set <code>EYM_MODEL</code> / <code>EYM_CONTROLNET</code>.</div>"
        ) + banner
    return (
        '<div class="eym-header"><h1>Edit-Your-Motion</h1>'
        "<p>One-shot video motion editing: keep the person and the background of the source video, "
        "give them the motion of a reference video.</p>"
        f'<p id="model-line" class="eym-model">Model: {_escape(model_line)}</p>'
        f"{banner}</div>"
    )


def _escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def _prompts_html(prompts) -> str:
    # HTML with escaped text, not Markdown: a prompt like ![x](https://...) stays text, no fetch.
    return (
        f"<b>P_c</b> (content): {_escape(prompts.content)}<br>"
        f"<b>P_s</b> (source): {_escape(prompts.source)}<br>"
        f"<b>P_t</b> (target): {_escape(prompts.target)}"
    )


def _page_error(err: BaseException) -> gr.Error:
    """A library error as the page shows it: one line, no server paths."""
    return gr.Error(without_paths(str(err)), print_exception=False)


def cancel_message(reason: str) -> str:
    """What the page says when a job stopped early, and what was kept."""
    why = {"time limit": "It ran past this server's time limit per job.",
           "client gone": "The page that started it was closed."}.get(reason, "You cancelled it.")
    return (f"Cancelled at the next step. {why} Nothing of this edit was saved; kept for the next run: the "
            "preprocessed clips, tuned weights finished earlier, and a checksummed tuning checkpoint if "
            "tuning had reached one (the next edit of this source resumes from it).")


def _event_alive() -> Callable[[], bool]:
    """A probe that turns False once Gradio has dropped the current event (client disconnected or cancelled)."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)

    def alive() -> bool:
        queue = getattr(blocks, "_queue", None)
        if event_id is None or queue is None:  # called outside Gradio's queue (tests, scripts)
            return True
        for events in getattr(queue, "active_jobs", None) or []:
            for event in events or []:
                if getattr(event, "_id", None) == event_id:
                    return bool(getattr(event, "alive", True))  # False once its client disconnected
        return False  # no longer running as far as Gradio knows: its task was cancelled

    return alive


def _request_client(request: gr.Request | None) -> tuple[str, str | None]:
    """(client key for the per-client share, session hash) of a request."""
    if request is None:
        return "local", None
    headers = getattr(request, "headers", None) or {}
    host = getattr(getattr(request, "client", None), "host", None)
    return client_key(host, headers.get("x-forwarded-for")), getattr(request, "session_hash", None)


def build_demo(editor_or_factory: Any, *, gallery_dir: str | Path | None = DEFAULT_GALLERY,
               outputs_dir: str | Path = "outputs", max_upload_mb: int = 200,
               model_line: str | None = None, is_tiny: bool | None = None, concurrency: int = 1,
               limits: RunnerLimits | None = None, device: Any = None, allow_cpu: bool = False) -> gr.Blocks:
    """Build the page (no launch, no model loading).

    Args:
        editor_or_factory: an ``eym.editor.Editor`` (or any object with its ``edit`` method and a
            ``components`` attribute), a list of them (one per worker, each over its own model
            copy), or a zero-argument factory returning one; a factory is called once, on the
            first request that needs it. Every edit runs through one ``eym.runner.JobRunner``
            that owns them.
        gallery_dir: gallery folder or manifest (see ``eym.gallery``); ``None`` hides the gallery.
        outputs_dir: folder for job outputs; the only folder the server lets users download from.
        max_upload_mb: upload limit, shown next to the upload boxes.
        model_line: the loaded model, shown at the top (default: from the editor's components).
        is_tiny: show the tiny-model banner (default: from the editor's components).
        concurrency: edits that may run at once; needs that many editors (model copies).
        limits: the runner's operator limits (time per job, share per client, work per job);
            default ``RunnerLimits.from_env()``.
        device: ``eym.env.DeviceReport`` of this machine (default: detected); with a real model
            and no usable GPU the page says so, and edits are refused unless ``allow_cpu``.
        allow_cpu: the operator chose to run a real model on the CPU (``--allow-cpu``).
    Returns:
        The ``gr.Blocks``; call ``.queue(...)`` and ``.launch(...)`` on it (``main`` does).
    Raises:
        EymError: the gallery manifest is invalid.
    """
    from eym.gallery import load_gallery
    from eym.probe import ProbeLimits

    upload_limits = ProbeLimits(max_bytes=int(max_upload_mb) * 2**20)
    editors = editor_or_factory if isinstance(editor_or_factory, (list, tuple)) else [editor_or_factory]
    if len(editors) != concurrency and not _is_factory(editor_or_factory):
        raise EymError(f"--concurrency {concurrency} needs {concurrency} model copies, got {len(editors)}; "
                       "each job that runs at once needs its own")
    if _is_factory(editor_or_factory) and concurrency != 1:
        raise EymError("a lazily loaded model serves one job at a time; use --concurrency 1")
    runner = JobRunner(editor_or_factory if _is_factory(editor_or_factory) else list(editors),
                       limits if limits is not None else RunnerLimits.from_env())
    editor_or_factory = editors[0] if not _is_factory(editor_or_factory) else editor_or_factory
    outputs_dir = Path(outputs_dir).resolve()
    gallery = load_gallery(gallery_dir, skip_missing=True) if gallery_dir is not None else None
    staged, examples = _stage_gallery(gallery, outputs_dir, editor_or_factory)
    entries = [e for e in gallery.entries if e.name in staged] if gallery is not None else []
    start_hint = ("Upload a source video (or click a demo pair above) to see what the method will use." if entries
                  else "Upload a source video to see what the method will use.")
    if model_line is None or is_tiny is None:
        # Only describe an editor that exists; a factory is not called just to label the page.
        line, tiny = ("loading on first use", False) if _is_factory(editor_or_factory) else _model_info(editor_or_factory)
        model_line = model_line if model_line is not None else line
        is_tiny = is_tiny if is_tiny is not None else tiny
    defaults = default_controls(bool(is_tiny))
    if device is None and not is_tiny:
        from eym.env import detect_device

        device = detect_device()
    device_html = "" if is_tiny else _device_banner(device, allow_cpu)
    figures = _step_figures(device, bool(is_tiny))

    # -- handlers (each gets everything it needs as arguments) ---------------------------------
    def on_preview(source, mode, reference, preset, num_frames, start, stride, size, retarget):
        if not source:
            return None, None, None, None, start_hint
        try:
            config = _preprocess_config(num_frames, start, stride, size)
            enforce_disk_cap(outputs_dir)
            src = load_source(source, config, upload_limits)
            ref_strip, ref_note = None, ""
            if (mode == MOTION_PRESET and preset) or (mode == MOTION_REFERENCE and reference):
                ref_strip = strip(preview_motion(mode, reference, preset, src, config, upload_limits, retarget=bool(retarget)))
                ref_note = f"; reference skeletons: {'preset ' + preset if mode == MOTION_PRESET else 'retargeted to the source' if retarget else 'as detected'}"
        except EymError as err:
            raise _page_error(err) from None
        missing = f"; no person found in frame(s) {', '.join(map(str, src.missing))} (filled in)" if src.missing else ""
        from eym.preprocess import clip_span

        info = f"{len(src.frames)} frames, {clip_span(src)}, {config.size}x{config.size}{missing}{ref_note}"
        return strip(src.frames), strip(src.skeletons), strip(mask_overlay(src.frames, src.masks)), ref_strip, info

    def on_prompts(subject, source_motion, target_motion, p_c, p_s, p_t):
        try:
            return _prompts_html(compose_prompts(subject, source_motion, target_motion, p_c, p_s, p_t))
        except EymError as err:
            return f"<i>{_escape(str(err))}</i>"

    def on_gallery(name):
        """Load a gallery entry by name: clips, motion, prompts, sampling hints, and its finished example if any."""
        keep = [gr.update()] * 13
        if not name or name not in staged:
            if name:
                raise gr.Error(f"this page has no gallery entry called {name!r}", print_exception=False)
            return keep
        entry, files = gallery.get(name), staged[name]
        example = examples.get(name)
        shown = (str(example.video), str(example.side_by_side) if example.side_by_side else None,
                 f"Finished example of this pair, made earlier with {_escape(example.model)}. Press "
                 "**Edit motion** to run it yourself.") if example else (gr.update(), gr.update(), gr.update())
        return (
            str(files.source),
            MOTION_PRESET if entry.preset else MOTION_REFERENCE,
            str(files.reference) if files.reference else None,
            entry.preset or gr.update(),
            entry.subject or entry.content_prompt or "",
            entry.source_motion or "",
            entry.target_motion or "",
            entry.num_frames or gr.update(),
            entry.start if entry.start is not None else gr.update(),
            entry.stride if entry.stride is not None else gr.update(),
            *shown,
        )

    def on_gallery_select(evt: gr.SelectData):
        return on_gallery(entries[evt.index].name if 0 <= int(evt.index) < len(entries) else None)

    def on_push(files, repo, token):
        from eym.hub import push_tuned_zip

        archive = next((f for f in (files or []) if str(f).endswith(TUNED_ZIP)), None)
        if archive is None:
            raise gr.Error("run an edit first: the tuned weights of its source are pushed", print_exception=False)
        try:
            url = push_tuned_zip(archive, repo, token)
        except EymError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return f"Pushed to [{_escape(url)}]({_escape(url)})."

    def run_estimate(num_frames, size, stage1_steps, stage2_steps, ddim_steps):
        from eym.estimate import estimate

        if figures is None:
            return None
        return estimate(num_frames=int(num_frames or 1), size=int(size or 512), steps1=int(stage1_steps or 0),
                        steps2=int(stage2_steps or 0), ddim_steps=int(ddim_steps or 1), figures=figures)

    def on_estimate(num_frames, size, stage1_steps, stage2_steps, ddim_steps):
        try:
            found = run_estimate(num_frames, size, stage1_steps, stage2_steps, ddim_steps)
        except (TypeError, ValueError, OverflowError):  # a half-typed or out-of-range field: the edit says why
            return "**Estimate:** fill in frames, size and steps with whole numbers to see what a run costs."
        if found is None:
            return ("**Estimate:** no measured figures for this model on a CPU; expect hours per edit. "
                    "A second edit of the same source skips tuning.")
        return (f"**Estimate:** {_escape(found.describe())}. A second edit of the same source skips tuning "
                f"(about {_format_seconds(found.total - found.stages['stage1'] - found.stages['stage2'])}).")

    def on_cancel(request: gr.Request):
        _client, session = _request_client(request)
        stopped = runner.cancel_session(session, "cancelled")
        return cancel_message("cancelled") if stopped else "Nothing to cancel: no edit of yours is queued or running."

    def on_unload(request: gr.Request):
        _client, session = _request_client(request)
        runner.cancel_session(session, "client gone")  # a closed tab gives its GPU time back

    def on_edit(source, mode, reference, preset, num_frames, start, stride, size, retarget,
                subject, source_motion, target_motion, p_c, p_s, p_t,
                seed, stage1_steps, stage2_steps, ddim_steps, inject_layers, inject_start, inject_end,
                request: gr.Request, progress=gr.Progress()):
        from eym.runner import check_work

        client, session = _request_client(request)
        try:
            ticket = runner.ticket(client, session, alive=_event_alive())  # admission: per-client share
        except EymError as err:
            raise _page_error(err) from None
        try:
            # 1. settings and prompts: bounded and checked before any work
            if not source:
                raise EymError("upload a source video first" + (" (or click a demo pair in the gallery)" if entries else ""))
            prompts = compose_prompts(subject, source_motion, target_motion, p_c, p_s, p_t)
            config = _preprocess_config(num_frames, start, stride, size)
            settings = edit_config(config, seed=seed, stage1_steps=stage1_steps, stage2_steps=stage2_steps,
                                   ddim_steps=ddim_steps, inject_layers=inject_layers, inject_start=inject_start,
                                   inject_end=inject_end, retarget=retarget)
            check_work(settings, runner.limits.max_work)
            planned = run_estimate(config.num_frames, config.size, settings.tune.steps1, settings.tune.steps2,
                                   settings.infer.ddim_steps)  # from the checked settings: weights the progress bar
            relay = ProgressRelay(progress, ticket, planned.stages if planned is not None else None)
            # 2. uploads checked, then preprocessed (no model needed: done while waiting)
            enforce_disk_cap(outputs_dir)
            relay("preprocess", 0, 2)
            src = load_source(source, config, upload_limits)
            relay("preprocess", 1, 2)
            # resolved once, with the edit's retargeting: the editor uses these skeletons as they are
            ref = load_motion(mode, reference, preset, src, config, upload_limits, retarget=settings.infer.retarget)
            relay("preprocess", 2, 2)
            # 3. the models, for this job alone, until it ends or stops
            waiting = lambda ahead: progress(0.0, desc=f"Waiting for the GPU: {ahead} edit(s) ahead")  # noqa: E731
            with runner.slot(ticket, on_wait=waiting) as editor:
                from eym.env import check_cpu_choice

                components = getattr(editor, "components", None)
                check_cpu_choice(is_tiny=bool(getattr(components, "is_tiny", True)), allow_cpu=allow_cpu, report=device,
                                 device=getattr(getattr(components, "device", None), "type", "cpu"))
                return run_job(editor, src, ref, prompts, settings, outputs_dir, relay)
        except JobCancelled as stop:
            raise gr.Error(cancel_message(stop.reason), print_exception=False) from None
        except EymError as err:
            raise _page_error(err) from None
        finally:
            runner.release(ticket)

    # -- layout --------------------------------------------------------------------------------
    # Gradio's copies of uploads and outputs: swept every 10 min, gone after an hour (the disk cap
    # counts them meanwhile, see enforce_disk_cap).
    with gr.Blocks(title="Edit-Your-Motion", delete_cache=(600, 3600)) as demo:
        gr.HTML(_header_html(model_line, bool(is_tiny), device_html))
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                gr.Markdown("### 1. Source video: the person to keep")
                source = gr.Video(label=f"Source video (up to {max_upload_mb} MB)", sources=["upload"],
                                  elem_id="source-video", height=260)
            with gr.Column(scale=1):
                gr.Markdown("### 2. Motion: what they should do")
                mode = gr.Radio([MOTION_REFERENCE, MOTION_PRESET], value=MOTION_REFERENCE, label="Motion from",
                                elem_id="motion-mode")
                reference = gr.Video(label=f"Reference video (up to {max_upload_mb} MB)", sources=["upload"],
                                     elem_id="reference-video", height=200)
                preset = gr.Dropdown(_preset_choices(), label="Preset motion", visible=False, elem_id="preset")
                retarget = gr.Checkbox(value=True, label="Retarget the reference skeleton to the source person's body",
                                       elem_id="retarget")
        gallery_name = gr.Textbox(visible=False, elem_id="gallery-name")  # the /gallery API's input
        if entries:
            gallery_view = gr.Gallery(
                [(str(staged[e.name].thumbnail), f"{e.title}" + (" - result ready" if e.name in examples else ""))
                 for e in entries],
                label="Or start from a demo pair (TaiChi-HD and more): one click loads it", columns=min(len(entries), 5),
                height="auto", allow_preview=False, object_fit="contain", elem_id="gallery", elem_classes=["eym-gallery"])
        else:
            gallery_view = None

        with gr.Accordion("Frames", open=True):
            with gr.Row():
                num_frames = gr.Slider(2, 32, value=defaults["num_frames"], step=1, label="Frames", elem_id="num-frames")
                start = gr.Number(value=0, precision=0, minimum=0, label="Start frame", elem_id="start")
                stride = gr.Number(value=0, precision=0, minimum=0, label="Stride (0 = auto: consecutive frames playing near 12 fps)", elem_id="stride")
                size = gr.Dropdown(list(SIZES), value=defaults["size"], label="Resolution (px)", elem_id="size")
        gr.Markdown("### What the method will use", elem_classes=["eym-section"])
        preview_info = gr.Markdown(start_hint, elem_id="preview-info")
        with gr.Row():
            src_frames = gr.Image(label="Source frames", interactive=False, elem_id="src-frames", height=140)
            src_skeletons = gr.Image(label="Source skeletons", interactive=False, elem_id="src-skeletons", height=140)
        with gr.Row():
            src_masks = gr.Image(label="Person masks (stage 1 trains on the person only)", interactive=False,
                                 elem_id="src-masks", height=140)
            ref_skeletons = gr.Image(label="Target skeletons (drive the edit)", interactive=False,
                                     elem_id="ref-skeletons", height=140)

        gr.Markdown("### 3. Prompts", elem_classes=["eym-section"])
        with gr.Row():
            subject = gr.Textbox(label="Subject (P_c)", placeholder="A man in a white tai chi suit", elem_id="subject")
            source_motion = gr.Textbox(label="Source motion", placeholder="is practicing tai chi in a garden",
                                       elem_id="source-motion")
            target_motion = gr.Textbox(label="Target motion", placeholder="is raising both arms in a garden",
                                       elem_id="target-motion")
        prompts_view = gr.HTML(elem_id="prompts-view")
        with gr.Accordion("Advanced: prompts and settings", open=False):
            with gr.Row():
                p_c = gr.Textbox(label="P_c override", elem_id="p-c")
                p_s = gr.Textbox(label="P_s override", elem_id="p-s")
                p_t = gr.Textbox(label="P_t override", elem_id="p-t")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Tuning seed", elem_id="seed")
                stage1_steps = gr.Number(value=defaults["stage1_steps"], precision=0, minimum=0,
                                         label="Stage 1 steps", elem_id="stage1-steps")
                stage2_steps = gr.Number(value=defaults["stage2_steps"], precision=0, minimum=0,
                                         label="Stage 2 steps", elem_id="stage2-steps")
                ddim_steps = gr.Number(value=defaults["ddim_steps"], precision=0, minimum=1,
                                       label="DDIM steps", elem_id="ddim-steps")
            with gr.Row():
                injection = gr.Dropdown(list(INJECTION_PRESETS), value=DEFAULT_INJECTION, elem_id="injection",
                                        label="Key/value injection (where the edit copies the source's appearance)")
                inject_layers = gr.Textbox(value="all", label="Injection layers: all, none, down, mid, up, 7-15, up_blocks.3.*",
                                           elem_id="inject-layers")
                inject_start = gr.Number(value=0, precision=0, minimum=0, label="Injection from step (0 = the noisiest)",
                                         elem_id="inject-start")
                inject_end = gr.Number(value=None, precision=0, minimum=0, label="Injection until step (empty: the last)",
                                       elem_id="inject-end")

        with gr.Row():
            run = gr.Button("Edit motion", variant="primary", elem_id="run", scale=3)
            cancel = gr.Button("Cancel", variant="stop", elem_id="cancel", scale=1)
        estimate_view = gr.Markdown(on_estimate(defaults["num_frames"], defaults["size"], defaults["stage1_steps"],
                                                defaults["stage2_steps"], defaults["ddim_steps"]), elem_id="estimate")
        status = gr.Markdown(elem_id="status")
        gr.Markdown("### 4. Result", elem_classes=["eym-section"])
        with gr.Row():
            out_source = gr.Video(label="Source (as processed)", interactive=False, elem_id="out-source", height=300)
            out_edited = gr.Video(label="Edited", interactive=False, elem_id="out-edited", autoplay=True,
                                  loop=True, height=300)
            out_skeleton = gr.Video(label="Target skeletons", interactive=False, elem_id="out-skeleton", height=300)
        with gr.Row():
            out_side = gr.Video(label="Side by side: source | target skeletons | edited", interactive=False,
                                elem_id="out-side", height=240)
            downloads = gr.File(label="Downloads (the tuned weights too: tuned_weights.zip)", interactive=False,
                                file_count="multiple", elem_id="downloads")
        with gr.Accordion("Keep the tuned weights on the Hugging Face Hub", open=False):
            gr.Markdown("Pushes this edit's tuned tensors (safetensors + manifest) to a model repository of yours, "
                        "created private if it does not exist. The token is used for this push only and not stored.")
            with gr.Row():
                push_repo = gr.Textbox(label="Repository", placeholder="your-name/my-tuned-source", elem_id="push-repo")
                push_token = gr.Textbox(label="Hugging Face token (write access)", type="password", elem_id="push-token")
                push = gr.Button("Push to the Hub", elem_id="push")
            push_status = gr.Markdown(elem_id="push-status")

        # -- events --------------------------------------------------------------------------------
        mode.change(lambda m: (gr.update(visible=m == MOTION_REFERENCE), gr.update(visible=m == MOTION_PRESET),
                               gr.update(visible=m == MOTION_REFERENCE)),
                    mode, [reference, preset, retarget], queue=False, api_visibility="private")
        preview_inputs = [source, mode, reference, preset, num_frames, start, stride, size, retarget]
        preview_outputs = [src_frames, src_skeletons, src_masks, ref_skeletons, preview_info]
        preview_kw = dict(fn=on_preview, inputs=preview_inputs, outputs=preview_outputs, concurrency_id="preview",
                          concurrency_limit=2, trigger_mode="always_last", show_progress="minimal")
        gr.on([source.change, reference.change, preset.change, mode.change, num_frames.release, start.submit,
               stride.submit, size.change, retarget.change], api_name="preview", **preview_kw)
        prompt_inputs = [subject, source_motion, target_motion, p_c, p_s, p_t]
        gr.on([c.change for c in prompt_inputs], fn=on_prompts, inputs=prompt_inputs, outputs=prompts_view,
              queue=False, api_name="prompts", show_progress="hidden")
        gallery_outputs = [source, mode, reference, preset, subject, source_motion, target_motion,
                           num_frames, start, stride, out_edited, out_side, status]
        gallery_name.submit(on_gallery, gallery_name, gallery_outputs, api_name="gallery", concurrency_id="preview")
        if gallery_view is not None:
            gallery_view.select(on_gallery_select, None, gallery_outputs, api_visibility="private",
                                concurrency_id="preview")
        injection.change(injection_fields, injection, [inject_layers, inject_start, inject_end], queue=False,
                         api_visibility="private")
        estimate_inputs = [num_frames, size, stage1_steps, stage2_steps, ddim_steps]
        gr.on([c.change for c in estimate_inputs], fn=on_estimate, inputs=estimate_inputs, outputs=estimate_view,
              queue=False, api_visibility="private", show_progress="hidden")
        edit_inputs = preview_inputs + prompt_inputs + [seed, stage1_steps, stage2_steps, ddim_steps, inject_layers,
                                                          inject_start, inject_end]
        edit_event = run.click(on_edit, edit_inputs, [out_edited, out_source, out_skeleton, out_side, downloads, status],
                               api_name="edit", concurrency_id="gpu", concurrency_limit=runner.limits.max_waiting,
                               show_progress_on=[out_edited, status])
        # Edits wait in the runner (FIFO, per-client share), not in Gradio's queue: so every
        # waiting edit can be cancelled and counted, and the models have one owner.
        cancel.click(on_cancel, None, status, cancels=[edit_event], queue=False, api_visibility="private")
        push.click(on_push, [downloads, push_repo, push_token], push_status, api_visibility="private")
        demo.unload(on_unload)
    demo.eym_runner = runner  # for health checks and tests
    return demo


def _step_figures(device: Any, is_tiny: bool):
    """The per-step figures for this page's estimates (``eym.estimate``), from the detected device."""
    from eym.estimate import figures_for

    on_gpu = bool(device is not None and device.gpu)
    return figures_for(device.name if on_gpu else "CPU", is_tiny=is_tiny, on_gpu=on_gpu)


def _format_seconds(seconds: float) -> str:
    from eym.estimate import format_seconds

    return format_seconds(seconds)


def _preset_choices() -> list[tuple[str, str]]:
    from eym.presets import PRESETS

    return [(f"{name} - {description}", name) for name, description in PRESETS.items()]


def _stage_gallery(gallery, outputs_dir: Path, editor_or_factory: Any) -> tuple[dict, dict]:
    """Stage every gallery pair under outputs/_gallery (the only folder served) and find their
    finished examples for this model (copied under outputs/_examples). Pairs that fail are left out."""
    from eym.gallery import find_example, stage_entry

    staged: dict[str, Any] = {}
    examples: dict[str, Any] = {}
    if gallery is None:
        return staged, examples
    components = None if _is_factory(editor_or_factory) else getattr(editor_or_factory, "components", None)
    model = getattr(components, "model_id", None)
    for entry in gallery.entries:
        try:
            staged[entry.name] = stage_entry(entry, outputs_dir / "_gallery")
        except (EymError, OSError) as err:
            logger.warning("gallery: leaving out %s: %s", entry.name, err)
            continue
        example = find_example(entry.name, model) if isinstance(model, str) else None
        if example is not None:
            served = outputs_dir / "_examples" / entry.name
            served.mkdir(parents=True, exist_ok=True)
            copies = {}
            for kind in ("video", "side_by_side"):
                path = getattr(example, kind)
                if path is not None:
                    copies[kind] = served / path.name
                    shutil.copyfile(path, copies[kind])
            examples[entry.name] = type(example)(entry=example.entry, video=copies["video"],
                                                 side_by_side=copies.get("side_by_side"), model=example.model)
    logger.info("gallery: %d pairs on the page, %d with a finished example", len(staged), len(examples))
    return staged, examples


TUNED_ZIP = "tuned_weights.zip"


def run_job(editor, source, reference, prompts, settings, outputs_dir: Path, relay: ProgressRelay):
    """Run one edit in a fresh, locked job folder (``eym.jobs``); a failed or cancelled job's
    folder is removed, so only complete results stay in the outputs folder.

    Returns:
        The values of the result components: edited, source, skeleton, side-by-side videos,
        the download list and the status line.
    """
    from eym.jobs import new_job, oom_guard

    job = new_job(outputs_dir)
    started = time.perf_counter()
    try:
        with oom_guard(frames=len(source.frames), size=source.frames.shape[1]):
            result = editor.edit(source, reference, prompts, settings, out_dir=job.folder, callback=relay)
        source_mp4 = write_video(source.frames, job.path("source.mp4"), source.fps)
        skeletons = result.skeletons  # the skeletons the editing branch was conditioned on
        skeleton_mp4 = write_video(skeletons, job.path("target_skeletons.mp4"), source.fps)
    except BaseException:
        job.finish(ok=False)
        shutil.rmtree(job.folder, ignore_errors=True)
        raise
    downloads = [str(result.video), str(result.side_by_side)]
    tuned = editor.find_tuned(source, prompts, settings.tune) if hasattr(editor, "find_tuned") else None
    if tuned is not None:  # the tuned tensors leave the server as a download (and, from the page, to the Hub)
        from eym.hub import pack_tuned

        downloads.append(str(pack_tuned(tuned.path, job.path(TUNED_ZIP))))
    job.finish(ok=True)
    seconds = time.perf_counter() - started
    reused = ("Reused the tuned weights for this source (no tuning this time)." if result.reused_tuning else
              "Tuned on this source; the next edit of it (another reference or target prompt) reuses these weights.")
    status = f"Done in {seconds:.1f} s. {reused} Saved to `{job.id}`."
    logger.info("job %s done in %.1f s (reused tuning: %s)", job.id, seconds, result.reused_tuning)
    video, side = str(result.video), str(result.side_by_side)
    return video, str(source_mp4), str(skeleton_mp4), side, downloads, status


# ---------------------------------------------------------------------------------------------
# Health check and launch
# ---------------------------------------------------------------------------------------------
def health_routes(demo: gr.Blocks) -> list:
    """``GET /healthz`` -> ``{"status": "ok", "queue": <events waiting>}`` (for load balancers)."""
    from fastapi.routing import APIRoute

    def healthz() -> dict[str, Any]:
        queue = getattr(demo, "_queue", None)
        return {"status": "ok", "queue": len(queue) if queue is not None else 0}

    return [APIRoute("/healthz", healthz, methods=["GET"])]


def load_css() -> str:
    return (ASSETS / "app.css").read_text(encoding="utf-8") if (ASSETS / "app.css").is_file() else ""


def theme() -> gr.themes.Base:
    # System fonts: the stock themes fetch Google Fonts, an outbound call from every visitor.
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate",
                          font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


def default_bind() -> tuple[str, int]:
    """Host and port from the platform: Spaces and containers set ``GRADIO_SERVER_NAME`` /
    ``GRADIO_SERVER_PORT``; ``EYM_HOST`` / ``EYM_PORT`` next; loopback and 7860 otherwise."""
    host = os.environ.get("GRADIO_SERVER_NAME") or os.environ.get("EYM_HOST") or "127.0.0.1"
    port = os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("EYM_PORT") or "7860"
    try:
        return host, int(port)
    except ValueError:
        raise EymError(f"the port {port!r} (GRADIO_SERVER_PORT / EYM_PORT) is not a number; set it to e.g. 7860") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="Edit-Your-Motion web app (Gradio)")
    try:
        host, port = default_bind()
    except EymError as err:
        parser.error(str(err))
    parser.add_argument("--host", default=host,
                        help="interface to listen on; default $GRADIO_SERVER_NAME (set by Spaces and containers), "
                             "else $EYM_HOST, else 127.0.0.1")
    parser.add_argument("--port", type=int, default=port,
                        help="default $GRADIO_SERVER_PORT, else $EYM_PORT, else 7860")
    parser.add_argument("--allow-cpu", action="store_true", default=allow_cpu_from_env(),
                        help="let a real model run on the CPU when no usable GPU is found (hours per edit; "
                             "or $EYM_ALLOW_CPU=1); without it such edits are refused")
    parser.add_argument("--queue-size", type=int, default=20, help="jobs that may wait in the queue (default 20)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="edits running at once, each on its own model copy (default 1: one GPU job); "
                             "refused when the copies do not fit the GPU")
    parser.add_argument("--job-time-limit", default=os.environ.get("EYM_JOB_TIME_LIMIT") or None,
                        help="wall-clock limit of one edit once it runs, e.g. 45m or 2h; stopped at the next step "
                             "after it (default 1h, or $EYM_JOB_TIME_LIMIT)")
    parser.add_argument("--jobs-per-client", type=int, default=None,
                        help="edits one client (address) may have queued or running (default 2, or $EYM_JOBS_PER_CLIENT)")
    parser.add_argument("--max-work", type=int, default=None,
                        help="cap on frames x (stage 1 + stage 2 + 2 x DDIM steps) of one edit "
                             "(default 22400: the paper's settings at 32 frames; or $EYM_MAX_WORK)")
    parser.add_argument("--max-upload-mb", type=int, default=200, help="largest upload in MB (default 200)")
    parser.add_argument("--disk-cap-gb", type=float, default=None,
                        help="cap on job folders + caches; least recently used evicted first, running jobs never "
                             "(default: $EYM_DISK_CAP_GB, else no cap)")
    parser.add_argument("--outputs", default=os.environ.get("EYM_OUTPUTS", "outputs"),
                        help="folder for job outputs, the only folder the server serves (default ./outputs)")
    parser.add_argument("--gallery", default=str(DEFAULT_GALLERY),
                        help="gallery folder or manifest (default examples/); 'none' hides the gallery")
    parser.add_argument("--gallery-mirror", default=os.environ.get("EYM_GALLERY_MIRROR"),
                        help="local folder holding the gallery's clips, used instead of downloading them from their "
                             "pinned origins (offline; or $EYM_GALLERY_MIRROR)")
    parser.add_argument("--model", default=os.environ.get("EYM_MODEL"),
                        help="SD 1.5: hub id, diffusers folder, .safetensors file or 'tiny' (or $EYM_MODEL); "
                             "default: SD 1.5 from the local cache, else the tiny demo model")
    parser.add_argument("--controlnet", default=os.environ.get("EYM_CONTROLNET"),
                        help="openpose ControlNet: hub id, folder or file (or $EYM_CONTROLNET)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                        help="weight dtype (default: bfloat16 on CUDA cards that have it, else float16; float32 on CPU)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    for name in ("queue_size", "concurrency", "max_upload_mb", "jobs_per_client", "max_work"):
        if getattr(args, name) is None:
            continue
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1-65535, got {args.port}")
    if args.disk_cap_gb is not None and not args.disk_cap_gb > 0:
        parser.error(f"--disk-cap-gb must be positive, got {args.disk_cap_gb}")
    return args


def runner_limits(args: argparse.Namespace) -> RunnerLimits:
    """The runner's operator limits from the flags, the environment and the defaults."""
    from eym.jobs import parse_duration

    limit = parse_duration(args.job_time_limit) if args.job_time_limit else None
    return RunnerLimits.from_env(time_limit_s=limit, max_per_client=args.jobs_per_client, max_work=args.max_work,
                                 max_waiting=args.queue_size)


def load_editors(args: argparse.Namespace) -> list:
    """One Editor per ``--concurrency`` worker, each over its own model copy (refused if they do not fit)."""
    from eym.runner import check_copies_fit

    first = load_editor(args.model, args.controlnet, args.device, args.dtype)
    logger.info("job runner: %s", check_copies_fit(first.components, args.concurrency))
    return [first] + [load_editor(args.model, args.controlnet, args.device, args.dtype) for _ in range(args.concurrency - 1)]


def load_editor(model: str | None, controlnet: str | None, device: str | None, dtype: str):
    """SD 1.5 from the local cache, else (with no ``--model``) the tiny random-weight model: the page says so."""
    from eym.editor import Editor

    return Editor.from_pretrained(model, controlnet, device=device, dtype=dtype, tiny_fallback=True)


def launch_demo(demo: gr.Blocks, *, host: str, port: int, outputs_dir: Path, max_upload_mb: int,
                queue_size: int = 20, concurrency: int = 1, block: bool = True, quiet: bool = False):
    """Queue and serve a built page: no share link, uploads capped, only ``outputs_dir`` served.

    Returns:
        What ``gr.Blocks.launch`` returns; with ``block=False`` the server runs in a thread
        (tests) and ``demo.close()`` stops it.
    """
    demo.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=f"{max_upload_mb}mb",
        allowed_paths=[str(outputs_dir)],
        app_kwargs={"routes": health_routes(demo)},
        theme=theme(),
        css=load_css(),
        footer_links=["api"],
        ssr_mode=False,
        mcp_server=False,
        show_error=True,
        quiet=quiet,
        prevent_thread_lock=not block,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, load the models once, build the page, queue it and serve it."""
    args = parse_args(argv)
    if args.disk_cap_gb is not None:  # eym.jobs.new_job reads the cap from the environment
        os.environ["EYM_DISK_CAP_GB"] = str(args.disk_cap_gb)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    outputs = Path(args.outputs).expanduser().resolve()
    try:
        outputs.mkdir(parents=True, exist_ok=True)
        from eym.cache import clean_stale_tmp

        from eym.jobs import remove_crashed

        clean_stale_tmp(outputs)  # leftovers of jobs killed mid-way in an earlier run
        remove_crashed([outputs])
        limits = runner_limits(args)
        editors = load_editors(args)
        gallery = None if args.gallery.lower() == "none" else args.gallery
        if gallery is not None:  # first start: the clips into the verified clip store (later starts find them)
            from eym.gallery import fetch_clips

            report = fetch_clips(gallery, mirror=args.gallery_mirror, timeout=15)
            if report.fetched or report.failed:
                logger.info("gallery clips: %d fetched, %d already there, %d missing", len(report.fetched),
                            len(report.present), len(report.failed))
        from eym.env import detect_device

        device = detect_device()
        components = editors[0].components
        if not components.is_tiny and components.device.type == "cpu":
            logger.warning("no usable GPU: %s; %s", device.reason or "no CUDA GPU found",
                           "running the real model on the CPU as chosen (--allow-cpu): hours per edit" if args.allow_cpu
                           else "edits are refused: run on a GPU with a torch build matching the driver "
                                "(docs/DEPLOY.md) or pass --allow-cpu / EYM_ALLOW_CPU=1")
        demo = build_demo(editors, gallery_dir=gallery, outputs_dir=outputs, max_upload_mb=args.max_upload_mb,
                          concurrency=args.concurrency, limits=limits, device=device, allow_cpu=args.allow_cpu)
    except EymError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    launch_demo(demo, host=args.host, port=args.port, outputs_dir=outputs, max_upload_mb=args.max_upload_mb,
                queue_size=args.queue_size, concurrency=args.concurrency)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

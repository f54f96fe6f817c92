"""An edit request: the values of a page's controls, checked into the library's settings, and served.

A web page hands over raw values (a Gradio number can be NaN, a textbox anything). This module
turns them into the library's inputs, with the error messages a user reads:

- :class:`PreviewRequest` (the source, the motion and the frames controls) and
  :class:`EditRequest` (those, plus the prompts and the advanced settings) hold the values,
  in the order of the page's inputs;
- their methods give the ``PreprocessConfig``, the prompts, the ``EditConfig`` and the
  motion choice for :func:`eym.motion.resolve_motion`;
- :func:`preview` is what the page shows before an edit (exactly the skeletons that will drive
  it), :func:`serve_edit` runs one edit through a :class:`~eym.runner.JobRunner` slot.

Every upload is probed once (:func:`eym.probe.check_upload`, results cached by file), against
the page's upload limits, which preprocessing then uses too. Nothing here imports gradio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from eym.errors import EymError
from eym.prompts import compose_prompts  # noqa: F401  the request's prompts (the app and the CLI share it)

MOTION_REFERENCE = "Reference video"  # the motion comes from a reference video
MOTION_PRESET = "Preset motion"  # the motion is a built-in preset, fitted to the source person
SIZES = (64, 128, 256, 384, 512)  # multiples of 64 keep SD's 8x latent grid even at every level


def default_controls(is_tiny: bool) -> dict[str, Any]:
    """Initial control values: the paper's settings, or seconds-long ones on the tiny bundle."""
    if is_tiny:
        # 128 px: mediapipe finds the person in the README's TaiChi-HD clips (at 64 px it misses some frames)
        return {"num_frames": 8, "size": 128, "stage1_steps": 2, "stage2_steps": 2, "ddim_steps": 3}
    return {"num_frames": 8, "size": 512, "stage1_steps": 300, "stage2_steps": 300, "ddim_steps": 50}


def preset_choices() -> list[tuple[str, str]]:
    """(label, name) of every preset motion, for a dropdown."""
    from eym.presets import PRESETS

    return [(f"{name} - {description}", name) for name, description in PRESETS.items()]


def injection_choices() -> tuple[list[str], str]:
    """The injection presets' names and the default one, for a dropdown."""
    from eym.injection import DEFAULT_PRESET, INJECTION_PRESETS

    return list(INJECTION_PRESETS), DEFAULT_PRESET


def injection_fields(preset: str) -> tuple[str, int, int | None]:
    """The advanced injection fields (layers, from step, until step) a preset fills in."""
    from eym.injection import injection_preset

    schedule = injection_preset(preset)
    if schedule.start or schedule.end != 1.0:
        raise EymError(f"the injection preset {preset!r} is given in fractions; the page takes step numbers")
    return schedule.layers, int(schedule.start_step or 0), schedule.end_step


def preprocess_config(num_frames: Any, start: Any, stride: Any, size: Any):
    """The ``PreprocessConfig`` of the frames controls (stride 0 or empty: automatic)."""
    from eym.preprocess import PreprocessConfig
    from eym.validate import as_whole

    stride = as_whole(stride if stride is not None else 0, "stride")
    return PreprocessConfig(num_frames=as_whole(num_frames, "frames"), size=as_whole(size, "resolution"),
                            start=as_whole(start, "start frame"), stride=stride or None)


def edit_config(preprocess_config, *, seed: Any, stage1_steps: Any, stage2_steps: Any, ddim_steps: Any,
                inject_layers: Any, inject_start: Any, inject_end: Any, retarget: bool):
    """The library's ``EditConfig`` from the page's settings (the seed is tuning's; inference is deterministic).

    ``inject_start``/``inject_end`` are denoising step indices (0 = the noisiest); an empty end
    means to the last step.
    """
    from eym.config import from_dict
    from eym.editor import EditConfig
    from eym.validate import as_whole

    end = None if inject_end in (None, "") else as_whole(inject_end, "injection until step")
    injection = {"layers": str(inject_layers or "").strip() or "all",
                 "start_step": as_whole(inject_start or 0, "injection from step"), "end_step": end}
    return from_dict(EditConfig, {
        "preprocess": preprocess_config,
        "tune": {"steps1": as_whole(stage1_steps, "stage 1 steps"), "steps2": as_whole(stage2_steps, "stage 2 steps"),
                 "seed": as_whole(seed, "seed")},
        "infer": {"ddim_steps": as_whole(ddim_steps, "DDIM steps"), "injection": injection, "retarget": bool(retarget)},
    }, where="settings")


# ---------------------------------------------------------------------------------------------
# The requests
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreviewRequest:
    """What the preview reads: the uploads, the motion choice and the frames controls (raw page values)."""

    source: str | None = None  # path of the uploaded source video
    mode: str = MOTION_REFERENCE  # MOTION_REFERENCE or MOTION_PRESET
    reference: str | None = None  # path of the uploaded reference video (reference mode)
    preset: str | None = None  # preset motion name (preset mode)
    num_frames: Any = 8  # frames to sample
    start: Any = 0  # first frame
    stride: Any = 0  # frame step; 0 or empty: automatic
    size: Any = 512  # side of the square frames, px
    retarget: bool = True  # fit the reference skeleton to the source person's body

    def preprocess_config(self):
        return preprocess_config(self.num_frames, self.start, self.stride, self.size)

    def has_motion(self) -> bool:
        """The chosen kind of motion was given (a preset picked, or a reference uploaded)."""
        return bool(self.preset) if self.mode == MOTION_PRESET else bool(self.reference)

    def motion(self) -> dict[str, str]:
        """The keyword :func:`eym.motion.resolve_motion` takes for the chosen motion: ``reference`` or ``preset``."""
        if self.mode == MOTION_PRESET:
            if not self.preset:
                raise EymError("choose a preset motion, or switch to 'Reference video'")
            return {"preset": self.preset}
        if not self.reference:
            raise EymError("upload a reference video (the motion to copy), or switch to 'Preset motion'")
        return {"reference": self.reference}


@dataclass(frozen=True)
class EditRequest(PreviewRequest):
    """Everything an edit reads: the preview's values, the prompts and the advanced settings."""

    subject: str = ""  # the person, e.g. "A man in a white tai chi suit" (P_c)
    source_motion: str = ""  # what they do in the source
    target_motion: str = ""  # what they should do
    p_c: str = ""  # explicit prompts: non-empty ones win over the composed ones
    p_s: str = ""
    p_t: str = ""
    seed: Any = 0  # tuning seed
    stage1_steps: Any = 300
    stage2_steps: Any = 300
    ddim_steps: Any = 50
    inject_layers: Any = "all"  # key/value injection layers
    inject_start: Any = 0  # injection from this denoising step (0 = the noisiest)
    inject_end: Any = None  # until this step; empty: the last

    def prompts(self):
        return compose_prompts(self.subject, self.source_motion, self.target_motion, content=self.p_c, source=self.p_s, target=self.p_t)

    def settings(self, preprocess=None):
        """The ``EditConfig`` (frames from :meth:`preprocess_config` unless given)."""
        return edit_config(preprocess if preprocess is not None else self.preprocess_config(), seed=self.seed,
                           stage1_steps=self.stage1_steps, stage2_steps=self.stage2_steps, ddim_steps=self.ddim_steps,
                           inject_layers=self.inject_layers, inject_start=self.inject_start,
                           inject_end=self.inject_end, retarget=self.retarget)


def from_gallery(entry, staged) -> dict[str, Any]:
    """The request values a gallery pair sets (an ``eym.gallery.GalleryEntry`` and its ``StagedEntry``);
    the controls it leaves out keep their values."""
    values = {
        "source": str(staged.source),
        "mode": MOTION_PRESET if entry.preset else MOTION_REFERENCE,
        "reference": str(staged.reference) if staged.reference else None,  # None clears the reference
        "subject": entry.subject or entry.content_prompt or "",
        "source_motion": entry.source_motion or "",
        "target_motion": entry.target_motion or "",
    }
    optional = {"preset": entry.preset or None, "num_frames": entry.num_frames or None, "start": entry.start,
                "stride": entry.stride}
    return values | {k: v for k, v in optional.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Serving them
# ---------------------------------------------------------------------------------------------
def load_source(path: str | Path, config, limits):
    """The source upload, probed against ``limits`` (once per file), then preprocessed with masks (cached by content)."""
    from eym.preprocess import preprocess
    from eym.probe import check_upload

    check_upload(path, config, limits)
    return preprocess(path, config, with_masks=True, probe_limits=limits)


@dataclass(frozen=True)
class Preview:
    """What the method will use, as images: thumbnail strips of the frames, skeletons, masks and motion."""

    frames: np.ndarray  # (h, w, 3) uint8 strips
    skeletons: np.ndarray
    masks: np.ndarray  # the person in colour, the background dimmed: what stage 1 trains on
    motion: np.ndarray | None  # the skeletons that will drive the edit; None before a motion is given
    info: str  # e.g. "8 frames, frames 0-7 of 237, 0.53 s, plays at 15 fps, 64x64"


def preview(req: PreviewRequest, limits, *, disk_roots: Sequence[str | Path] = ()) -> Preview:
    """Preprocess the source and resolve the motion as an edit of ``req`` would, and show them.

    Args:
        req: the page's values.  limits: ``ProbeLimits`` of the uploads.
        disk_roots: folders the disk cap applies to besides the caches (:func:`eym.jobs.enforce_disk_cap`).
    """
    from eym.jobs import enforce_disk_cap
    from eym.motion import resolve_motion
    from eym.preprocess import clip_span
    from eym.video import mask_overlay, thumbnail_strip

    config = req.preprocess_config()
    enforce_disk_cap(*disk_roots)
    src = load_source(req.source, config, limits)
    motion, note = None, ""
    if req.has_motion():
        motion = resolve_motion(src, **req.motion(), config=config, retarget=bool(req.retarget), limits=limits)
        note = ("; reference skeletons: " + (f"preset {req.preset}" if req.mode == MOTION_PRESET else
                                             "retargeted to the source" if req.retarget else "as detected"))
    missing = f"; no person found in frame(s) {', '.join(map(str, src.missing))} (filled in)" if src.missing else ""

    def strip(frames: np.ndarray) -> np.ndarray:
        return thumbnail_strip(frames, height=112, per_row=8)

    return Preview(frames=strip(src.frames), skeletons=strip(src.skeletons),
                   masks=strip(mask_overlay(src.frames, src.masks)),
                   motion=strip(motion.skeletons) if motion is not None else None,
                   info=f"{len(src.frames)} frames, {clip_span(src)}, {config.size}x{config.size}{missing}{note}")


def step_figures(device: Any, is_tiny: bool):
    """The measured per-step figures (``eym.estimate``) for a ``DeviceReport``; None where none were measured."""
    from eym.estimate import figures_for

    on_gpu = bool(device is not None and device.gpu)
    return figures_for(device.name if on_gpu else "CPU", is_tiny=is_tiny, on_gpu=on_gpu)


def cost(figures, num_frames: Any, size: Any, stage1_steps: Any, stage2_steps: Any, ddim_steps: Any):
    """The expected time of an edit with these settings (``eym.estimate.Estimate``), or None without figures.

    Raises:
        TypeError, ValueError, OverflowError: a value that is not a number.
    """
    from eym.estimate import estimate

    if figures is None:
        return None
    return estimate(num_frames=int(num_frames or 1), size=int(size or 512), steps1=int(stage1_steps or 0),
                    steps2=int(stage2_steps or 0), ddim_steps=int(ddim_steps or 1), figures=figures)


def cost_line(found) -> str:
    """An ``Estimate`` in words, with what a second edit of the same source costs (tuning is reused)."""
    from eym.estimate import format_seconds

    again = found.total - found.stages["stage1"] - found.stages["stage2"]
    return f"{found.describe()}. A second edit of the same source skips tuning (about {format_seconds(again)})"


def serve_edit(req: EditRequest, *, runner, ticket, limits, outputs_dir: str | Path, figures=None,
               allow_cpu: bool = False, device: Any = None, progress: Callable[..., Any] | None = None,
               disk_roots: Sequence[str | Path] = ()):
    """Run one edit of ``req``: checks first, preprocessing while waiting, then the models for this job alone.

    Args:
        req: the page's values.
        runner: the :class:`~eym.runner.JobRunner` that owns the models.
        ticket: this job's admitted :class:`~eym.runner.Ticket` (the caller releases it).
        limits: ``ProbeLimits`` of the uploads.
        outputs_dir: the job folder goes here (:func:`eym.jobs.run_edit`).
        figures: per-step figures (:func:`step_figures`), to weight the progress bar.
        allow_cpu: the operator chose to run a real model on the CPU.  device: ``DeviceReport``.
        progress: ``progress(fraction, desc=...)``, one bar over all stages.
        disk_roots: folders the disk cap applies to besides the caches.
    Returns:
        The :class:`~eym.jobs.EditJob`.
    Raises:
        EymError: refused settings, uploads or device, with the user's words.
        JobCancelled: the ticket was cancelled, timed out or lost its client.
    """
    from eym.env import check_cpu_choice
    from eym.jobs import enforce_disk_cap, run_edit
    from eym.motion import resolve_motion
    from eym.progress import StageBar
    from eym.runner import check_work

    # 1. settings and prompts: bounded and checked before any work
    prompts = req.prompts()
    config = req.preprocess_config()
    settings = req.settings(config)
    check_work(settings, runner.limits.max_work)
    planned = cost(figures, config.num_frames, config.size, settings.tune.steps1, settings.tune.steps2,
                   settings.infer.ddim_steps)  # from the checked settings: weights the progress bar
    bar = ticket.callback(StageBar(progress, planned.stages if planned is not None else None))
    # 2. uploads checked, then preprocessed (no model needed: done while waiting)
    enforce_disk_cap(*disk_roots)
    bar("preprocess", 0, 2)
    src = load_source(req.source, config, limits)
    bar("preprocess", 1, 2)
    # resolved once, with the edit's retargeting: the editor uses these skeletons as they are
    motion = resolve_motion(src, **req.motion(), config=config, retarget=settings.infer.retarget, limits=limits)
    bar("preprocess", 2, 2)

    # 3. the models, for this job alone, until it ends or stops
    def waiting(ahead: int) -> None:
        if progress is not None:
            progress(0.0, desc=f"Waiting for the GPU: {ahead} edit(s) ahead")

    with runner.slot(ticket, on_wait=waiting) as editor:
        components = getattr(editor, "components", None)
        check_cpu_choice(is_tiny=bool(getattr(components, "is_tiny", True)), allow_cpu=allow_cpu, report=device,
                         device=getattr(getattr(components, "device", None), "type", "cpu"))
        return run_edit(editor, src, motion, prompts, settings, outputs_dir, callback=bar)


def upload_limits(max_upload_mb: int):
    """The ``ProbeLimits`` of a page's uploads: the public defaults with the page's size cap."""
    from eym.probe import ProbeLimits

    return ProbeLimits(max_bytes=int(max_upload_mb) * 2**20)

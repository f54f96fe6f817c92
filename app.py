"""Gradio app for Edit-Your-Motion: give a source video and a motion, get the source person moving.

The page (docs/APP.md: screenshots and the HTTP API) takes a source video and a motion (a
reference video, a preset or a gallery pair), previews what preprocessing extracted, composes
P_c, P_s, P_t, runs one queued job with one progress bar and a Cancel button, and shows the
edited video beside the source and the target skeletons, with downloads.

This file only lays out the page and wires it to ``eym``: the handlers are module functions of a
:class:`Page` (what every request shares) and a typed request (``eym.request.PreviewRequest`` /
``EditRequest``), so tests call them without a browser. ``import app`` loads no weights and reads
no argv; :func:`build_demo` builds the page without launching it; :func:`main` loads the models once.
"""

from __future__ import annotations

import os

# Set before gradio is imported: it reads this at import time and would otherwise phone home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse  # noqa: E402
import html  # noqa: E402
import inspect  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, fields  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import gradio as gr  # noqa: E402

from eym import request as rq  # noqa: E402
from eym import server  # noqa: E402
from eym.env import detect_device  # noqa: E402
from eym.errors import EymError, without_paths  # noqa: E402
from eym.gallery import PageGallery, stage_gallery  # noqa: E402
from eym.hub import TUNED_ZIP, push_tuned_zip  # noqa: E402
from eym.request import MOTION_PRESET, MOTION_REFERENCE, EditRequest, PreviewRequest  # noqa: E402
from eym.runner import JobCancelled, JobRunner, RunnerLimits, describe_editor, request_client  # noqa: E402

logger = logging.getLogger("eym.app")

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"
DEFAULT_GALLERY = HERE / "examples"


def compose_prompts(subject: str, source_motion: str, target_motion: str, p_c: str = "", p_s: str = "", p_t: str = ""):
    """P_c, P_s, P_t from the subject and the two motions; non-empty explicit prompts win."""
    return rq.compose_prompts(subject, source_motion, target_motion, content=p_c, source=p_s, target=p_t)


@dataclass
class Page:
    """What every request of one page shares (per process, never per request)."""

    runner: JobRunner  # owns the models; every edit takes a ticket and a slot
    limits: Any  # ProbeLimits of the uploads
    outputs_dir: Path  # every job writes to outputs_dir/<job id>/; the only folder served to users
    gallery: PageGallery  # staged demo pairs and their finished examples
    figures: Any = None  # per-step figures of this device (estimates, progress weights); None: none measured
    device: Any = None  # eym.env.DeviceReport
    allow_cpu: bool = False  # the operator chose to run a real model on the CPU

    @property
    def start_hint(self) -> str:
        return ("Upload a source video (or click a demo pair above) to see what the method will use."
                if self.gallery.entries else "Upload a source video to see what the method will use.")


# ---------------------------------------------------------------------------------------------
# The page's words
# ---------------------------------------------------------------------------------------------
def _escape(text: str) -> str:
    return html.escape(text, quote=True)


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


def done_message(job) -> str:
    """The status line of a finished edit (an ``eym.jobs.EditJob``)."""
    reused = ("Reused the tuned weights for this source (no tuning this time)." if job.reused_tuning else
              "Tuned on this source; the next edit of it (another reference or target prompt) reuses these weights.")
    return f"Done in {job.seconds:.1f} s. {reused} Saved to `{job.id}`."


# ---------------------------------------------------------------------------------------------
# Gradio's side of a request
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Handlers: module functions of (page, request values); build_demo binds the page
# ---------------------------------------------------------------------------------------------
def on_preview(page: Page, req: PreviewRequest) -> tuple:
    """The preview images and info line: exactly what an edit of ``req`` would use."""
    if not req.source:
        return None, None, None, None, page.start_hint
    try:
        shown = rq.preview(req, page.limits, disk_roots=server.disk_roots(page.outputs_dir))
    except EymError as err:
        raise _page_error(err) from None
    return shown.frames, shown.skeletons, shown.masks, shown.motion, shown.info


def on_prompts(subject: str, source_motion: str, target_motion: str, p_c: str, p_s: str, p_t: str) -> str:
    try:
        return _prompts_html(compose_prompts(subject, source_motion, target_motion, p_c, p_s, p_t))
    except EymError as err:
        return f"<i>{_escape(str(err))}</i>"


GALLERY_FIELDS = ("source", "mode", "reference", "preset", "subject", "source_motion", "target_motion", "num_frames",
                  "start", "stride")  # the controls a gallery pair fills, then the edited video, side by side, status


def on_gallery(page: Page, name: str | None) -> tuple:
    """Load a gallery entry by name: clips, motion, prompts, sampling hints, and its finished example if any."""
    if not name or name not in page.gallery.staged:
        if name:
            raise gr.Error(f"this page has no gallery entry called {name!r}", print_exception=False)
        return (gr.update(),) * (len(GALLERY_FIELDS) + 3)
    values = rq.from_gallery(page.gallery.gallery.get(name), page.gallery.staged[name])
    example = page.gallery.examples.get(name)
    shown = (str(example.video), str(example.side_by_side) if example.side_by_side else None,
             f"Finished example of this pair, made earlier with {_escape(example.model)}. Press "
             "**Edit motion** to run it yourself.") if example else (gr.update(), gr.update(), gr.update())
    return (*(values[k] if k in values else gr.update() for k in GALLERY_FIELDS), *shown)


def on_gallery_select(page: Page, evt: gr.SelectData) -> tuple:
    entries = page.gallery.entries
    return on_gallery(page, entries[evt.index].name if 0 <= int(evt.index) < len(entries) else None)


def on_push(files, repo: str, token: str) -> str:
    archive = next((f for f in (files or []) if str(f).endswith(TUNED_ZIP)), None)
    if archive is None:
        raise gr.Error("run an edit first: the tuned weights of its source are pushed", print_exception=False)
    try:
        url = push_tuned_zip(archive, repo, token)
    except EymError as err:
        raise gr.Error(str(err), print_exception=False) from None
    return f"Pushed to [{_escape(url)}]({_escape(url)})."


def on_estimate(page: Page, num_frames, size, stage1_steps, stage2_steps, ddim_steps) -> str:
    try:
        found = rq.cost(page.figures, num_frames, size, stage1_steps, stage2_steps, ddim_steps)
    except (TypeError, ValueError, OverflowError):  # a half-typed or out-of-range field: the edit says why
        return "**Estimate:** fill in frames, size and steps with whole numbers to see what a run costs."
    if found is None:
        return ("**Estimate:** no measured figures for this model on a CPU; expect hours per edit. "
                "A second edit of the same source skips tuning.")
    return f"**Estimate:** {_escape(rq.cost_line(found))}."


def on_cancel(page: Page, request: gr.Request) -> str:
    _client, session = request_client(request)
    stopped = page.runner.cancel_session(session, "cancelled")
    return cancel_message("cancelled") if stopped else "Nothing to cancel: no edit of yours is queued or running."


def on_unload(page: Page, request: gr.Request) -> None:
    _client, session = request_client(request)
    page.runner.cancel_session(session, "client gone")  # a closed tab gives its GPU time back


def on_edit(page: Page, req: EditRequest, request: gr.Request | None = None, progress=None) -> tuple:
    """Run one edit; returns the edited, source, skeleton and side-by-side videos, the downloads and the status."""
    client, session = request_client(request)
    try:
        ticket = page.runner.ticket(client, session, alive=_event_alive())  # admission: per-client share
    except EymError as err:
        raise _page_error(err) from None
    try:
        if not req.source:
            raise EymError("upload a source video first" + (" (or click a demo pair in the gallery)"
                                                            if page.gallery.entries else ""))
        job = rq.serve_edit(req, runner=page.runner, ticket=ticket, limits=page.limits, outputs_dir=page.outputs_dir,
                            figures=page.figures, allow_cpu=page.allow_cpu, device=page.device, progress=progress,
                            disk_roots=server.disk_roots(page.outputs_dir))
    except JobCancelled as stop:
        raise gr.Error(cancel_message(stop.reason), print_exception=False) from None
    except EymError as err:
        raise _page_error(err) from None
    finally:
        page.runner.release(ticket)
    return (str(job.video), str(job.source_video), str(job.skeleton_video), str(job.side_by_side),
            [str(p) for p in job.downloads], done_message(job))


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------
def build_demo(editor_or_factory: Any, *, gallery_dir: str | Path | None = DEFAULT_GALLERY,
               outputs_dir: str | Path = "outputs", max_upload_mb: int = 200,
               model_line: str | None = None, is_tiny: bool | None = None, concurrency: int = 1,
               limits: RunnerLimits | None = None, device: Any = None, allow_cpu: bool = False) -> gr.Blocks:
    """Build the page (no launch, no model loading).

    Args:
        editor_or_factory: an ``eym.editor.Editor`` (anything with its ``edit`` and ``components``),
            a list of them (one per worker, each over its own model copy), or a zero-argument
            factory called on the first edit; one ``eym.runner.JobRunner`` owns them.
        gallery_dir: gallery folder or manifest (see ``eym.gallery``); ``None`` hides the gallery.
        outputs_dir: folder for job outputs; the only folder the server lets users download from.
        max_upload_mb: upload limit, shown next to the upload boxes.
        model_line: the loaded model, shown at the top (default: from the editor's components).
        is_tiny: show the tiny-model banner (default: from the editor's components).
        concurrency: edits that may run at once; needs that many editors (model copies).
        limits: the runner's operator limits (default ``RunnerLimits.from_env()``).
        device: ``eym.env.DeviceReport`` (default: detected); with a real model and no usable
            GPU the page says so, and edits are refused unless ``allow_cpu``.
        allow_cpu: the operator chose to run a real model on the CPU (``--allow-cpu``).
    Returns:
        The ``gr.Blocks``; call ``.queue(...)`` and ``.launch(...)`` on it (``main`` does).
    Raises:
        EymError: the gallery manifest is invalid.
    """
    runner = JobRunner(editor_or_factory, limits if limits is not None else RunnerLimits.from_env(),
                       concurrency=concurrency)
    editors = runner.editors()  # none yet with a factory: it is not called just to label the page
    outputs_dir = Path(outputs_dir).resolve()
    components = getattr(editors[0], "components", None) if editors else None
    gallery = stage_gallery(gallery_dir, outputs_dir, getattr(components, "model_id", None))
    if model_line is None or is_tiny is None:
        line, tiny = describe_editor(editors[0]) if editors else ("loading on first use", False)
        model_line = model_line if model_line is not None else line
        is_tiny = is_tiny if is_tiny is not None else tiny
    is_tiny = bool(is_tiny)
    if device is None and not is_tiny:
        device = detect_device()
    page = Page(runner=runner, limits=rq.upload_limits(max_upload_mb), outputs_dir=outputs_dir, gallery=gallery,
                figures=rq.step_figures(device, is_tiny), device=device, allow_cpu=allow_cpu)
    entries, staged, examples = gallery.entries, gallery.staged, gallery.examples
    defaults = rq.default_controls(is_tiny)
    injection_names, default_injection = rq.injection_choices()

    # -- layout --------------------------------------------------------------------------------
    # Gradio's copies of uploads and outputs: swept every 10 min, gone after an hour (the disk cap
    # counts them meanwhile, see enforce_disk_cap).
    with gr.Blocks(title="Edit-Your-Motion", delete_cache=(600, 3600)) as demo:
        gr.HTML(_header_html(model_line, is_tiny, "" if is_tiny else _device_banner(device, allow_cpu)))
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
                preset = gr.Dropdown(rq.preset_choices(), label="Preset motion", visible=False, elem_id="preset")
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
                size = gr.Dropdown(list(rq.SIZES), value=defaults["size"], label="Resolution (px)", elem_id="size")
        gr.Markdown("### What the method will use", elem_classes=["eym-section"])
        preview_info = gr.Markdown(page.start_hint, elem_id="preview-info")
        shown = partial(gr.Image, interactive=False, height=140)
        with gr.Row():
            src_frames = shown(label="Source frames", elem_id="src-frames")
            src_skeletons = shown(label="Source skeletons", elem_id="src-skeletons")
        with gr.Row():
            src_masks = shown(label="Person masks (stage 1 trains on the person only)", elem_id="src-masks")
            ref_skeletons = shown(label="Target skeletons (drive the edit)", elem_id="ref-skeletons")

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
            whole = partial(gr.Number, precision=0, minimum=0)
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Tuning seed", elem_id="seed")
                stage1_steps = whole(value=defaults["stage1_steps"], label="Stage 1 steps", elem_id="stage1-steps")
                stage2_steps = whole(value=defaults["stage2_steps"], label="Stage 2 steps", elem_id="stage2-steps")
                ddim_steps = whole(value=defaults["ddim_steps"], minimum=1, label="DDIM steps", elem_id="ddim-steps")
            with gr.Row():
                injection = gr.Dropdown(injection_names, value=default_injection, elem_id="injection",
                                        label="Key/value injection (where the edit copies the source's appearance)")
                inject_layers = gr.Textbox(value="all", label="Injection layers: all, none, down, mid, up, 7-15, up_blocks.3.*",
                                           elem_id="inject-layers")
                inject_start = whole(value=0, label="Injection from step (0 = the noisiest)", elem_id="inject-start")
                inject_end = whole(value=None, label="Injection until step (empty: the last)", elem_id="inject-end")

        with gr.Row():
            run = gr.Button("Edit motion", variant="primary", elem_id="run", scale=3)
            cancel = gr.Button("Cancel", variant="stop", elem_id="cancel", scale=1)
        estimate_view = gr.Markdown(on_estimate(page, defaults["num_frames"], defaults["size"], defaults["stage1_steps"],
                                                defaults["stage2_steps"], defaults["ddim_steps"]), elem_id="estimate")
        status = gr.Markdown(elem_id="status")
        gr.Markdown("### 4. Result", elem_classes=["eym-section"])
        result = partial(gr.Video, interactive=False, height=300)
        with gr.Row():
            out_source = result(label="Source (as processed)", elem_id="out-source")
            out_edited = result(label="Edited", elem_id="out-edited", autoplay=True, loop=True)
            out_skeleton = result(label="Target skeletons", elem_id="out-skeleton")
        with gr.Row():
            out_side = result(label="Side by side: source | target skeletons | edited", elem_id="out-side", height=240)
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

        # -- events: the handlers are module functions; the page is bound here -------------------
        # (Gradio passes its request and select data by annotation, so these three are small defs)
        def select_event(evt: gr.SelectData) -> tuple:
            return on_gallery_select(page, evt)

        def cancel_event(request: gr.Request) -> str:
            return on_cancel(page, request)

        def unload_event(request: gr.Request) -> None:
            on_unload(page, request)

        scope = locals()  # the components are named as the request's fields
        controls = {f.name: scope[f.name] for f in fields(EditRequest)}
        mode.change(lambda m: (gr.update(visible=m == MOTION_REFERENCE), gr.update(visible=m == MOTION_PRESET),
                               gr.update(visible=m == MOTION_REFERENCE)),
                    mode, [reference, preset, retarget], queue=False, api_visibility="private")
        preview_outputs = [src_frames, src_skeletons, src_masks, ref_skeletons, preview_info]
        gr.on([source.change, reference.change, preset.change, mode.change, num_frames.release, start.submit,
               stride.submit, size.change, retarget.change], fn=_event(on_preview, page, PreviewRequest),
              inputs=_inputs(controls, PreviewRequest), outputs=preview_outputs, api_name="preview",
              concurrency_id="preview", concurrency_limit=2, trigger_mode="always_last", show_progress="minimal")
        prompt_inputs = [subject, source_motion, target_motion, p_c, p_s, p_t]
        gr.on([c.change for c in prompt_inputs], fn=on_prompts, inputs=prompt_inputs, outputs=prompts_view,
              queue=False, api_name="prompts", show_progress="hidden")
        gallery_outputs = [controls[name] for name in GALLERY_FIELDS] + [out_edited, out_side, status]
        gallery_name.submit(partial(on_gallery, page), gallery_name, gallery_outputs, api_name="gallery",
                            concurrency_id="preview")
        if gallery_view is not None:
            gallery_view.select(select_event, None, gallery_outputs, api_visibility="private", concurrency_id="preview")
        injection.change(rq.injection_fields, injection, [inject_layers, inject_start, inject_end], queue=False,
                         api_visibility="private")
        estimate_inputs = [num_frames, size, stage1_steps, stage2_steps, ddim_steps]
        gr.on([c.change for c in estimate_inputs], fn=partial(on_estimate, page), inputs=estimate_inputs,
              outputs=estimate_view, queue=False, api_visibility="private", show_progress="hidden")
        edit_event = run.click(_event(on_edit, page, EditRequest, gradio_request=True), _inputs(controls, EditRequest),
                               [out_edited, out_source, out_skeleton, out_side, downloads, status],
                               api_name="edit", concurrency_id="gpu", concurrency_limit=runner.limits.max_waiting,
                               show_progress_on=[out_edited, status])
        # Edits wait in the runner (FIFO, per-client share), not in Gradio's queue: so every
        # waiting edit can be cancelled and counted, and the models have one owner.
        cancel.click(cancel_event, None, status, cancels=[edit_event], queue=False, api_visibility="private")
        push.click(on_push, [downloads, push_repo, push_token], push_status, api_visibility="private")
        demo.unload(unload_event)
    demo.eym_runner = runner  # for health checks and tests
    return demo


def _inputs(controls: dict[str, Any], request_type: type) -> list:
    """The page's components in the order of the request's fields."""
    return [controls[f.name] for f in fields(request_type)]


def _event(handler: Callable, page: Page, request_type: type, *, gradio_request: bool = False) -> Callable:
    """``handler(page, request_type(*values), ...)`` as an event function whose parameters are the
    request's fields, so the HTTP API names them; with ``gradio_request`` it also takes the
    ``gr.Request`` and a ``gr.Progress`` that Gradio passes in."""
    params = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for f in fields(request_type)]
    count = len(params)

    def event(*args):
        return handler(page, request_type(*args[:count]), *args[count:])

    if gradio_request:
        params += [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request),
                   inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress())]
        event.__annotations__ = {"request": gr.Request}
    event.__signature__ = inspect.Signature(params)
    return event


# ---------------------------------------------------------------------------------------------
# Health check and launch
# ---------------------------------------------------------------------------------------------
def load_css() -> str:
    return (ASSETS / "app.css").read_text(encoding="utf-8") if (ASSETS / "app.css").is_file() else ""


def theme() -> gr.themes.Base:
    # System fonts: the stock themes fetch Google Fonts, an outbound call from every visitor.
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate",
                          font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags of ``app.py`` (``eym.server.parse_args``; ``--help`` lists them)."""
    return server.parse_args(argv, default_gallery=DEFAULT_GALLERY)


def launch_demo(demo: gr.Blocks, *, host: str, port: int, outputs_dir: Path, max_upload_mb: int,
                queue_size: int = 20, concurrency: int = 1, block: bool = True, quiet: bool = False):
    """Queue and serve a built page: no share link, uploads capped, only ``outputs_dir`` served.

    Returns:
        What ``gr.Blocks.launch`` returns; with ``block=False`` the server runs in a thread
        (tests) and ``demo.close()`` stops it.
    """
    demo.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    queued = lambda: len(getattr(demo, "_queue", None) or ())  # noqa: E731  (events waiting, for /healthz)
    return demo.launch(server_name=host, server_port=port, share=False, max_file_size=f"{max_upload_mb}mb",
                       allowed_paths=[str(outputs_dir)], app_kwargs={"routes": server.health_routes(queued)},
                       theme=theme(), css=load_css(), footer_links=["api"], ssr_mode=False, mcp_server=False,
                       show_error=True, quiet=quiet, prevent_thread_lock=not block)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, load the models once, build the page, queue it and serve it."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        started = server.start(args)
        demo = build_demo(started.editors, gallery_dir=started.gallery, outputs_dir=started.outputs,
                          max_upload_mb=args.max_upload_mb, concurrency=args.concurrency, limits=started.limits,
                          device=started.device, allow_cpu=args.allow_cpu)
    except EymError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    launch_demo(demo, host=args.host, port=args.port, outputs_dir=started.outputs, max_upload_mb=args.max_upload_mb,
                queue_size=args.queue_size, concurrency=args.concurrency)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Command line: ``eym <command> ...`` (also ``python -m eym``).

A thin layer over the library: each command fills the same config dataclasses and calls the
same functions as the Gradio app. Errors a user can fix (:class:`eym.EymError`) print as one
line, ``error: ...``, with exit code 2; nothing else is caught.

Each command has one section below: ``_add_<name>(sub)`` declares its arguments and
``_run_<name>(args) -> int`` runs it. Library imports happen inside ``_run_*`` so that
``eym --help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Callable, Sequence

from eym.errors import EymError

_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def _command(name: str, help: str):
    """Register ``_add_<name>``/``_run_<name>`` pairs in declaration order."""

    def register(add: Callable[[argparse.ArgumentParser], None]):
        _COMMANDS[name] = (add, None, help)  # type: ignore[assignment]
        return add

    return register


def _runner(name: str):
    def register(run: Callable[[argparse.Namespace], int]):
        add, _, help = _COMMANDS[name]
        _COMMANDS[name] = (add, run, help)
        return run

    return register


# ---------------------------------------------------------------------------------------------
# tiny: build the tiny random-weight bundle (issue 2, models)
# ---------------------------------------------------------------------------------------------
@_command("tiny", "build the tiny random-weight SD-1.5-shaped bundle (tests, offline demo)")
def _add_tiny(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write the bundle to (hub layout)")
    p.add_argument("--seed", type=int, default=0)


@_runner("tiny")
def _run_tiny(args: argparse.Namespace) -> int:
    from eym.models import build_tiny_bundle

    path = build_tiny_bundle(args.out, seed=args.seed)
    logging.getLogger("eym").info("tiny bundle written to %s", path)
    print(path)
    return 0


# ---------------------------------------------------------------------------------------------
# preprocess: video -> frames, skeletons, masks, keypoints (issue 2, preprocessing)
# ---------------------------------------------------------------------------------------------
@_command("preprocess", "sample frames of a video, detect the person's pose and mask, write them to a folder")
def _add_preprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="video file (mp4, mov, webm, avi, gif, ...) or folder of numbered frames")
    p.add_argument("--out", required=True, help="folder to write frames/, skeletons/, masks/, keypoints.json, preview.png, *.mp4")
    p.add_argument("--frames", type=int, default=8, help="number of frames to sample (default 8)")
    p.add_argument("--size", type=int, default=512, help="output side S, a multiple of 8 (default 512)")
    p.add_argument("--start", type=int, default=0, help="first source frame, 0-based (default 0)")
    p.add_argument("--stride", type=int, default=None, help="take every N-th frame (default: consecutive frames at the stride that plays near 12 fps, 1-3)")
    p.add_argument("--pose", choices=("auto", "mediapipe", "openpose"), default="auto", help="pose backend (default auto)")
    p.add_argument("--mask", choices=("mediapipe", "rembg"), default="mediapipe", help="person mask backend (default mediapipe)")
    p.add_argument("--resize", choices=("crop", "pad"), default="crop", help="fit to SxS by centre crop or padding (default crop)")
    p.add_argument("--no-masks", action="store_true", help="skip person masks (enough for a reference video)")


@_runner("preprocess")
def _run_preprocess(args: argparse.Namespace) -> int:
    from eym.preprocess import PreprocessConfig, clip_span, preprocess

    config = PreprocessConfig(
        num_frames=args.frames,
        size=args.size,
        start=args.start,
        stride=args.stride,
        resize_mode=args.resize,
        pose=args.pose,
        mask=args.mask,
    )
    clip = preprocess(args.video, config, out_dir=args.out, with_masks=not args.no_masks, progress=not args.quiet)
    log = logging.getLogger("eym")
    log.info("%d frames at %.3g fps, content hash %s", clip.num_frames, clip.fps, clip.content_hash[:12])
    print(f"source: {clip_span(clip)}")
    if clip.missing:
        log.warning("no person found in frame(s) %s; they were filled from the nearest frame", clip.missing)
    print(args.out)
    return 0


# ---------------------------------------------------------------------------------------------
# cache: list and clear job folders and caches under EYM_HOME (issue 7, reliability)
# ---------------------------------------------------------------------------------------------
@_command("cache", "list or clear job folders and caches (preprocessed clips, tuned weights)")
def _add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "clear"], help="list entries, or remove those not in use")
    p.add_argument("--older-than", metavar="AGE", help="clear: only entries unused for AGE (e.g. 30m, 12h, 7d)")
    p.add_argument("--max-gb", type=float, metavar="GB", help="clear: evict least recently used until under GB")
    p.add_argument("--root", action="append", metavar="DIR", help="folder(s) to manage (default: jobs, preprocess, tuned under EYM_HOME)")


@_runner("cache")
def _run_cache(args: argparse.Namespace) -> int:
    import time

    from eym import jobs

    roots = args.root or jobs.default_roots()
    if args.action == "list":
        if args.older_than or args.max_gb is not None:
            raise EymError("--older-than and --max-gb apply to 'eym cache clear'; drop them for 'list'")
        entries = jobs.list_entries(roots)
        now = time.time()
        for e in entries:
            age_h = (now - e.last_used) / 3600
            print(f"{e.kind:<11} {e.path.name:<40} {e.size / 2**20:9.1f} MB  {age_h:7.1f} h ago  {e.state}")
        total = sum(e.size for e in entries)
        print(f"{len(entries)} entries, {total / 2**30:.2f} GB in {', '.join(str(r) for r in roots)}")
        return 0
    if args.max_gb is not None and args.max_gb < 0:
        raise EymError(f"--max-gb {args.max_gb} must be >= 0")
    removed = []
    if args.older_than:
        removed += jobs.clear(roots, older_than_s=jobs.parse_duration(args.older_than))
    if args.max_gb is not None:
        removed += jobs.enforce_cap(int(args.max_gb * 2**30), roots)
    if not args.older_than and args.max_gb is None:
        removed += jobs.clear(roots)
    kept = [e for e in jobs.list_entries(roots) if e.in_use]
    print(f"removed {len(removed)} entries ({sum(e.size for e in removed) / 2**20:.1f} MB)")
    if kept:
        print(f"kept {len(kept)} in use by a running job")
    return 0


# ---------------------------------------------------------------------------------------------
# eval: the paper's metrics and ours for one edited video (issue 5, evaluation)
# ---------------------------------------------------------------------------------------------
def _add_eval_settings(p: argparse.ArgumentParser) -> None:
    """Metric settings shared by `eval` and `suite` (eym.metrics.EvalConfig)."""
    g = p.add_argument_group("metrics")
    g.add_argument("--clip-model", default="openai/clip-vit-large-patch14",
                   help="CLIP for TA/TC: hub id (local cache only) or folder (default: %(default)s)")
    g.add_argument("--pose", default="auto", help="pose backend for motion alignment: auto|mediapipe|openpose")
    g.add_argument("--mask", default="mediapipe", help="person-mask backend for background metrics: mediapipe|rembg")
    g.add_argument("--pck-threshold", type=float, default=0.1, help="PCK radius, fraction of the reference bbox size")
    g.add_argument("--metrics", default="clip,lpips,motion,background,temporal",
                   help="comma-separated metric groups (default: all)")
    g.add_argument("--eval-device", default="cpu", help="device for CLIP and LPIPS: cpu|cuda|auto")


def _eval_config(args: argparse.Namespace):
    from eym.metrics import EvalConfig

    groups = tuple(g.strip() for g in args.metrics.split(",") if g.strip())
    return EvalConfig(clip_model=args.clip_model, pose=args.pose, mask=args.mask, pck_threshold=args.pck_threshold,
                      metrics=groups, device=args.eval_device)


@_command("eval", "score an edited video: TA, TC, L-N, L-S (the paper's) + motion, background, stability")
def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("edited", help="the edited video")
    p.add_argument("--source", required=True, help="the source video or frame folder the edit started from")
    p.add_argument("--reference", help="the reference video/folder, or a preset motion name (motion metrics)")
    p.add_argument("--target-prompt", required=True, help="P_t, the prompt of the edit")
    p.add_argument("--json", metavar="OUT", help="also write the full report (values, reasons, settings) here")
    s = p.add_argument_group("sampling (pass the edit's values)")
    s.add_argument("--frames", type=int, default=8, help="frames sampled from the source (default: %(default)s)")
    s.add_argument("--size", type=int, default=512, help="side of the square frames (default: %(default)s)")
    s.add_argument("--start", type=int, default=0, help="first source frame (default: %(default)s)")
    s.add_argument("--stride", type=int, default=None, help="step between frames (default: the stride that plays near 12 fps, 1-3)")
    s.add_argument("--resize", default="crop", choices=["crop", "pad"], help="fit to SxS by centre crop or padding (default: %(default)s)")
    s.add_argument("--retarget", action=argparse.BooleanOptionalAction, default=True,
                   help="the edit retargeted the reference to the source person (the edit's default: on)")
    _add_eval_settings(p)


@_runner("eval")
def _run_eval(args: argparse.Namespace) -> int:
    from eym.cache import atomic_write_bytes
    from eym.metrics import evaluate_files

    report = evaluate_files(
        args.edited, args.source, args.target_prompt, reference=args.reference, num_frames=args.frames,
        size=args.size, start=args.start, stride=args.stride, resize_mode=args.resize,
        retarget=args.retarget, config=_eval_config(args),
    )
    said = set()  # a group's reason is printed once, not for each of its metrics
    for name, metric in report.metrics.items():
        value = "n/a" if metric.value is None else f"{metric.value:.4f}"
        reason = metric.unavailable if metric.unavailable and metric.unavailable not in said else None
        said.add(metric.unavailable)
        print(f"{name:<11} {value}" + (f"   ({reason})" if reason else ""))
    if args.json:
        atomic_write_bytes(args.json, report.to_json().encode())
        print(f"report written to {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------
# suite: a gallery of edit pairs through edit + eval, table + contact sheets (issue 5, evaluation)
# ---------------------------------------------------------------------------------------------
@_command("suite", "run a gallery of edit pairs through edit + eval: results.md/.csv, contact sheets; resumes")
def _add_suite(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="gallery folder or manifest (gallery.yaml/.json, see docs/EVALUATION.md)")
    p.add_argument("--out", required=True, help="output folder (results.md, results.csv, pairs/<name>/)")
    _add_model_flags(p.add_argument_group("model"))
    p.add_argument("--only", action="append", metavar="NAME", help="run only this entry (repeatable)")
    p.add_argument("--save-examples", action="store_true",
                   help="keep each finished pair as the app's cached example for this model ($EYM_HOME/examples)")
    _add_edit_settings(p, "edit settings, for every pair (a --settings file first, then these flags; an entry's "
                          "num_frames/start/stride win)", inference=True)
    _add_eval_settings(p)


@_runner("suite")
def _run_suite(args: argparse.Namespace) -> int:
    from eym.suite import run_suite

    result = run_suite(
        args.manifest, args.out, model=args.model, controlnet=args.controlnet, edit_config=_edit_config(args),
        eval_config=_eval_config(args), device=args.device, names=args.only, disable_progress=args.quiet,
        save_examples=args.save_examples,
    )
    print(result.table_md.read_text(), end="")
    reused = sum(p.reused for p in result.pairs)
    print(f"{len(result.pairs)} pairs: {result.edits_run} edited, {reused} reused from an earlier run; "
          f"tables in {result.table_md} and {result.table_csv}")
    return 1 if any(p.error for p in result.pairs) else 0


# ---------------------------------------------------------------------------------------------
# tune / infer / edit: DPL tuning, two-branch inference, the whole edit (issue 3, editor)
# ---------------------------------------------------------------------------------------------
def _add_editor_inputs(p: argparse.ArgumentParser, *, reference: bool) -> None:
    """Arguments tune, infer and edit share: inputs, prompts, model, sampling of the clips."""
    p.add_argument("source", help="source video file or folder of numbered frames (the person and background kept)")
    if reference:
        p.add_argument("reference", nargs="?", help="reference video/folder whose motion is copied (or use --preset)")
        p.add_argument("--preset", metavar="NAME", help="a built-in motion instead of a reference video (names in docs/USAGE.md)")
    g = p.add_argument_group("prompts (docs/USAGE.md: how P_c is derived when not given)")
    g.add_argument("--source-prompt", required=True, metavar="P_S", help="the source video: subject + its motion, 'A boy in black is dancing.'")
    g.add_argument("--target-prompt", required=reference, default="", metavar="P_T", help="the edit: subject + the new motion")
    g.add_argument("--content-prompt", metavar="P_C", help="the subject alone (default: derived from P_s and P_t)")
    g = p.add_argument_group("model")
    _add_model_flags(g)
    g.add_argument("--cache-dir", default=None, help="tuned-weights cache (default: $EYM_HOME/tuned)")
    g.add_argument("--allow-cpu", action="store_true", help="let a real model run on the CPU (hours per edit; or EYM_ALLOW_CPU=1)")
    _add_edit_settings(p, "settings (a --settings file first, then these flags)", inference=reference)


def _add_model_flags(g, *, device: bool = True) -> None:
    """--model, --controlnet (and --device): the same names and defaults for every command that loads a model."""
    g.add_argument("--model", default=None, help="tiny | hub id | diffusers folder | single-file .safetensors (default: SD 1.5 from the HF cache)")
    g.add_argument("--controlnet", default=None, help="openpose ControlNet: hub id | folder | file (default: the model's own or lllyasviel/sd-controlnet-openpose)")
    if device:
        g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")


def _add_edit_settings(p: argparse.ArgumentParser, title: str, *, inference: bool) -> None:
    """The EditConfig flags of every command that tunes or edits (tune, infer, edit, suite, batch), read
    back by :func:`_edit_config`; the inference ones only where an edit runs."""
    g = p.add_argument_group(title)
    g.add_argument("--settings", metavar="FILE", help="EditConfig JSON/YAML: {preprocess: {...}, tune: {...}, infer: {...}}")
    g.add_argument("--frames", type=int, help="frames sampled from each video (default 8)")
    g.add_argument("--size", type=int, help="side of the square frames, a multiple of 8 (default 512)")
    g.add_argument("--seed", type=int, help="seed of tuning: frame order, timesteps, noise (default 0); inference is deterministic")
    g.add_argument("--steps1", type=int, help="DPL stage 1 steps (default 300)")
    g.add_argument("--steps2", type=int, help="DPL stage 2 steps (default 300)")
    g.add_argument("--lr", type=float, help="tuning learning rate (default 3e-5)")
    g.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"), help="tuning precision (default auto)")
    if inference:
        g.add_argument("--ddim-steps", type=int, help="DDIM steps of inversion and sampling (default 50)")
        g.add_argument("--guidance", type=float, help="classifier-free guidance of the branches (default 1.0 = none)")
        g.add_argument("--injection", metavar="PRESET", help="injection schedule preset: " + _injection_presets()
                       + " (default paper-all); the --inject-* flags below change it")
        g.add_argument("--inject-layers", help="RC-Attn layers injecting the reconstruction's K/V: all | none | down,mid,up | "
                       "indices 0-15 (e.g. 7-15) | attn1 name patterns (up_blocks.3.*)")
        g.add_argument("--inject-start", metavar="STEP", help="first injecting denoising step: an index (4) or a fraction (0.1)")
        g.add_argument("--inject-end", metavar="STEP", help="injection stops before this step: an index (40) or a fraction (0.8)")
        g.add_argument("--injection-weighting", choices=("paper", "balanced", "source"),
                       help="Eq. 18 literally (paper, default), balanced, or source (the edit reads the reconstruction's keys/values only)")
        g.add_argument("--no-retarget", action="store_true", help="use the reference skeletons as they are (no fitting to the source person)")


def _edit_config(args: argparse.Namespace):
    """The EditConfig of :func:`_add_edit_settings`'s flags: a --settings file first, then the flags given."""
    from eym.config import load_config, replace
    from eym.editor import EditConfig

    config = load_config(EditConfig, args.settings) if args.settings else EditConfig()

    def given(pairs):
        return {k: v for k, v in pairs if v is not None}

    prep = given((("num_frames", args.frames), ("size", args.size)))
    tune = given((("steps1", args.steps1), ("steps2", args.steps2), ("lr", args.lr), ("seed", args.seed),
                  ("mixed_precision", args.mixed_precision)))
    infer = given((("ddim_steps", getattr(args, "ddim_steps", None)), ("guidance_scale", getattr(args, "guidance", None)),
                   ("injection_weighting", getattr(args, "injection_weighting", None))))
    if getattr(args, "no_retarget", False):
        infer["retarget"] = False
    injection = _injection_schedule(args, config.infer.injection)
    if injection is not None:
        infer["injection"] = injection
    return replace(config, preprocess=replace(config.preprocess, **prep), tune=replace(config.tune, **tune),
                   infer=replace(config.infer, **infer))


def _injection_presets() -> str:
    from eym.injection import INJECTION_PRESETS, preset_slug

    return " | ".join(preset_slug(name) for name in INJECTION_PRESETS)


def _injection_schedule(args: argparse.Namespace, base):
    """The InjectionSchedule of --injection and the --inject-* flags over ``base``; None when none is given."""
    from eym.config import replace
    from eym.injection import injection_preset

    preset, layers = getattr(args, "injection", None), getattr(args, "inject_layers", None)
    start, end = getattr(args, "inject_start", None), getattr(args, "inject_end", None)
    if preset is None and layers is None and start is None and end is None:
        return None
    schedule = injection_preset(preset) if preset is not None else base
    changes = {} if layers is None else {"layers": layers}
    for flag, value, fraction, index in (("--inject-start", start, "start", "start_step"), ("--inject-end", end, "end", "end_step")):
        if value is None:
            continue
        try:
            number = float(value)
        except ValueError:
            raise EymError(f"{flag} {value!r} is not a step index (4) or a fraction (0.1)") from None
        if "." in value:
            changes.update({fraction: number, index: None})
        elif number.is_integer():
            changes[index] = int(number)
        else:
            raise EymError(f"{flag} {value!r} is not a step index (4) or a fraction (0.1)")
    return replace(schedule, **changes)


def _editor_prompts(args: argparse.Namespace):
    from eym.prompts import compose_prompts

    # cleaned and composed as the app does (eym.prompts.compose_prompts); P_t is checked by the
    # edit itself, `eym tune` needs none
    prompts = compose_prompts(content=args.content_prompt, source=args.source_prompt, target=args.target_prompt,
                              require_target=False)
    if not args.content_prompt:
        print(f"content prompt (derived): {prompts.content}")
    return prompts


def _load_editor(args: argparse.Namespace):
    from eym.editor import Editor
    from eym.env import allow_cpu_from_env, check_cpu_choice, detect_device
    from eym.models import describe

    editor = Editor.from_pretrained(args.model, args.controlnet, device=args.device, cache_dir=args.cache_dir,
                                    disable_progress=args.quiet)
    components = editor.components
    logging.getLogger("eym").info("model: %s", describe(components))
    if not components.is_tiny and components.device.type == "cpu":
        check_cpu_choice(is_tiny=False, device="cpu", allow_cpu=args.allow_cpu or allow_cpu_from_env(),
                         report=detect_device())
    return editor


def _reference_arg(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(reference, preset): the reference video or the preset name, exactly one of them."""
    if bool(args.reference) == bool(args.preset):
        raise EymError("give either a REFERENCE video or --preset NAME (not both, not neither)")
    return args.reference or None, args.preset or None


def _print_tuning(tuned) -> None:
    if tuned.reused:
        print(f"tuning: reused cached tuned weights {tuned.path} (no tuning steps ran)")
    else:
        tune = tuned.manifest["tune"]
        print(f"tuning: ran {tune['steps1']} + {tune['steps2']} steps in {tuned.manifest['seconds']:.1f} s -> {tuned.path}")


@_command("tune", "DPL-tune the model on a source video (stage 1 + 2), or find it already tuned; prints the folder")
def _add_tune(p: argparse.ArgumentParser) -> None:
    _add_editor_inputs(p, reference=False)


@_runner("tune")
def _run_tune(args: argparse.Namespace) -> int:
    config = _edit_config(args)
    prompts = _editor_prompts(args)
    editor = _load_editor(args)
    source = editor.load_source(args.source, config)
    tuned = editor.tune(source, prompts, config.tune)
    _print_tuning(tuned)
    print(tuned.path)
    return 0


@_command("infer", "edit with weights tuned before (eym tune): inversion + two-branch sampling, never tunes")
def _add_infer(p: argparse.ArgumentParser) -> None:
    _add_editor_inputs(p, reference=True)
    p.add_argument("--tuned", metavar="DIR", help="tuned-weights folder (default: the cached one for this source and settings)")
    p.add_argument("--out", required=True, help="edited video (.mp4); NAME.side_by_side.mp4 and NAME.settings.json go next to it")


@_runner("infer")
def _run_infer(args: argparse.Namespace) -> int:
    return _edit_or_infer(args, tune=False)


@_command("edit", "the whole edit: preprocess, tune (or reuse), infer; writes the video, a side-by-side and settings")
def _add_edit(p: argparse.ArgumentParser) -> None:
    _add_editor_inputs(p, reference=True)
    p.add_argument("--out", required=True, help="edited video (.mp4); NAME.side_by_side.mp4 and NAME.settings.json go next to it")


@_runner("edit")
def _run_edit(args: argparse.Namespace) -> int:
    return _edit_or_infer(args, tune=True)


def _edit_or_infer(args: argparse.Namespace, *, tune: bool) -> int:
    from pathlib import Path

    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise EymError(f"--out {args.out!r} must be an .mp4 file name")
    reference, preset = _reference_arg(args)
    config = _edit_config(args)
    prompts = _editor_prompts(args)
    editor = _load_editor(args)
    source = editor.load_source(args.source, config)
    from eym.preprocess import clip_span

    print(f"source: {clip_span(source)}")
    tuned = None
    if not tune:
        tuned = editor.open_tuned(args.tuned) if args.tuned else editor.find_tuned(source, prompts, config.tune)
        if tuned is None:
            raise EymError(f"no tuned weights for {args.source} with these prompts and settings; run `eym tune` first (or `eym edit`)")
    result = editor.edit(source, reference, prompts, config, preset=preset, out_dir=out.parent, name=out.stem, tuned=tuned)
    if tune:
        print("tuning: reused cached tuned weights (no tuning steps ran)" if result.reused_tuning else "tuning: tuned on the source")
    print(f"side by side: {result.side_by_side}")
    print(f"settings: {result.settings}")
    print(result.video)
    return 0


# ---------------------------------------------------------------------------------------------
# gallery: fetch the demo gallery's clips into the clip store, list what is there
# ---------------------------------------------------------------------------------------------
@_command("gallery", "fetch a gallery's clips from their pinned origins (or a mirror folder), or list its entries")
def _add_gallery(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("fetch", "list"), help="fetch: download and verify the clips; list: entries and clips")
    p.add_argument("manifest", nargs="?", default=None, help="gallery folder or manifest (default: the project's examples/)")
    p.add_argument("--mirror", default=None, help="local folder laid out like the clips' paths, used instead of the "
                                                   "origins (offline; default $EYM_GALLERY_MIRROR)")
    p.add_argument("--store", default=None, help="clip store (default $EYM_GALLERY_CACHE, else $EYM_HOME/gallery)")


@_runner("gallery")
def _run_gallery(args: argparse.Namespace) -> int:
    from pathlib import Path

    from eym.gallery import fetch_clips, load_gallery

    manifest = args.manifest or str(Path(__file__).resolve().parents[1] / "examples")
    if args.action == "fetch":
        report = fetch_clips(manifest, mirror=args.mirror, store=args.store)
        for file, why in report.failed.items():
            print(f"failed: {file}: {why}")
        print(f"{len(report.fetched)} fetched, {len(report.present)} already there, {len(report.failed)} failed")
        return 0 if report.ok else 1
    gallery = load_gallery(manifest, store=args.store, skip_missing=True)
    for entry in gallery.entries:
        print(f"{entry.name}: {entry.title} ({entry.motion_label})")
    for name, why in gallery.skipped.items():
        print(f"{name}: missing ({why})")
    return 0


# ---------------------------------------------------------------------------------------------
# (further commands are added below, one section each)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# batch: a manifest of edits shared out over GPUs / machines by accelerate (issue 8)
# ---------------------------------------------------------------------------------------------
@_command("batch", "run a gallery manifest of edits, shared over GPUs/machines with `accelerate launch -m eym batch`; resumes")
def _add_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="gallery folder or manifest (gallery.yaml/.json: source, reference or preset, prompts)")
    p.add_argument("--out", required=True, help="output folder (summary.md/.csv, batch.json, pairs/<name>/); shared by all machines")
    _add_model_flags(p.add_argument_group("model"), device=False)
    p.add_argument("--cpu", action="store_true", help="run every rank on the CPU (ranks then talk over gloo)")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this entry (repeatable)")
    p.add_argument("--timeout-hours", type=float, default=24.0, help="how long ranks wait for the busiest one at the end (default 24)")
    _add_edit_settings(p, "edit settings, for every entry (a --settings file first, then these flags; an entry's num_frames/start/stride win)", inference=True)
    p.add_argument("--eval", action="store_true", help="also score each edit (metrics in the summary; settings below)")
    _add_eval_settings(p)


@_runner("batch")
def _run_batch(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from eym.batch import run_batch
    from eym.models import DEFAULT_MODEL

    if args.timeout_hours <= 0:
        raise EymError(f"--timeout-hours {args.timeout_hours} must be > 0")
    result = run_batch(
        args.manifest, args.out, model=args.model or DEFAULT_MODEL, controlnet=args.controlnet,
        edit_config=_edit_config(args), eval_config=_eval_config(args) if args.eval else None, cpu=args.cpu,
        names=args.only, timeout=timedelta(hours=args.timeout_hours), disable_progress=args.quiet,
    )
    if result.rank == 0:  # the other ranks hold the same rows; one copy of the output is enough
        print(result.summary_md.read_text(), end="")
        print(f"summary: {result.summary_md} and {result.summary_csv}")
    return 1 if result.failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eym", description="Edit-Your-Motion: one-shot video motion editing")
    from eym import __version__

    parser.add_argument("--version", action="version", version=f"eym {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, _run, help) in _COMMANDS.items():
        add(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    if not args.verbose:  # third-party deprecation chatter (diffusers calling huggingface_hub) is not the user's business
        warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
        warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _add, run, _help = _COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except EymError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

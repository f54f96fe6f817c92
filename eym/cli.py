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
    p.add_argument("--stride", type=int, default=None, help="take every N-th frame (default: spread frames over the whole video)")
    p.add_argument("--pose", choices=("auto", "mediapipe", "openpose"), default="auto", help="pose backend (default auto)")
    p.add_argument("--mask", choices=("mediapipe", "rembg"), default="mediapipe", help="person mask backend (default mediapipe)")
    p.add_argument("--resize", choices=("crop", "pad"), default="crop", help="fit to SxS by centre crop or padding (default crop)")
    p.add_argument("--no-masks", action="store_true", help="skip person masks (enough for a reference video)")


@_runner("preprocess")
def _run_preprocess(args: argparse.Namespace) -> int:
    from eym.preprocess import PreprocessConfig, preprocess

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
    p.add_argument("--root", action="append", metavar="DIR", help="folder(s) to manage (default: all under EYM_HOME)")


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
    s.add_argument("--stride", type=int, default=None, help="step between frames (default: spread over the video)")
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
    p.add_argument("--model", default="tiny", help="base model: tiny | hub id | folder | single file (default: tiny)")
    p.add_argument("--controlnet", default=None, help="openpose ControlNet (default: the model's or the hub one)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--settings", metavar="FILE", help="edit settings JSON/YAML (eym.editor.EditConfig); flags below override it")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this entry (repeatable)")
    e = p.add_argument_group("edit settings (for every pair; an entry's num_frames/start/stride win)")
    e.add_argument("--frames", type=int, help="frames per clip")
    e.add_argument("--size", type=int, help="side of the square frames")
    e.add_argument("--steps1", type=int, help="DPL stage 1 steps")
    e.add_argument("--steps2", type=int, help="DPL stage 2 steps")
    e.add_argument("--ddim-steps", type=int, help="DDIM steps of inversion and sampling")
    _add_eval_settings(p)


def _suite_edit_config(args: argparse.Namespace):
    from eym.config import load_config, replace
    from eym.editor import EditConfig

    config = load_config(EditConfig, args.settings) if args.settings else EditConfig()
    prep = {k: v for k, v in (("num_frames", args.frames), ("size", args.size)) if v is not None}
    tune = {k: v for k, v in (("steps1", args.steps1), ("steps2", args.steps2)) if v is not None}
    infer = {"ddim_steps": args.ddim_steps} if args.ddim_steps is not None else {}
    return replace(config, preprocess=replace(config.preprocess, **prep), tune=replace(config.tune, **tune),
                   infer=replace(config.infer, **infer))


@_runner("suite")
def _run_suite(args: argparse.Namespace) -> int:
    from eym.suite import run_suite

    result = run_suite(
        args.manifest, args.out, model=args.model, controlnet=args.controlnet, edit_config=_suite_edit_config(args),
        eval_config=_eval_config(args), device=args.device, names=args.only, disable_progress=args.quiet,
    )
    print(result.table_md.read_text(), end="")
    reused = sum(p.reused for p in result.pairs)
    print(f"{len(result.pairs)} pairs: {result.edits_run} edited, {reused} reused from an earlier run; "
          f"tables in {result.table_md} and {result.table_csv}")
    return 1 if any(p.error for p in result.pairs) else 0


# ---------------------------------------------------------------------------------------------
# (further commands are added below, one section each)
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eym", description="Edit-Your-Motion: one-shot video motion editing")
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

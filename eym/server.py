"""The process that serves the web page: its operator settings (flags, environment) and start-up.

``app.py`` lays out the page; what an operator sets (where to listen, the model, the limits of
the job runner, the disk cap, the gallery) and what a server does once before its first request
(remove what a killed run left behind, fetch the gallery's clips, load one model copy per
worker, look at the GPU) live here, without gradio. See docs/DEPLOY.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from eym.env import allow_cpu_from_env
from eym.errors import EymError

if TYPE_CHECKING:
    from eym.runner import RunnerLimits

logger = logging.getLogger(__name__)


def default_bind() -> tuple[str, int]:
    """Host and port from the platform: Spaces and containers set ``GRADIO_SERVER_NAME`` /
    ``GRADIO_SERVER_PORT``; ``EYM_HOST`` / ``EYM_PORT`` next; loopback and 7860 otherwise."""
    host = os.environ.get("GRADIO_SERVER_NAME") or os.environ.get("EYM_HOST") or "127.0.0.1"
    port = os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("EYM_PORT") or "7860"
    try:
        return host, int(port)
    except ValueError:
        raise EymError(f"the port {port!r} (GRADIO_SERVER_PORT / EYM_PORT) is not a number; set it to e.g. 7860") from None


def parse_args(argv: Sequence[str] | None = None, *, default_gallery: str | Path = "examples") -> argparse.Namespace:
    """The flags of ``app.py``; defaults from the platform's and eym's environment variables."""
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
    parser.add_argument("--gallery", default=str(default_gallery),
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
    from eym.runner import RunnerLimits

    limit = parse_duration(args.job_time_limit) if args.job_time_limit else None
    return RunnerLimits.from_env(time_limit_s=limit, max_per_client=args.jobs_per_client, max_work=args.max_work,
                                 max_waiting=args.queue_size)


@dataclass
class Started:
    """What a server start-up prepared for the page."""

    outputs: Path  # the outputs folder (created), the only folder served
    editors: list  # one Editor per --concurrency worker
    limits: Any  # the runner's RunnerLimits
    gallery: str | None  # gallery folder or manifest; None: no gallery
    device: Any  # eym.env.DeviceReport of this machine


def start(args: argparse.Namespace) -> Started:
    """Once per process, before the page is built: clean up, fetch the gallery, load the models.

    Raises:
        EymError: a bad setting, a model that does not load, or copies that do not fit the GPU.
    """
    from eym.env import detect_device
    from eym.gallery import fetch_clips
    from eym.jobs import CAP_ENV, recover
    from eym.runner import load_editors

    if args.disk_cap_gb is not None:  # eym.jobs reads the cap from the environment
        os.environ[CAP_ENV] = str(args.disk_cap_gb)
    outputs = Path(args.outputs).expanduser().resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    recover(outputs)  # leftovers of jobs killed mid-way in an earlier run
    limits = runner_limits(args)
    editors = load_editors(args.model, args.controlnet, device=args.device, dtype=args.dtype, copies=args.concurrency)
    gallery = None if args.gallery.lower() == "none" else args.gallery
    if gallery is not None:  # first start: the clips into the verified clip store (later starts find them)
        report = fetch_clips(gallery, mirror=args.gallery_mirror, timeout=15)
        if report.fetched or report.failed:
            logger.info("gallery clips: %d fetched, %d already there, %d missing", len(report.fetched),
                        len(report.present), len(report.failed))
    device = detect_device()
    components = editors[0].components
    if not components.is_tiny and components.device.type == "cpu":
        logger.warning("no usable GPU: %s; %s", device.reason or "no CUDA GPU found",
                       "running the real model on the CPU as chosen (--allow-cpu): hours per edit" if args.allow_cpu
                       else "edits are refused: run on a GPU with a torch build matching the driver "
                            "(docs/DEPLOY.md) or pass --allow-cpu / EYM_ALLOW_CPU=1")
    return Started(outputs=outputs, editors=editors, limits=limits, gallery=gallery, device=device)


def gradio_upload_dir() -> Path:
    """Where Gradio keeps its copies of uploads (and of files it serves)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def disk_roots(outputs_dir: Path) -> list[Path]:
    """What the disk cap counts besides the caches: job folders and Gradio's upload copies."""
    return [outputs_dir, gradio_upload_dir()]


def health_routes(queued: Callable[[], int]) -> list:
    """``GET /healthz`` -> ``{"status": "ok", "queue": queued()}`` (for load balancers and container health checks)."""
    from fastapi.routing import APIRoute

    def healthz() -> dict[str, Any]:
        return {"status": "ok", "queue": int(queued())}

    return [APIRoute("/healthz", healthz, methods=["GET"])]

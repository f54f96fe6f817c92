"""Process environment: telemetry off, where caches live, which device the models can use.

The only global state of the library is in caches with clear keys under :func:`eym_home`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from eym.errors import EymError

# Libraries that would otherwise phone home (gradio analytics, onnxruntime, HF hub telemetry).
_TELEMETRY_OFF = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def apply_offline_hygiene() -> None:
    """Turn telemetry off unless the user set these variables explicitly."""
    for key, value in _TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def eym_home() -> Path:
    """Root of eym's caches (preprocess results, tuned weights, the tiny bundle).

    ``$EYM_HOME`` if set, else ``~/.cache/eym``.
    """
    root = os.environ.get("EYM_HOME")
    path = Path(root) if root else Path.home() / ".cache" / "eym"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Where the models run
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceReport:
    """What torch can run on here, and why CUDA is not usable when it is not."""

    device: str  # "cuda" or "cpu": where models go by default
    name: str  # "NVIDIA A100-SXM4-80GB", or "CPU"
    cuda_build: str | None  # CUDA version torch was built for (None: a CPU-only build)
    driver: str | None  # NVIDIA kernel driver version, when one is installed
    reason: str = ""  # why CUDA is not usable ("" when it is, or when there is no GPU at all)

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def gpu_unusable(self) -> bool:
        """A GPU (driver) is installed but torch cannot use it: the case worth a warning."""
        return not self.gpu and bool(self.reason)


def _driver_version() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return match.group(1) if match else "unknown"


def detect_device() -> DeviceReport:
    """Detect CUDA and whether it works, including "a GPU is there but torch cannot use it".

    The usual cause of the latter is a torch build for a newer CUDA than the driver supports
    (PyPI's torch 2.14.1 wheels are CUDA 13 builds); ``reason`` then says so.
    """
    import torch

    build = torch.version.cuda
    driver = _driver_version()
    if torch.cuda.is_available():
        try:  # a kernel launch catches builds without kernels for this GPU's architecture
            (torch.ones(1, device="cuda") + 1).item()
            return DeviceReport("cuda", torch.cuda.get_device_name(0), build, driver)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return DeviceReport("cpu", "CPU", build, driver, f"CUDA is present but fails to run a kernel ({first})")
    if driver is None and not Path("/dev/nvidia0").exists():
        return DeviceReport("cpu", "CPU", build, driver)  # no GPU here: nothing to fix
    if build is None:
        reason = f"an NVIDIA GPU (driver {driver}) is present but this torch {torch.__version__} is a CPU-only build"
    else:
        try:
            torch.cuda.init()
            detail = "torch sees no CUDA device"
        except Exception as err:  # torch raises RuntimeError/AssertionError with the driver's words
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = (f"an NVIDIA GPU (driver {driver}) is present but torch {torch.__version__} (built for CUDA {build}) "
                  f"cannot use it: {detail}")
    return DeviceReport("cpu", "CPU", build, driver, reason)


def allow_cpu_from_env() -> bool:
    """``$EYM_ALLOW_CPU`` set to 1/true/yes: the operator chose to run real models on the CPU."""
    return os.environ.get("EYM_ALLOW_CPU", "").strip().lower() in ("1", "true", "yes", "on")


def check_cpu_choice(*, is_tiny: bool, device: str, allow_cpu: bool, report: DeviceReport | None = None) -> None:
    """Refuse to run a real model on the CPU unless that was chosen explicitly.

    SD 1.5 tuning on a CPU takes hours per edit, in fp32; nobody should get that by accident
    because a GPU went missing or a torch build does not match the driver.

    Raises:
        EymError: a real model on the CPU without ``allow_cpu``, saying why there is no GPU.
    """
    if is_tiny or device != "cpu" or allow_cpu:
        return
    why = report.reason if report is not None and report.reason else "no CUDA GPU was found"
    raise EymError(f"{why}. A real model on the CPU takes hours per edit: run on a GPU with a matching torch "
                   "build (docs/DEPLOY.md), or choose the CPU explicitly with --allow-cpu (or EYM_ALLOW_CPU=1)")

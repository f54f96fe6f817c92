"""Process environment: telemetry off, where caches live.

The only global state of the library is in caches with clear keys under :func:`eym_home`.
"""

from __future__ import annotations

import os
from pathlib import Path

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

"""Shared fixtures: the real-footage folder and the tiny random-weight bundle.

Tests run offline: HF_HUB_OFFLINE=1 and telemetry off are set before anything imports.
EYM_HOME points at a per-session temporary folder so tests never touch a user's cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
MEDIA = Path(os.environ.get("EYM_MEDIA", REPO.parent / "shared" / "media"))


def motioneditor_clip(media: Path, folder: str = "images", condition: str = "source_condition", case: str = "case-1", size: int = 64):
    """A Clip-like object from MotionEditor's ground truth: frames, person masks and the OpenPose
    skeleton images ControlNet was fed (no detection, so tuning tests do not depend on pose)."""
    import hashlib
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    root = media / "MotionEditor" / case

    def read(sub: str, mode: str) -> np.ndarray:
        files = sorted((root / sub).glob("*.png"))
        return np.stack([np.asarray(Image.open(f).convert(mode).resize((size, size), Image.BILINEAR)) for f in files])

    frames = read(folder, "RGB")
    return SimpleNamespace(
        frames=frames,
        masks=read("man.mask", "L") > 127,
        skeletons=read(f"{condition}/openposefull", "RGB"),
        keypoints=None,
        fps=8.0,
        content_hash=hashlib.sha256(frames.tobytes()).hexdigest(),
        path=root / folder,
    )


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The tiny models' ops are too small to gain from threads, and on the 2-core CI machine two
    threads per process made tuning steps 5-10x slower (measured: 30-60 vs 250-500 ms/step)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _eym_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("eym_home")
    os.environ["EYM_HOME"] = str(home)
    yield home


@pytest.fixture(scope="session")
def media() -> Path:
    """``../shared/media``; tests that use it skip cleanly where it is absent."""
    if not (MEDIA / "README.md").exists():
        pytest.skip(f"real footage not found at {MEDIA}")
    return MEDIA


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The tiny SD-1.5-shaped bundle, built once per test session."""
    from eym.models import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("tiny") / "bundle", seed=0)


@pytest.fixture(scope="session")
def tiny_components(tiny_bundle):
    """Components loaded from the tiny bundle through the real ``from_pretrained`` path (CPU, fp32)."""
    from eym.models import load_components

    return load_components(str(tiny_bundle), dtype=None, device="cpu")


def pytest_collection_modifyitems(config, items):
    """Every test that needs ../shared/media (through the ``media`` fixture) is marked ``media``, so
    ``-m "not media"`` is a clean checkout's run; ``slow`` tests (real weights) run only with RUN_SLOW=1."""
    run_slow = os.environ.get("RUN_SLOW") == "1"
    for item in items:
        if "media" in getattr(item, "fixturenames", ()) and item.get_closest_marker("media") is None:
            item.add_marker(pytest.mark.media)
        if item.get_closest_marker("slow") is not None and not run_slow:
            item.add_marker(pytest.mark.skip(reason="needs real weights and a GPU: run with RUN_SLOW=1"))

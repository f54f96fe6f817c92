"""Checks on untrusted input: prompts, names that become paths, and every numeric setting.

The app faces the public, so a prompt or a gallery/example name is hostile until checked:
:func:`check_prompt` bounds and cleans prompts, :func:`safe_join` keeps a name inside its folder.
Settings come from CLI flags, settings files and the app's API; all of them become config
dataclasses whose ``__post_init__`` calls :func:`check_ranges`, so one table (:data:`RANGES`)
bounds them all, before any work.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from pathlib import Path

from eym.errors import EymError

# CSI ("ESC [ ... final"), OSC ("ESC ] ... BEL" or "ESC ] ... ESC \\") and two-byte escapes.
_TERMINAL_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
# CLIP reads 77 tokens; 500 characters is several times that, so no real prompt is refused.
MAX_PROMPT_CHARS = 500


def check_prompt(text: str | None, *, max_chars: int = MAX_PROMPT_CHARS, what: str = "prompt") -> str:
    """A prompt with control characters removed and whitespace collapsed, within ``max_chars``.

    Args:
        text: the prompt as typed.
        max_chars: longest accepted prompt after cleaning.
        what: how the error message names the field ("source prompt", ...).

    Returns:
        The cleaned prompt ("" for None or blank input; callers decide whether empty is allowed).

    Raises:
        EymError: if the text is not a string or is longer than ``max_chars``.
    """
    if text is None:
        return ""
    if not isinstance(text, str):
        raise EymError(f"the {what} must be text, got {type(text).__name__}")
    # Whole terminal escape sequences go, not only their ESC byte ("\x1b[31m", "\x1b]0;title\x07").
    text = _TERMINAL_ESCAPE.sub("", text)
    # Unicode categories C* are control, format (bidi overrides, zero-width), surrogate, private
    # use and unassigned code points: invisible or terminal-controlling, never part of a prompt.
    kept = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or not unicodedata.category(ch).startswith("C")
    )
    cleaned = " ".join(kept.split())
    if len(cleaned) > max_chars:
        raise EymError(f"the {what} is {len(cleaned)} characters long; shorten it to at most {max_chars}")
    return cleaned


def safe_join(root: str | os.PathLike, name: str | os.PathLike) -> Path:
    """``root / name``, refusing any name that would land outside ``root``.

    Refused: absolute paths, ``..`` components, NUL bytes, empty names, and symlinks (anywhere on
    the way) that resolve outside ``root``. A name may contain sub-folders (``a/b.mp4``).

    Args:
        root: the folder the name must stay in (e.g. the gallery or a job folder).
        name: a relative name coming from a user, a URL or a settings file.

    Returns:
        The joined path (not resolved, so that it reads like ``root / name``); it need not exist.

    Raises:
        EymError: naming the offending name, if it escapes or is malformed.
    """
    name_str = os.fspath(name)
    if not isinstance(name_str, str) or not name_str.strip():
        raise EymError(f"empty name {name!r}; give a file name inside {Path(root).name}/")
    if "\x00" in name_str:
        raise EymError(f"name {name_str!r} contains a NUL byte; use a plain file name")
    rel = Path(name_str)
    if rel.is_absolute() or name_str.startswith(("/", "\\")) or (len(name_str) > 1 and name_str[1] == ":"):
        raise EymError(f"name {name_str!r} is an absolute path; give a name inside {Path(root).name}/")
    parts = name_str.replace("\\", "/").split("/")
    if ".." in parts:
        raise EymError(f"name {name_str!r} contains '..'; give a name inside {Path(root).name}/")
    root_path = Path(root)
    joined = root_path / rel
    # Resolve symlinks of what exists so far: a link inside root pointing out is an escape too.
    real_root = root_path.resolve()
    real = joined.resolve()
    if real != real_root and real_root not in real.parents:
        raise EymError(f"name {name_str!r} leads outside {root_path.name}/ (through a link); refused")
    return joined


# ---------------------------------------------------------------------------------------------
# Settings: the one table of ranges every config dataclass checks in __post_init__
# ---------------------------------------------------------------------------------------------
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a signed 64-bit seed
TRAIN_TIMESTEPS = 1000  # SD 1.5's DDPM training schedule: DDIM cannot take more steps than this

# (low, high, whole number?) per field, both ends included. Chosen for users: the paper's
# settings sit well inside, and the top ends bound what one request can cost (a 10^9-step
# request is refused here, before any work; the job runner also caps frames x steps).
RANGES: dict[str, dict[str, tuple[float, float, bool]]] = {
    "PreprocessConfig": {
        "num_frames": (1, 64, True),
        "size": (64, 1024, True),
        "start": (0, 100_000, True),
        "stride": (1, 10_000, True),
    },
    "TuneConfig": {
        "steps1": (0, 10_000, True),
        "steps2": (0, 10_000, True),
        "lr": (1e-12, 1.0, False),
        "weight_decay": (0.0, 10.0, False),
        "max_grad_norm": (1e-6, 1e6, False),
        "rec_weight": (0.0, 1.0, False),
        "seed": (0, SEED_LIMIT - 1, True),
        "checkpoint_every": (0, 100_000, True),
    },
    "InferConfig": {
        "ddim_steps": (1, TRAIN_TIMESTEPS, True),
        "guidance_scale": (1.0, 50.0, False),
        "controlnet_scale": (0.0, 10.0, False),
        "decode_chunk": (1, 256, True),
    },
}


def check_number(value: object, what: str, low: float, high: float, *, whole: bool = False) -> int | float:
    """``value`` if it is a finite number (a whole one if ``whole``) in ``[low, high]``; else EymError.

    Booleans are refused (``True`` is not 1 frame); ``None`` is left to the caller (optional fields).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EymError(f"{what} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise EymError(f"{what} must be a finite number, got {value!r}")
    if whole and not isinstance(value, int):
        if not float(value).is_integer():
            raise EymError(f"{what} must be a whole number, got {value!r}")
        value = int(value)
    if not low <= value <= high:
        raise EymError(f"{what}={_shown(value)} is out of range; use {_shown(low)} to {_shown(high)}")
    return value


def _shown(x: int | float) -> str:
    if isinstance(x, float):
        return f"{x:g}"
    return f"{x:,}" if abs(x) < 10**30 else f"{x:.3e}"


def check_ranges(config: object) -> None:
    """Check every field of ``config`` named in :data:`RANGES` (types, finiteness, bounds)."""
    for name, (low, high, whole) in RANGES.get(type(config).__name__, {}).items():
        value = getattr(config, name)
        if value is not None:
            check_number(value, name, low, high, whole=whole)


def as_whole(value: object, what: str) -> int:
    """A whole number from a form field (Gradio numbers arrive as floats); EymError otherwise."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise EymError(f"{what} must be a number, got {value!r}") from None
    return int(check_number(value, what, -float("inf"), float("inf"), whole=True))


def as_number(value: object, what: str) -> float:
    """A finite number from a form field; EymError otherwise."""
    return float(check_number(value, what, -float("inf"), float("inf")))


def check_ddim_steps(ddim_steps: int, scheduler: object) -> None:
    """DDIM cannot take more steps than the model was trained with (its scheduler says how many)."""
    train = int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", TRAIN_TIMESTEPS))
    if ddim_steps > train:
        raise EymError(f"ddim_steps={ddim_steps} is more than the model's {train} training timesteps; use at most {train}")

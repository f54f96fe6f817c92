"""Small checks on untrusted text: prompts, and names that become paths.

The app faces the public, so a prompt or a gallery/example name is hostile until checked:
:func:`check_prompt` bounds and cleans prompts, :func:`safe_join` keeps a name inside its folder.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from eym.errors import EymError

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

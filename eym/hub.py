"""Tuned weights leave the server: a zip of the tuned tensors and, given a token, a Hub repository.

A tuned-weights folder (``eym.editor``: ``tuned.safetensors`` with only the trained tensors, and
``manifest.json`` naming the base model, ControlNet, prompts and settings) is all another machine
needs to re-edit the same source with ``eym infer --tuned``.
"""

from __future__ import annotations

import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from eym.errors import EymError

TUNED_FILES = ("tuned.safetensors", "manifest.json")
TUNED_ZIP = "tuned_weights.zip"  # the name of a job's tuned-weights download (pack_tuned)
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def _tuned_files(folder: Path) -> list[Path]:
    files = [folder / name for name in TUNED_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise EymError(f"{folder} is not a tuned-weights folder (no {', '.join(missing)}); run the edit again")
    return files


def pack_tuned(folder: str | Path, out: str | Path) -> Path:
    """Zip the tuned tensors and their manifest into ``out`` (written atomically)."""
    from eym.cache import atomic_output

    files = _tuned_files(Path(folder))
    with atomic_output(out, suffix=".zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # safetensors do not compress
            for f in files:
                zf.write(f, arcname=f.name)
    return Path(out)


def unpack_tuned(archive: str | Path, folder: str | Path) -> Path:
    """Extract a :func:`pack_tuned` zip (only its two known members) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in TUNED_FILES:
                with zf.open(name) as src, open(folder / name, "wb") as dst:
                    dst.write(src.read())
    except (KeyError, zipfile.BadZipFile, OSError) as err:
        raise EymError(f"{Path(archive).name} is not a tuned-weights zip made by eym ({err})") from None
    return folder


def push_tuned(folder: str | Path, repo_id: str, token: str, *, private: bool = True, api: Any = None) -> str:
    """Upload a tuned-weights folder to a Hugging Face model repository (created if needed).

    Args:
        folder: the tuned-weights folder (or what :func:`unpack_tuned` extracted).
        repo_id: ``"user/name"``.
        token: a Hugging Face token with write access; used for this call only, never stored.
        private: create the repository private (an existing one keeps its visibility).
        api: an ``huggingface_hub.HfApi`` (tests pass a fake); default one made with ``token``.
    Returns:
        The repository's URL.
    Raises:
        EymError: a malformed repo id, an empty token, or the Hub refusing (its message, one line).
    """
    repo_id = (repo_id or "").strip()
    if not _REPO_RE.match(repo_id):
        raise EymError(f"the repository name {repo_id!r} must look like 'your-name/my-tuned-source'")
    if not (token or "").strip():
        raise EymError("a Hugging Face token with write access is needed to push (huggingface.co/settings/tokens)")
    files = _tuned_files(Path(folder))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token.strip())
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          allow_patterns=[f.name for f in files],
                          commit_message="Edit-Your-Motion tuned weights (tuned.safetensors + manifest.json)")
    except Exception as err:  # the hub raises HTTP, auth and validation errors of many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EymError(f"the Hub refused the upload to {repo_id}: {first}") from None
    return str(getattr(url, "url", None) or url or f"https://huggingface.co/{repo_id}")


def push_tuned_zip(archive: str | Path, repo_id: str, token: str, *, private: bool = True, api: Any = None) -> str:
    """:func:`push_tuned` for a zip made by :func:`pack_tuned` (what the app offers for download)."""
    with tempfile.TemporaryDirectory(prefix="eym-push-") as tmp:
        return push_tuned(unpack_tuned(archive, tmp), repo_id, token, private=private, api=api)

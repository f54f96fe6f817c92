"""Gallery manifests: named demo pairs (source video + reference video or preset motion + prompts).

A gallery is a folder with a manifest, ``gallery.yaml`` (or ``gallery.yml`` / ``gallery.json``)::

    version: 1
    root: .                      # optional: the folder entry paths are relative to
                                 # (default: the manifest's folder; relative to the manifest)
    entries:
      - name: taichi-raise-arms  # unique, letters/digits/-/_
        title: Tai chi -> raise both arms          # optional, shown in the app
        source: taichi_hd/taichi_copart00.mp4      # video file or numbered-frame folder
        reference: taichi_hd/taichi_copart06.mp4   # either a reference video ...
        # preset: raise_arms                        # ... or a built-in preset motion
        subject: A man in a white tai chi suit      # P_c
        source_motion: practicing tai chi in front of a hedge
        target_motion: raising both arms in front of a hedge
        # content_prompt / source_prompt / target_prompt: explicit P_c / P_s / P_t (override)
        num_frames: 8            # optional sampling hints
        start: 0
        stride: 2

Entry paths are relative to the root and can never leave it: absolute paths and ``..`` are
rejected, and symlinks are resolved before the containment check. The root itself is the
operator's choice (a command-line flag or the manifest's ``root`` key), which is how a test
can keep its manifest in a temporary folder and point it at a read-only media folder.

Used by the app (``--gallery``) and by ``eym suite`` / ``eym batch``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from eym.errors import EymError
from eym.validate import safe_join

logger = logging.getLogger(__name__)

MANIFEST_NAMES = ("gallery.yaml", "gallery.yml", "gallery.json")
SUPPORTED_VERSIONS = (1,)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_TOP_KEYS = {"version", "root", "entries"}


@dataclass(frozen=True)
class GalleryEntry:
    """One demo pair, with paths resolved and checked."""

    name: str  # unique id within the gallery (letters, digits, '-', '_')
    title: str  # label shown in the app; defaults to the name
    source: Path  # absolute, resolved path of the source video or frame folder
    reference: Path | None  # absolute, resolved path of the reference video; None with a preset
    preset: str | None  # built-in preset motion name (eym.presets.PRESETS); None with a reference
    subject: str | None = None  # subject description -> P_c
    source_motion: str | None = None  # what the source person does -> P_s
    target_motion: str | None = None  # what the edited person should do -> P_t
    content_prompt: str | None = None  # explicit P_c (overrides the derived one)
    source_prompt: str | None = None  # explicit P_s
    target_prompt: str | None = None  # explicit P_t
    num_frames: int | None = None  # sampling hint: frames to take
    start: int | None = None  # sampling hint: first source frame
    stride: int | None = None  # sampling hint: take every stride-th frame

    @property
    def motion_label(self) -> str:
        """``"preset: wave"`` or the reference file's name, for listings."""
        return f"preset: {self.preset}" if self.preset else f"reference: {self.reference.name}"


@dataclass(frozen=True)
class Gallery:
    """A loaded manifest: where it came from and its entries in file order."""

    manifest: Path  # the manifest file that was read
    root: Path  # resolved folder that entry paths are relative to
    entries: tuple[GalleryEntry, ...]  # in manifest order, names unique

    def get(self, name: str) -> GalleryEntry:
        """The entry called ``name``; raises :class:`EymError` naming the known ones otherwise."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        known = ", ".join(e.name for e in self.entries) or "none"
        raise EymError(f"gallery {self.manifest}: no entry named {name!r} (known: {known})")

    def names(self) -> list[str]:
        return [e.name for e in self.entries]


_ENTRY_KEYS = {f.name for f in fields(GalleryEntry)}
_TEXT_KEYS = ("title", "subject", "source_motion", "target_motion", "content_prompt", "source_prompt", "target_prompt")
_INT_KEYS = {"num_frames": 1, "start": 0, "stride": 1}  # key -> smallest allowed value


def find_manifest(path: str | Path) -> Path:
    """The manifest for ``path``: the file itself, or the first of :data:`MANIFEST_NAMES` in a folder.

    Args:
        path: a gallery folder or a manifest file.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in MANIFEST_NAMES:
            if (path / name).is_file():
                return path / name
        raise EymError(f"gallery folder {path} has no {' / '.join(MANIFEST_NAMES)}: add one (see docs/APP.md)")
    raise EymError(f"gallery {path} does not exist: pass a folder with a gallery.yaml or the manifest file")


def _read_manifest(manifest: Path) -> Any:
    text = manifest.read_text(encoding="utf-8")
    if manifest.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise EymError(f"gallery {manifest}: not valid JSON at line {err.lineno}: {err.msg}") from None
    import yaml  # only needed for YAML manifests

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise EymError(f"gallery {manifest}: not valid YAML{where}; fix the syntax") from None


def resolve_inside(root: Path, rel: Any, *, what: str) -> Path:
    """Resolve a manifest path under ``root``, refusing anything that could leave it.

    Args:
        root: resolved gallery root.
        rel: the manifest value (must be a relative path string).
        what: how to name the value in error messages (``"gallery.yaml entry 'x' source"``).
    Returns:
        The resolved absolute path; it exists and lies inside ``root`` (after following symlinks).
    """
    if not isinstance(rel, str) or not rel.strip():
        raise EymError(f"{what} must be a relative path string, got {rel!r}")
    try:
        # safe_join refuses absolute paths, '..' and symlinks that resolve outside root
        joined = safe_join(root, rel)
    except EymError as err:
        raise EymError(f"{what}: {err}") from None
    if not joined.exists():
        raise EymError(f"{what} {rel!r} does not exist under {root}")
    return joined.resolve()


def _check_entry(raw: Any, index: int, root: Path, manifest: Path, presets: set[str] | None) -> GalleryEntry:
    where = f"gallery {manifest.name} entry {index + 1}"
    if not isinstance(raw, dict):
        raise EymError(f"{where} must be a mapping of keys to values, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise EymError(f"{where}: 'name' must be 1-64 letters, digits, '-' or '_', got {name!r}")
    where = f"gallery {manifest.name} entry {name!r}"
    unknown = sorted(set(raw) - _ENTRY_KEYS)
    if unknown:
        raise EymError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_ENTRY_KEYS))}")

    for key in _TEXT_KEYS:
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise EymError(f"{where}: {key!r} must be non-empty text, got {value!r}")
    for key, low in _INT_KEYS.items():
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise EymError(f"{where}: {key!r} must be an integer >= {low}, got {value!r}")

    if "source" not in raw:
        raise EymError(f"{where}: 'source' is missing (a video file or frame folder under {root})")
    source = resolve_inside(root, raw["source"], what=f"{where} source")
    has_ref, has_preset = raw.get("reference") is not None, raw.get("preset") is not None
    if has_ref == has_preset:
        raise EymError(f"{where}: give exactly one of 'reference' (a video) or 'preset' (a built-in motion)")
    reference = resolve_inside(root, raw["reference"], what=f"{where} reference") if has_ref else None
    preset = raw.get("preset")
    if has_preset:
        if not isinstance(preset, str):
            raise EymError(f"{where}: 'preset' must be a preset name, got {preset!r}")
        if presets is not None and preset not in presets:
            raise EymError(f"{where}: unknown preset {preset!r}; choose one of {', '.join(sorted(presets))}")

    # The app composes P_c/P_s/P_t from the parts (eym.editor.derive_prompts); an entry needs
    # enough of either form to produce a content and a target prompt.
    if not (raw.get("subject") or raw.get("content_prompt")):
        raise EymError(f"{where}: give 'subject' (or an explicit 'content_prompt')")
    if not (raw.get("target_motion") or raw.get("target_prompt")):
        raise EymError(f"{where}: give 'target_motion' (or an explicit 'target_prompt')")

    values = {k: raw.get(k) for k in _TEXT_KEYS + tuple(_INT_KEYS)}
    values["title"] = (values["title"] or name).strip()
    return GalleryEntry(name=name, source=source, reference=reference, preset=preset, **values)


def load_gallery(path: str | Path, *, presets: Iterable[str] | None = None) -> Gallery:
    """Read and validate a gallery manifest.

    Args:
        path: a gallery folder (containing ``gallery.yaml``/``.yml``/``.json``) or a manifest file.
        presets: the preset names entries may use; default ``eym.presets.PRESETS``.
    Returns:
        The :class:`Gallery`; every path in it exists and lies inside its root.
    Raises:
        EymError: naming the manifest, the entry and the key at fault.
    """
    manifest = find_manifest(path).resolve()
    if presets is None:
        from eym.presets import PRESETS

        presets = PRESETS
    preset_names = set(presets)
    data = _read_manifest(manifest)
    if not isinstance(data, dict):
        raise EymError(f"gallery {manifest}: the top level must be a mapping with 'version' and 'entries'")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise EymError(f"gallery {manifest}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    version = data.get("version", 1)
    if version not in SUPPORTED_VERSIONS:
        raise EymError(f"gallery {manifest}: version {version!r} is not supported (supported: {SUPPORTED_VERSIONS})")

    root_value = data.get("root", ".")
    if not isinstance(root_value, str):
        raise EymError(f"gallery {manifest}: 'root' must be a folder path, got {root_value!r}")
    root = (manifest.parent / Path(root_value).expanduser()).resolve()
    if not root.is_dir():
        raise EymError(f"gallery {manifest}: root folder {root} does not exist")

    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list):
        raise EymError(f"gallery {manifest}: 'entries' must be a list, got {type(raw_entries).__name__}")
    entries: list[GalleryEntry] = []
    for i, raw in enumerate(raw_entries):
        entry = _check_entry(raw, i, root, manifest, preset_names)
        if any(e.name == entry.name for e in entries):
            raise EymError(f"gallery {manifest}: entry name {entry.name!r} appears twice; names must be unique")
        entries.append(entry)
    logger.info("gallery %s: %d entries under %s", manifest, len(entries), root)
    return Gallery(manifest=manifest, root=root, entries=tuple(entries))

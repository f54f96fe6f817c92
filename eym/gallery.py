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

Clips that cannot be shipped (third-party footage) are listed under ``clips``, each with a
public origin pinned by commit and a sha256::

    clips:
      - file: taichi_hd/taichi_copart00.mp4   # the path entries use, in the store and in a mirror
        sha256: 8e18...                        # of the prepared file (what a mirror holds)
        origin: snap-research/articulated-animation@03f1968bb1be:web/videos/copart/0.mp4
        url: https://raw.githubusercontent.com/.../03f1968bb1be.../web/videos/copart/0.mp4
        origin_sha256: b1c3...                 # of the file at url (default: sha256, a verbatim copy)
        crop: [0, 0, 256, 256]                 # x, y, width, height kept of the origin's frames

An entry path listed there resolves to the clip's verified copy in the clip store
(:func:`clip_store`), not under ``root``. :func:`fetch_clips` fills the store: from a local
mirror folder laid out like the ``file`` paths (offline; checked against ``sha256``), or from
``url`` (checked against ``origin_sha256``, then cropped). Every clip is built as a cache entry
(:func:`eym.cache.building`: a temporary folder, fsynced, renamed into place, with the sha256 of
its file recorded and checked on every load), so a cut-off download, a wrong hash or a kill
mid-way never leaves a clip that gets used.

Used by the app (``--gallery``), ``eym gallery fetch`` and ``eym suite`` / ``eym batch``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from eym.errors import EymError
from eym.validate import safe_join

logger = logging.getLogger(__name__)

MANIFEST_NAMES = ("gallery.yaml", "gallery.yml", "gallery.json")
SUPPORTED_VERSIONS = (1,)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_TOP_KEYS = {"version", "root", "entries", "clips"}
_CLIP_KEYS = {"file", "sha256", "origin", "url", "origin_sha256", "crop", "license"}
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
CLIP_STORE_ENV = "EYM_GALLERY_CACHE"  # where fetched clips live (default: $EYM_HOME/gallery)
MIRROR_ENV = "EYM_GALLERY_MIRROR"  # a local folder that replaces the clips' origins (offline)
_DOWNLOAD_CHUNK = 1 << 16


@dataclass(frozen=True)
class ClipSpec:
    """A clip the gallery uses but cannot ship: where it comes from and its hashes."""

    file: str  # relative path entries use; also its path in a mirror folder
    sha256: str  # of the prepared file, as a mirror holds it
    origin: str | None = None  # "owner/repo@commit:path", for people
    url: str | None = None  # where to download the origin file (http or https)
    origin_sha256: str | None = None  # of the file at url; None: the origin is the prepared file itself
    crop: tuple[int, int, int, int] | None = None  # x, y, width, height kept of the origin's frames
    license: str | None = None  # the origin's licence, as its repository states it

    @property
    def key(self) -> str:
        """The clip's folder in the store: named by the prepared hash, so a re-pinned clip is a new entry."""
        return f"{Path(self.file).stem}-{self.sha256[:16]}"


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
    clips: tuple[ClipSpec, ...] = ()  # clips fetched into the store (see fetch_clips)
    skipped: dict[str, str] = field(default_factory=dict)  # entry name -> why it was left out (skip_missing)

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


class _Unreachable(EymError):
    """A download failed before any answer came (no network, DNS, refused, timed out)."""


class _MissingClip(EymError):
    """An entry's clip is listed under ``clips`` but not (yet) in the store."""


def _resolve(root: Path, rel: Any, *, what: str, clips: dict[str, Path | None]) -> Path:
    if isinstance(rel, str) and rel in clips:
        found = clips[rel]
        if found is None:
            raise _MissingClip(f"{what} {rel!r} has not been fetched: run `eym gallery fetch` (or start the app online)")
        return found
    return resolve_inside(root, rel, what=what)


def _check_entry(raw: Any, index: int, root: Path, manifest: Path, presets: set[str] | None,
                 clips: dict[str, Path | None] | None = None) -> GalleryEntry:
    clips = clips or {}
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
    source = _resolve(root, raw["source"], what=f"{where} source", clips=clips)
    has_ref, has_preset = raw.get("reference") is not None, raw.get("preset") is not None
    if has_ref == has_preset:
        raise EymError(f"{where}: give exactly one of 'reference' (a video) or 'preset' (a built-in motion)")
    reference = _resolve(root, raw["reference"], what=f"{where} reference", clips=clips) if has_ref else None
    preset = raw.get("preset")
    if has_preset:
        if not isinstance(preset, str):
            raise EymError(f"{where}: 'preset' must be a preset name, got {preset!r}")
        if presets is not None and preset not in presets:
            raise EymError(f"{where}: unknown preset {preset!r}; choose one of {', '.join(sorted(presets))}")

    # The app composes P_c/P_s/P_t from the parts (eym.prompts.compose_prompts); an entry needs
    # enough of either form to produce a content and a target prompt.
    if not (raw.get("subject") or raw.get("content_prompt")):
        raise EymError(f"{where}: give 'subject' (or an explicit 'content_prompt')")
    if not (raw.get("target_motion") or raw.get("target_prompt")):
        raise EymError(f"{where}: give 'target_motion' (or an explicit 'target_prompt')")

    values = {k: raw.get(k) for k in _TEXT_KEYS + tuple(_INT_KEYS)}
    values["title"] = (values["title"] or name).strip()
    return GalleryEntry(name=name, source=source, reference=reference, preset=preset, **values)


def _check_clips(raw: Any, manifest: Path) -> tuple[ClipSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise EymError(f"gallery {manifest}: 'clips' must be a list, got {type(raw).__name__}")
    specs: list[ClipSpec] = []
    for i, item in enumerate(raw):
        where = f"gallery {manifest.name} clip {i + 1}"
        if not isinstance(item, dict):
            raise EymError(f"{where} must be a mapping, got {type(item).__name__}")
        unknown = sorted(set(item) - _CLIP_KEYS)
        if unknown:
            raise EymError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_CLIP_KEYS))}")
        file = item.get("file")
        if not isinstance(file, str) or not file.strip():
            raise EymError(f"{where}: 'file' must be a relative path, got {file!r}")
        safe_join(Path("/clips"), file)  # refuses absolute paths and '..'
        where = f"gallery {manifest.name} clip {file!r}"
        for key in ("sha256", "origin_sha256"):
            value = item.get(key)
            if (key == "sha256" or value is not None) and (not isinstance(value, str) or not _SHA_RE.match(value)):
                raise EymError(f"{where}: {key!r} must be 64 lowercase hex digits, got {value!r}")
        url = item.get("url")
        if url is not None and (not isinstance(url, str) or not url.startswith(("https://", "http://"))):
            raise EymError(f"{where}: 'url' must be an http(s) address, got {url!r}")
        crop = item.get("crop")
        if crop is not None:
            if (not isinstance(crop, list) or len(crop) != 4
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in crop) or 0 in crop[2:]):
                raise EymError(f"{where}: 'crop' must be [x, y, width, height] in pixels, got {crop!r}")
            crop = tuple(crop)
            if item.get("origin_sha256") is None:
                raise EymError(f"{where}: a cropped clip needs 'origin_sha256', the hash of the file before cropping")
        if any(s.file == file for s in specs):
            raise EymError(f"{where} is listed twice")
        specs.append(ClipSpec(file=file, sha256=item["sha256"], origin=item.get("origin"), url=url,
                              origin_sha256=item.get("origin_sha256"), crop=crop, license=item.get("license")))
    return tuple(specs)


def load_gallery(path: str | Path, *, presets: Iterable[str] | None = None, store: str | Path | None = None,
                 skip_missing: bool = False) -> Gallery:
    """Read and validate a gallery manifest.

    Args:
        path: a gallery folder (containing ``gallery.yaml``/``.yml``/``.json``) or a manifest file.
        presets: the preset names entries may use; default ``eym.presets.PRESETS``.
        store: the clip store for the manifest's ``clips`` (default :func:`clip_store`).
        skip_missing: leave out (with a log line, and in ``Gallery.skipped``) entries whose
            clips are missing or fail their hash check, instead of raising.
    Returns:
        The :class:`Gallery`; every path in it exists and lies inside its root or the store.
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
    specs = _check_clips(data.get("clips"), manifest)
    store_dir = Path(store) if store is not None else clip_store()
    clips = {spec.file: cached_clip(spec, store_dir) for spec in specs}

    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list):
        raise EymError(f"gallery {manifest}: 'entries' must be a list, got {type(raw_entries).__name__}")
    entries: list[GalleryEntry] = []
    skipped: dict[str, str] = {}
    for i, raw in enumerate(raw_entries):
        try:
            entry = _check_entry(raw, i, root, manifest, preset_names, clips)
        except _MissingClip as err:
            if not skip_missing:
                raise
            name = raw.get("name", f"entry {i + 1}") if isinstance(raw, dict) else f"entry {i + 1}"
            skipped[str(name)] = str(err)
            logger.warning("gallery: leaving out %s: %s", name, err)
            continue
        if any(e.name == entry.name for e in entries) or entry.name in skipped:
            raise EymError(f"gallery {manifest}: entry name {entry.name!r} appears twice; names must be unique")
        entries.append(entry)
    logger.info("gallery %s: %d entries under %s", manifest, len(entries), root)
    return Gallery(manifest=manifest, root=root, entries=tuple(entries), clips=specs, skipped=skipped)


# ---------------------------------------------------------------------------------------------
# The clip store: fetching clips from a mirror or their origin, verified
# ---------------------------------------------------------------------------------------------
def clip_store() -> Path:
    """Where fetched gallery clips live: ``$EYM_GALLERY_CACHE``, else ``$EYM_HOME/gallery``."""
    root = os.environ.get(CLIP_STORE_ENV)
    if root:
        return Path(root).expanduser()
    from eym.env import eym_home

    return eym_home() / "gallery"


def cached_clip(spec: ClipSpec, store: str | Path) -> Path | None:
    """The clip's verified file in the store, or ``None`` (absent, partial or damaged: removed)."""
    from eym.cache import load_entry

    folder = Path(store) / spec.key
    meta = load_entry(folder)  # checks the recorded sha256 of the file; removes a damaged entry
    if meta is None:
        return None
    path = folder / Path(spec.file).name
    return path if path.is_file() else None


@dataclass(frozen=True)
class FetchReport:
    """What :func:`fetch_clips` did, per clip file."""

    present: tuple[str, ...]  # already in the store, verified
    fetched: tuple[str, ...]  # added by this call
    failed: dict[str, str]  # file -> why (the clip stays absent)

    @property
    def ok(self) -> bool:
        return not self.failed


def fetch_clips(path: str | Path, *, mirror: str | Path | None = None, store: str | Path | None = None,
                timeout: float = 60.0, names: Iterable[str] | None = None) -> FetchReport:
    """Put the manifest's clips into the clip store, verified; what is there already is kept.

    Args:
        path: gallery folder or manifest file.
        mirror: a local folder laid out like the clips' ``file`` paths (e.g. ``../shared/media``);
            it replaces the origins, so nothing touches the network. Default ``$EYM_GALLERY_MIRROR``.
        store: the clip store (default :func:`clip_store`).
        timeout: seconds a download may stall before it is abandoned.
        names: fetch only these clip files (default: all).
    Returns:
        A :class:`FetchReport`. A clip that cannot be had (no mirror copy, network down, a bad
        hash, a cut-off transfer) is reported in ``failed`` and left absent; it never raises for one clip.
    """
    manifest = find_manifest(path).resolve()
    data = _read_manifest(manifest)
    specs = _check_clips(data.get("clips") if isinstance(data, dict) else None, manifest)
    wanted = set(names) if names is not None else None
    store_dir = Path(store) if store is not None else clip_store()
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    present, fetched, failed = [], [], {}
    unreachable: str | None = None  # offline: one unanswered download is enough, the rest are not tried
    for spec in specs:
        if wanted is not None and spec.file not in wanted:
            continue
        if cached_clip(spec, store_dir) is not None:
            present.append(spec.file)
            continue
        if unreachable is not None and mirror is None:
            failed[spec.file] = f"not tried: {unreachable}"
            continue
        try:
            fetch_clip(spec, store_dir, mirror=mirror, timeout=timeout)
            fetched.append(spec.file)
        except _Unreachable as err:
            unreachable = str(err)
            failed[spec.file] = str(err)
            logger.warning("gallery clip %s not fetched: %s", spec.file, err)
        except EymError as err:
            failed[spec.file] = str(err)
            logger.warning("gallery clip %s not fetched: %s", spec.file, err)
    return FetchReport(present=tuple(present), fetched=tuple(fetched), failed=failed)


def fetch_clip(spec: ClipSpec, store: str | Path, *, mirror: str | Path | None = None, timeout: float = 60.0) -> Path:
    """Fetch one clip into the store (from ``mirror`` if given, else from ``spec.url``), verified.

    Returns:
        The clip's file in the store.
    Raises:
        EymError: no mirror copy, download failed or cut off, or a hash that does not match.
    """
    from eym.cache import building, sha256_file

    folder = Path(store) / spec.key
    name = Path(spec.file).name
    if mirror is not None:
        source = safe_join(Path(mirror), spec.file)
        if not source.is_file():
            raise EymError(f"the mirror {mirror} has no {spec.file}")
        with building(folder, meta={"kind": "gallery-clip", "file": spec.file, "from": "mirror"}) as tmp:
            shutil.copyfile(source, tmp / name)
            _fsync(tmp / name)
            got = sha256_file(tmp / name)
            if got != spec.sha256:
                raise EymError(f"{source} has sha256 {got[:12]}..., the manifest pins {spec.sha256[:12]}...: "
                               "the mirror holds another file")
        return folder / name
    if spec.url is None:
        raise EymError(f"{spec.file} has no url to download it from; give a mirror folder")
    origin_sha = spec.origin_sha256 or spec.sha256
    with building(folder, meta={"kind": "gallery-clip", "file": spec.file, "from": spec.url,
                                "origin_sha256": origin_sha, "crop": spec.crop}) as tmp:
        downloaded = tmp / (".origin" + Path(spec.file).suffix)
        download(spec.url, downloaded, sha256=origin_sha, timeout=timeout)
        if spec.crop is None:
            os.replace(downloaded, tmp / name)
        else:
            _crop_video(downloaded, tmp / name, spec.crop)
            downloaded.unlink()
    return folder / name


def download(url: str, dest: str | Path, *, sha256: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically: a temporary file, hashed while it streams,
    length-checked, fsynced and renamed only when the sha256 matches.

    Raises:
        EymError: an unreachable server, an HTTP error, a transfer cut short (fewer bytes than
            Content-Length, or a dropped connection) or a sha256 that does not match.
    """
    import hashlib

    from eym.cache import atomic_output

    if not url.startswith(("https://", "http://")):
        raise EymError(f"{url!r}: only http(s) downloads are allowed")
    dest = Path(dest)
    digest = hashlib.sha256()
    received = 0
    try:
        with atomic_output(dest) as tmp:
            request = urllib.request.Request(url, headers={"User-Agent": "eym-gallery"})
            with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
                expected = response.headers.get("Content-Length")
                while block := response.read(_DOWNLOAD_CHUNK):
                    digest.update(block)
                    out.write(block)
                    received += len(block)
                if expected is not None and received != int(expected):
                    raise EymError(f"{url}: the transfer stopped after {received} of {expected} bytes; try again")
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != sha256:
                raise EymError(f"{url}: sha256 {digest.hexdigest()[:12]}... does not match the pinned "
                               f"{sha256[:12]}...; the file was not used")
    except EymError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        no_answer = received == 0 and not isinstance(err, urllib.error.HTTPError)
        raise (_Unreachable if no_answer else EymError)(f"{url}: download failed after {received} bytes ({reason}); check the network or use a mirror "
                       f"folder ({MIRROR_ENV})") from None
    except Exception as err:  # http.client.IncompleteRead and friends: a dropped connection
        raise EymError(f"{url}: the transfer was cut off after {received} bytes ({type(err).__name__}); try again") from None
    return dest


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _crop_video(origin: Path, out: Path, crop: tuple[int, int, int, int]) -> None:
    """Keep the ``crop`` rectangle of every frame of ``origin`` (all frames, its fps) in an mp4."""
    from eym.video import read_video, write_mp4

    video = read_video(origin, num_frames=None, size=None)
    x, y, w, h = crop
    frames = video.frames[:, y:y + h, x:x + w]
    if frames.shape[1:3] != (h, w):
        raise EymError(f"{origin.name}: frames are {video.frames.shape[2]}x{video.frames.shape[1]}, "
                       f"too small for the crop {list(crop)}; the manifest does not fit this file")
    write_mp4(frames, out, video.source_fps)
    _fsync(out)


# ---------------------------------------------------------------------------------------------
# Staging for the app: playable copies and thumbnails the server may serve
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StagedEntry:
    """A gallery pair copied where the app serves files from."""

    source: Path  # source.mp4 (a frame folder is encoded)
    reference: Path | None  # reference video, None with a preset
    thumbnail: Path  # thumbnail.png: the source's first frame beside the reference's


THUMB_HEIGHT = 160


def stage_entry(entry: GalleryEntry, cache_dir: str | Path) -> StagedEntry:
    """Copy (or, for a frame folder, encode) a pair into ``cache_dir/<name>/`` with a thumbnail.

    The app's server only serves its outputs folder, and a browser cannot play a frame folder;
    a per-entry copy solves both. Built as a cache entry (atomic, hash-checked), reused after.
    """
    import cv2

    from eym.cache import building, load_entry
    from eym.video import read_video, thumbnail_strip, write_mp4

    folder = Path(cache_dir) / entry.name
    names = {"source": entry.source, "reference": entry.reference}
    if load_entry(folder) is None:
        with building(folder, meta={"entry": entry.name, "source": str(entry.source),
                                    "reference": str(entry.reference) if entry.reference else None}) as tmp:
            firsts = []
            for role, path in names.items():
                if path is None:
                    continue
                if path.is_dir():
                    video = read_video(path, num_frames=None, size=None)
                    write_mp4(video.frames, tmp / f"{role}.mp4", video.fps)
                else:
                    shutil.copyfile(path, tmp / f"{role}{path.suffix.lower()}")
                firsts.append(read_video(path, num_frames=1, size=None).frames[0])
            thumb = thumbnail_strip(firsts, height=THUMB_HEIGHT)
            cv2.imwrite(str(tmp / "thumbnail.png"), cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR))
    found = {p.stem: p for p in folder.iterdir() if p.stem in names}
    return StagedEntry(source=found["source"], reference=found.get("reference"), thumbnail=folder / "thumbnail.png")


# ---------------------------------------------------------------------------------------------
# Cached examples: finished edits of gallery pairs, shown before anyone runs a job
# ---------------------------------------------------------------------------------------------
EXAMPLES_ENV = "EYM_EXAMPLES"  # where finished examples live (default: $EYM_HOME/examples)
EXAMPLE_VIDEO = "edited.mp4"
EXAMPLE_SIDE = "side_by_side.mp4"


@dataclass(frozen=True)
class Example:
    """A finished edit of one gallery pair with one base model."""

    entry: str
    video: Path
    side_by_side: Path | None
    model: str


def examples_dir() -> Path:
    root = os.environ.get(EXAMPLES_ENV)
    if root:
        return Path(root).expanduser()
    from eym.env import eym_home

    return eym_home() / "examples"


def _model_slug(model: str) -> str:
    from eym.cache import sha256_bytes

    tail = re.sub(r"[^A-Za-z0-9]+", "-", Path(str(model)).name).strip("-")[:40] or "model"
    return f"{tail}-{sha256_bytes(str(model).encode())[:10]}"


def save_example(entry: str, model: str, video: str | Path, side_by_side: str | Path | None = None, *,
                 store: str | Path | None = None) -> Example:
    """Keep a finished edit of gallery entry ``entry`` made with base model ``model`` (``eym suite --save-examples``).

    Stored as ``<store>/<model slug>/<entry>/`` (atomic, hash-checked); an older one is replaced.
    """
    from eym.cache import building

    folder = Path(store or examples_dir()) / _model_slug(model) / entry
    shutil.rmtree(folder, ignore_errors=True)  # a newer result replaces the old one
    with building(folder, meta={"kind": "eym-example", "entry": entry, "model": str(model)}) as tmp:
        shutil.copyfile(video, tmp / EXAMPLE_VIDEO)
        if side_by_side is not None and Path(side_by_side).is_file():
            shutil.copyfile(side_by_side, tmp / EXAMPLE_SIDE)
    return find_example(entry, model, store=store)  # type: ignore[return-value]


def find_example(entry: str, model: str, *, store: str | Path | None = None) -> Example | None:
    """The finished example of ``entry`` with ``model``, if one was made and is intact."""
    from eym.cache import load_entry

    folder = Path(store or examples_dir()) / _model_slug(model) / entry
    meta = load_entry(folder)
    if meta is None or not (folder / EXAMPLE_VIDEO).is_file():
        return None
    side = folder / EXAMPLE_SIDE
    return Example(entry=entry, video=folder / EXAMPLE_VIDEO, side_by_side=side if side.is_file() else None,
                   model=str(model))


# ---------------------------------------------------------------------------------------------
# The gallery as a page offers it: staged pairs and their finished examples, served copies only
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PageGallery:
    """The pairs a page can offer: those that staged, in manifest order, with their examples."""

    gallery: Gallery | None  # the loaded manifest (None: no gallery)
    staged: dict[str, StagedEntry] = field(default_factory=dict)  # name -> playable copies under the served folder
    examples: dict[str, Example] = field(default_factory=dict)  # name -> finished example, copied under the served folder

    @property
    def entries(self) -> list[GalleryEntry]:
        return [e for e in self.gallery.entries if e.name in self.staged] if self.gallery is not None else []


def stage_gallery(path: str | Path | None, served_dir: str | Path, model: str | None) -> PageGallery:
    """Load a gallery, stage every pair under ``served_dir/_gallery`` and copy the finished
    examples made with ``model`` under ``served_dir/_examples``; pairs that fail are left out.

    Args:
        path: gallery folder or manifest (:func:`load_gallery`, missing clips skipped); None for none.
        served_dir: the only folder the server serves files from.
        model: the loaded base model's id, to find its finished examples; None for none.
    Raises:
        EymError: the manifest is invalid.
    """
    if path is None:
        return PageGallery(None)
    gallery = load_gallery(path, skip_missing=True)
    served_dir = Path(served_dir)
    staged: dict[str, StagedEntry] = {}
    examples: dict[str, Example] = {}
    for entry in gallery.entries:
        try:
            staged[entry.name] = stage_entry(entry, served_dir / "_gallery")
        except (EymError, OSError) as err:
            logger.warning("gallery: leaving out %s: %s", entry.name, err)
            continue
        example = find_example(entry.name, model) if isinstance(model, str) else None
        if example is not None:
            folder = served_dir / "_examples" / entry.name
            folder.mkdir(parents=True, exist_ok=True)
            copies = {kind: folder / getattr(example, kind).name for kind in ("video", "side_by_side")
                      if getattr(example, kind) is not None}
            for kind, copy in copies.items():
                shutil.copyfile(getattr(example, kind), copy)
            examples[entry.name] = Example(entry=example.entry, video=copies["video"],
                                           side_by_side=copies.get("side_by_side"), model=example.model)
    logger.info("gallery: %d pairs on the page, %d with a finished example", len(staged), len(examples))
    return PageGallery(gallery, staged, examples)

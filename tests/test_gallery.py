"""Gallery manifests: format, path containment, error messages, the committed examples/ gallery."""

from __future__ import annotations

import json
import os
import re
import types
from pathlib import Path

import numpy as np
import pytest

from eym.cache import sha256_bytes, sha256_file
from eym.errors import EymError
from eym.gallery import MANIFEST_NAMES, download, fetch_clips, find_manifest, load_gallery, resolve_inside

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"wave", "raise_arms", "squat"}


def _folder(tmp_path: Path) -> Path:
    """A gallery folder with two 'videos' (content is irrelevant to the loader) and a frame folder."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(b"x")
    (tmp_path / "clips" / "b.mp4").write_bytes(b"y")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "0000.png").write_bytes(b"z")
    return tmp_path


def _write(folder: Path, data, name: str = "gallery.yaml") -> Path:
    import yaml

    path = folder / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


def _entry(**kw):
    base = {"name": "one", "source": "clips/a.mp4", "reference": "clips/b.mp4", "subject": "A man",
            "source_motion": "is walking", "target_motion": "is waving"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def test_yaml_and_json_load_the_same(tmp_path):
    folder = _folder(tmp_path)
    data = {"version": 1, "entries": [_entry(), _entry(name="two", reference=None, preset="wave", source="frames",
                                                      num_frames=8, stride=2)]}
    _write(folder, data)
    yaml_gallery = load_gallery(folder, presets=PRESETS)
    (folder / "gallery.yaml").unlink()
    _write(folder, data, "gallery.json")
    json_gallery = load_gallery(folder, presets=PRESETS)
    assert yaml_gallery.entries == json_gallery.entries
    one, two = yaml_gallery.entries
    assert one.source == (folder / "clips" / "a.mp4").resolve() and one.reference == (folder / "clips/b.mp4").resolve()
    assert one.preset is None and one.title == "one" and one.motion_label == "reference: b.mp4"
    assert two.preset == "wave" and two.reference is None and two.source.is_dir()
    assert (two.num_frames, two.start, two.stride) == (8, None, 2)
    assert yaml_gallery.get("two") is two
    with pytest.raises(EymError, match="no entry named 'three'.*one, two"):
        yaml_gallery.get("three")


def test_manifest_file_can_be_passed_directly_and_root_can_point_elsewhere(tmp_path):
    media = _folder(tmp_path / "media")
    elsewhere = tmp_path / "manifests"
    elsewhere.mkdir()
    manifest = _write(elsewhere, {"root": str(media), "entries": [_entry()]}, "pairs.yml")
    gallery = load_gallery(manifest, presets=PRESETS)
    assert gallery.root == media.resolve() and gallery.manifest == manifest.resolve()
    assert gallery.entries[0].source == (media / "clips" / "a.mp4").resolve()
    # a relative root is relative to the manifest, not to the working directory
    _write(elsewhere, {"root": "../media", "entries": [_entry()]}, "rel.yaml")
    assert load_gallery(elsewhere / "rel.yaml", presets=PRESETS).root == media.resolve()


@pytest.mark.parametrize(
    "path, message",
    [
        ("/etc/passwd", "is an absolute path"),
        ("C:/x.mp4", "is an absolute path"),
        ("~/x.mp4", "does not exist"),
        ("../outside.mp4", "contains '..'"),
        ("clips/../../outside.mp4", "contains '..'"),
        ("clips\\..\\..\\outside.mp4", "contains '..'"),
        ("clips/missing.mp4", "does not exist"),
        ("", "relative path string"),
        (5, "relative path string"),
    ],
)
def test_paths_cannot_escape_or_be_missing(tmp_path, path, message):
    folder = _folder(tmp_path / "g")
    (tmp_path / "outside.mp4").write_bytes(b"secret")
    _write(folder, {"entries": [_entry(source=path)]})
    with pytest.raises(EymError, match=message) as err:
        load_gallery(folder, presets=PRESETS)
    assert "entry 'one' source" in str(err.value)


@pytest.mark.skipif(os.name == "nt", reason="symlinks")
def test_symlinks_leading_out_are_refused_but_inside_ones_are_fine(tmp_path):
    folder = _folder(tmp_path / "g")
    (tmp_path / "outside.mp4").write_bytes(b"secret")
    (folder / "clips" / "escape.mp4").symlink_to(tmp_path / "outside.mp4")
    (folder / "alias.mp4").symlink_to(folder / "clips" / "a.mp4")
    _write(folder, {"entries": [_entry(source="clips/escape.mp4")]})
    with pytest.raises(EymError, match="leads outside"):
        load_gallery(folder, presets=PRESETS)
    _write(folder, {"entries": [_entry(source="alias.mp4")]})
    assert load_gallery(folder, presets=PRESETS).entries[0].source == (folder / "clips" / "a.mp4").resolve()
    # a symlinked folder pointing out is caught too
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "v.mp4").write_bytes(b"v")
    (folder / "linked").symlink_to(tmp_path / "outdir")
    _write(folder, {"entries": [_entry(source="linked/v.mp4")]})
    with pytest.raises(EymError, match="leads outside"):
        load_gallery(folder, presets=PRESETS)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"entries": [_entry(colour="red")]}, "unknown key\\(s\\) colour"),
        ({"entries": [_entry()], "extra": 1}, "unknown top-level key\\(s\\) extra"),
        ({"version": 2, "entries": []}, "version 2 is not supported"),
        ({"entries": {"a": 1}}, "'entries' must be a list"),
        ([1, 2], "top level must be a mapping"),
        ({"entries": ["x"]}, "entry 1 must be a mapping"),
        ({"entries": [_entry(name="bad name!")]}, "'name' must be"),
        ({"entries": [_entry(), _entry()]}, "appears twice"),
        ({"entries": [_entry(preset="wave")]}, "exactly one of 'reference'"),
        ({"entries": [_entry(reference=None)]}, "exactly one of 'reference'"),
        ({"entries": [_entry(reference=None, preset="moonwalk")]}, "unknown preset 'moonwalk'; choose one of raise_arms, squat, wave"),
        ({"entries": [_entry(subject=None)]}, "give 'subject'"),
        ({"entries": [_entry(target_motion=None)]}, "give 'target_motion'"),
        ({"entries": [_entry(subject="  ")]}, "'subject' must be non-empty text"),
        ({"entries": [_entry(num_frames=0)]}, "'num_frames' must be an integer >= 1"),
        ({"entries": [_entry(stride=True)]}, "'stride' must be an integer >= 1"),
        ({"root": "nowhere", "entries": []}, "root folder .* does not exist"),
    ],
)
def test_bad_manifests_name_the_problem(tmp_path, data, message):
    folder = _folder(tmp_path)
    _write(folder, data)
    with pytest.raises(EymError, match=message):
        load_gallery(folder, presets=PRESETS)


def test_explicit_prompts_satisfy_the_prompt_requirements(tmp_path):
    folder = _folder(tmp_path)
    entry = _entry(subject=None, target_motion=None, source_motion=None, content_prompt="A man.",
                   source_prompt="A man is walking.", target_prompt="A man is waving.")
    _write(folder, {"entries": [entry]})
    got = load_gallery(folder, presets=PRESETS).entries[0]
    assert (got.content_prompt, got.source_prompt, got.target_prompt) == ("A man.", "A man is walking.", "A man is waving.")


def test_missing_and_broken_manifests(tmp_path):
    with pytest.raises(EymError, match="does not exist"):
        find_manifest(tmp_path / "nope")
    with pytest.raises(EymError, match="has no gallery.yaml"):
        find_manifest(tmp_path)
    (tmp_path / "gallery.yaml").write_text("entries: [unclosed\n")
    with pytest.raises(EymError, match="not valid YAML at line"):
        load_gallery(tmp_path, presets=PRESETS)
    (tmp_path / "gallery.yaml").unlink()
    (tmp_path / "gallery.json").write_text("{nope")
    with pytest.raises(EymError, match="not valid JSON at line 1"):
        load_gallery(tmp_path, presets=PRESETS)
    # yaml wins over json when both exist, in MANIFEST_NAMES order
    (tmp_path / "gallery.yml").write_text("entries: []\n")
    assert find_manifest(tmp_path).name == "gallery.yml" and MANIFEST_NAMES.index("gallery.yml") < MANIFEST_NAMES.index("gallery.json")


def test_resolve_inside_accepts_nested_relative_paths(tmp_path):
    folder = _folder(tmp_path).resolve()
    assert resolve_inside(folder, "clips/./a.mp4", what="x") == folder / "clips" / "a.mp4"


def test_committed_examples_gallery_pins_every_clip_and_offers_nothing_it_does_not_have(tmp_path):
    """examples/gallery.yaml (the app's default --gallery): >= 6 TaiChi-HD pairs, every clip pinned by
    commit and sha256; with an empty clip store every entry is left out, none raises."""
    gallery = load_gallery(REPO / "examples", store=tmp_path / "empty", skip_missing=True)
    assert gallery.manifest == (REPO / "examples" / "gallery.yaml").resolve()
    assert gallery.entries == () and len(gallery.skipped) >= 6
    assert all("eym gallery fetch" in why for why in gallery.skipped.values())
    taichi = [name for name in gallery.skipped if name.startswith("taichi-")]
    assert len(taichi) >= 6
    for clip in gallery.clips:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{12}:.+", clip.origin), clip.origin
        commit = clip.origin.split("@")[1].split(":")[0]
        assert re.search(rf"/{commit}[0-9a-f]{{28}}/", clip.url), "the url must name the full pinned commit"
        assert clip.url.endswith(clip.origin.split(":", 1)[1])
        if clip.file.startswith("taichi_hd/"):
            assert clip.crop == (0, 0, 256, 256) and clip.origin_sha256 != clip.sha256
    with pytest.raises(EymError, match="has not been fetched"):
        load_gallery(REPO / "examples", store=tmp_path / "empty")


@pytest.mark.media
def test_examples_gallery_fetches_from_the_mirror_and_verifies(media, tmp_path):
    store = tmp_path / "store"
    report = fetch_clips(REPO / "examples", mirror=media, store=store)
    assert report.ok and len(report.fetched) == len(load_gallery(REPO / "examples", store=store).clips)
    gallery = load_gallery(REPO / "examples", store=store)
    assert len(gallery.entries) >= 8 and not gallery.skipped
    for entry in gallery.entries:
        assert entry.source.is_relative_to(store) and sha256_file(entry.source) in {c.sha256 for c in gallery.clips}
    again = fetch_clips(REPO / "examples", mirror=media, store=store)
    assert again.fetched == () and len(again.present) == len(report.fetched)
    # a damaged clip in the store is never used: the entry is left out until fetched again
    victim = gallery.get("taichi-hedge-raise-arms").reference
    victim.write_bytes(victim.read_bytes()[:1000])
    reloaded = load_gallery(REPO / "examples", store=store, skip_missing=True)
    assert "taichi-hedge-raise-arms" in reloaded.skipped and "taichi-lakeside-low-stance" in reloaded.skipped
    assert fetch_clips(REPO / "examples", mirror=media, store=store).fetched == ("taichi_hd/taichi_copart06.mp4",)


def test_a_mirror_holding_another_file_is_refused(tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "clips").mkdir(parents=True)
    (mirror / "clips" / "a.mp4").write_bytes(b"not the pinned bytes")
    manifest = _write(_folder(tmp_path / "g"), {"clips": [{"file": "clips/a.mp4", "sha256": "0" * 64}],
                                               "entries": [_entry(source="clips/a.mp4")]})
    report = fetch_clips(manifest, mirror=mirror, store=tmp_path / "store")
    assert "the mirror holds another file" in report.failed["clips/a.mp4"]
    assert not any((tmp_path / "store").iterdir()), "nothing may be left in the store"
    missing = fetch_clips(manifest, mirror=tmp_path / "empty-mirror", store=tmp_path / "store")
    assert "has no clips/a.mp4" in missing.failed["clips/a.mp4"]


# ---------------------------------------------------------------------------------------------
# Downloads from the origin, against a loopback HTTP server
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def origin_server():
    """http://127.0.0.1:<port>/ serving ``files`` (name -> bytes); ``mode[name]`` = "cut" sends a
    Content-Length of the whole file but only half of it, then closes the connection."""
    import http.server
    import threading

    files: dict[str, bytes] = {}
    mode: dict[str, str] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            name = self.path.lstrip("/")
            if name not in files:
                self.send_error(404)
                return
            data = files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2] if mode.get(name) == "cut" else data)
            self.wfile.flush()
            if mode.get(name) == "cut":
                self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield types.SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}/", files=files, mode=mode)
    server.shutdown()
    server.server_close()


def _origin_video(path: Path) -> np.ndarray:
    """A 64x32 (w x h... here 32 wide, 64 tall) clip whose top and bottom halves differ, like TaiChi-HD's."""
    from eym.video import write_mp4

    frames = np.zeros((6, 64, 32, 3), np.uint8)
    for i in range(6):
        frames[i, :32] = (40 * i, 120, 200)  # top: the video
        frames[i, 32:] = (250, 20, 20)  # bottom: "segmentation"
    write_mp4(frames, path, 30.0)
    return frames


def _origin_manifest(folder: Path, url: str, origin_sha: str, crop=(0, 0, 32, 32)) -> Path:
    clip = {"file": "clips/o.mp4", "sha256": "1" * 64, "url": url, "origin_sha256": origin_sha,
            "origin": "someone/repo@0123456789ab:o.mp4"}
    if crop is not None:
        clip["crop"] = list(crop)
    return _write(_folder(folder), {"clips": [clip], "entries": [_entry(source="clips/o.mp4", reference="clips/b.mp4")]})


def test_download_good_file_is_verified_cropped_and_used(origin_server, tmp_path):
    from eym.video import read_video

    frames = _origin_video(tmp_path / "origin.mp4")
    data = (tmp_path / "origin.mp4").read_bytes()
    origin_server.files["o.mp4"] = data
    manifest = _origin_manifest(tmp_path / "g", origin_server.url + "o.mp4", sha256_bytes(data))
    store = tmp_path / "store"
    report = fetch_clips(manifest, store=store)
    assert report.fetched == ("clips/o.mp4",) and report.ok
    gallery = load_gallery(manifest, presets=PRESETS, store=store)
    clip = read_video(gallery.entries[0].source, num_frames=None, size=None)
    assert clip.frames.shape == (6, 32, 32, 3) and clip.source_fps == pytest.approx(30.0)
    assert np.abs(clip.frames.astype(int) - frames[:, :32].astype(int)).mean() < 6  # the top half, not the bottom
    assert not list(store.rglob(".tmp-*")) and not list(store.rglob(".origin*"))


def test_download_with_a_bad_hash_is_never_used(origin_server, tmp_path):
    _origin_video(tmp_path / "origin.mp4")
    origin_server.files["o.mp4"] = (tmp_path / "origin.mp4").read_bytes()
    manifest = _origin_manifest(tmp_path / "g", origin_server.url + "o.mp4", "2" * 64)
    store = tmp_path / "store"
    report = fetch_clips(manifest, store=store)
    assert "does not match the pinned" in report.failed["clips/o.mp4"]
    assert not store.exists() or not any(store.iterdir())
    gallery = load_gallery(manifest, presets=PRESETS, store=store, skip_missing=True)
    assert gallery.entries == () and "one" in gallery.skipped


def test_cut_off_download_and_missing_file_leave_nothing(origin_server, tmp_path):
    data = b"x" * 300_000
    origin_server.files["o.mp4"] = data
    origin_server.mode["o.mp4"] = "cut"
    manifest = _origin_manifest(tmp_path / "g", origin_server.url + "o.mp4", sha256_bytes(data), crop=None)
    store = tmp_path / "store"
    report = fetch_clips(manifest, store=store, timeout=10)
    assert re.search(r"cut off|stopped after|download failed", report.failed["clips/o.mp4"])
    assert not store.exists() or not any(store.iterdir())
    # the same file served whole (no crop: a verbatim clip) is fetched on the next try
    origin_server.mode.clear()
    manifest = _write(tmp_path / "g", {"clips": [{"file": "clips/o.mp4", "sha256": sha256_bytes(data),
                                                  "url": origin_server.url + "o.mp4"}],
                                       "entries": [_entry(source="clips/o.mp4")]})
    assert fetch_clips(manifest, store=store).fetched == ("clips/o.mp4",)
    assert sha256_file(load_gallery(manifest, presets=PRESETS, store=store).entries[0].source) == sha256_bytes(data)
    # a 404 is a failure with a message, not an exception
    manifest = _origin_manifest(tmp_path / "g404", origin_server.url + "nope.mp4", "3" * 64)
    assert "download failed" in fetch_clips(manifest, store=tmp_path / "other").failed["clips/o.mp4"]


def test_download_refuses_other_schemes(tmp_path):
    with pytest.raises(EymError, match="only http"):
        download("file:///etc/passwd", tmp_path / "x", sha256="0" * 64)


@pytest.mark.media
def test_media_pairs_manifest(media, tmp_path):
    """The README's suggested pairs load from a manifest kept outside the media folder."""
    manifest = _write(tmp_path, {"root": str(media), "entries": [
        _entry(name="taichi", source="taichi_hd/taichi_copart00.mp4", reference="taichi_hd/taichi_copart06.mp4"),
        _entry(name="case1", source="MotionEditor/case-1/images", reference="MotionEditor/case-1/target_images"),
    ]})
    gallery = load_gallery(manifest, presets=PRESETS)
    assert [e.name for e in gallery.entries] == ["taichi", "case1"]
    assert gallery.entries[1].source.is_dir() and gallery.entries[0].reference.is_file()


def test_offline_one_unanswered_download_is_enough(tmp_path):
    """With no network the first clip's failure stops the others being tried (a fast offline start)."""
    import socket

    with socket.socket() as s:  # a port nobody listens on: connection refused, no answer
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    clips = [{"file": f"clips/{n}.mp4", "sha256": str(i) * 64, "url": dead + f"{n}.mp4"} for i, n in enumerate("abc", 1)]
    manifest = _write(_folder(tmp_path / "g"), {"clips": clips, "entries": [_entry()]})
    report = fetch_clips(manifest, store=tmp_path / "store", timeout=5)
    assert "download failed" in report.failed["clips/a.mp4"]
    assert report.failed["clips/b.mp4"].startswith("not tried") and report.failed["clips/c.mp4"].startswith("not tried")


def test_stage_gallery_offers_the_pairs_that_stage_with_their_examples(tmp_path, monkeypatch):
    """Playable copies and a source | reference thumbnail under the served folder; a pair that
    cannot be read is left out; a finished example is copied next to them; the request values."""
    from eym.gallery import save_example, stage_gallery
    from eym.request import MOTION_PRESET, MOTION_REFERENCE, from_gallery
    from eym.video import write_mp4

    folder = _folder(tmp_path / "g")
    write_mp4(np.full((4, 32, 48, 3), 60, np.uint8), folder / "clips" / "a.mp4", 8.0)  # b.mp4 stays unreadable
    write_mp4(np.full((4, 32, 32, 3), 200, np.uint8), folder / "clips" / "c.mp4", 8.0)
    _write(folder, {"version": 1, "entries": [
        _entry(name="good", reference="clips/c.mp4", stride=2), _entry(name="broken"),
        _entry(name="preset", reference=None, preset="wave")]})
    monkeypatch.setenv("EYM_EXAMPLES", str(tmp_path / "examples"))
    save_example("good", "my-model", folder / "clips" / "a.mp4")
    served = tmp_path / "outputs"
    page = stage_gallery(folder, served, "my-model")
    assert [e.name for e in page.entries] == ["good", "preset"]
    good = page.staged["good"]
    assert good.source.parent == served / "_gallery" / "good" and good.reference.name == "reference.mp4"
    import cv2

    thumb = cv2.imread(str(good.thumbnail))
    assert thumb.shape == (160, 240 + 4 + 160, 3)  # each clip's first frame at 160 px, its own aspect
    assert set(page.examples) == {"good"} and page.examples["good"].video.parent == served / "_examples" / "good"
    assert stage_gallery(folder, served, None).examples == {} and stage_gallery(None, served, "m").entries == []
    values = from_gallery(page.gallery.get("good"), good)
    assert values["mode"] == MOTION_REFERENCE and values["reference"] == str(good.reference)
    assert values["stride"] == 2 and "preset" not in values and "start" not in values  # those keep their values
    preset = from_gallery(page.gallery.get("preset"), page.staged["preset"])
    assert preset["mode"] == MOTION_PRESET and preset["preset"] == "wave" and preset["reference"] is None

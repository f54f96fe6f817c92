"""Gallery manifests: format, path containment, error messages, the committed examples/ gallery."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from eym.errors import EymError
from eym.gallery import MANIFEST_NAMES, find_manifest, load_gallery, resolve_inside

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


def test_committed_examples_gallery_is_valid():
    """examples/gallery.yaml ships with the repo (the app's default --gallery): it must load."""
    gallery = load_gallery(REPO / "examples")
    assert gallery.manifest == (REPO / "examples" / "gallery.yaml").resolve()
    for entry in gallery.entries:
        assert entry.source.is_relative_to(REPO / "examples")
        assert entry.preset or entry.reference


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

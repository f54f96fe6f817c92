"""Tuned weights leave the server: the zip round trip and the Hub push (a fake HfApi, no network)."""

from __future__ import annotations

import json
import zipfile

import pytest

from eym.errors import EymError
from eym.hub import pack_tuned, push_tuned, push_tuned_zip, unpack_tuned


def _tuned(folder):
    folder.mkdir(parents=True)
    (folder / "tuned.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (folder / "manifest.json").write_text(json.dumps({"kind": "eym-tuned", "key": "abc"}))
    (folder / "MANIFEST.json").write_text("{}")  # cache bookkeeping: not part of what leaves
    return folder


class FakeApi:
    def __init__(self, fail: Exception | None = None):
        self.calls = []
        self.fail = fail

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))
        if self.fail:
            raise self.fail
        return f"https://huggingface.co/{kw['repo_id']}"

    def upload_folder(self, **kw):
        from pathlib import Path

        self.calls.append(("upload_folder", {**kw, "files": sorted(p.name for p in Path(kw["folder_path"]).iterdir())}))


def test_zip_round_trip_holds_exactly_the_tuned_files(tmp_path):
    folder = _tuned(tmp_path / "t")
    archive = pack_tuned(folder, tmp_path / "out" / "tuned_weights.zip")
    assert sorted(zipfile.ZipFile(archive).namelist()) == ["manifest.json", "tuned.safetensors"]
    back = unpack_tuned(archive, tmp_path / "back")
    for name in ("tuned.safetensors", "manifest.json"):
        assert (back / name).read_bytes() == (folder / name).read_bytes()
    with pytest.raises(EymError, match="not a tuned-weights folder"):
        pack_tuned(tmp_path / "out", tmp_path / "x.zip")
    (tmp_path / "bad.zip").write_bytes(b"no zip")
    with pytest.raises(EymError, match="not a tuned-weights zip"):
        unpack_tuned(tmp_path / "bad.zip", tmp_path / "b2")


def test_push_creates_the_repo_and_uploads_only_the_tuned_files(tmp_path):
    folder = _tuned(tmp_path / "t")
    api = FakeApi()
    url = push_tuned_zip(pack_tuned(folder, tmp_path / "w.zip"), "me/my-source", "hf_token", api=api)
    assert url == "https://huggingface.co/me/my-source"
    (create, kw1), (upload, kw2) = api.calls
    assert create == "create_repo" and kw1["repo_id"] == "me/my-source" and kw1["private"] and kw1["exist_ok"]
    assert upload == "upload_folder" and kw2["repo_id"] == "me/my-source"
    assert sorted(kw2["allow_patterns"]) == ["manifest.json", "tuned.safetensors"]
    assert push_tuned(folder, "me/other", "t", api=FakeApi()) == "https://huggingface.co/me/other"


@pytest.mark.parametrize("repo,token,message", [("no-slash", "t", "must look like"), ("a/b/c", "t", "must look like"),
                                                 ("me/x", " ", "token")])
def test_push_refuses_bad_names_and_missing_tokens_before_any_call(tmp_path, repo, token, message):
    api = FakeApi()
    with pytest.raises(EymError, match=message):
        push_tuned(_tuned(tmp_path / "t"), repo, token, api=api)
    assert api.calls == []


def test_hub_errors_become_one_line_messages(tmp_path):
    with pytest.raises(EymError, match="the Hub refused the upload to me/x: 401 Unauthorized"):
        push_tuned(_tuned(tmp_path / "t"), "me/x", "bad", api=FakeApi(RuntimeError("401 Unauthorized\nlong body")))

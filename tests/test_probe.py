"""eym.probe and eym.validate: uploads, prompts and names are checked before any work."""

from __future__ import annotations

import csv
import os
import stat
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from eym.errors import EymError
from eym.probe import ProbeLimits, probe, sniff_container
from eym.validate import MAX_PROMPT_CHARS, check_prompt, safe_join


# ---------------------------------------------------------------------------------------------
# helpers: small real files written at test time
# ---------------------------------------------------------------------------------------------
def write_clip(path: Path, num_frames: int = 12, size: tuple[int, int] = (64, 48), fps: float = 10.0) -> Path:
    """An H.264 mp4 of moving gradients through the bundled ffmpeg."""
    import imageio_ffmpeg

    w, h = size
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", macro_block_size=1,
        output_params=["-loglevel", "error"],
    )  # fmt: skip
    writer.send(None)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(num_frames):
        frame = np.stack([(xx * 4 + i * 9) % 256, (yy * 4) % 256, np.full_like(xx, i * 20 % 256)], -1)
        writer.send(np.ascontiguousarray(frame.astype(np.uint8)))
    writer.close()
    return path


def png_bytes(width: int, height: int, rgb: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    """A valid PNG, built by hand (also used to declare absurd sizes with a tiny body)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height)) if width * height < 10**6 else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def gif_bytes(width: int, height: int, frames: int = 1) -> bytes:
    """A GIF with a declared canvas of width x height and ``frames`` 1x1 images (tiny on disk)."""
    out = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    out += b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop forever
    for _ in range(frames):
        out += b"!\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 1/100 s per frame
        out += b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return out + b";"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", num_frames=12, size=(64, 48), fps=10.0)


# ---------------------------------------------------------------------------------------------
# videos that pass
# ---------------------------------------------------------------------------------------------
def test_generated_clip_is_described_exactly(clip):
    info = probe(clip)
    assert info.kind == "video" and info.codec == "h264"
    assert (info.width, info.height, info.frame_count) == (64, 48, 12)
    assert info.fps == pytest.approx(10.0)
    assert info.duration == pytest.approx(1.2, abs=0.05)
    assert info.size_bytes == clip.stat().st_size
    assert info.path == clip


def test_frame_count_matches_a_full_decode(clip):
    """The probe reads the count from the container; decoding every frame must agree."""
    import av

    with av.open(str(clip)) as c:
        decoded = sum(1 for _ in c.decode(video=0))
    assert probe(clip).frame_count == decoded


@pytest.mark.parametrize(
    "suffix, codec, decoder",
    [(".mov", "libx264", "h264"), (".mkv", "libx264", "h264"), (".webm", "libvpx", "vp8"),
     (".avi", "mpeg4", "mpeg4"), (".ts", "mpeg2video", "mpeg2video"), (".mpg", "mpeg2video", "mpeg2video"),
     (".ogv", "libtheora", "theora"), (".gif", "gif", "gif")],  # fmt: skip
)
def test_every_allowed_container_reads(tmp_path, suffix, codec, decoder):
    """The container is forced from the file's signature: each allowed one must still open."""
    import imageio_ffmpeg

    path = tmp_path / f"clip{suffix}"
    writer = imageio_ffmpeg.write_frames(
        str(path), (48, 32), fps=10, codec=codec, macro_block_size=1, output_params=["-loglevel", "error"],
        pix_fmt_out="rgb8" if codec == "gif" else "yuv420p",
    )  # fmt: skip
    writer.send(None)
    for i in range(10):
        writer.send(np.full((32, 48, 3), i * 20, np.uint8))
    writer.close()
    info = probe(path)
    assert (info.width, info.height, info.codec) == (48, 32, decoder)
    assert 9 <= info.frame_count <= 10  # some muxers drop/merge a final duplicate frame
    assert info.fps == pytest.approx(10.0, rel=0.05) and info.duration == pytest.approx(1.0, abs=0.15)


@pytest.mark.media
def test_real_footage_matches_the_index(media):
    rows = list(csv.DictReader(open(media / "INDEX.tsv"), delimiter="\t"))
    videos = [r for r in rows if r["path"].endswith(".mp4")]
    assert videos
    for row in videos:
        info = probe(media / row["path"])
        w, h = map(int, row["res"].split("x"))
        assert (info.width, info.height, info.frame_count) == (w, h, int(row["frames"])), row["path"]
        assert info.fps == pytest.approx(float(row["fps"]), abs=0.01)
        assert info.duration == pytest.approx(float(row["dur_s"]), abs=0.02)


@pytest.mark.media
def test_real_frame_folder(media):
    info = probe(media / "MotionEditor" / "case-1" / "images")
    assert info.kind == "frames" and info.frame_count == 8
    assert (info.width, info.height) == (512, 512) and info.codec == "jpeg"


def test_frame_folder(tmp_path):
    for i in (0, 1, 2, 10):  # numeric, not lexical, order; gaps allowed
        (tmp_path / f"frame_{i}.png").write_bytes(png_bytes(32, 24))
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    info = probe(tmp_path, min_frames=4)
    assert (info.kind, info.frame_count, info.width, info.height, info.codec) == ("frames", 4, 32, 24, "png")
    assert info.size_bytes == sum(p.stat().st_size for p in tmp_path.glob("*.png"))
    with pytest.raises(EymError, match="4 frame"):
        probe(tmp_path, min_frames=5)


# ---------------------------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "limits, message",
    [
        (ProbeLimits(max_bytes=1000), r"MB limit"),
        (ProbeLimits(max_seconds=1.0), r"1 s limit"),
        (ProbeLimits(max_side=63), r"64x48, over the 63 px"),
        (ProbeLimits(max_frames=11), r"12 frames, over the 11"),
        (ProbeLimits(codecs=("vp9",)), r"'h264' codec"),
    ],
)
def test_limits_refuse_with_a_message_naming_the_file(clip, limits, message):
    with pytest.raises(EymError, match=message) as err:
        probe(clip, limits=limits)
    assert "clip.mp4" in str(err.value) and "\n" not in str(err.value)


def test_min_frames(clip):
    assert probe(clip, min_frames=12).frame_count == 12
    with pytest.raises(EymError, match=r"12 frame\(s\) but 13 are needed.*--frames"):
        probe(clip, min_frames=13)


def test_limits_from_dict_rejects_unknown_keys():
    assert ProbeLimits.from_dict({"max_side": 512, "codecs": ["h264"]}) == ProbeLimits(max_side=512, codecs=("h264",))
    with pytest.raises(EymError, match="max_sid"):
        ProbeLimits.from_dict({"max_sid": 512})
    with pytest.raises(EymError, match="timeout_s=0"):
        ProbeLimits(timeout_s=0)


# ---------------------------------------------------------------------------------------------
# hostile files: each refused before any real decoding, with a one-line EymError
# ---------------------------------------------------------------------------------------------
def _refused(path: Path, match: str, **kw) -> str:
    t0 = time.perf_counter()
    with pytest.raises(EymError, match=match) as err:
        probe(path, **kw)
    assert time.perf_counter() - t0 < 10, "the probe must answer quickly"
    assert "\n" not in str(err.value)
    return str(err.value)


def test_missing_empty_and_renamed_files(tmp_path):
    _refused(tmp_path / "nope.mp4", "no such file")
    (tmp_path / "empty.mp4").write_bytes(b"")
    _refused(tmp_path / "empty.mp4", r"empty \(0 bytes\)")
    (tmp_path / "text.mp4").write_text("hello, I am not a video\n" * 20)
    _refused(tmp_path / "text.mp4", "not a video")
    (tmp_path / "still.mp4").write_bytes(png_bytes(16, 16))
    _refused(tmp_path / "still.mp4", "not a video")
    (tmp_path / "empty_dir").mkdir()
    _refused(tmp_path / "empty_dir", "holds no images")


def test_playlists_cannot_make_the_demuxer_open_other_files(tmp_path):
    """HLS / ffconcat text renamed .mp4 would read /etc/passwd through ffmpeg: refused unopened."""
    (tmp_path / "hls.mp4").write_text("#EXTM3U\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:10.0,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n")
    (tmp_path / "concat.mp4").write_text("ffconcat version 1.0\nfile /etc/passwd\n")
    (tmp_path / "sdp.avi").write_text("v=0\nc=IN IP4 127.0.0.1\nm=video 5004 RTP/AVP 96\n")
    for name in ("hls.mp4", "concat.mp4", "sdp.avi"):
        _refused(tmp_path / name, "not a video")


def test_declared_huge_canvas_is_refused_without_decoding(tmp_path):
    (tmp_path / "bomb.gif").write_bytes(gif_bytes(60000, 60000))
    _refused(tmp_path / "bomb.gif", r"60000x60000, over the 4096 px")
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "0000.png").write_bytes(png_bytes(8, 8))
    (frames / "0001.png").write_bytes(png_bytes(60000, 60000))  # ~100 bytes declaring 3.6 Gpx
    _refused(frames, r"0001.png declares a size over the 4096 px limit")


def test_gif_with_too_many_frames(tmp_path):
    path = tmp_path / "many.gif"
    path.write_bytes(gif_bytes(16, 16, frames=3000))  # ~60 KB, 3000 frames
    _refused(path, r"(3000|more than 2000) frames, over the( 2000)? limit", limits=ProbeLimits(max_frames=2000))
    info = probe(path, limits=ProbeLimits(max_frames=5000))
    assert info.kind == "video" and info.frame_count == 3000 and info.codec == "gif"


def test_frame_folder_escapes_and_junk(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(8, 8))
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "0000.png").write_bytes(png_bytes(8, 8))
    (frames / "0001.png").symlink_to(outside)
    _refused(frames, "links outside its folder")
    (frames / "0001.png").unlink()
    (frames / "0001.png").write_text("not an image")
    _refused(frames, r"0001.png is not a readable image")
    (frames / "0001.png").write_bytes(png_bytes(8, 8))
    (frames / "cover.png").write_bytes(png_bytes(8, 8))
    _refused(frames, "cover.png is not numbered")


def test_crashing_or_hanging_decoder_is_contained(tmp_path, clip, monkeypatch):
    """A decoder that segfaults or never returns only takes the probe process with it."""
    import eym.probe as probe_mod

    crash = tmp_path / "crash.sh"
    crash.write_text("#!/bin/sh\nkill -SEGV $$\n")
    hang = tmp_path / "hang.sh"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    for script in (crash, hang):
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(probe_mod.sys, "executable", str(crash))
    _refused(clip, r"clip.mp4 could not be read: the decoder crashed \(SIGSEGV\)")
    monkeypatch.setattr(probe_mod.sys, "executable", str(hang))
    t0 = time.perf_counter()
    _refused(clip, r"took longer than 1 s", limits=ProbeLimits(timeout_s=1))
    assert time.perf_counter() - t0 < 5


def test_probe_process_runs_under_a_memory_limit(clip):
    """The limit is real: with 64 MB of address space the probe process cannot even load its decoder."""
    _refused(clip, r"clip.mp4 could not be read", limits=ProbeLimits(max_memory_mb=64))
    assert probe(clip).frame_count == 12  # and the default leaves room for real work


def test_sniff_container():
    assert sniff_container(b"\x00\x00\x00\x20ftypisom" + b"\x00" * 8) == "mov"
    assert sniff_container(b"\x1a\x45\xdf\xa3" + b"\x00" * 12) == "matroska"
    assert sniff_container(b"RIFF\x00\x00\x00\x00AVI LIST") == "avi"
    assert sniff_container(b"GIF89a" + b"\x00" * 10) == "gif"
    assert sniff_container(b"#EXTM3U\n" + b"\x00" * 8) is None
    assert sniff_container(b"".join(b"\x47" + bytes(187) for _ in range(3))) == "mpegts"
    assert sniff_container(b"GET / HTTP/1.1\r\n" + bytes(500)) is None  # one 'G' is not a stream
    assert sniff_container(png_bytes(1, 1)[:16]) is None


# ---------------------------------------------------------------------------------------------
# prompts and names
# ---------------------------------------------------------------------------------------------
def test_check_prompt_cleans_and_bounds():
    assert check_prompt("  A man\tin a\nred suit \x1b[31m is dancing\x00 ") == "A man in a red suit is dancing"
    assert check_prompt("a \u202egnicnad\u202c girl\u200b") == "a gnicnad girl"  # bidi + zero-width gone
    assert check_prompt("Un garçon 跳舞 🙂") == "Un garçon 跳舞 🙂"  # ordinary non-ASCII is kept
    assert check_prompt(None) == "" and check_prompt(" \n ") == ""
    assert check_prompt("x" * MAX_PROMPT_CHARS) == "x" * MAX_PROMPT_CHARS
    with pytest.raises(EymError, match=f"source prompt is {MAX_PROMPT_CHARS + 1} characters.*at most {MAX_PROMPT_CHARS}"):
        check_prompt("x" * (MAX_PROMPT_CHARS + 1), what="source prompt")
    with pytest.raises(EymError, match="must be text"):
        check_prompt(b"bytes")  # type: ignore[arg-type]


def test_safe_join_stays_inside(tmp_path):
    root = tmp_path / "gallery"
    (root / "sub").mkdir(parents=True)
    assert safe_join(root, "a.mp4") == root / "a.mp4"
    assert safe_join(root, "sub/b.mp4") == root / "sub" / "b.mp4"
    assert safe_join(root, "not-yet/c.mp4") == root / "not-yet" / "c.mp4"
    for bad, why in [
        ("../secret", r"'\.\.'"),
        ("sub/../../secret", r"'\.\.'"),
        ("..\\secret", r"'\.\.'"),
        ("/etc/passwd", "absolute"),
        ("C:\\Windows", "absolute"),
        ("", "empty"),
        ("a\x00b", "NUL"),
    ]:
        with pytest.raises(EymError, match=why):
            safe_join(root, bad)
    (tmp_path / "secret").mkdir()
    (root / "link").symlink_to(tmp_path / "secret")
    (root / "filelink.mp4").symlink_to("/etc/passwd")
    for bad in ("link", "link/x.mp4", "filelink.mp4"):
        with pytest.raises(EymError, match="outside"):
            safe_join(root, bad)
    (root / "inner").symlink_to(root / "sub")  # a link that stays inside is fine
    assert safe_join(root, "inner/d.mp4") == root / "inner" / "d.mp4"
    assert os.path.realpath(safe_join(root, "inner/d.mp4")) == str((root / "sub" / "d.mp4").resolve())

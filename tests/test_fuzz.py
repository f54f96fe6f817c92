"""Hostile uploads: >= 200 corrupted or malicious files through the probe and the reader.

Every file must end, within a time bound, in a clean :class:`EymError` or a correct result:
no other exception, no crash, no hang, no files left behind. Files are made at test time in a
temporary folder from seed clips: real footage from ``../shared/media`` when present, and
always a clip generated here, so the test never skips.

The ingest entry point (``eym.preprocess.preprocess`` once it exists, else
``eym.video.read_video``) runs in a separate worker process that the test restarts if a
decoder kills it, so a crash or hang is reported with the file that caused it.
"""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from eym.errors import EymError
from eym.probe import ProbeInfo, ProbeLimits, probe
from test_probe import gif_bytes, png_bytes, write_clip

LIMITS = ProbeLimits(timeout_s=10)
PER_FILE_S = 20.0  # the worker must answer each file within this
REAL_SEEDS = ("taichi_hd/taichi_copart08.mp4",)  # 256x256, 170 KB: broken copies stay cheap to decode


# ---------------------------------------------------------------------------------------------
# Hostile file factory
# ---------------------------------------------------------------------------------------------
def _patch_atom(data: bytes, atom: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite ``value`` at ``offset`` bytes after every ``atom`` type tag of an mp4."""
    out = bytearray(data)
    pos = out.find(atom)
    while pos >= 0:
        at = pos + 4 + offset
        if at + len(value) <= len(out):
            out[at : at + len(value)] = value
        pos = out.find(atom, pos + 4)
    return bytes(out)


def _mutations(seed: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """72 broken variants of one clip: truncations, bit flips, block damage, header lies."""
    n = len(seed)
    out: list[tuple[str, bytes]] = []
    for frac in (0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 0.999):
        out.append((f"trunc{frac}", seed[: max(1, int(n * frac))]))
    for cut in (8, 12, 32, 100, 1000):
        out.append((f"trunc_at{cut}", seed[:cut]))
    for k in range(36):
        data = bytearray(seed)
        flips = (1, 4, 16, 64, 256, 2048)[k % 6]
        head_only = k % 2 == 0  # half of them hit the first 8 KB, where the headers live
        for _ in range(flips):
            i = rng.randrange(min(n, 8192) if head_only else n)
            data[i] ^= 1 << rng.randrange(8)
        out.append((f"flip{flips}_{'head' if head_only else 'any'}_{k}", bytes(data)))
    for k in range(6):
        data = bytearray(seed)
        i, size = rng.randrange(n), rng.choice((16, 512, 8192))
        kind = ("zero", "ff", "random")[k % 3]
        fill = {"zero": b"\x00" * size, "ff": b"\xff" * size, "random": rng.randbytes(size)}[kind]
        data[i : i + size] = fill
        out.append((f"block_{kind}_{k}", bytes(data[:n])))
    out.append(("swap_halves", seed[n // 2 :] + seed[: n // 2]))
    out.append(("doubled", seed + seed))
    out.append(("trailing_garbage", seed + rng.randbytes(4096)))
    out.append(("leading_garbage", rng.randbytes(100) + seed))
    big = (0xFFFFFFF0).to_bytes(4, "big")
    header_lies = {
        "stsz_count_huge": (b"stsz", 8, big),  # declared frame count 4 billion
        "stts_count_huge": (b"stts", 8, big),
        "mdhd_duration_huge": (b"mdhd", 16, big),  # declared duration ~ years
        "mdhd_timescale_1": (b"mdhd", 12, (1).to_bytes(4, "big")),
        "mdhd_timescale_0": (b"mdhd", 12, (0).to_bytes(4, "big")),
        "mvhd_timescale_0": (b"mvhd", 12, (0).to_bytes(4, "big")),
        "mvhd_duration_huge": (b"mvhd", 16, big),
        "tkhd_size_60000": (b"tkhd", 76, (60000 << 16).to_bytes(4, "big") * 2),
        "avcC_garbage": (b"avcC", 0, b"\xff" * 24),
        "stco_offsets_far": (b"stco", 8, big * 4),
        "stsd_entries_huge": (b"stsd", 4, big),
        "atom_size_huge": (b"moov", -8, big),
        "atom_size_zero": (b"trak", -8, b"\x00\x00\x00\x00"),
    }
    for name, (atom, offset, value) in header_lies.items():
        out.append((name, _patch_atom(seed, atom, offset, value)))
    return out


def _standalone(tmp: Path, rng: random.Random) -> list[Path]:
    """Files that are hostile on their own: empty, junk, renamed, bombs, links, odd file types."""
    files: dict[str, bytes] = {
        "empty.mp4": b"",
        "one_byte.mp4": b"\x00",
        "ftyp_only.mp4": b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2",
        "ftyp_then_zeros.mp4": b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 5000,
        "ftyp_then_hls.mp4": b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2#EXTM3U\nfile:///etc/passwd\n",
        "mkv_magic_only.mkv": b"\x1a\x45\xdf\xa3" + b"\x00" * 100,
        "avi_magic_only.avi": b"RIFF\x00\x00\x00\x00AVI LIST" + b"\x00" * 100,
        "ogg_magic.ogv": b"OggS" + rng.randbytes(500),
        "ts_sync.ts": b"".join(b"\x47" + rng.randbytes(187) for _ in range(6)),
        "mpeg_ps.mpg": b"\x00\x00\x01\xba" + rng.randbytes(1000),
        "text.mp4": b"this is not a video\n" * 50,
        "json.mp4": json.dumps({"frames": 10**12, "width": 60000}).encode(),
        "html.mp4": b"<html><script>alert(1)</script></html>",
        "hls.mp4": b"#EXTM3U\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
        "hls.m3u8": b"#EXTM3U\n#EXTINF:10,\nhttp://169.254.169.254/latest/meta-data\n",
        "concat.mp4": b"ffconcat version 1.0\nfile /etc/passwd\n",
        "sdp.mp4": b"v=0\no=- 0 0 IN IP4 127.0.0.1\nc=IN IP4 127.0.0.1\nm=video 5004 RTP/AVP 96\n",
        "png_as.mp4": png_bytes(32, 32),
        "gif_still.mp4": gif_bytes(16, 16, 1),
        "bmp_as.mp4": b"BM" + (54 + 12).to_bytes(4, "little") + b"\x00" * 60,
        "png_60000.png": png_bytes(60000, 60000),
        "png_60000.mp4": png_bytes(60000, 60000),
        "gif_canvas_60000.gif": gif_bytes(60000, 60000),
        "gif_canvas_60000.mp4": gif_bytes(60000, 60000),
        "gif_canvas_4096x1.gif": gif_bytes(4096, 1, 3),
        "gif_canvas_65535.gif": gif_bytes(65535, 65535, 2),
        "gif_20000_frames.gif": gif_bytes(8, 8, 20000),  # ~340 KB, far over max_frames
        "gif_8000_frames.gif": gif_bytes(8, 8, 8000),
        "gif_truncated.gif": gif_bytes(16, 16, 10)[:-30],
        "gif_ok_small.gif": gif_bytes(16, 16, 12),  # legitimate: must be read correctly
    }
    for size in (10, 100, 1000, 10_000, 100_000):
        files[f"random_{size}.mp4"] = rng.randbytes(size)
        files[f"random_{size}.gif"] = b"GIF89a" + rng.randbytes(size)
    paths = []
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        paths.append(tmp / name)
    # Links and non-regular files with video names.
    for name, target in (("passwd_link.mp4", "/etc/passwd"), ("zero_link.mp4", "/dev/zero"),
                         ("dangling_link.mp4", str(tmp / "nowhere.mp4")), ("dir_link.mp4", "/etc")):  # fmt: skip
        (tmp / name).symlink_to(target)
        paths.append(tmp / name)
    os.mkfifo(tmp / "fifo.mp4")  # opening it for reading would block forever
    paths.append(tmp / "fifo.mp4")
    return paths


def _frame_folders(tmp: Path, rng: random.Random) -> list[Path]:
    """Numbered-frame folders with damaged, huge, escaping or fake images."""
    good = png_bytes(32, 32)
    specs: dict[str, list[tuple[str, bytes | str]]] = {
        "ok": [(f"{i:04d}.png", png_bytes(32, 32, (i * 30, 0, 0))) for i in range(4)],
        "truncated_png": [("0000.png", good), ("0001.png", good[:40])],
        "flipped_png": [("0000.png", good), ("0001.png", good[:20] + bytes([good[20] ^ 0xFF]) + good[21:])],
        "text_as_png": [("0000.png", b"not a png at all")],
        "huge_png": [("0000.png", good), ("0001.png", png_bytes(60000, 60000))],
        "gif_as_png": [("0000.png", gif_bytes(60000, 60000))],
        "jpeg_header_only": [("0000.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")],
        "random_jpgs": [(f"{i}.jpg", b"\xff\xd8" + rng.randbytes(200)) for i in range(3)],
        "empty_files": [("0000.png", b""), ("0001.png", b"")],
        "link_out": [("0000.png", good), ("0001.png", "->/etc/passwd")],
        "link_dev": [("0000.png", "->/dev/zero")],
        "no_images": [("readme.txt", b"hello")],
        "unnumbered": [("cover.png", good), ("0001.png", good)],
    }
    paths = []
    for name, files in specs.items():
        folder = tmp / f"frames_{name}"
        folder.mkdir()
        for fname, data in files:
            if isinstance(data, str) and data.startswith("->"):
                (folder / fname).symlink_to(data[2:])
            else:
                (folder / fname).write_bytes(data)
        paths.append(folder)
    return paths


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, list[Path]]:
    """(folder, files): all hostile inputs, generated fresh with a fixed RNG."""
    tmp = tmp_path_factory.mktemp("hostile")
    rng = random.Random(1234)
    seeds: list[tuple[str, bytes]] = []
    generated = write_clip(tmp_path_factory.mktemp("seed") / "generated.mp4", num_frames=10, size=(64, 64), fps=8.0)
    seeds.append(("gen", generated.read_bytes()))
    media = Path(os.environ.get("EYM_MEDIA", Path(__file__).resolve().parents[2] / "shared" / "media"))
    for rel in REAL_SEEDS:
        if (media / rel).is_file():
            seeds.append((Path(rel).stem[:12], (media / rel).read_bytes()))
    if len(seeds) == 1:  # no real footage here: a second generated clip, in another container
        second = write_clip(tmp_path_factory.mktemp("seed") / "generated.mkv", num_frames=20, size=(128, 96), fps=12.0)
        seeds.append(("genmkv", second.read_bytes()))
    paths: list[Path] = []
    for tag, data in seeds:
        for name, variant in _mutations(data, rng):
            path = tmp / f"{tag}_{name}.mp4"
            path.write_bytes(variant)
            paths.append(path)
    paths += _standalone(tmp, rng)
    paths += _frame_folders(tmp, rng)
    return tmp, paths


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------
def _check_info(info: ProbeInfo) -> None:
    """What 'a correct result' means for a file the probe lets through."""
    assert info.kind in ("video", "frames")
    assert 0 < info.width <= LIMITS.max_side and 0 < info.height <= LIMITS.max_side
    assert 1 <= info.frame_count <= LIMITS.max_frames
    assert 0 < info.duration <= LIMITS.max_seconds and 0.1 <= info.fps <= 1000
    assert 0 < info.size_bytes <= LIMITS.max_bytes


def test_probe_survives_every_hostile_file(hostile):
    tmp, paths = hostile
    assert len(paths) >= 200, f"only {len(paths)} hostile inputs"
    before = sorted(p.name for p in tmp.iterdir())
    outcomes: dict[str, str] = {}
    slowest = 0.0
    for path in paths:
        t0 = time.perf_counter()
        try:
            _check_info(probe(path, limits=LIMITS))
            outcomes[path.name] = "ok"
        except EymError as err:
            msg = str(err)
            assert msg and "\n" not in msg and "Traceback" not in msg, (path.name, msg)
            outcomes[path.name] = "refused"
        slowest = max(slowest, time.perf_counter() - t0)
    assert slowest < LIMITS.timeout_s + 2
    assert sorted(p.name for p in tmp.iterdir()) == before, "the probe must not write next to inputs"
    # Files with a known verdict: lies and bombs refused, the legitimate ones read.
    for name in ("empty.mp4", "text.mp4", "hls.mp4", "concat.mp4", "png_as.mp4", "png_60000.mp4",
                 "gif_canvas_60000.gif", "gif_20000_frames.gif", "passwd_link.mp4", "zero_link.mp4",
                 "fifo.mp4", "dir_link.mp4", "dangling_link.mp4", "frames_link_out", "frames_huge_png",
                 "frames_text_as_png", "gen_trunc0.0.mp4", "gen_stsz_count_huge.mp4"):  # fmt: skip
        assert outcomes[name] == "refused", name
    for name in ("gif_ok_small.gif", "frames_ok", "gen_trailing_garbage.mp4", "gen_doubled.mp4"):
        assert outcomes[name] == "ok", name


# ---------------------------------------------------------------------------------------------
# The ingest entry point, in a worker process that may die
# ---------------------------------------------------------------------------------------------
_WORKER = textwrap.dedent(
    """
    import json, sys, traceback
    from pathlib import Path
    from eym.errors import EymError
    paths = json.loads(Path(sys.argv[1]).read_text())
    cache = Path(sys.argv[2])
    try:
        from eym.preprocess import PreprocessConfig, preprocess
        def ingest(path):
            clip = preprocess(path, PreprocessConfig(num_frames=2, size=64), cache_dir=cache, with_masks=False)
            return clip.frames
        entry = "preprocess"
    except ImportError:
        from eym.video import read_video
        def ingest(path):
            return read_video(path, num_frames=2, size=64).frames
        entry = "read_video"
    print(json.dumps({"entry": entry}), flush=True)
    for i, path in enumerate(paths):
        print(json.dumps({"start": i}), flush=True)
        try:
            frames = ingest(path)
            ok = frames.shape == (2, 64, 64, 3) and str(frames.dtype) == "uint8"
            reply = {"i": i, "outcome": "ok" if ok else f"bad result {frames.shape} {frames.dtype}"}
        except EymError as err:
            reply = {"i": i, "outcome": "refused", "msg": str(err)}
        except BaseException as err:
            reply = {"i": i, "outcome": "exception", "msg": "".join(traceback.format_exception(err))[-1500:]}
        print(json.dumps(reply), flush=True)
    """
)


def _run_worker(paths: list[Path], work: Path) -> tuple[str, dict[int, dict]]:
    """Feed ``paths`` to the ingest worker; restart it after a crash or hang. Returns (entry, results)."""
    results: dict[int, dict] = {}
    entry = "?"
    start = 0
    env = dict(os.environ, TMPDIR=str(work / "tmp"))
    while start < len(paths):
        (work / "paths.json").write_text(json.dumps([str(p) for p in paths[start:]]))
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(work / "paths.json"), str(work / "cache")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=work,
        )  # fmt: skip
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
        current = None
        while True:
            try:
                line = lines.get(timeout=PER_FILE_S if current is not None else 120)
            except queue.Empty:
                proc.kill()
                results[start + (current or 0)] = {"outcome": f"hang (> {PER_FILE_S:g} s)"}
                break
            if line is None:  # the worker exited
                proc.wait()
                if current is not None:
                    results[start + current] = {"outcome": f"crash (exit {proc.returncode})"}
                break
            msg = json.loads(line)
            if "entry" in msg:
                entry = msg["entry"]
            elif "start" in msg:
                current = msg["start"]
            else:
                results[start + msg["i"]] = msg
                current = None
        proc.wait()
        done = [i for i in results if i >= start]
        start = max(done) + 1 if done else len(paths)
    return entry, results


def test_ingest_entry_point_survives_every_hostile_file(hostile, tmp_path):
    _tmp, paths = hostile
    # Links and FIFOs are the probe's job (it refuses them, tested above); the reader gets the rest.
    regular = [p for p in paths if not p.is_symlink() and (p.is_dir() or p.is_file())]
    (tmp_path / "tmp").mkdir()
    t0 = time.perf_counter()
    entry, results = _run_worker(regular, tmp_path)
    elapsed = time.perf_counter() - t0
    bad = {regular[i].name: r for i, r in results.items() if r["outcome"] not in ("ok", "refused")}
    assert not bad, f"{entry}: files that did not end in EymError or a correct result: {bad}"
    assert len(results) == len(regular)
    for i, r in results.items():
        if r["outcome"] == "refused":
            assert r["msg"] and "\n" not in r["msg"], (regular[i].name, r["msg"])
    by_name = {regular[i].name: r["outcome"] for i, r in results.items()}
    assert by_name["empty.mp4"] == "refused" and by_name["png_60000.mp4"] == "refused"
    # Legitimate inputs still work: any readable clip for the reader; preprocess also needs a
    # person in it, which only the real footage has.
    if entry == "read_video":
        assert by_name["gif_ok_small.gif"] == "ok" and by_name["frames_ok"] == "ok"
    if "taichi_copar_trailing_garbage.mp4" in by_name:
        assert by_name["taichi_copar_trailing_garbage.mp4"] == "ok", results
    # Nothing left behind: no temp files, no partial cache entries.
    # (torch keeps its compile cache there, torchinductor_<user>: a library cache, not ours)
    assert [p for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor_")] == []
    cache = tmp_path / "cache"
    if cache.exists():
        from eym.cache import verify_entry

        leftovers = [p for p in cache.rglob(".tmp-*")]
        assert not leftovers, leftovers
        entries = [e for e in cache.iterdir() if not e.name.startswith(".")]
        assert len(entries) <= sum(outcome == "ok" for outcome in by_name.values())
        for e in entries:
            assert verify_entry(e) is not None, f"damaged cache entry {e}"
    assert elapsed < 150, f"fuzzing the entry point took {elapsed:.0f} s"

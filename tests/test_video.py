"""eym.video: reading formats and frame folders, sampling, crop/pad geometry, mp4 writing, bad input."""

from __future__ import annotations

import subprocess
from pathlib import Path

import av
import cv2
import imageio_ffmpeg
import numpy as np
import pytest

from eym.errors import EymError
from eym.video import (
    VideoLimits,
    contact_sheet,
    count_frames,
    list_frame_files,
    read_video,
    resize_square,
    sample_indices,
    side_by_side,
    write_mp4,
)


def _ramp_frames(num_frames: int = 12, height: int = 48, width: int = 64) -> np.ndarray:
    """Frames whose brightness encodes their index (robust to lossy codecs), plus a colour bar."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        frames[i] = 10 + 20 * i
        frames[i, :, : width // 4] = (255, 0, 0)
    return frames


def _index_of(frame: np.ndarray) -> int:
    return int(round((float(frame[:, frame.shape[1] // 2 :].mean()) - 10) / 20))


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> Path:
    return write_mp4(_ramp_frames(), tmp_path_factory.mktemp("v") / "ramp.mp4", fps=12.0)


# ---------------------------------------------------------------------------------------------
# Sampling and geometry
# ---------------------------------------------------------------------------------------------
def test_even_sampling_spans_the_video():
    assert sample_indices(100, 5) == [0, 25, 50, 74, 99]
    assert sample_indices(100, 4, start=10) == [10, 40, 69, 99]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(10, 1) == [0]


def test_stride_sampling():
    assert sample_indices(100, 4, start=3, stride=5) == [3, 8, 13, 18]
    assert sample_indices(10, None, start=2, stride=3) == [2, 5, 8]
    assert sample_indices(5, None) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "args",
    [dict(total=5, num_frames=6), dict(total=10, num_frames=4, stride=4), dict(total=10, num_frames=2, start=10),
     dict(total=10, num_frames=0), dict(total=10, num_frames=2, stride=0), dict(total=10, num_frames=2, start=-1)],
)  # fmt: skip
def test_sampling_errors_name_the_problem(args):
    with pytest.raises(EymError):
        sample_indices(**args)


def test_crop_keeps_the_centre_at_full_height():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :50] = (255, 0, 0)  # left quarter: cut away by a centre crop
    image[:, 50:150] = (0, 255, 0)
    image[:, 150:] = (0, 0, 255)
    out = resize_square(image, 64, "crop")
    assert out.shape == (64, 64, 3)
    # scale 0.64 -> 128 wide, crop columns 32..96 = source columns 50..150: all green
    assert np.abs(out.astype(int) - (0, 255, 0)).max() <= 2


def test_pad_letterboxes_on_black():
    image = np.full((100, 200, 3), 200, np.uint8)
    out = resize_square(image, 64, "pad")
    assert out.shape == (64, 64, 3)
    # scale 0.32 -> 64x32, centred: 16 black rows above and below
    assert (out[:16] == 0).all() and (out[48:] == 0).all()
    assert (out[16:48] == 200).all()
    tall = resize_square(np.full((200, 100, 3), 200, np.uint8), 64, "pad")
    assert (tall[:, :16] == 0).all() and (tall[:, 16:48] == 200).all()


def test_side_by_side_concatenates_widths():
    a, b = np.zeros((3, 16, 16, 3), np.uint8), np.ones((3, 32, 16, 3), np.uint8)
    out = side_by_side(a, b)
    assert out.shape == (3, 16, 24, 3)  # b scaled to height 16 -> width 8
    with pytest.raises(ValueError):
        side_by_side(a, np.zeros((2, 16, 16, 3), np.uint8))


# ---------------------------------------------------------------------------------------------
# Frame folders
# ---------------------------------------------------------------------------------------------
def test_thumbnail_strip_wraps_and_keeps_aspect_and_mask_overlay_dims_the_background():
    from eym.video import mask_overlay, thumbnail_strip

    frames = np.random.default_rng(0).integers(0, 255, (10, 32, 48, 3), dtype=np.uint8)
    out = thumbnail_strip(frames, height=16, per_row=4)  # the app's preview
    assert out.shape == (3 * 20 - 4, 4 * 28 - 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:16, :24], cv2.resize(frames[0], (24, 16), interpolation=cv2.INTER_AREA))
    assert (out[16:20] == 255).all() and (out[40:, 56:] == 255).all()  # gaps, and the last row's empty tiles
    # tiles of different shapes keep their own aspect (the gallery's source | reference thumbnail)
    pair = thumbnail_strip([frames[0], frames[1, :, :16]], height=64)
    assert pair.shape == (64, 96 + 4 + 32, 3) and (pair[:, 96:100] == 255).all()
    masks = np.zeros((10, 32, 48), bool)
    masks[:, 8:24, 8:24] = True
    over = mask_overlay(frames, masks)
    assert np.array_equal(over[masks], frames[masks])
    assert (over[~masks].astype(int) <= frames[~masks].astype(int) * 0.25 + 71).all()


def test_contact_sheet_layout():
    F, H = 3, 20
    rows = {name: np.full((F, H, H, 3), value, np.uint8) for name, value in
            (("source", 10), ("reference skeleton", 120), ("edited", 250))}
    sheet = contact_sheet(rows, cell=32, label_width=40)
    assert sheet.shape == (3 * 32, 40 + F * 32, 3) and sheet.dtype == np.uint8
    # each row holds its video's frames, one cell per frame, after the label strip
    for r, value in enumerate((10, 120, 250)):
        assert (sheet[r * 32:(r + 1) * 32, 40:] == value).all()
    assert (sheet[:, :40] < 255).any()  # labels were drawn
    bare = contact_sheet(rows, cell=32, label_width=0)  # no label strip: the preview.png layout
    np.testing.assert_array_equal(bare, sheet[:, 40:])
    with pytest.raises(EymError, match="frame counts"):
        contact_sheet({"a": np.zeros((2, 8, 8, 3), np.uint8), "b": np.zeros((3, 8, 8, 3), np.uint8)})


def test_frame_folder_sorts_numerically(tmp_path):
    for n in (10, 2, 1, 33, 3):
        image = np.full((20, 20, 3), n, np.uint8)
        cv2.imwrite(str(tmp_path / f"frame_{n}.png"), image)
    (tmp_path / "notes.txt").write_text("not a frame")
    assert [p.name for p in list_frame_files(tmp_path)] == [f"frame_{n}.png" for n in (1, 2, 3, 10, 33)]
    video = read_video(tmp_path, num_frames=None, size=None)
    assert [int(f[0, 0, 0]) for f in video.frames] == [1, 2, 3, 10, 33]
    assert count_frames(tmp_path)[0] == 5
    sampled = read_video(tmp_path, num_frames=3, size=16)
    assert sampled.indices == [0, 1, 2] and sampled.frames.shape == (3, 16, 16, 3)  # consecutive at the folder's 8 fps


def test_empty_frame_folder_is_an_error(tmp_path):
    with pytest.raises(EymError, match=str(tmp_path)):
        read_video(tmp_path)


# ---------------------------------------------------------------------------------------------
# Writing and reading back
# ---------------------------------------------------------------------------------------------
def test_write_mp4_is_browser_h264(tmp_path):
    frames = _ramp_frames(10, 48, 64)
    path = write_mp4(frames, tmp_path / "out" / "v.mp4", fps=7.5)
    assert [p.name for p in path.parent.iterdir()] == ["v.mp4"]  # no temp file left behind
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (64, 48)
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == pytest.approx(7.5, rel=1e-3)
    assert len(decoded) == 10
    assert [_index_of(f) for f in decoded] == list(range(10))
    assert np.abs(np.stack(decoded).astype(int) - frames).mean() < 3


def test_write_mp4_pads_odd_sizes(tmp_path):
    path = write_mp4(_ramp_frames(3, 33, 45), tmp_path / "odd.mp4", fps=5)
    count, fps = count_frames(path)
    assert (count, fps) == (3, 5.0)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (46, 34)


def test_read_video_samples_and_keeps_real_time(mp4):
    video = read_video(mp4, num_frames=4, size=32)
    assert video.frames.shape == (4, 32, 32, 3) and video.frames.dtype == np.uint8
    assert video.indices == [0, 1, 2, 3]  # default: consecutive (a 12 fps source already plays near 12 fps)
    assert [_index_of(f) for f in video.frames] == video.indices
    assert video.source_fps == 12.0 and video.fps == pytest.approx(12.0)
    assert sample_indices(12, 4, fps=None) == [0, 4, 7, 11]  # without a frame rate: spread over the clip
    strided = read_video(mp4, num_frames=3, start=1, stride=2, size=None)
    assert strided.indices == [1, 3, 5] and strided.fps == pytest.approx(6.0)
    assert [_index_of(f) for f in strided.frames] == [1, 3, 5]
    assert strided.frames.shape[1:] == (48, 64, 3)


@pytest.mark.parametrize(
    "suffix,codec_args",
    [(".webm", ["-c:v", "libvpx", "-b:v", "1M"]), (".avi", ["-c:v", "mjpeg", "-q:v", "2"]),
     (".gif", []), (".mov", ["-c:v", "libx264", "-pix_fmt", "yuv420p"])],
)  # fmt: skip
def test_reads_other_containers(mp4, tmp_path, suffix, codec_args):
    out = tmp_path / f"v{suffix}"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(mp4), *codec_args, str(out)], check=True)
    count, fps = count_frames(out)
    assert count == 12 and fps == pytest.approx(12.0, rel=0.05)
    video = read_video(out, num_frames=4, size=32)
    assert video.frames.shape == (4, 32, 32, 3)
    assert [_index_of(f) for f in video.frames] == [0, 1, 2, 3]


def test_display_rotation_is_applied(mp4, tmp_path):
    rotated = tmp_path / "rot.mp4"
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    subprocess.run([exe, "-loglevel", "error", "-display_rotation", "90", "-i", str(mp4), "-c", "copy", str(rotated)], check=True)
    frame = read_video(rotated, num_frames=1, size=None).frames[0]
    assert frame.shape == (64, 48, 3)  # portrait now
    # The red bar on the left of the stored frame ends up on the bottom (counter-clockwise 90).
    assert frame[-8:, :, 0].mean() > 200 and frame[:8, :, 0].mean() < 150


# ---------------------------------------------------------------------------------------------
# Bad input: one clear EymError naming the file
# ---------------------------------------------------------------------------------------------
def test_missing_empty_and_garbage_files(tmp_path):
    with pytest.raises(EymError, match="no such file"):
        read_video(tmp_path / "nope.mp4")
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(EymError, match=r"empty\.mp4: file is empty"):
        read_video(empty)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(EymError, match=r"garbage\.mp4: not a readable video"):
        read_video(garbage)


def test_too_few_frames(mp4):
    with pytest.raises(EymError, match=r"ramp\.mp4: asked for 20 frames but only 12"):
        read_video(mp4, num_frames=20)


def test_limits(mp4):
    with pytest.raises(EymError, match=r"ramp\.mp4: resolution 64x48 is above the limit of 32"):
        read_video(mp4, num_frames=2, limits=VideoLimits(max_side=32))
    with pytest.raises(EymError, match=r"longer than the limit of 0 s"):
        read_video(mp4, num_frames=2, limits=VideoLimits(max_duration_s=0.5))
    with pytest.raises(EymError, match=r"12 frames is above the limit of 5"):
        read_video(mp4, num_frames=2, limits=VideoLimits(max_source_frames=5))


def test_bad_size_and_mode(mp4):
    with pytest.raises(EymError, match="size=100"):
        read_video(mp4, size=100)
    with pytest.raises(EymError, match="resize_mode"):
        read_video(mp4, resize_mode="stretch")


# ---------------------------------------------------------------------------------------------
# labelled panels and soundtracks (moviepy)
# ---------------------------------------------------------------------------------------------
def test_labelled_side_by_side_is_side_by_side_plus_labels():
    from eym.video import labelled_side_by_side

    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)  # scaled to 96 rows, as side_by_side does
    out = labelled_side_by_side({"source": a, "edit": b}, fps=8.0)
    plain = side_by_side(a, b)
    assert out.shape == plain.shape and out.dtype == np.uint8
    changed = (out != plain).any(axis=-1)  # (F, H, W)
    rows, cols = np.nonzero(changed.any(axis=0))
    # every frame keeps its own index (no frame repeated or dropped), and only the label corners differ
    assert changed.any(axis=(1, 2)).all() and rows.max() < 96 // 4
    assert cols.min() < 96 // 3 and ((cols >= 96) & (cols < 96 + 96 // 3)).any()  # one label per panel
    np.testing.assert_array_equal(out[:, 96 // 4 :], plain[:, 96 // 4 :])
    with pytest.raises(ValueError, match="frames"):
        labelled_side_by_side({"source": a, "edit": b[:3]}, fps=8.0)


def test_sampled_span_is_the_time_the_frames_cover():
    from eym.video import sampled_span

    assert sampled_span([24, 25, 26, 27], 24.0) == pytest.approx((1.0, 4 / 24))
    # every 10th frame of a 30 fps video from frame 30: plays at 3 fps, covers 30..69 = 1 s .. 2.33 s
    start, duration = sampled_span([30, 40, 50, 60], 3.0)
    assert start == pytest.approx(1.0) and duration == pytest.approx(4 / 3)
    assert sampled_span([12], 8.0) == pytest.approx((1.5, 1 / 8))


def test_mux_audio_carries_the_matching_span(tmp_path):
    from synthetic import dominant_frequency, write_video

    from eym.video import has_audio, mux_audio, sampled_span

    frames = _ramp_frames(48, 48, 64)
    source = write_video(tmp_path / "source.mp4", frames, 24.0, tones=[(440.0, 1.0), (1320.0, 1.0)])
    edited = write_mp4(frames[24:], tmp_path / "edited.mp4", 24.0)  # the second second, as an edit of it
    before = read_video(edited, num_frames=None, size=None).frames
    assert has_audio(source) and not has_audio(edited)
    assert mux_audio(edited, source, *sampled_span(list(range(24, 48)), 24.0))
    frequency, duration = dominant_frequency(edited)
    assert frequency == pytest.approx(1320.0, abs=20.0) and duration == pytest.approx(1.0, abs=0.1)
    np.testing.assert_array_equal(read_video(edited, num_frames=None, size=None).frames, before)  # video copied, not re-encoded
    with av.open(str(edited)) as container:
        assert container.streams.video[0].codec_context.name == "h264" and container.streams.audio[0].codec_context.name == "aac"
    # the first second is the other tone; no source audio (or a frame folder) leaves the file silent
    first = write_mp4(frames[:24], tmp_path / "first.mp4", 24.0)
    assert mux_audio(first, source, 0.0, 1.0) and dominant_frequency(first)[0] == pytest.approx(440.0, abs=20.0)
    silent = write_mp4(frames, tmp_path / "silent.mp4", 24.0)
    data = silent.read_bytes()
    assert not mux_audio(silent, edited.with_name("nothing.mp4"), 0.0, 1.0)
    assert not mux_audio(silent, tmp_path, 0.0, 1.0)
    assert not mux_audio(silent, source, 5.0, 1.0)  # past the end of the soundtrack
    assert silent.read_bytes() == data and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["source.mp4", "edited.mp4", "first.mp4", "silent.mp4"])


def test_default_sampling_of_a_30fps_clip_plays_at_least_8fps(tmp_path):
    """Default sampling takes consecutive frames at a small stride, not frames spread over the clip."""
    from eym.video import describe_span, natural_stride

    frames = np.zeros((240, 16, 16, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(240, dtype=np.uint8)[:, None, None]
    path = write_mp4(frames, tmp_path / "long30.mp4", 30.0)
    video = read_video(path, num_frames=8, size=None)
    assert video.fps >= 8 and video.fps == pytest.approx(15.0)
    assert video.indices == list(range(0, 16, 2))
    assert natural_stride(24.0, 1000, 8) == 2 and natural_stride(12.0, 1000, 8) == 1
    assert natural_stride(120.0, 1000, 8) == 3, "capped: never more than 3"
    assert natural_stride(30.0, 10, 8) == 1, "lowered until the frames fit in a short clip"
    assert describe_span(video.indices, 240, 30.0) == "frames 0-14 of 240 (stride 2), 0.53 s, plays at 15 fps"

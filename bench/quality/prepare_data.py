"""Prepare the quality lab's data on a CPU: frames, skeletons, masks, captions, edit pairs.

From the 10 TaiChi-HD clips in ``../shared/media/taichi_hd`` (256 x 256, 30 fps):

- training frames: every ``FRAME_STEP``-th frame up to ``MAX_TRAIN_PER_CLIP`` per clip, before
  the held-out window (see :mod:`lab`), resized to ``SIZE``; their skeletons are BlazePose
  keypoints (detected at 256 px, as ``eym.preprocess`` does) drawn by ``eym.pose.draw_skeletons``
  in ControlNet-openpose's format, frames without a person filled from the nearest one;
- held-out windows (``EVAL_FRAMES`` frames at the end of every clip): frames, keypoints,
  skeletons and person masks (``eym.masks``), the material of the edits and their metrics;
- per pair, the driving motion: the reference window's keypoints retargeted to the source
  person (``eym.pose.retarget``, what ``Editor`` does with ``retarget=True``) and drawn, so the
  GPU run needs no pose code.

Writes ``train.npz``, ``edits.npz`` (uint8 / float32 / bool arrays) and ``data.json`` (clips, captions, pairs,
settings) into ``--out`` (default ``.carry/quality/`` of the repository).

    python bench/quality/prepare_data.py --media ../shared/media
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lab  # noqa: E402


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """(F, H, W[, 3]) -> (F, size, size[, 3]) by area averaging (no aliasing when shrinking)."""
    import cv2

    return np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])


def _detect(frames: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """OpenPose-18 keypoints (F, 18, 3) of a frame sequence, gaps filled; and the empty frames."""
    from eym.pose import MediaPipePose, fill_missing

    return fill_missing(MediaPipePose().detect(frames))


def _window_masks(frames: np.ndarray, size: int) -> np.ndarray:
    """Person masks (F, size, size) bool of full-resolution frames, segmented then shrunk."""
    from eym.masks import MediaPipeMask, fill_empty_masks

    masks, _ = fill_empty_masks(MediaPipeMask().segment(frames))
    return _resize(masks.astype(np.float32), size) > 0.5


def split_indices(total: int) -> tuple[list[int], list[int]]:
    """(training frame indices, held-out window indices) of a clip with ``total`` frames."""
    window_start = total - lab.EVAL_RAW_FRAMES
    train_end = window_start - lab.GAP_RAW_FRAMES
    train = list(range(0, max(train_end, 0), lab.FRAME_STEP))[: lab.MAX_TRAIN_PER_CLIP]
    window = list(range(window_start, total, lab.FRAME_STEP))
    return train, window


def prepare(media: Path, out: Path, size: int = lab.SIZE) -> dict:
    """Read the clips, detect, draw, write ``data.npz`` + ``data.json`` into ``out``; returns the meta."""
    from eym.pose import draw_skeletons, retarget
    from eym.video import read_video

    started = time.perf_counter()
    train_frames, train_skeletons, train_clip, train_index = [], [], [], []
    windows = {k: [] for k in ("frames", "keypoints", "skeletons", "masks")}
    clips_meta = []
    for c, info in enumerate(lab.CLIPS):
        path = media / "taichi_hd" / f"{info.name}.mp4"
        video = read_video(path, num_frames=None, size=None)
        frames = video.frames  # (T, 256, 256, 3)
        train, window = split_indices(len(frames))
        keypoints, empty = _detect(frames[train])
        train_frames.append(_resize(frames[train], size))
        train_skeletons.append(draw_skeletons(keypoints, size, size))
        train_clip += [c] * len(train)
        train_index += train
        w_keypoints, w_empty = _detect(frames[window])
        windows["frames"].append(_resize(frames[window], size))
        windows["keypoints"].append(w_keypoints)
        windows["skeletons"].append(draw_skeletons(w_keypoints, size, size))
        windows["masks"].append(_window_masks(frames[window], size))
        clips_meta.append({
            "name": info.name, "subject": info.subject, "place": info.place, "frames": len(frames),
            "train": len(train), "train_empty": len(empty), "window": [window[0], window[-1]], "window_empty": len(w_empty),
            "fps": video.fps / lab.FRAME_STEP,
        })
        print(f"{info.name}: {len(frames)} frames, {len(train)} train ({len(empty)} without a person), "
              f"window {window[0]}-{window[-1]} ({len(w_empty)} without)", flush=True)

    names = [c.name for c in lab.CLIPS]
    driving_keypoints = []
    for pair in lab.PAIRS:
        src, ref = names.index(pair.source), names.index(pair.reference)
        driving_keypoints.append(retarget(windows["keypoints"][ref], windows["keypoints"][src]))
    driving_keypoints = np.stack(driving_keypoints).astype(np.float32)
    arrays = {
        "train_frames": np.concatenate(train_frames),  # (N, S, S, 3) uint8
        "train_skeletons": np.concatenate(train_skeletons),  # (N, S, S, 3) uint8
        "train_clip": np.asarray(train_clip, np.int16),  # (N,) index into clips
        "train_index": np.asarray(train_index, np.int32),  # (N,) source frame number
        "window_frames": np.stack(windows["frames"]),  # (C, F, S, S, 3) uint8
        "window_keypoints": np.stack(windows["keypoints"]).astype(np.float32),  # (C, F, 18, 3)
        "window_skeletons": np.stack(windows["skeletons"]),  # (C, F, S, S, 3) uint8
        "window_masks": np.stack(windows["masks"]),  # (C, F, S, S) bool
        "driving_keypoints": driving_keypoints,  # (P, F, 18, 3): reference motion on the source body
        "driving_skeletons": np.stack([draw_skeletons(k, size, size) for k in driving_keypoints]),  # (P, F, S, S, 3)
    }
    meta = {
        "size": size,
        "frame_step": lab.FRAME_STEP,
        "eval_frames": lab.EVAL_FRAMES,
        "gap_raw_frames": lab.GAP_RAW_FRAMES,
        "clips": clips_meta,
        "pairs": [{"source": p.source, "reference": p.reference, "target_motion": p.target_motion, "prompts": lab.pair_prompts(p)} for p in lab.PAIRS],
        "motions": list(lab.MOTIONS),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write(out, arrays, meta)
    return meta


def write(out: Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """``train.npz`` (``train_*`` arrays), ``edits.npz`` (the rest) and ``data.json`` into ``out``, atomically.

    Frame arrays are stored delta-coded (:func:`lab.delta_encode`), all compressed.
    """
    from eym.cache import atomic_output, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    for name, train in ((lab.TRAIN_FILE, True), (lab.EDITS_FILE, False)):
        stored = {}
        for key, value in arrays.items():
            if key.startswith("train_") != train:
                continue
            stored[key + lab.DELTA_SUFFIX if key.endswith("_frames") else key] = value if not key.endswith("_frames") else lab.delta_encode(value)
        with atomic_output(out / name, suffix=".npz") as tmp:
            np.savez_compressed(tmp, **stored)
    atomic_write_json(out / lab.META_FILE, meta)
    return out


def synthetic(out: Path, *, frames_per_clip: int = 4, size: int = 64, seed: int = 0) -> Path:
    """A small data file with the real layout: random frames, skeletons of a jittered stick figure.

    For the CPU tests of the GPU scripts (no media, no pose detection).
    """
    from eym.pose import draw_skeletons
    from eym.presets import preset_motion

    rng = np.random.default_rng(seed)
    C, F, P = len(lab.CLIPS), lab.EVAL_FRAMES, len(lab.PAIRS)
    motion = preset_motion("wave", F)  # (F, 18, 3) a real skeleton sequence

    def keypoints(n: int) -> np.ndarray:
        k = np.repeat(motion[:1], n, 0) if n != F else motion.copy()
        k[..., :2] += rng.normal(0, 0.01, k[..., :2].shape)
        return k.astype(np.float32)

    train_kps = keypoints(C * frames_per_clip)
    window_kps = np.stack([keypoints(F) for _ in range(C)])
    masks = np.zeros((C, F, size, size), bool)
    masks[:, :, size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = True
    driving = np.stack([window_kps[(p + 1) % C] for p in range(P)])
    arrays = {
        "train_frames": rng.integers(0, 256, (C * frames_per_clip, size, size, 3), dtype=np.uint8),
        "train_skeletons": draw_skeletons(train_kps, size, size),
        "train_clip": np.repeat(np.arange(C, dtype=np.int16), frames_per_clip),
        "train_index": np.tile(np.arange(frames_per_clip, dtype=np.int32), C),
        "window_frames": rng.integers(0, 256, (C, F, size, size, 3), dtype=np.uint8),
        "window_keypoints": window_kps,
        "window_skeletons": np.stack([draw_skeletons(k, size, size) for k in window_kps]),
        "window_masks": masks,
        "driving_keypoints": driving,
        "driving_skeletons": np.stack([draw_skeletons(k, size, size) for k in driving]),
    }
    meta = {
        "size": size, "frame_step": lab.FRAME_STEP, "eval_frames": F, "gap_raw_frames": lab.GAP_RAW_FRAMES,
        "clips": [{"name": c.name, "subject": c.subject, "place": c.place, "fps": 15.0} for c in lab.CLIPS],
        "pairs": [{"source": p.source, "reference": p.reference, "target_motion": p.target_motion, "prompts": lab.pair_prompts(p)} for p in lab.PAIRS],
        "motions": list(lab.MOTIONS), "synthetic": True,
    }
    return write(out, arrays, meta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--media", type=Path, default=lab.ROOT.parent / "shared" / "media", help="the shared media folder")
    parser.add_argument("--out", type=Path, default=lab.DATA_DIR, help="where data.npz and data.json go (the GPU run reads .carry/quality/ of its checkout)")
    parser.add_argument("--size", type=int, default=lab.SIZE, help="frame side in pixels (a multiple of 8)")
    args = parser.parse_args(argv)
    meta = prepare(args.media, args.out, args.size)
    sizes = ", ".join(f"{n} {(args.out / n).stat().st_size / 2**20:.1f} MB" for n in (lab.TRAIN_FILE, lab.EDITS_FILE))
    print(f"wrote {args.out} ({sizes}) in {meta['seconds']} s: "
          f"{sum(c['train'] for c in meta['clips'])} training frames, {len(meta['clips'])} windows, {len(meta['pairs'])} pairs")


if __name__ == "__main__":
    main()

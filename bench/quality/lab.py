"""What every quality-lab script shares: the clips, their captions, the edit pairs, the data file.

The lab trains a small Stable Diffusion in the real diffusers formats on TaiChi-HD footage
(``train_mini.py``), edits held-out windows of that footage through :class:`eym.editor.Editor`
(``run_edits.py``) and scores the edits with :mod:`eym.metrics` (``report.py``). The data are
prepared once on a CPU by ``prepare_data.py`` into ``DATA_DIR`` (``train.npz``, ``edits.npz``, ``data.json``).

Held out: the last ``EVAL_RAW_FRAMES`` source frames of every clip (taken every
``FRAME_STEP``-th, i.e. ``EVAL_FRAMES`` frames) and a gap of ``GAP_RAW_FRAMES`` before them are
never trained on. Edits take their sources and their reference motions from these windows, so
the model has seen each person and place but not the frames being edited.

This module imports only numpy and the standard library, so the GPU scripts can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the repository
DATA_DIR = ROOT / ".carry" / "quality"  # carried to the GPU machine (git-ignored)
TRAIN_FILE = "train.npz"  # training frames and skeletons (the training call carries it)
EDITS_FILE = "edits.npz"  # held-out windows and driving motions (the edit call carries it)
META_FILE = "data.json"  # clips, captions, pairs, settings (both calls)
MODEL_DIR = DATA_DIR / "mini"  # the trained mini model, diffusers layout

SIZE = 128  # pixels; the mini VAE maps 128 x 128 x 3 -> 16 x 16 x 4 (8x, as SD 1.5)
FRAME_STEP = 2  # every 2nd source frame (15 fps from 30)
MAX_TRAIN_PER_CLIP = 200  # training frames per clip at most
EVAL_FRAMES = 16  # frames of each held-out window (edit length)
EVAL_RAW_FRAMES = EVAL_FRAMES * FRAME_STEP  # source frames the window spans, at the clip's end
GAP_RAW_FRAMES = 16  # source frames between the training frames and the window (no near-duplicates)


@dataclass(frozen=True)
class ClipInfo:
    """One TaiChi-HD clip and its caption parts (from ../shared/media/INDEX.tsv's descriptions)."""

    name: str  # file stem under taichi_hd/
    subject: str  # who, "A man in a white tai chi suit"
    place: str  # where, "in front of a green hedge"


CLIPS = (
    ClipInfo("taichi_copart00", "A man in a white tai chi suit", "in front of a green hedge"),
    ClipInfo("taichi_copart01", "A woman in a yellow silk suit", "in a lakeside park"),
    ClipInfo("taichi_copart02", "A man in a cream suit", "in a courtyard under a tree"),
    ClipInfo("taichi_copart03", "A person in a black robe", "in a white hall"),
    ClipInfo("taichi_copart04", "A person in a red suit", "in a garden"),
    ClipInfo("taichi_copart05", "A woman in a yellow suit", "in a lakeside park"),
    ClipInfo("taichi_copart06", "A woman in a yellow suit", "in a lakeside park"),
    ClipInfo("taichi_copart07", "A man in a red suit", "in a garden with a red house"),
    ClipInfo("taichi_copart08", "A bald man in a white suit", "in front of a black background"),
    ClipInfo("taichi_copart09", "A woman in a yellow suit", "in a lakeside park"),
)

# Motion phrases put into training captions at random: they say nothing about the pose (the
# skeleton does), so the model learns that the motion words of P_s and P_t leave the person as is.
MOTIONS = (
    "practicing tai chi",
    "raising both arms",
    "doing a low stance",
    "doing a deep bow stance",
    "stepping forward",
    "doing a single whip",
    "pushing both hands forward",
    "turning to the side",
)
SOURCE_MOTION = "practicing tai chi"


@dataclass(frozen=True)
class Pair:
    """An edit: the held-out window of ``source`` moved like the held-out window of ``reference``."""

    source: str  # clip name (a person the model has seen)
    reference: str  # clip name of the motion (another person)
    target_motion: str  # P_t's motion phrase


PAIRS = (
    Pair("taichi_copart00", "taichi_copart06", "raising both arms"),
    Pair("taichi_copart07", "taichi_copart05", "doing a deep bow stance"),
    Pair("taichi_copart02", "taichi_copart00", "doing a low stance"),
    Pair("taichi_copart08", "taichi_copart07", "doing a single whip"),
    Pair("taichi_copart03", "taichi_copart02", "stepping forward"),
    Pair("taichi_copart09", "taichi_copart08", "pushing both hands forward"),
)


def clip_info(name: str) -> ClipInfo:
    for info in CLIPS:
        if info.name == name:
            return info
    raise KeyError(name)


def caption(info: ClipInfo, motion: str | None) -> str:
    """P_c (``motion=None``: who and where) or P_s / P_t (who is doing what where)."""
    return f"{info.subject} {info.place}." if motion is None else f"{info.subject} is {motion} {info.place}."


def pair_prompts(pair: Pair) -> dict[str, str]:
    """The paper's three prompts of a pair: P_c, P_s, P_t."""
    info = clip_info(pair.source)
    return {"content": caption(info, None), "source": caption(info, SOURCE_MOTION), "target": caption(info, pair.target_motion)}


DELTA_SUFFIX = "__delta"  # frame arrays are stored as differences to the previous frame


def delta_encode(frames: np.ndarray) -> np.ndarray:
    """uint8 frames ``(..., F, H, W, 3)`` -> differences to the previous frame along F, modulo 256 (lossless).

    Consecutive frames of a clip differ little, so the differences compress to about 40% of
    the frames' own zlib size; this keeps the carried data files small.
    """
    axis = frames.ndim - 4
    return np.diff(frames, axis=axis, prepend=np.zeros_like(frames.take([0], axis=axis)))  # uint8 arithmetic wraps mod 256


def delta_decode(deltas: np.ndarray) -> np.ndarray:
    """The inverse of :func:`delta_encode`."""
    return np.cumsum(deltas, axis=deltas.ndim - 4, dtype=np.uint8)


def load_data(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays of an ``.npz`` of :data:`DATA_DIR` (in memory, frames decoded) and ``data.json`` next to it."""
    path = Path(path)
    arrays = {}
    with np.load(path) as npz:
        for key in npz.files:
            if key.endswith(DELTA_SUFFIX):
                arrays[key[: -len(DELTA_SUFFIX)]] = delta_decode(npz[key])
            else:
                arrays[key] = npz[key]
    meta = json.loads((path.parent / META_FILE).read_text())
    return arrays, meta

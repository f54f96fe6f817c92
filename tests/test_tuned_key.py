"""The one tuned-weights key (eym.tuned.tuning_key): batch's groups and the Editor's cache keys agree.

The property that matters: two entries batch puts in one group get the same Editor tuned key
(so a group's first edit tunes and its others reuse), and entries with another source, P_c/P_s,
tuning settings, sampling or model get another key. Checked with real preprocessing of real
footage (media) and, without footage, with clips built from the files' bytes.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from eym import batch as B
from eym.config import replace, to_dict
from eym.editor import EditConfig, Editor, InferConfig
from eym.preprocess import PreprocessConfig
from eym.suite import entry_prompts, pair_config
from eym.tuning import TuneConfig

_ENTRIES = """\
version: 1
entries:
  - name: a-wave
    source: a/images
    preset: wave
    subject: A girl in a white crop top
    source_motion: dancing on the beach
    target_motion: waving on the beach
  - name: a-squat  # another motion and P_t: the same tuning
    source: a/images
    preset: squat
    subject: A girl in a white crop top
    source_motion: dancing on the beach
    target_motion: doing a squat on the beach
  - name: a-copy  # the same frames in another folder: the same tuning
    source: a-copy/images
    preset: wave
    subject: A girl in a white crop top
    source_motion: dancing on the beach
    target_motion: waving on the beach
  - name: a-other-ps  # P_s differs
    source: a/images
    preset: wave
    subject: A girl in a white crop top
    source_motion: walking on the beach
    target_motion: waving on the beach
  - name: a-other-pc  # P_c differs, P_s the same
    source: a/images
    preset: wave
    content_prompt: A girl.
    source_prompt: A girl in a white crop top is dancing on the beach.
    target_prompt: A girl in a white crop top is waving on the beach.
  - name: a-3frames  # a sampling hint: another clip
    source: a/images
    preset: wave
    num_frames: 3
    subject: A girl in a white crop top
    source_motion: dancing on the beach
    target_motion: waving on the beach
  - name: b-wave  # another source
    source: b.mp4
    preset: wave
    subject: A girl in a white crop top
    source_motion: dancing on the beach
    target_motion: waving on the beach
"""
SAME_TUNING = [{"a-wave", "a-squat", "a-copy"}, {"a-other-ps"}, {"a-other-pc"}, {"a-3frames"}, {"b-wave"}]
CONFIG = EditConfig(preprocess=PreprocessConfig(num_frames=4, size=64), tune=TuneConfig(steps1=2, steps2=2))


@pytest.fixture(scope="module")
def editors(tiny_bundle, tmp_path_factory):
    """Editors over two tiny models (seed 0 and seed 1): the model is part of the key."""
    from eym.models import build_tiny_bundle, load_components

    other = build_tiny_bundle(tmp_path_factory.mktemp("tiny-seed1") / "bundle", seed=1)
    return {str(path): Editor(load_components(str(path), device="cpu"), cache_dir=tmp_path_factory.mktemp("tuned"),
                              disable_progress=True) for path in (tiny_bundle, other)}


def _gallery(root: Path):
    from eym.gallery import load_gallery

    (root / "gallery.yaml").write_text(_ENTRIES)
    return load_gallery(root / "gallery.yaml")


def _real_clip(entry, config: EditConfig):
    """The clip the edit tunes on, as eym.suite makes it."""
    from eym.preprocess import preprocess

    return preprocess(entry.source, config.preprocess, with_masks=True)


def _bytes_clip(entry, config: EditConfig):
    """Without footage: a clip whose content follows from the file's bytes and the sampling, as preprocessing's does."""
    from eym.cache import hash_path

    prep = config.preprocess
    seed = int(hashlib.sha256((hash_path(entry.source) + repr(to_dict(prep))).encode()).hexdigest()[:8], 16)
    frames = np.random.default_rng(seed).integers(0, 256, (prep.num_frames, prep.size, prep.size, 3), dtype=np.uint8)
    masks = np.ones(frames.shape[:3], bool)
    return SimpleNamespace(frames=frames, skeletons=frames, masks=masks, content_hash=hashlib.sha256(frames.tobytes()).hexdigest())


def _check_agreement(gallery, editors, make_clip, configs):
    """For every pair of (entry, config, model): equal group key <=> equal Editor tuned key."""
    clips = {}
    keyed = []  # (group key, editor key, label)
    for (model, editor), config, entry in itertools.product(editors.items(), configs, gallery.entries):
        pc = pair_config(entry, config)
        clip_key = (entry.name, repr(to_dict(pc.preprocess)))
        if clip_key not in clips:
            clips[clip_key] = make_clip(entry, pc)
        editor_key = editor.tuned_key(clips[clip_key], entry_prompts(entry), pc.tune)
        keyed.append((B.group_key(entry, config, model, None), editor_key, (Path(model).parent.name, entry.name)))
    for (g1, e1, l1), (g2, e2, l2) in itertools.combinations(keyed, 2):
        assert (g1 == g2) == (e1 == e2), (l1, l2, g1 == g2, e1 == e2)
    return keyed


def _layout(root: Path, media: Path | None) -> None:
    if media is not None:
        shutil.copytree(media / "MotionEditor" / "case-1" / "images", root / "a" / "images")
        shutil.copy(media / "taichi_hd" / "taichi_copart07.mp4", root / "b.mp4")
    else:
        (root / "a" / "images").mkdir(parents=True)
        for i in range(4):
            (root / "a" / "images" / f"{i:04d}.png").write_bytes(b"frame %d" % i * 50)
        (root / "b.mp4").write_bytes(b"video b" * 100)
    shutil.copytree(root / "a" / "images", root / "a-copy" / "images")


def _configs():
    return [
        CONFIG,
        replace(CONFIG, infer=InferConfig(ddim_steps=3, guidance_scale=2.0)),  # inference: the same tuning
        replace(CONFIG, tune=replace(CONFIG.tune, checkpoint_every=7)),  # bookkeeping: the same tuning
        replace(CONFIG, tune=replace(CONFIG.tune, steps1=3)),  # another tuning
        replace(CONFIG, tune=replace(CONFIG.tune, mask_background=False)),  # L_rec on the whole frame
    ]


def _expected_groups(keyed, model, config_index, n_entries):
    per_config = [k for k in keyed if k[2][0] == Path(model).parent.name]
    rows = per_config[config_index * n_entries:(config_index + 1) * n_entries]
    by_key: dict[str, set[str]] = {}
    for group, _editor, (_m, name) in rows:
        by_key.setdefault(group, set()).add(name)
    return sorted(by_key.values(), key=sorted)


def test_batch_groups_are_the_editor_keys_without_footage(editors, tmp_path):
    _layout(tmp_path, None)
    gallery = _gallery(tmp_path)
    keyed = _check_agreement(gallery, editors, _bytes_clip, _configs())
    n = len(gallery.entries)
    assert _expected_groups(keyed, next(iter(editors)), 0, n) == sorted(SAME_TUNING, key=sorted)
    # inference and bookkeeping settings share the first config's keys; steps and masking do not
    first = [k[1] for k in keyed[:n]]
    assert [k[1] for k in keyed[n:2 * n]] == first and [k[1] for k in keyed[2 * n:3 * n]] == first
    assert not set(first) & {k[1] for k in keyed[3 * n:5 * n]}
    # the other model shares no key with the first
    half = len(keyed) // 2
    assert not {k[1] for k in keyed[:half]} & {k[1] for k in keyed[half:]}


@pytest.mark.media
def test_batch_groups_are_the_editor_keys_of_preprocessed_footage(editors, media, tmp_path):
    _layout(tmp_path, media)
    gallery = _gallery(tmp_path)
    configs = _configs()[::3]  # the paper's tuning and another one: preprocessing dominates the time
    keyed = _check_agreement(gallery, {k: v for k, v in list(editors.items())[:1]}, _real_clip, configs)
    assert _expected_groups(keyed, next(iter(editors)), 0, len(gallery.entries)) == sorted(SAME_TUNING, key=sorted)

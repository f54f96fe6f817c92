"""Batch: grouping by tuning key, the rank assignment, the summary tables, and a real two-rank
``accelerate launch`` on footage with the tiny bundle (then a re-run, then one process)."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eym import batch as B
from eym.errors import EymError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Groups: what the tuned weights depend on, and nothing else
# ---------------------------------------------------------------------------------------------
def _gallery(tmp_path: Path, entries: str):
    from eym.gallery import load_gallery

    manifest = tmp_path / "gallery.yaml"
    manifest.write_text("version: 1\nentries:\n" + entries)
    return load_gallery(manifest)


_ENTRY = """\
  - name: {name}
    source: {source}
    {motion}
    subject: {subject}
    source_motion: {source_motion}
    target_motion: {target_motion}
{extra}"""


def _entry(name, source="a.mp4", motion="preset: wave", subject="A man", source_motion="walking",
           target_motion="waving", extra=""):
    return _ENTRY.format(name=name, source=source, motion=motion, subject=subject, source_motion=source_motion,
                         target_motion=target_motion, extra=extra)


def test_groups_follow_the_tuning_key(tmp_path):
    from eym.editor import EditConfig, InferConfig
    from eym.config import replace

    # the group key hashes file contents only: fake bytes are enough, nothing is decoded
    (tmp_path / "a.mp4").write_bytes(b"video a" * 100)
    (tmp_path / "a-copy.mp4").write_bytes(b"video a" * 100)
    (tmp_path / "b.mp4").write_bytes(b"video b" * 100)
    (tmp_path / "ref.mp4").write_bytes(b"reference" * 100)
    gallery = _gallery(tmp_path, "".join([
        _entry("a-wave"),
        _entry("a-ref", motion="reference: ref.mp4", target_motion="jumping"),  # other motion and P_t: same tuning
        _entry("a-copy", source="a-copy.mp4", motion="preset: squat"),  # same content under another name
        _entry("a-other-ps", source_motion="running"),  # P_s differs: tuned on another prompt
        _entry("a-4frames", extra="    num_frames: 4\n"),  # sampling hint: another clip
        _entry("b-wave", source="b.mp4"),
    ]))
    config = EditConfig()
    groups = B.group_entries(gallery.entries, config, "tiny", None)
    assert [g.names for g in groups] == [("a-wave", "a-ref", "a-copy"), ("a-other-ps",), ("a-4frames",), ("b-wave",)]
    assert len({g.key for g in groups}) == 4

    key = B.group_key(gallery.get("a-wave"), config, "tiny", None)
    # inference settings never change the tuned weights; tuning, sampling and model settings do
    assert B.group_key(gallery.get("a-wave"), replace(config, infer=InferConfig(ddim_steps=3)), "tiny", None) == key
    assert B.group_key(gallery.get("a-wave"), replace(config, tune=replace(config.tune, steps1=2)), "tiny", None) != key
    assert B.group_key(gallery.get("a-wave"), replace(config, preprocess=replace(config.preprocess, size=64)), "tiny", None) != key
    assert B.group_key(gallery.get("a-wave"), config, "other-model", None) != key
    assert B.group_key(gallery.get("a-wave"), config, "tiny", "other-controlnet") != key
    # bookkeeping settings of tuning are left out of the cache key, and so out of the group key
    assert B.group_key(gallery.get("a-wave"), replace(config, tune=replace(config.tune, checkpoint_every=7)), "tiny", None) == key


# ---------------------------------------------------------------------------------------------
# Assignment of groups to ranks
# ---------------------------------------------------------------------------------------------
def _groups(sizes: list[int]) -> list[B.EditGroup]:
    return [B.EditGroup(f"key{i}", tuple(f"g{i:02d}-e{j}" for j in range(n))) for i, n in enumerate(sizes)]


def test_assign_groups_worked_example():
    groups = _groups([3, 2, 2, 1])  # g00 (3 edits), g01 (2), g02 (2), g03 (1)
    plan = B.assign_groups(groups, 2)
    # largest first: g00 -> r0 (3); g01 -> r1 (2); g02 -> r1 (2 < 3, now 4); g03 -> r0 (3 < 4, now 4)
    assert [[g.key for g in share] for share in plan] == [["key0", "key3"], ["key1", "key2"]]
    # ties in load go to the lowest rank; ties in size to the first name
    plan = B.assign_groups(_groups([1, 1, 1]), 2)
    assert [[g.key for g in share] for share in plan] == [["key0", "key2"], ["key1"]]


@pytest.mark.parametrize("seed", range(5))
def test_assign_groups_properties(seed):
    rng = random.Random(seed)
    groups = _groups([rng.randint(1, 6) for _ in range(rng.randint(1, 12))])
    for num_ranks in (1, 2, 3, 4, 8, 20):  # 20: more ranks than groups
        plan = B.assign_groups(groups, num_ranks)
        assert len(plan) == num_ranks
        # every edit exactly once, every group whole on a single rank
        names = [n for share in plan for g in share for n in g.names]
        assert sorted(names) == sorted(n for g in groups for n in g.names)
        assert sorted(g.key for share in plan for g in share) == sorted(g.key for g in groups)
        # deterministic and independent of the order the groups come in (each rank computes it alone)
        shuffled = groups[:]
        rng.shuffle(shuffled)
        assert B.assign_groups(shuffled, num_ranks) == plan
        # balanced: the greedy bound, and no rank idle while another holds two groups
        loads = [sum(g.size for g in share) for share in plan]
        assert max(loads) - min(loads) <= max(g.size for g in groups)
        if num_ranks >= len(groups):
            assert all(len(share) <= 1 for share in plan) and sum(map(len, plan)) == len(groups)
        else:
            assert all(plan)
    with pytest.raises(EymError, match="at least 1"):
        B.assign_groups(groups, 0)


# ---------------------------------------------------------------------------------------------
# Summary tables
# ---------------------------------------------------------------------------------------------
def test_summary_tables():
    rows = [
        B.EditRow("pair-a", "clips/a|b.mp4", "preset: wave", 0, "abc", B.EDITED, False, 12.5,
                  {"video": "pairs/pair-a/edited.mp4"}, {"TA": 0.25, "MAFD": None}),
        B.EditRow("pair-b", "clips/b.mp4", "reference: r.mp4", 1, "def", B.SKIPPED, True, 0.01,
                  {"video": "pairs/pair-b/edited.mp4"}, {"TA": 0.5, "MAFD": 3.0}),
        B.EditRow("pair-c", "clips/c.mp4", "preset: squat", 1, "ghi", B.FAILED, None, 0.2, error="no person"),
    ]
    table = list(csv.DictReader(io.StringIO(B.summary_csv(rows))))
    assert [r["edit"] for r in table] == ["pair-a", "pair-b", "pair-c"]
    assert [r["status"] for r in table] == ["edited", "skipped", "failed"]
    assert [r["reused_tuning"] for r in table] == ["false", "true", ""]
    assert float(table[0]["TA"]) == 0.25 and table[0]["MAFD"] == "" and table[2]["error"] == "no person"
    assert list(table[0])[-2:] == ["TA", "MAFD"]  # metric columns after the fixed ones, in METRICS order

    md = B.summary_markdown(rows, 2).splitlines()
    assert md[2] == "3 edits on 2 rank(s): 1 edited (tuning ran 1 time(s)), 1 skipped (complete from an earlier run), 1 failed."
    assert md[4] == "| Edit | Source | Motion | Rank | Status | Tuning | Seconds | Video | TA ↑ | MAFD |"
    # a '|' in a file name is escaped, so the row keeps its columns
    assert md[6] == r"| pair-a | clips/a\|b.mp4 | preset: wave | 0 | edited | tuned | 12.5 | [edited.mp4](pairs/pair-a/edited.mp4) | 0.250 | n/a |"
    assert md[-1] == "- pair-c: no person"


def test_run_batch_records_internal_errors_and_goes_on(tmp_path, monkeypatch):
    """One process, the per-edit work replaced by a fake: rows, order, counters, the summary
    files, and an unexpected exception recorded as a failed edit instead of stopping the rank."""
    from eym import suite

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.mp4").write_bytes(name.encode() * 100)
    _gallery(tmp_path, "".join([_entry("a-wave"), _entry("boom", source="c.mp4"), _entry("b-wave", source="b.mp4"),
                                _entry("a-squat", motion="preset: squat")]))
    ran: list[str] = []

    def fake_run_pair(entry, edit_config, eval_config, *, model, controlnet, get_editor, pairs_dir, callback=None):
        ran.append(entry.name)
        if entry.name == "boom":
            raise RuntimeError("kaput")
        folder = pairs_dir / entry.name
        folder.mkdir(parents=True)
        (folder / "edited.mp4").write_bytes(b"video")
        (folder / "edited.settings.json").write_text(json.dumps({"tuned": {"reused": entry.name == "a-squat"}}))
        return suite.PairOutcome(entry.name, folder, None, reused=False, seconds=0.25)

    monkeypatch.setattr(suite, "run_pair", fake_run_pair)
    events: list[tuple] = []
    result = B.run_batch(tmp_path / "gallery.yaml", tmp_path / "out", model="tiny", cpu=True, disable_progress=True,
                         callback=lambda *e: events.append(e))
    # one rank: its groups in order of their first entries, each group's edits together
    assert ran == ["a-wave", "a-squat", "boom", "b-wave"]
    assert events == [("batch", i, 4) for i in range(1, 5)]
    assert [(r.name, r.status, r.reused_tuning) for r in result.rows] == [
        ("a-wave", "edited", False), ("boom", "failed", None), ("b-wave", "edited", False), ("a-squat", "edited", True)]
    assert result.rows[1].error == "internal error RuntimeError: kaput"
    assert result.rows[0].outputs == {"video": "pairs/a-wave/edited.mp4", "settings": "pairs/a-wave/edited.settings.json"}
    assert (result.rank, result.num_ranks, result.edits_run, result.tunings_run) == (0, 1, 3, 2)
    assert [r["edit"] for r in B.read_summary(tmp_path / "out")] == ["a-wave", "boom", "b-wave", "a-squat"]
    assert "- boom: internal error RuntimeError: kaput" in result.summary_md.read_text()
    info = json.loads(result.batch_json.read_text())
    assert [[g["edits"] for g in share] for share in info["plan"]] == [[["a-wave", "a-squat"], ["b-wave"], ["boom"]]]
    assert info["ranks"] == [{"rank": 0, "device": "cpu", "edits": 4, "edits_run": 3, "tunings_run": 2, "failed": 1,
                              "model_loaded": False, "seconds": info["ranks"][0]["seconds"]}]
    with pytest.raises(EymError, match="no entry named 'nope'"):
        B.run_batch(tmp_path / "gallery.yaml", tmp_path / "out", model="tiny", names=["nope"])


# ---------------------------------------------------------------------------------------------
# Two ranks with accelerate, a re-run, and one process: real footage, the tiny bundle
# ---------------------------------------------------------------------------------------------
from test_metrics import tiny_clip  # noqa: E402,F401  (tiny CLIP, session fixture)

_SUBJECT_A = "A girl in a white crop top and a blue pleated skirt"
_SUBJECT_B = "A man in a red tai chi suit"
_MANIFEST = f"""\
version: 1
root: {{root}}
entries:
  - name: dance-arms
    source: MotionEditor/case-1/images
    reference: MotionEditor/case-1/target_images
    subject: {_SUBJECT_A}
    source_motion: dancing on the beach
    target_motion: dancing with her arms stretched out on the beach
  - name: taichi-bow
    source: taichi_hd/taichi_copart07.mp4
    reference: taichi_hd/taichi_copart05.mp4
    subject: {_SUBJECT_B}
    source_motion: practicing tai chi in a garden
    target_motion: doing a deep bow stance in a garden
  - name: dance-wave
    source: MotionEditor/case-1/images
    preset: wave
    subject: {_SUBJECT_A}
    source_motion: dancing on the beach
    target_motion: waving on the beach
  - name: taichi-raise
    source: taichi_hd/taichi_copart07.mp4
    preset: raise_arms
    subject: {_SUBJECT_B}
    source_motion: practicing tai chi in a garden
    target_motion: raising both arms in a garden
  - name: too-late  # starts past the last of the 8 frames: fails, the rank's other edits go on
    source: MotionEditor/case-1/images
    preset: squat
    subject: {_SUBJECT_A}
    target_motion: doing a squat
    start: 5000
"""
_SETTINGS = ["--frames", "8", "--size", "64", "--steps1", "2", "--steps2", "2", "--ddim-steps", "3"]
EDITS = ["dance-arms", "taichi-bow", "dance-wave", "taichi-raise"]
SOURCE_OF = {"dance-arms": "case-1", "dance-wave": "case-1", "taichi-bow": "taichi07", "taichi-raise": "taichi07"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``accelerate launch`` with two processes on the CPU, non-interactive (no config file used).

    accelerate 1.15's ``--cpu --num_processes 2`` starts a single process (several CPU processes
    need mpirun); ``--multi_gpu`` selects its torchrun launcher, which works without GPUs, and
    ``eym batch --cpu`` then makes the ranks use the CPU and gloo.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "eym", "batch", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def _rows(out: Path) -> dict[str, dict[str, str]]:
    return {r["edit"]: r for r in B.read_summary(out)}


def _tuned_entries(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "tuned").iterdir() if not p.name.startswith("."))


def _frames(path: Path) -> np.ndarray:
    from eym.video import read_video

    return read_video(path, num_frames=None, size=None).frames.astype(np.float32)


@pytest.mark.media
def test_batch_two_ranks_rerun_and_single_process(media, tiny_bundle, tiny_clip, tmp_path, monkeypatch, capsys):
    from eym.editor import EditConfig, InferConfig
    from eym.gallery import load_gallery
    from eym.preprocess import PreprocessConfig
    from eym.tuning import TuneConfig

    manifest = tmp_path / "gallery.yaml"
    manifest.write_text(_MANIFEST.format(root=media))
    home = tmp_path / "home"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EYM_HOME": str(home), "HF_HOME": str(tmp_path / "hf"),
           "GRADIO_ANALYTICS_ENABLED": "False", "ORT_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    args = [str(manifest), "--out", str(out), "--model", str(tiny_bundle), "--cpu", *_SETTINGS,
            "--eval", "--metrics", "clip,temporal", "--clip-model", str(tiny_clip)]

    # 1. two ranks: every edit once, each source tuned once, the summary written once
    first = _launch(args, env)
    log = first.stdout + first.stderr
    assert first.returncode != 0, log[-3000:]  # `too-late` failed: the command says so
    assert log.count("wrote summary") == 1, log[-3000:]
    rows = _rows(out)
    assert list(rows) == [*EDITS, "too-late"]  # manifest order, whichever rank did them
    assert {rows[n]["status"] for n in EDITS} == {"edited"}
    assert rows["too-late"]["status"] == "failed" and "start=5000" in rows["too-late"]["error"]
    for name in EDITS:
        for kind in ("video", "side_by_side", "settings", "contact_sheet", "metrics"):
            assert (out / rows[name][kind]).is_file(), (name, kind)
        assert 0 <= float(rows[name]["TA"]) <= 1 and float(rows[name]["MAFD"]) > 0  # metrics gathered too
    # both ranks worked, each source on one rank, tuned exactly once there, reused by its other edit
    assert {rows[n]["rank"] for n in EDITS} == {"0", "1"}
    for source in ("case-1", "taichi07"):
        mine = [rows[n] for n in EDITS if SOURCE_OF[n] == source]
        assert len({r["rank"] for r in mine}) == 1
        assert sorted(r["reused_tuning"] for r in mine) == ["false", "true"]
    assert len(_tuned_entries(home)) == 2
    info = json.loads((out / B.BATCH_JSON).read_text())
    assert [(r["rank"], r["edits_run"], r["tunings_run"]) for r in info["ranks"]] == [(0, 2, 1), (1, 2, 1)]
    # the ranks' plan is the one assign_groups gives here, without talking to each other
    gallery = load_gallery(manifest)
    config = EditConfig(preprocess=PreprocessConfig(num_frames=8, size=64), tune=TuneConfig(steps1=2, steps2=2),
                        infer=InferConfig(ddim_steps=3))
    plan = B.assign_groups(B.group_entries(gallery.entries, config, str(tiny_bundle), None), 2)
    assert {n: str(r) for r, share in enumerate(plan) for g in share for n in g.names} == \
        {n: row["rank"] for n, row in rows.items()}
    created = {n: json.loads((out / "pairs" / n / "MANIFEST.json").read_text())["created"] for n in EDITS}

    # 2. the same command again: nothing to do, no model loaded on any rank
    second = _launch(args, env)
    log = second.stdout + second.stderr
    assert log.count("wrote summary") == 1, log[-3000:]
    again = _rows(out)
    assert [again[n]["status"] for n in EDITS] == ["skipped"] * 4 and again["too-late"]["status"] == "failed"
    assert [again[n]["reused_tuning"] for n in EDITS] == [rows[n]["reused_tuning"] for n in EDITS]  # as recorded
    assert [again[n]["TA"] for n in EDITS] == [rows[n]["TA"] for n in EDITS]
    info = json.loads((out / B.BATCH_JSON).read_text())
    assert [(r["edits_run"], r["tunings_run"], r["model_loaded"]) for r in info["ranks"]] == [(0, 0, False)] * 2
    assert {n: json.loads((out / "pairs" / n / "MANIFEST.json").read_text())["created"] for n in EDITS} == created
    assert len(_tuned_entries(home)) == 2

    # 3. one process, no accelerate, in-process through the CLI: the same results. Its own
    #    tuned-weights cache (so it tunes again); preprocessed clips are reused to save time.
    single_home = tmp_path / "home-single"
    shutil.copytree(home / "preprocess", single_home / "preprocess")
    monkeypatch.setenv("EYM_HOME", str(single_home))
    from eym.cli import main

    single_out = tmp_path / "single"
    code = main(["-q", "batch", args[0], "--out", str(single_out), *args[3:]])
    assert code == 1  # too-late
    single = _rows(single_out)
    assert "5 edits on 1 rank(s): 4 edited (tuning ran 2 time(s))" in capsys.readouterr().out
    assert [single[n]["status"] for n in single] == [rows[n]["status"] for n in rows]
    assert {single[n]["rank"] for n in single} == {"0"}
    assert [single[n]["reused_tuning"] for n in EDITS] == [rows[n]["reused_tuning"] for n in EDITS]
    # the same tunings: same cache keys, the same tensors up to float rounding
    from safetensors.torch import load_file

    assert _tuned_entries(single_home) == _tuned_entries(home)
    for key in _tuned_entries(home):
        ours, theirs = (load_file(str(h / "tuned" / key / "tuned.safetensors")) for h in (single_home, home))
        assert ours.keys() == theirs.keys()
        assert max(float((ours[n] - theirs[n]).abs().max()) for n in ours) < 1e-5
    # the same edits: identical inputs and settings, and videos equal up to float rounding. Not
    # bit-equal: CPU BLAS results depend on the thread count (one per rank under torchrun) and
    # on memory alignment, and random weights amplify that; so each video must be close to its
    # two-rank twin and much closer to it than to the other edit of its source.
    for name in EDITS:
        a, b = (json.loads(((o / r[name]["settings"])).read_text()) for o, r in ((single_out, single), (out, rows)))
        for part in ("prompts", "source", "reference", "config", "frames", "fps"):
            assert a[part] == b[part], (name, part)
        assert a["tuned"]["key"] == b["tuned"]["key"]
        mine = _frames(single_out / single[name]["video"])
        twin = np.abs(mine - _frames(out / rows[name]["video"])).mean()
        other = next(n for n in EDITS if n != name and SOURCE_OF[n] == SOURCE_OF[name])
        apart = np.abs(mine - _frames(out / rows[other]["video"])).mean()
        assert twin < 4.0 and twin < apart / 2.5, (name, twin, apart)
        assert float(single[name]["TA"]) == pytest.approx(float(rows[name]["TA"]), abs=0.02)

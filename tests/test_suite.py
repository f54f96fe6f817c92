"""Suite: contact sheets, the paper-layout tables, and a resumable run on real footage with the
tiny bundle."""

from __future__ import annotations

import csv
import io
import json
import math
import pytest

from eym import suite as S
from eym.metrics import EvalReport, Metric


def _report(**values: float | None) -> EvalReport:
    return EvalReport({k: Metric(k, v, True, None if v is not None else "no weights") for k, v in values.items()}, {})


def test_tables_have_paper_layout_and_mean_row():
    reports = {
        "pair-a": _report(**{"TA": 0.2, "TC": 0.9, "L-N": 0.1, "L-S": 0.3, "PCK": 1.0, "BG-PSNR": math.inf}),
        "pair-b": _report(**{"TA": 0.4, "TC": 0.8, "L-N": 0.3, "L-S": None, "PCK": 0.5, "BG-PSNR": 30.0}),
    }
    md = S.table_markdown(reports, {"pair-a": "pairs/pair-a/contact_sheet.png"})
    lines = md.splitlines()
    assert lines[0] == "| Pair | TA ↑ | TC ↑ | L-N ↓ | L-S ↓ | PCK ↑ | BG-PSNR ↑ |"
    assert lines[2] == "| pair-a | 0.200 | 0.900 | 0.100 | 0.300 | 1.000 | inf |"
    assert lines[3] == "| pair-b | 0.400 | 0.800 | 0.300 | n/a | 0.500 | 30.00 |"
    # mean over the pairs where a metric is available; inf stays inf
    assert lines[4] == "| **mean (2)** | 0.300 | 0.850 | 0.200 | 0.300 | 0.750 | inf |"
    assert "n/a (L-S): no weights" in md and "(pairs/pair-a/contact_sheet.png)" in md

    rows = list(csv.reader(io.StringIO(S.table_csv(reports))))
    assert rows[0] == ["pair", "TA", "TC", "L-N", "L-S", "PCK", "BG-PSNR"]
    assert [r[0] for r in rows[1:]] == ["pair-a", "pair-b", "mean"]
    assert rows[2][4] == "" and float(rows[3][1]) == pytest.approx(0.3) and float(rows[3][4]) == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------
# The suite on real footage with the tiny bundle
# ---------------------------------------------------------------------------------------------
from test_metrics import tiny_clip, torch_home  # noqa: E402,F401  (tiny CLIP and AlexNet fixtures)

_GALLERY = """\
version: 1
root: {root}
entries:
  - name: dance-arms
    source: MotionEditor/case-1/images
    reference: MotionEditor/case-1/target_images
    content_prompt: A girl in a white crop top and a blue pleated skirt.
    source_prompt: A girl in a white crop top and a blue pleated skirt is dancing on the beach.
    target_prompt: A girl in a white crop top and a blue pleated skirt is dancing with her arms stretched out on the beach.
  - name: taichi-bow
    source: taichi_hd/taichi_copart07.mp4
    reference: taichi_hd/taichi_copart05.mp4
    subject: A man in a red tai chi suit
    source_motion: practicing tai chi in a garden
    target_motion: doing a deep bow stance in a garden
  - name: no-person  # at 64x64 nobody is found in these frames: the pair fails, the others run
    source: taichi_hd/taichi_copart06.mp4
    reference: taichi_hd/taichi_copart06.mp4
    stride: 41
    subject: A man in a white tai chi suit
    target_motion: raising both arms
"""


@pytest.mark.media
def test_suite_two_pairs_then_resume_without_work(media, tiny_bundle, tiny_clip, torch_home, tmp_path, monkeypatch,
                                                  capsys):
    from eym.editor import EditConfig, Editor, InferConfig
    from eym.metrics import EvalConfig
    from eym.preprocess import PreprocessConfig
    from eym.tuning import TuneConfig

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    manifest = tmp_path / "gallery.yaml"
    manifest.write_text(_GALLERY.format(root=media))
    out = tmp_path / "results"
    edit = EditConfig(preprocess=PreprocessConfig(num_frames=8, size=64), tune=TuneConfig(steps1=2, steps2=2),
                      infer=InferConfig(ddim_steps=3))
    kwargs = dict(model=str(tiny_bundle), device="cpu", edit_config=edit, disable_progress=True,
                  eval_config=EvalConfig(clip_model=str(tiny_clip)))
    events: list[tuple[str, int, int]] = []
    monkeypatch.setenv("EYM_EXAMPLES", str(tmp_path / "examples"))
    first = S.run_suite(manifest, out, callback=lambda *e: events.append(e), save_examples=True, **kwargs)
    from eym.gallery import find_example

    for pair in first.pairs[:2]:  # finished pairs become the app's cached examples for this model
        example = find_example(pair.name, str(tiny_bundle))
        assert example is not None and example.video.read_bytes() == (pair.folder / S.EDITED_VIDEO).read_bytes()
        assert example.side_by_side is not None and find_example(pair.name, "another-model") is None
    assert find_example("no-person", str(tiny_bundle)) is None

    assert first.edits_run == 2 and [p.name for p in first.pairs] == ["dance-arms", "taichi-bow", "no-person"]
    assert [e for e in events if e[0] == "suite"] == [("suite", 1, 3), ("suite", 2, 3), ("suite", 3, 3)]
    broken = first.pairs[2]
    assert broken.report is None and "no person" in broken.error and not broken.folder.exists()
    assert {"preprocess", "stage1", "stage2", "sampling"} <= {e[0] for e in events}  # editor stages forwarded
    # the table: paper columns first, a row per pair, a mean row equal to the mean of the rows
    md = first.table_md.read_text().splitlines()
    assert md[2].startswith("| Pair | TA ↑ | TC ↑ | L-N ↓ | L-S ↓ | PCK ↑")
    assert md[4].startswith("| dance-arms |") and md[5].startswith("| taichi-bow |") and md[6].startswith("| **mean (2)** |")
    assert any(line.startswith("- no-person:") and "no person" in line for line in md)  # listed, not averaged
    rows = list(csv.DictReader(io.StringIO(first.table_csv.read_text())))
    assert [r["pair"] for r in rows] == ["dance-arms", "taichi-bow", "mean"]
    for col in ("TA", "TC", "L-N", "L-S", "BG-PSNR", "MAFD"):
        assert float(rows[2][col]) == pytest.approx((float(rows[0][col]) + float(rows[1][col])) / 2)
    for pair in first.pairs[:2]:
        # contact sheet: rows source / reference skeleton / edited, 8 frame columns of 160 px + label strip
        from PIL import Image

        with Image.open(pair.folder / S.CONTACT_SHEET) as im:
            assert im.size == (96 + 8 * 160, 3 * 160)
        report = json.loads((pair.folder / S.METRICS_FILE).read_text())
        assert report["settings"]["sampling"]["num_frames"] == 8 and report["settings"]["retarget"] is True
        assert (pair.folder / S.EDITED_VIDEO).is_file() and (pair.folder / "MANIFEST.json").is_file()
        # the source row of the sheet is the source itself: compare with the pair's own source frames
        assert report["metrics"]["MAFD"]["value"] > 0
    created = {p.name: json.loads((p.folder / "MANIFEST.json").read_text())["created"] for p in first.pairs[:2]}

    # second run, through the CLI with the same settings as flags: nothing to do, no model
    # loaded, no edit called; the failed pair is tried again (it may have been fixed) and fails
    # before any model is needed
    def no_work(*args, **kwargs):
        raise AssertionError("the second run must not edit or load a model")

    monkeypatch.setattr(Editor, "edit", no_work)
    monkeypatch.setattr("eym.models.load_components", no_work)
    table = first.table_csv.read_text()
    from eym.cli import main

    code = main(["-q", "suite", str(manifest), "--out", str(out), "--model", str(tiny_bundle), "--device", "cpu",
                 "--frames", "8", "--size", "64", "--steps1", "2", "--steps2", "2", "--ddim-steps", "3",
                 "--clip-model", str(tiny_clip)])
    assert code == 1  # one pair failed
    assert "3 pairs: 0 edited, 2 reused" in capsys.readouterr().out
    assert {p.name: json.loads((p.folder / "MANIFEST.json").read_text())["created"] for p in first.pairs[:2]} == created
    assert first.table_csv.read_text() == table

"""Evaluation suite: run a gallery of edit pairs through edit + eval, write tables and contact sheets.

``eym suite MANIFEST --out DIR`` reads a gallery manifest (:mod:`eym.gallery`: source, reference
video or preset, prompts, sampling hints per entry) and, for each pair:

1. preprocesses source and reference with the suite's sampling (an entry's ``num_frames`` /
   ``start`` / ``stride`` hints win over the suite's defaults),
2. edits (:meth:`eym.editor.Editor.edit`; tuning is cached per source, so pairs that share a
   source tune once),
3. evaluates (:func:`eym.metrics.evaluate`) against the source frames and the reference
   skeletons that drove the edit,
4. draws a contact sheet: rows source / reference skeleton / edited, one column per frame.

Each pair's results live in ``DIR/pairs/<name>/``, built atomically with a manifest
(:func:`eym.cache.building`) whose key covers the entry, its input files and every setting.
A second run reuses every pair whose key still matches and does no work for it; a pair killed
half-way leaves only a ``.tmp-*`` folder and runs again. After all pairs, ``DIR/results.md``
and ``DIR/results.csv`` hold the table in the paper's layout (Table 1: TA, TC, L-N, L-S, then
the metrics beyond the paper), one row per pair and a mean row.

Layout of ``DIR``::

    results.md, results.csv, suite.json     table and the suite's settings
    pairs/<name>/edited.mp4                 the edited video (+ edited.side_by_side.mp4, edited.settings.json)
    pairs/<name>/metrics.json               eym.metrics.EvalReport
    pairs/<name>/contact_sheet.png
    pairs/<name>/MANIFEST.json              file hashes + the pair's key (resume)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from eym.cache import atomic_write_bytes, atomic_write_json, building, hash_path, load_entry, stable_hash
from eym.config import to_dict
from eym.errors import EymError
from eym.metrics import HEADINGS, METRICS, EvalConfig, EvalReport, csv_value, evaluate, format_value, table_columns
from eym.progress import ProgressCallback
from eym.video import contact_sheet

logger = logging.getLogger(__name__)

PAIRS_DIR = "pairs"
METRICS_FILE = "metrics.json"
CONTACT_SHEET = "contact_sheet.png"
EDITED_VIDEO = "edited.mp4"
CELL = 160  # contact sheet cell side, pixels

# ---------------------------------------------------------------------------------------------
# Contact sheet (laid out by eym.video.contact_sheet)
# ---------------------------------------------------------------------------------------------
def write_png(image: np.ndarray, path: Path) -> Path:
    """Write an RGB uint8 image as PNG, atomically."""
    import cv2

    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise EymError(f"could not encode {path.name} as PNG")
    return atomic_write_bytes(path, data.tobytes())


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def mean_row(reports: dict[str, EvalReport]) -> dict[str, float | None]:
    """Mean of each metric over the pairs where it is available (None where it is nowhere)."""
    means: dict[str, float | None] = {}
    for name, _, _ in METRICS:
        vals = [r.metrics[name].value for r in reports.values() if name in r.metrics]
        vals = [v for v in vals if v is not None]
        means[name] = float(np.mean(vals)) if vals else None
    return means


def _columns(reports: dict[str, EvalReport]) -> list[str]:
    """The metric columns any report has, in table order."""
    return table_columns(n for r in reports.values() for n in r.metrics)


def table_markdown(reports: dict[str, EvalReport], sheets: dict[str, str] | None = None) -> str:
    """The paper's Table 1 layout: one row per pair, then the mean; unavailable cells say n/a.

    Args:
        reports: pair name -> its report, in row order.
        sheets: pair name -> contact sheet path relative to the table (linked under the table).
    """
    cols = _columns(reports)
    lines = ["| Pair | " + " | ".join(HEADINGS[c] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, report in reports.items():
        lines.append(f"| {name} | " + " | ".join(format_value(report.metrics[c].value, c) for c in cols) + " |")
    means = mean_row(reports)
    lines.append(f"| **mean ({len(reports)})** | " + " | ".join(format_value(means[c], c) for c in cols) + " |")
    reasons = {}
    for report in reports.values():
        for c in cols:
            if report.metrics[c].unavailable:
                reasons.setdefault(report.metrics[c].unavailable, []).append(c)
    notes = [f"- n/a ({', '.join(sorted(set(v)))}): {k}" for k, v in reasons.items()]
    if sheets:
        notes += [f"- {name}: ![{name}]({path})" for name, path in sheets.items()]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def table_csv(reports: dict[str, EvalReport]) -> str:
    """The same table as CSV: ``pair`` then one column per metric; unavailable cells are empty."""
    cols = _columns(reports)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["pair", *cols])

    for name, report in reports.items():
        writer.writerow([name, *(csv_value(report.metrics[c].value) for c in cols)])
    means = mean_row(reports)
    writer.writerow(["mean", *(csv_value(means[c]) for c in cols)])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Running the suite
# ---------------------------------------------------------------------------------------------
SUITE_VERSION = 1  # bump when a pair's outputs change meaning: earlier results stop matching


@dataclass
class PairOutcome:
    """One pair of the suite: where its results are and whether this run computed them."""

    name: str  # the gallery entry's name
    folder: Path  # DIR/pairs/<name>
    report: EvalReport | None  # None when the pair failed or ran without evaluation
    reused: bool  # found complete from an earlier run: nothing ran for it
    error: str | None = None  # the EymError message of a failed pair
    seconds: float = 0.0  # wall time this run spent on the pair (checking, or editing + evaluating)


@dataclass
class SuiteResult:
    """What :func:`run_suite` wrote."""

    pairs: list[PairOutcome]  # in manifest order
    table_md: Path  # DIR/results.md
    table_csv: Path  # DIR/results.csv
    edits_run: int = 0  # pairs edited by this run (0 on a complete resume)

    @property
    def reports(self) -> dict[str, EvalReport]:
        return {p.name: p.report for p in self.pairs if p.report is not None}


def entry_prompts(entry: Any) -> Any:
    """The entry's P_c/P_s/P_t: explicit prompts win over ones composed from subject + motions."""
    from eym.prompts import derive_prompts

    return derive_prompts(entry.subject, entry.source_motion, entry.target_motion, content=entry.content_prompt,
                          source=entry.source_prompt, target=entry.target_prompt)


def pair_config(entry: Any, edit_config: Any) -> Any:
    """The suite's edit settings with the entry's sampling hints applied (hints win)."""
    hints = {k: getattr(entry, k) for k in ("num_frames", "start", "stride") if getattr(entry, k) is not None}
    if not hints:
        return edit_config
    return replace(edit_config, preprocess=replace(edit_config.preprocess, **hints))


def _pair_key(entry: Any, edit_config: Any, eval_config: EvalConfig | None, model: str, controlnet: str | None) -> str:
    """Everything a pair's results depend on: entry, input file contents, model, all settings."""
    return stable_hash({
        "version": SUITE_VERSION,
        "entry": {k: str(v) if isinstance(v, Path) else v for k, v in vars(entry).items()},
        "source": hash_path(entry.source),
        "reference": hash_path(entry.reference) if entry.reference is not None else None,
        "model": model,
        "controlnet": controlnet,
        "edit": to_dict(edit_config),
        "eval": to_dict(eval_config) if eval_config is not None else None,
    })


def _run_pair(entry: Any, edit_config: Any, eval_config: EvalConfig | None, get_editor: Callable[[], Any], folder: Path,
              callback: ProgressCallback | None) -> EvalReport | None:
    """Preprocess, edit, evaluate (unless ``eval_config`` is None) and draw one pair into ``folder``
    (a temporary build folder)."""
    from eym.motion import resolve_motion
    from eym.pose import draw_skeletons
    from eym.preprocess import preprocess

    prep = edit_config.preprocess
    prompts = entry_prompts(entry)
    source = preprocess(entry.source, prep, with_masks=True, callback=callback)
    # the entry's reference video, or its preset motion (fitted to the source once)
    motion = resolve_motion(source, reference=None if entry.preset is not None else entry.reference,
                            preset=entry.preset, config=prep, retarget=edit_config.infer.retarget, callback=callback)
    # the model is loaded only now: a pair whose inputs are unusable fails before that
    result = get_editor().edit(source, motion, prompts, edit_config, out_dir=folder,
                               name=Path(EDITED_VIDEO).stem, callback=callback)
    driving = result.motion.keypoints  # the keypoints the editing branch was conditioned on

    settings = {
        "pair": entry.name,
        "inputs": {"source": str(entry.source), "reference": str(entry.reference) if entry.reference else None,
                   "preset": entry.preset},
        "prompts": {"content": prompts.content, "source": prompts.source, "target": prompts.target},
        "sampling": prep.to_dict(),
        "retarget": edit_config.infer.retarget,
        "edit_settings": Path(result.settings).name,
    }
    report = None
    if eval_config is not None:
        report = evaluate(result.frames, source.frames, prompts.target, reference_keypoints=driving,
                          source_masks=source.masks if source.has_masks else None, config=eval_config,
                          settings=settings)
        atomic_write_bytes(folder / METRICS_FILE, report.to_json().encode())
    sheet = contact_sheet({
        "source": source.frames,
        # drawn at the cell size: limbs keep ControlNet's stroke widths instead of being rescaled
        "reference skeleton": draw_skeletons(driving, CELL, CELL),
        "edited": result.frames,
    }, cell=CELL)
    write_png(sheet, folder / CONTACT_SHEET)
    return report


def run_suite(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    model: str | None = None,
    controlnet: str | None = None,
    edit_config: Any = None,
    eval_config: EvalConfig = EvalConfig(),
    editor: Any = None,
    device: str | None = None,
    names: list[str] | None = None,
    disable_progress: bool = False,
    callback: ProgressCallback | None = None,
    save_examples: bool = False,
) -> SuiteResult:
    """Run every pair of a gallery manifest through edit + eval; resume what an earlier run did.

    Args:
        manifest: gallery folder or manifest file (:func:`eym.gallery.load_gallery`).
        out_dir: the suite's output folder (created; see the module docstring for its layout).
        model, controlnet: the base model and ControlNet (:func:`eym.models.load_components`);
            default :data:`eym.models.DEFAULT_MODEL`, as everywhere (``"tiny"``: the random-weight bundle).
        edit_config: :class:`eym.editor.EditConfig` for every pair (entry sampling hints win);
            default ``EditConfig()``, the paper's settings.
        eval_config: metric settings.
        editor: an :class:`eym.editor.Editor` to use; default: one is built from ``model`` the
            first time a pair needs editing (a complete resume loads no model at all).
        device: where to load the model (default: CUDA if available).
        names: run only these entries (default: all, in manifest order).
        disable_progress: turn off the per-pair tqdm bar (callbacks still fire).
        callback: ``callback("suite", done, total)`` after each pair, plus the stages of
            preprocessing and editing (``"preprocess"``, ``"stage1"``, ...) as they happen.
        save_examples: also keep each finished pair as the app's cached example of that gallery
            entry with this model (:func:`eym.gallery.save_example`).
    Returns:
        :class:`SuiteResult`. A pair that fails with :class:`EymError` is reported (its error
        under the table) and the others still run; any other exception stops the suite.
    """
    from eym.editor import EditConfig
    from eym.gallery import load_gallery
    from eym.models import DEFAULT_MODEL

    model = model or DEFAULT_MODEL  # named in the pairs' keys and suite.json
    gallery = load_gallery(manifest)
    entries = [gallery.get(n) for n in names] if names else list(gallery.entries)
    if not entries:
        raise EymError(f"gallery {gallery.manifest} has no entries to run")
    edit_config = edit_config if edit_config is not None else EditConfig()
    out_dir = Path(out_dir)
    pairs_dir = out_dir / PAIRS_DIR
    pairs_dir.mkdir(parents=True, exist_ok=True)

    def get_editor() -> Any:
        nonlocal editor
        if editor is None:
            from eym.editor import Editor

            editor = Editor.from_pretrained(model, controlnet, device=device, disable_progress=disable_progress)
        return editor

    outcomes: list[PairOutcome] = []
    bar = tqdm(entries, desc="suite", unit="pair", disable=disable_progress)
    for done, entry in enumerate(bar, start=1):
        bar.set_postfix_str(entry.name)
        outcomes.append(run_pair(entry, edit_config, eval_config, model=model, controlnet=controlnet,
                                 get_editor=get_editor, pairs_dir=pairs_dir, callback=callback))
        if save_examples and outcomes[-1].error is None:
            from eym.gallery import save_example

            folder = outcomes[-1].folder
            save_example(entry.name, model, folder / EDITED_VIDEO, folder / f"{Path(EDITED_VIDEO).stem}.side_by_side.mp4")
        if callback is not None:
            callback("suite", done, len(entries))

    edits_run = sum(not p.reused and p.error is None for p in outcomes)
    result = SuiteResult(pairs=outcomes, table_md=out_dir / "results.md", table_csv=out_dir / "results.csv",
                         edits_run=edits_run)
    _write_tables(result, out_dir)
    atomic_write_json(out_dir / "suite.json", {
        "manifest": str(gallery.manifest), "model": model, "controlnet": controlnet,
        "edit": to_dict(edit_config), "eval": to_dict(eval_config),
        "pairs": {p.name: {"reused": p.reused, "error": p.error} for p in outcomes},
    })
    return result


def run_pair(
    entry: Any,
    edit_config: Any,
    eval_config: EvalConfig | None,
    *,
    model: str,
    controlnet: str | None,
    get_editor: Callable[[], Any],
    pairs_dir: Path,
    callback: ProgressCallback | None = None,
) -> PairOutcome:
    """One gallery entry into ``pairs_dir/<name>/``, or nothing if an earlier run completed it.

    Shared by :func:`run_suite` and :mod:`eym.batch`.

    Args:
        entry: the :class:`eym.gallery.GalleryEntry`.
        edit_config: the run's :class:`eym.editor.EditConfig` (the entry's sampling hints win).
        eval_config: metric settings, or ``None`` to edit without evaluating (no metrics.json).
        model, controlnet: the model names, part of the pair's key.
        get_editor: returns the :class:`eym.editor.Editor`; called only when the pair must run.
        pairs_dir: the folder of all pairs' folders.
        callback: forwarded to preprocessing and editing.
    Returns:
        :class:`PairOutcome`; a pair failing with :class:`EymError` has ``error`` set and no
        folder. Any other exception propagates.
    """
    started = time.perf_counter()
    config = pair_config(entry, edit_config)
    key = _pair_key(entry, config, eval_config, model, controlnet)
    folder = pairs_dir / entry.name
    found = load_entry(folder)
    if found is not None and found["meta"].get("key") == key:
        # complete from an earlier run with the same inputs and settings: nothing to do
        report = None
        if eval_config is not None:
            report = EvalReport.from_dict(json.loads((folder / METRICS_FILE).read_text()))
        logger.info("suite: %s already done (%s), reused", entry.name, folder)
        return PairOutcome(entry.name, folder, report, reused=True, seconds=time.perf_counter() - started)
    try:
        with building(folder, meta={"key": key, "pair": entry.name, "kind": "eym-suite-pair"}) as tmp:
            report = _run_pair(entry, config, eval_config, get_editor, tmp, callback)
    except EymError as err:
        logger.error("suite: pair %s failed: %s", entry.name, err)
        return PairOutcome(entry.name, folder, None, reused=False, error=str(err),
                           seconds=time.perf_counter() - started)
    seconds = time.perf_counter() - started
    logger.info("suite: %s done in %.1f s", entry.name, seconds)
    return PairOutcome(entry.name, folder, report, reused=False, seconds=seconds)


def _write_tables(result: SuiteResult, out_dir: Path) -> None:
    reports = result.reports
    sheets = {p.name: f"{PAIRS_DIR}/{p.name}/{CONTACT_SHEET}" for p in result.pairs if p.report is not None}
    md = "# Evaluation suite\n\n"
    md += table_markdown(reports, sheets) if reports else "No pair finished.\n"
    failed = [p for p in result.pairs if p.error]
    if failed:
        md += "\nFailed pairs:\n" + "".join(f"- {p.name}: {p.error}\n" for p in failed)
    atomic_write_bytes(result.table_md, md.encode())
    atomic_write_bytes(result.table_csv, table_csv(reports).encode())

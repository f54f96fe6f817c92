"""Batch edits over GPUs and machines: a gallery manifest shared out by accelerate.

``eym batch MANIFEST --out DIR`` runs every entry of a gallery manifest (:mod:`eym.gallery`:
source, reference video or preset motion, prompts, sampling hints) through
:meth:`eym.editor.Editor.edit`. Launched as ``accelerate launch --num_processes N -m eym batch ...``
(one machine with N GPUs, or several machines with accelerate's multi-node settings) each
process, a *rank*, does its share; started without accelerate it is one rank doing everything.

How the work is shared, without any communication until the end:

1. **Groups.** Entries whose tuning would be the same land in one group: the group key holds
   made by the same key function as the tuned-weights cache (:func:`eym.tuned.tuning_key`),
   with the source identified by its file's content and the preprocess settings, and the model
   by its names (see :func:`group_key`). A group runs on one rank, so each source is tuned once and its
   other edits reuse the tuned weights from that rank's cache.
2. **Assignment.** Groups are dealt out greedily, largest first (ties by the first entry's
   name), each to the rank with the fewest edits so far (ties: the lowest rank). Every rank
   computes the same plan from the same manifest.
3. **Per edit**, :func:`eym.suite.run_pair` does the work the suite does: an atomic folder
   ``DIR/pairs/<name>/`` keyed by the entry, its input files and every setting; a folder that is
   complete with the same key is skipped, so running the command again after a failed node only
   does what is missing. An edit that fails with :class:`EymError` is recorded as failed and
   the rank goes on with its other edits.
4. **Summary.** The rows of all ranks are gathered on every rank
   (:func:`accelerate.utils.gather_object`) and rank 0 writes ``DIR/summary.md``,
   ``DIR/summary.csv`` and ``DIR/batch.json`` once.

Each rank loads the model once, on ``PartialState().device`` (``cuda:<local rank>``, or the CPU
with ``cpu=True``), and only when one of its edits has to run.

Layout of ``DIR``::

    summary.md, summary.csv            one row per edit: status, tuning reused, seconds, outputs, metrics
    batch.json                         settings, the plan (groups per rank) and per-rank counters
    pairs/<name>/edited.mp4            + edited.side_by_side.mp4, edited.settings.json, contact_sheet.png
    pairs/<name>/metrics.json          with evaluation on (eym.metrics.EvalReport)
    pairs/<name>/MANIFEST.json         file hashes + the edit's key (skip on a re-run)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from eym.cache import atomic_write_bytes, atomic_write_json, hash_path, stable_hash
from eym.config import to_dict
from eym.errors import EymError
from eym.progress import ProgressCallback

logger = logging.getLogger(__name__)


SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
BATCH_JSON = "batch.json"

# Status of an edit in the summary.
EDITED = "edited"  # this run edited it
SKIPPED = "skipped"  # complete from an earlier run with the same key: nothing ran
FAILED = "failed"  # this run tried and failed; `error` says why


# ---------------------------------------------------------------------------------------------
# Groups and their assignment to ranks
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EditGroup:
    """Entries that share one tuning: all of them run on the same rank."""

    key: str  # hash of what the tuned weights depend on (group_key)
    names: tuple[str, ...]  # the entries' names, in manifest order

    @property
    def size(self) -> int:
        return len(self.names)


def group_key(entry: Any, edit_config: Any, model: str, controlnet: str | None) -> str:
    """The tuned-weights key of an entry (:func:`eym.tuned.tuning_key`), planned before any work.

    The Editor keys tuned weights on the source clip's content hash and the loaded weights'
    fingerprint; neither exists yet while planning (no preprocessing, no model). So the source
    is identified by what makes the clip, its file's bytes and the preprocess settings, and the
    model by its names: entries with equal group keys get equal Editor keys within one run.

    Args:
        entry: a :class:`eym.gallery.GalleryEntry`.
        edit_config: the run's :class:`eym.editor.EditConfig`; the entry's sampling hints are
            applied here as the edit applies them.
        model, controlnet: the model names as given (``load_components`` arguments).
    Returns:
        A hex key; entries with equal keys would tune to the same weights.
    """
    from eym.suite import entry_prompts, pair_config
    from eym.tuned import tuning_key

    config = pair_config(entry, edit_config)
    prep = config.preprocess
    return tuning_key(
        source=stable_hash({"file": hash_path(entry.source), "preprocess": to_dict(prep)}),
        shape=(prep.num_frames, prep.size, prep.size, 3),
        masked=config.tune.mask_background,  # the suite preprocesses every source with masks
        prompts=entry_prompts(entry), tune=config.tune, model=model, controlnet=controlnet, weights=None,
    )


def group_entries(entries: Sequence[Any], edit_config: Any, model: str, controlnet: str | None) -> list[EditGroup]:
    """Entries grouped by :func:`group_key`, groups in order of their first entry."""
    by_key: dict[str, list[str]] = {}
    for entry in entries:
        by_key.setdefault(group_key(entry, edit_config, model, controlnet), []).append(entry.name)
    return [EditGroup(key, tuple(names)) for key, names in by_key.items()]


def assign_groups(groups: Sequence[EditGroup], num_ranks: int) -> list[list[EditGroup]]:
    """Deal groups out to ranks, balancing the number of edits; the same on every rank.

    Greedy, largest group first (ties by the group's first entry name), each to the rank with
    the fewest edits so far (ties: the lowest rank). This keeps the largest rank load within
    one group of the smallest. With more ranks than groups, some ranks get nothing.

    Args:
        groups: the groups (any order: the result does not depend on it).
        num_ranks: number of processes, >= 1.
    Returns:
        ``num_ranks`` lists of groups, each sorted by the groups' first entry names.
    """
    if num_ranks < 1:
        raise EymError(f"the number of ranks must be at least 1, got {num_ranks}")
    ranks: list[list[EditGroup]] = [[] for _ in range(num_ranks)]
    loads = [0] * num_ranks
    for group in sorted(groups, key=lambda g: (-g.size, g.names[0])):
        rank = min(range(num_ranks), key=lambda r: (loads[r], r))
        ranks[rank].append(group)
        loads[rank] += group.size
    return [sorted(share, key=lambda g: g.names[0]) for share in ranks]


# ---------------------------------------------------------------------------------------------
# Rows of the summary
# ---------------------------------------------------------------------------------------------
@dataclass
class EditRow:
    """One edit in the summary (plain values: rows travel between ranks by pickling)."""

    name: str  # the gallery entry's name
    source: str  # source path relative to the gallery root
    motion: str  # "reference: x.mp4" or "preset: wave"
    rank: int  # the rank that handled it
    group: str  # the group key (shortened)
    status: str  # EDITED | SKIPPED | FAILED
    reused_tuning: bool | None  # the edit took cached tuned weights (as recorded when it was made); None if failed
    seconds: float  # wall time this run spent on it (about 0 when skipped)
    outputs: dict[str, str] = field(default_factory=dict)  # kind -> path relative to DIR
    metrics: dict[str, float | None] = field(default_factory=dict)  # with evaluation on
    error: str | None = None  # why it failed


# files of a pair folder (eym.suite's layout) -> summary column
_OUTPUTS = {
    "video": "edited.mp4",
    "side_by_side": "edited.side_by_side.mp4",
    "settings": "edited.settings.json",
    "contact_sheet": "contact_sheet.png",
    "metrics": "metrics.json",
}
_COLUMNS = ["edit", "source", "motion", "rank", "group", "status", "reused_tuning", "seconds",
            *_OUTPUTS, "error"]


def _row(entry: Any, root: Path, outcome: Any, rank: int, group: str, out_dir: Path) -> EditRow:
    """The summary row of a :class:`eym.suite.PairOutcome`."""
    if outcome.error is not None:
        return EditRow(entry.name, _relative(entry.source, root), entry.motion_label, rank, group, FAILED, None,
                       round(outcome.seconds, 3), error=outcome.error)
    folder = outcome.folder
    outputs = {kind: _relative(folder / name, out_dir) for kind, name in _OUTPUTS.items() if (folder / name).is_file()}
    # the settings written by Editor.edit say whether that edit reused tuned weights
    settings = json.loads((folder / _OUTPUTS["settings"]).read_text())
    metrics = outcome.report.values() if outcome.report is not None else {}
    return EditRow(entry.name, _relative(entry.source, root), entry.motion_label, rank, group,
                   SKIPPED if outcome.reused else EDITED, bool(settings["tuned"]["reused"]),
                   round(outcome.seconds, 3), outputs, metrics)


def _relative(path: Path, base: Path) -> str:
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# Running a batch
# ---------------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    """What :func:`run_batch` did; the same rows on every rank."""

    rows: list[EditRow]  # all ranks' edits, in manifest order
    rank: int  # this process's rank
    num_ranks: int  # number of processes
    edits_run: int  # edits this rank ran (0 on a complete re-run)
    tunings_run: int  # of those, how many tuned instead of reusing cached weights
    summary_md: Path  # DIR/summary.md (written by rank 0)
    summary_csv: Path  # DIR/summary.csv
    batch_json: Path  # DIR/batch.json

    @property
    def failed(self) -> list[EditRow]:
        return [r for r in self.rows if r.status == FAILED]


def run_batch(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    model: str,
    controlnet: str | None = None,
    edit_config: Any = None,
    eval_config: Any = None,
    cpu: bool = False,
    names: list[str] | None = None,
    timeout: timedelta = timedelta(hours=24),
    disable_progress: bool = False,
    callback: ProgressCallback | None = None,
) -> BatchResult:
    """Run this rank's share of a gallery manifest's edits; gather the summary on rank 0.

    Args:
        manifest: gallery folder or manifest file (:func:`eym.gallery.load_gallery`).
        out_dir: the output folder (see the module docstring). Several machines need it on a
            shared file system: every rank writes its edits there, rank 0 the summary.
        model, controlnet: the base model and ControlNet (:func:`eym.models.load_components`).
        edit_config: :class:`eym.editor.EditConfig` for every edit (entry sampling hints win);
            default ``EditConfig()``.
        eval_config: :class:`eym.metrics.EvalConfig` to score each edit, or ``None`` (no metrics).
        cpu: run on the CPU even where GPUs are present (also makes the ranks talk over gloo).
        names: only these entries (default: all, in manifest order).
        timeout: how long a rank waits for the others at the end (torch.distributed's timeout);
            ranks with less work wait for the busiest one.
        disable_progress: turn the tqdm bars off (they are always off on ranks other than 0).
        callback: ``callback("batch", done, total)`` after each of this rank's edits, plus the
            editor's stages (``"preprocess"``, ``"stage1"``, ...) as they happen.
    Returns:
        :class:`BatchResult`.
    Raises:
        EymError: an unusable manifest or entry name (before any work, on every rank alike).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from eym.editor import EditConfig
    from eym.gallery import load_gallery
    from eym.suite import PAIRS_DIR, PairOutcome, run_pair

    # PartialState: accelerate's process group and device for this rank (a no-op single process
    # without `accelerate launch`); kwargs reach torch.distributed.init_process_group
    state = PartialState(cpu=cpu, timeout=timeout)
    rank, num_ranks = state.process_index, state.num_processes
    device = "cpu" if state.device.type == "cpu" else str(state.device)  # cuda:<local rank> under accelerate
    show_progress = not disable_progress and state.is_main_process  # one set of bars, not one per rank
    tag = f"batch [rank {rank}/{num_ranks}]"

    gallery = load_gallery(manifest)
    entries = [gallery.get(n) for n in names] if names else list(gallery.entries)
    if not entries:
        raise EymError(f"gallery {gallery.manifest} has no entries to run")
    edit_config = edit_config if edit_config is not None else EditConfig()
    if eval_config is not None and eval_config.device in ("auto", "cuda"):
        eval_config = replace(eval_config, device=device)  # this rank's GPU, not cuda:0
    out_dir = Path(out_dir)
    pairs_dir = out_dir / PAIRS_DIR
    pairs_dir.mkdir(parents=True, exist_ok=True)

    # 1-2. the same plan on every rank, from the manifest alone
    groups = group_entries(entries, edit_config, model, controlnet)
    plan = assign_groups(groups, num_ranks)
    by_name = {e.name: e for e in entries}
    order = {e.name: i for i, e in enumerate(entries)}
    group_of = {name: g.key for g in groups for name in g.names}
    # group by group, in manifest order: a source's edits follow each other, its tuned weights stay loaded
    mine = [by_name[n] for g in sorted(plan[rank], key=lambda g: order[g.names[0]]) for n in g.names]
    logger.info("%s: %d of %d edits (%d groups) on %s", tag, len(mine), len(entries), len(plan[rank]), device)

    editor = None

    def get_editor() -> Any:
        # loaded once per rank, and only when an edit has to run
        nonlocal editor
        if editor is None:
            from eym.editor import Editor

            editor = Editor.from_pretrained(model, controlnet, device=device, disable_progress=not show_progress)
        return editor

    # 3. this rank's edits; a failure is recorded and the rank goes on
    rows: list[EditRow] = []
    started = time.perf_counter()
    bar = tqdm(mine, desc=f"batch rank {rank}", unit="edit", disable=not show_progress)
    for done, entry in enumerate(bar, start=1):
        bar.set_postfix_str(entry.name)
        t0 = time.perf_counter()
        group = group_of[entry.name][:12]
        try:
            outcome = run_pair(entry, edit_config, eval_config, model=model, controlnet=controlnet,
                               get_editor=get_editor, pairs_dir=pairs_dir, callback=callback)
            row = _row(entry, gallery.root, outcome, rank, group, out_dir)
        except Exception as err:  # noqa: BLE001
            # Not a user error, but stopping here would leave the other ranks waiting in the
            # gather below until the timeout: log the traceback, record the edit, go on.
            logger.exception("%s: %s failed with an internal error", tag, entry.name)
            outcome = PairOutcome(entry.name, pairs_dir / entry.name, None, reused=False,
                                  error=f"internal error {type(err).__name__}: {err}", seconds=time.perf_counter() - t0)
            row = _row(entry, gallery.root, outcome, rank, group, out_dir)
        rows.append(row)
        logger.info("%s: %s %s in %.1f s", tag, entry.name, row.status, row.seconds)
        if callback is not None:
            callback("batch", done, len(mine))
    edits_run = sum(r.status == EDITED for r in rows)
    tunings_run = sum(r.status == EDITED and r.reused_tuning is False for r in rows)
    counters = {"rank": rank, "device": device, "edits": len(mine), "edits_run": edits_run,
                "tunings_run": tunings_run, "failed": sum(r.status == FAILED for r in rows),
                "model_loaded": editor is not None, "seconds": round(time.perf_counter() - started, 3)}
    logger.info("%s: done, %d edited (tuning ran %d time(s)), %d failed", tag, edits_run, tunings_run, counters["failed"])

    # 4. every rank's rows everywhere; rank 0 writes the summary once
    all_rows = sorted(gather_object(rows), key=lambda r: order[r.name])
    all_counters = sorted(gather_object([counters]), key=lambda c: c["rank"])
    result = BatchResult(rows=all_rows, rank=rank, num_ranks=num_ranks, edits_run=edits_run, tunings_run=tunings_run,
                         summary_md=out_dir / SUMMARY_MD, summary_csv=out_dir / SUMMARY_CSV,
                         batch_json=out_dir / BATCH_JSON)
    if state.is_main_process:
        atomic_write_bytes(result.summary_md, summary_markdown(all_rows, num_ranks).encode())
        atomic_write_bytes(result.summary_csv, summary_csv(all_rows).encode())
        atomic_write_json(result.batch_json, {
            "manifest": str(gallery.manifest), "model": model, "controlnet": controlnet,
            "edit": to_dict(edit_config), "eval": to_dict(eval_config) if eval_config is not None else None,
            "num_ranks": num_ranks,
            "plan": [[{"group": g.key, "edits": list(g.names)} for g in share] for share in plan],
            "ranks": all_counters,
        })
        logger.info("%s: wrote summary %s", tag, result.summary_md)
    state.wait_for_everyone()  # nobody leaves before the summary exists
    return result


# ---------------------------------------------------------------------------------------------
# Summary tables
# ---------------------------------------------------------------------------------------------
def _metric_columns(rows: Sequence[EditRow]) -> list[str]:
    from eym.metrics import table_columns

    return table_columns(name for r in rows for name in r.metrics)


def summary_csv(rows: Sequence[EditRow]) -> str:
    """One CSV row per edit: the :data:`_COLUMNS`, then one column per metric present.

    Booleans are ``true``/``false``, unknown or unavailable values empty, paths relative to DIR.
    """
    from eym.metrics import csv_value

    metrics = _metric_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*_COLUMNS, *metrics])
    for r in rows:
        reused = "" if r.reused_tuning is None else str(r.reused_tuning).lower()
        writer.writerow([r.name, r.source, r.motion, r.rank, r.group, r.status, reused, f"{r.seconds:.3f}",
                         *(r.outputs.get(kind, "") for kind in _OUTPUTS), r.error or "",
                         *(csv_value(r.metrics.get(m)) for m in metrics)])
    return buf.getvalue()


def summary_markdown(rows: Sequence[EditRow], num_ranks: int) -> str:
    """A human-readable summary: totals, a table with links to the videos, the failures."""
    from eym.metrics import HEADINGS, format_value

    counts = {s: sum(r.status == s for r in rows) for s in (EDITED, SKIPPED, FAILED)}
    tunings = sum(r.status == EDITED and r.reused_tuning is False for r in rows)
    metrics = _metric_columns(rows)
    lines = [
        "# Batch edits", "",
        f"{len(rows)} edits on {num_ranks} rank(s): {counts[EDITED]} edited (tuning ran {tunings} time(s)), "
        f"{counts[SKIPPED]} skipped (complete from an earlier run), {counts[FAILED]} failed.", "",
        "| Edit | Source | Motion | Rank | Status | Tuning | Seconds | Video | " + "".join(f"{HEADINGS[m]} | " for m in metrics),
        "|---" * (8 + len(metrics)) + "|",
    ]
    for r in rows:
        tuning = "" if r.reused_tuning is None else "reused" if r.reused_tuning else "tuned"
        video = f"[{Path(r.outputs['video']).name}]({r.outputs['video']})" if "video" in r.outputs else ""
        values = [format_value(r.metrics.get(m), m) for m in metrics]
        lines.append(f"| {r.name} | {_cell(r.source)} | {_cell(r.motion)} | {r.rank} | {r.status} | {tuning} | {r.seconds:.1f} | "
                     f"{video} | " + "".join(f"{v} | " for v in values))
    failed = [r for r in rows if r.status == FAILED]
    if failed:
        lines += ["", "Failed edits (run the same command again to retry them):"]
        lines += [f"- {r.name}: {r.error}" for r in failed]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _cell(text: str) -> str:
    """Text for a markdown table cell: a '|' in a file name would end the cell."""
    return text.replace("|", "\\|")


def read_summary(out_dir: str | Path) -> list[dict[str, str]]:
    """The rows of ``DIR/summary.csv`` as dicts (column -> text)."""
    path = Path(out_dir) / SUMMARY_CSV
    if not path.is_file():
        raise EymError(f"{path} does not exist: run `eym batch` with --out {out_dir} first")
    return list(csv.DictReader(io.StringIO(path.read_text())))


__all__ = [
    "EditGroup", "EditRow", "BatchResult", "group_key", "group_entries", "assign_groups", "run_batch",
    "summary_csv", "summary_markdown", "read_summary", "EDITED", "SKIPPED", "FAILED",
]

"""Score the quality lab's edits with eym's own metrics and write the table and contact sheets (CPU).

Reads ``run_edits.py``'s ``pair<N>.npz`` files and the held-out windows of ``edits.npz``, and
computes per pair and row (docs/QUALITY.md defines them):

- motion alignment: PCK@0.1 / MKD / detection rate (``eym.metrics.pose_alignment``) of the
  skeletons BlazePose detects in the edit (``eym.pose``) against the driving keypoints;
- background: BG-PSNR / BG-SSIM (``eym.metrics.psnr``, ``ssim``) against the source, outside the
  dilated union of the source's and the edit's person masks (``eym.metrics.background_region``);
- appearance: :func:`appearance_score`, the Bhattacharyya coefficient of the RGB histograms of
  the person pixels of the edit and of the source;
- temporal stability: MAFD ratio (``eym.metrics.mean_abs_frame_difference``) edit / source.

Two reference rows are scored the same way: ``source`` (the unedited source: the "do nothing"
bar for motion) and ``reference_video`` (the reference clip itself: another person and place,
the "wrong identity" bar for appearance and background).

Writes ``<out>/results.json``, ``<out>/table.md``, one contact sheet per pair
(``<out>/pair<N>.png``: source, driving skeleton, each row), and with ``--quality-doc`` replaces
the table between the ``<!-- quality-table -->`` markers of docs/QUALITY.md.

    python bench/quality/report.py --edits <files_at of run_edits> --out docs/quality --quality-doc docs/QUALITY.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lab  # noqa: E402

HIST_BINS = 8  # per RGB channel: 512 colour cells, coarse enough for 128 px video and codec noise
MARKER = "<!-- quality-table -->"
SHEET_FRAMES = 6  # frames shown per row of a contact sheet
SHEET_SIDE = 64  # thumbnail side in pixels
EXTRA_ROWS = ("source", "reference_video")


def colour_histogram(frames: np.ndarray, masks: np.ndarray, bins: int = HIST_BINS) -> np.ndarray | None:
    """Normalised joint RGB histogram ``(bins**3,)`` of the pixels inside ``masks``; None if empty."""
    pixels = np.asarray(frames)[np.asarray(masks, bool)]  # (P, 3)
    if len(pixels) == 0:
        return None
    cells = (pixels.astype(np.int64) * bins) // 256  # (P, 3) in [0, bins)
    index = (cells[:, 0] * bins + cells[:, 1]) * bins + cells[:, 2]
    hist = np.bincount(index, minlength=bins**3).astype(np.float64)
    return hist / hist.sum()


def appearance_score(frames: np.ndarray, masks: np.ndarray, source: np.ndarray, source_masks: np.ndarray) -> float | None:
    """Bhattacharyya coefficient sum_k sqrt(p_k q_k) of the person colour histograms, in [0, 1].

    p: histogram of the edit's person pixels (its own detected masks), q: the source person's.
    1 = the same colour distribution (clothes, skin, hair), whatever the pose; it drops when the
    person's colours change or background leaks into the person. Pose-independent by design:
    pixel metrics inside the mask would punish the very motion change the edit is asked for.
    """
    p, q = colour_histogram(frames, masks), colour_histogram(source, source_masks)
    if p is None or q is None:
        return None
    return float(np.sqrt(p * q).sum())


def unsharp(frames: np.ndarray, amount: float = 1.0, sigma: float = 1.5) -> np.ndarray:
    """Unsharp mask (1 + amount) x - amount * blur(x), per frame, clipped to uint8.

    BlazePose misses blurred people at 128 px (docs/QUALITY.md); ``--sharpen`` applies this to
    every video alike (the source too) before pose detection and person segmentation; the
    metrics themselves always read the unsharpened pixels.
    """
    import cv2

    return np.stack([cv2.addWeighted(f, 1.0 + amount, cv2.GaussianBlur(f, (0, 0), sigma), -amount, 0) for f in np.asarray(frames, np.uint8)])


def score(frames: np.ndarray, source: np.ndarray, source_masks: np.ndarray, driving: np.ndarray, backends: dict, *, sharpen: bool = False) -> dict:
    """All metrics of one video (F, H, W, 3) against the source window and the driving keypoints."""
    from eym.metrics import EvalConfig, background_region, mean_abs_frame_difference, pose_alignment, psnr, ssim

    cfg = EvalConfig()
    seen = unsharp(frames) if sharpen else frames  # what the detectors see; pixels are measured unsharpened
    detected = backends["pose"].detect(seen)  # (F, 18, 3)
    motion = pose_alignment(detected, driving, threshold=cfg.pck_threshold, min_confidence=cfg.min_confidence)
    masks = backends["mask"].segment(seen)  # (F, H, W)
    region = background_region(source_masks, masks, cfg.mask_dilation)
    mafd, _ = mean_abs_frame_difference(frames)
    src_mafd, _ = mean_abs_frame_difference(source)
    return {
        "PCK": motion["pck"], "MKD": motion["mkd"], "DET": motion["detection_rate"],
        "BG-PSNR": psnr(frames, source, region) if region.any() else None,
        "BG-SSIM": ssim(frames, source, region) if region.any() else None,
        "APP": appearance_score(frames, masks, source, source_masks),
        "MAFD-ratio": mafd / src_mafd if src_mafd > 0 else None,
        "person_fraction": float(masks.mean()),
    }


def load_pairs(edits: Path) -> dict[int, dict]:
    """pair index -> {"rows": [...], "edits": (R, F, H, W, 3), "driving_keypoints": ...} of every pair file."""
    pairs = {}
    for path in sorted(edits.glob("pair*.npz")):
        with np.load(path) as npz:
            pairs[int(path.stem[4:])] = {k: npz[k] for k in npz.files}
    return pairs


def evaluate(edits: Path, data_dir: Path, *, sharpen: bool = False) -> dict:
    """Scores of every pair and row (plus the source and reference-video bars)."""
    from eym.masks import get_mask_backend
    from eym.pose import get_pose_backend

    data, meta = lab.load_data(data_dir / lab.EDITS_FILE)
    names = [c["name"] for c in meta["clips"]]
    backends = {"pose": get_pose_backend("mediapipe"), "mask": get_mask_backend("mediapipe")}
    results = {"pairs": [], "sharpen_before_pose": sharpen}
    for p, pair in sorted(load_pairs(edits).items()):
        info = meta["pairs"][p]
        s, r = names.index(info["source"]), names.index(info["reference"])
        F = pair["edits"].shape[1]
        source, source_masks = data["window_frames"][s, :F], data["window_masks"][s, :F]
        driving = pair["driving_keypoints"][:F]
        rows = {}
        rows["source"] = score(source, source, source_masks, driving, backends, sharpen=sharpen)
        rows["reference_video"] = score(data["window_frames"][r, :F], source, source_masks, driving, backends, sharpen=sharpen)
        for name, frames in zip(pair["rows"].tolist(), pair["edits"]):
            rows[name] = score(frames, source, source_masks, driving, backends, sharpen=sharpen)
        results["pairs"].append({"pair": p, **info, "rows": rows})
        print(f"pair {p}: {info['source']} -> {info['reference']}: {len(rows)} rows scored", flush=True)
    results["mean"] = mean_rows(results["pairs"])
    return results


# Metrics that are missing where the detectors find nobody in an edit (Det 0): their row means are
# taken over the pairs where every row has them, so that rows are compared on the same pairs.
PAIRED = ("PCK", "MKD", "APP")


def common_pairs(pairs: list[dict], metric: str) -> list[int]:
    """Indices of the pairs where every row has a finite ``metric``."""
    ok = lambda v: v is not None and math.isfinite(v)  # noqa: E731
    return [i for i, pair in enumerate(pairs) if all(ok(row.get(metric)) for row in pair["rows"].values())]


def mean_rows(pairs: list[dict]) -> dict[str, dict]:
    """Per row, the mean of each metric: over the common pairs for :data:`PAIRED`, else over the pairs that have it.

    inf and None are left out (identical backgrounds give BG-PSNR = inf: the source's mean is inf).
    """
    order = list(dict.fromkeys(name for pair in pairs for name in pair["rows"]))
    common = {m: set(common_pairs(pairs, m)) for m in PAIRED}
    out = {}
    for name in order:
        values: dict[str, list[float]] = {}
        for i, pair in enumerate(pairs):
            for metric, v in pair["rows"].get(name, {}).items():
                if metric in common and i not in common[metric]:
                    continue
                if v is not None and not math.isnan(v):
                    values.setdefault(metric, []).append(v)
        means = {m: float(np.mean([x for x in v if math.isfinite(x)] or [math.inf])) for m, v in values.items()}
        out[name] = means | {"pairs": sum(name in pair["rows"] for pair in pairs)}
    return out


def table(results: dict, what: dict[str, str]) -> str:
    """Markdown table of the means over pairs, with the pairs the paired metrics are averaged over."""
    metrics = (("PCK", "PCK@0.1 ↑", 3), ("MKD", "MKD ↓", 3), ("DET", "Det ↑", 2), ("BG-PSNR", "BG-PSNR ↑", 2),
               ("BG-SSIM", "BG-SSIM ↑", 3), ("APP", "Appearance ↑", 3), ("MAFD-ratio", "MAFD ratio (≈1)", 2))
    lines = ["| row | " + " | ".join(m[1] for m in metrics) + " | pairs |", "|---|" + "---:|" * (len(metrics) + 1)]
    for name, row in results["mean"].items():
        cells = [("inf" if math.isinf(row[m]) else f"{row[m]:.{d}f}") if m in row else "n/a" for m, _, d in metrics]
        label = f"`{name}`" + (f": {what[name]}" if name in what else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['pairs']} |")
    pairs = results["pairs"]
    support = ", ".join(f"{m}: pairs {[pairs[i]['pair'] for i in common_pairs(pairs, m)]}" for m in PAIRED)
    lines.append("")
    lines.append(f"PCK, MKD and Appearance are averaged over the pairs where every row has a value ({support}); "
                 "the other columns over all pairs.")
    return "\n".join(lines) + "\n"


def contact_sheet(rows: list[tuple[str, np.ndarray]], path: Path, frames: int = SHEET_FRAMES, side: int = SHEET_SIDE) -> Path:
    """One PNG: a labelled strip of ``frames`` evenly spaced thumbnails per (label, video) row."""
    from PIL import Image

    from eym.video import contact_sheet as labelled_rows

    F = len(rows[0][1])
    pick = np.linspace(0, F - 1, min(frames, F)).round().astype(int)
    sheet = labelled_rows({label: np.asarray(video)[pick] for label, video in rows}, cell=side, label_width=150)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a 256-colour palette keeps a 12-row sheet near 200 KB (docs/ holds small PNGs)
    Image.fromarray(sheet).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edits", type=Path, required=True, help="folder with run_edits.py's pair<N>.npz and run_log.json")
    parser.add_argument("--data", type=Path, default=lab.DATA_DIR, help="folder with edits.npz and data.json")
    parser.add_argument("--out", type=Path, required=True, help="where results.json, table.md and the contact sheets go")
    parser.add_argument("--sharpen", action="store_true", help="unsharp-mask every video before pose detection and segmentation (metrics read the original pixels)")
    parser.add_argument("--quality-doc", type=Path, default=None, help="replace the table between the markers of this file")
    args = parser.parse_args(argv)

    results = evaluate(args.edits, args.data, sharpen=args.sharpen)
    log_path = args.edits / "run_log.json"
    run_log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    what = {r["name"]: r["what"] for r in run_log.get("rows", [])}
    what |= {"source": "the source window itself (no edit)", "reference_video": "the reference window itself (another person)"}
    results["run_log"] = run_log
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    text = table(results, what)
    (args.out / "table.md").write_text(text)

    data, meta = lab.load_data(args.data / lab.EDITS_FILE)
    names = [c["name"] for c in meta["clips"]]
    for p, pair in sorted(load_pairs(args.edits).items()):
        s = names.index(meta["pairs"][p]["source"])
        F = pair["edits"].shape[1]
        rows = [("source", data["window_frames"][s, :F]), ("driving skeleton", pair["driving_skeletons"][:F])]
        rows += list(zip(pair["rows"].tolist(), pair["edits"]))
        contact_sheet(rows, args.out / f"pair{p}.png")
    if args.quality_doc is not None:
        doc = args.quality_doc.read_text()
        start, end = doc.find(MARKER), doc.rfind(MARKER)
        if start < 0 or end == start:
            raise SystemExit(f"{args.quality_doc} has no pair of {MARKER} markers to put the table between")
        args.quality_doc.write_text(doc[: start + len(MARKER)] + "\n" + text + doc[end:])
    print(text)
    return results


if __name__ == "__main__":
    main()

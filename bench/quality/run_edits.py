"""Run the quality lab's edits through the real ``eym.editor.Editor`` on the mini model (GPU).

For each pair of :data:`lab.PAIRS` (the held-out window of a person the model has seen, moved
like the held-out window of another clip, the motion retargeted on the CPU beforehand) and each
row of :data:`ROWS`: tune (``Editor.tune``, cached by key, so rows that share a tuning share it)
and edit (``Editor.infer``), or, for the baseline, sample plain pose-conditioned DDIM from noise
with P_t and the driving skeletons on the untuned 2D model. Writes ``<out>/pair<N>.npz`` per pair
(rows, edited frames, driving keypoints, seconds) as soon as the pair is done, and
``<out>/run_log.json`` (settings, per-row seconds and tuning losses, what was skipped).

A pair is started only while the budget (``--budget-seconds``) is expected to cover it (the
first pair's time is the estimate); skipped pairs are listed in the log.

    python bench/quality/run_edits.py --out $OUT                       # H200
    python bench/quality/run_edits.py --toy --model /tmp/mini --out /tmp/edits   # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lab  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optional import stub_if_missing  # noqa: E402

# eym.editor imports OpenCV at module level (through eym.preprocess), but the lab's edits never
# call it (skeletons are drawn on the CPU beforehand), and an OpenCV wheel would not fit the
# GPU run's carry limit
stub_if_missing("cv2")

from eym.config import replace  # noqa: E402
from eym.editor import Editor, InferConfig, control_tensor  # noqa: E402
from eym.prompts import Prompts, encode_prompts  # noqa: E402
from eym.injection import InjectionSchedule  # noqa: E402
from eym.models import load_components  # noqa: E402
from eym.preprocess import Clip, PreprocessConfig, content_hash  # noqa: E402
from eym.sampling import ddim_step, ddim_timesteps, decode_video  # noqa: E402
from eym.tuning import TuneConfig  # noqa: E402

BASELINE = "plain_generation"


@dataclass(frozen=True)
class Row:
    """One row of the table: changes to the full method's tuning and inference settings."""

    name: str
    what: str  # one line for the report
    tune: dict = field(default_factory=dict)
    infer: dict = field(default_factory=dict)


ROWS = (
    Row("full", "full method: DPL stage 1 + 2, injection in all layers and steps, Eq. 18 weighting as printed"),
    Row("no_stage1", "without stage 1 (no RC-Attn tuning on masked, shuffled frames)", tune={"steps1": 0}),
    Row("no_stage2", "without stage 2 (no temporal-attention tuning)", tune={"steps2": 0}),
    Row("no_lnoise", "without L_noise (lambda = 1 in Eq. 15)", tune={"rec_weight": 1.0}),
    Row("no_injection", "without key/value injection", infer={"injection": InjectionSchedule(layers="none")}),
    Row("inject_decoder", "injection in the decoder (up blocks) only", infer={"injection": InjectionSchedule(layers="up")}),
    Row("inject_after_k", "injection from step k = 10 of 50 on", infer={"injection": InjectionSchedule(start=0.2)}),
    Row("inject_first_half", "injection in the first 25 of 50 steps only", infer={"injection": InjectionSchedule(end=0.5)}),
    Row("weighting_balanced", "the two current-frame key blocks share one slot (balanced)", infer={"injection_weighting": "balanced"}),
    Row(BASELINE, "plain pose-conditioned DDIM from noise, P_t + driving skeletons, untuned 2D model"),
)


def make_clip(frames: np.ndarray, keypoints: np.ndarray, skeletons: np.ndarray, masks: np.ndarray | None, fps: float) -> Clip:
    """A :class:`Clip` from arrays (what ``eym.preprocess`` would have produced)."""
    F, S = len(frames), frames.shape[1]
    masks = np.zeros((F, 0, 0), bool) if masks is None else np.asarray(masks, bool)
    return Clip(
        frames=np.ascontiguousarray(frames), keypoints=np.asarray(keypoints, np.float32), skeletons=np.ascontiguousarray(skeletons),
        masks=masks, fps=fps, content_hash=content_hash(frames, keypoints, masks, fps), missing=[], path=None,
        config=PreprocessConfig(num_frames=F, size=S),
    )


def pair_clips(data: dict, meta: dict, p: int, frames: int) -> tuple[Clip, Clip, Prompts]:
    """Source clip (with masks), reference clip (the driving skeletons) and prompts of pair ``p``."""
    names = [c["name"] for c in meta["clips"]]
    pair = meta["pairs"][p]
    s = names.index(pair["source"])
    fps = float(meta["clips"][s].get("fps", 15.0))
    source = make_clip(data["window_frames"][s, :frames], data["window_keypoints"][s, :frames],
                       data["window_skeletons"][s, :frames], data["window_masks"][s, :frames], fps)
    driving = data["driving_skeletons"][p, :frames]
    reference = make_clip(driving, data["driving_keypoints"][p, :frames], driving, None, fps)
    prompts = Prompts(**pair["prompts"])
    return source, reference, prompts


@torch.no_grad()
def plain_generation(components, prompt: str, skeletons: np.ndarray, *, steps: int, seed: int) -> np.ndarray:
    """DDIM (eta 0) from one shared noise latent per frame, P_t and the skeletons, 2D UNet + ControlNet."""
    c = components
    F, H = len(skeletons), skeletons.shape[1]
    h = H // c.vae_scale_factor
    param = next(c.unet.parameters())
    emb = encode_prompts(c.tokenizer, c.text_encoder, [prompt]).expand(F, -1, -1)  # (F, 77, D)
    control = control_tensor(skeletons, param.device, param.dtype)  # (F, 3, H, W)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((1, 4, h, h), generator=gen).expand(F, -1, -1, -1).to(param.device, param.dtype)  # (F, 4, h, w)
    levels = ddim_timesteps(c.scheduler, steps) + [-1]
    alpha = lambda t: float(c.scheduler.alphas_cumprod[t]) if t >= 0 else float(c.scheduler.final_alpha_cumprod)  # noqa: E731
    for t, s in zip(levels[:-1], levels[1:]):
        tt = torch.full((F,), t, device=param.device)
        down, mid = c.controlnet(x, tt, encoder_hidden_states=emb, controlnet_cond=control, return_dict=False)
        eps = c.unet(x, tt, encoder_hidden_states=emb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        x = ddim_step(x.float(), eps.float(), alpha(t), alpha(s)).to(param.dtype)
    latents = x.permute(1, 0, 2, 3).unsqueeze(0)  # (1, 4, F, h, w)
    return decode_video(c.vae, latents)


def ensure_model(model: Path, parts: Path | None) -> Path:
    """The model folder; unpacked from ``parts`` (train_mini.py's mini.tar.NN) when it is missing."""
    if (model / "model_index.json").is_file():
        return model
    if parts is None or not (parts / "train_log.json").is_file():
        raise SystemExit(f"no mini model at {model} and no mini.tar parts given (--parts); run train_mini.py first")
    from unpack_model import unpack

    folder = unpack(parts, model.parent)  # -> model.parent / "mini"
    if folder != model:
        folder.rename(model)
    return model


def _save_pair(out: Path, p: int, record: dict) -> None:
    from eym.cache import atomic_output

    with atomic_output(out / f"pair{p}.npz", suffix=".npz") as tmp:
        np.savez_compressed(tmp, **record)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=lab.MODEL_DIR, help="the mini model folder (train_mini.py --model-dir)")
    parser.add_argument("--parts", type=Path, default=None, help="folder with mini.tar.NN + train_log.json, used when --model is missing")
    parser.add_argument("--data", type=Path, default=lab.DATA_DIR, help="folder with edits.npz and data.json")
    parser.add_argument("--out", type=Path, required=True, help="where pair<N>.npz and run_log.json go ($OUT)")
    parser.add_argument("--frames", type=int, default=lab.EVAL_FRAMES)
    parser.add_argument("--pairs", type=int, default=len(lab.PAIRS), help="the first N pairs")
    parser.add_argument("--only", type=str, default=None, help="comma list of pair indices to run instead (e.g. one a budgeted run skipped)")
    parser.add_argument("--steps1", type=int, default=150)
    parser.add_argument("--steps2", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--budget-seconds", type=float, default=540.0, help="start no pair that would end after this")
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma list of row names")
    parser.add_argument("--toy", action="store_true", help="CPU test: 2+2 tuning steps, 2 DDIM steps, 4 frames, 2 pairs")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.toy:
        torch.set_num_threads(1)  # tiny ops: threads only add overhead on a small CPU
        args.frames, args.pairs, args.steps1, args.steps2, args.ddim_steps = 4, min(args.pairs, 2), 2, 2, 2

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    data, meta = lab.load_data(args.data / lab.EDITS_FILE)
    model = ensure_model(args.model, args.parts)
    components = load_components(str(model), device=args.device)
    rows = [r for r in ROWS if r.name in set(args.rows.split(","))]
    base_tune = TuneConfig(steps1=args.steps1, steps2=args.steps2, lr=args.lr, checkpoint_every=0, gradient_checkpointing=False)
    base_infer = InferConfig(ddim_steps=args.ddim_steps, retarget=False)  # driving skeletons are retargeted already
    pairs = list(range(min(args.pairs, len(meta["pairs"]))))
    if args.only:
        pairs = [int(p) for p in args.only.split(",") if 0 <= int(p) < len(meta["pairs"])]
    log = {"model": str(model), "device": str(components.device), "dtype": str(components.dtype),
           "settings": {"frames": args.frames, "tune": {"steps1": args.steps1, "steps2": args.steps2, "lr": args.lr}, "ddim_steps": args.ddim_steps},
           "rows": [{"name": r.name, "what": r.what, "tune": r.tune, "infer": {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in r.infer.items()}} for r in rows],
           "pairs": [], "skipped": []}
    outputs: dict[int, dict] = {p: {} for p in pairs}
    seconds: dict[int, dict] = {p: {} for p in pairs}

    # 1. the baseline, on the 2D model (the Editor inflates the UNet in place, for good)
    if any(r.name == BASELINE for r in rows):
        for p in pairs:
            _, reference, prompts = pair_clips(data, meta, p, args.frames)
            t0 = time.perf_counter()
            outputs[p][BASELINE] = plain_generation(components, prompts.target, reference.skeletons, steps=args.ddim_steps, seed=p)
            seconds[p][BASELINE] = round(time.perf_counter() - t0, 2)
        print(json.dumps({"baseline_seconds": seconds[pairs[0]].get(BASELINE) if pairs else None}), flush=True)

    # 2. the method's rows through the Editor; tunings are cached by key and shared across rows
    cache = Path(tempfile.mkdtemp(prefix="eym-quality-tuned-"))
    editor = Editor(components, cache_dir=cache, disable_progress=True)
    per_pair = None
    for p in pairs:
        elapsed = time.perf_counter() - started
        if per_pair is not None and elapsed + per_pair > args.budget_seconds:
            log["skipped"].append({"pair": p, "reason": f"{elapsed:.0f} s spent, a pair takes ~{per_pair:.0f} s, budget {args.budget_seconds:.0f} s"})
            continue
        t_pair = time.perf_counter()
        source, reference, prompts = pair_clips(data, meta, p, args.frames)
        losses = {}
        for row in rows:
            if row.name == BASELINE:
                continue
            t0 = time.perf_counter()
            tune_cfg = replace(base_tune, **row.tune)
            tuned = editor.tune(source, prompts, tune_cfg)
            losses[row.name] = tuned.manifest.get("final_loss")
            infer_cfg = replace(base_infer, **row.infer)
            outputs[p][row.name] = editor.infer(source, reference, prompts, tuned, infer_cfg)
            seconds[p][row.name] = round(time.perf_counter() - t0, 2)
            print(json.dumps({"pair": p, "row": row.name, "seconds": seconds[p][row.name], "reused_tuning": tuned.reused}), flush=True)
        names = [r.name for r in rows if r.name in outputs[p]]
        _save_pair(args.out, p, {
            "rows": np.asarray(names), "edits": np.stack([outputs[p][n] for n in names]),  # (R, F, H, W, 3) uint8
            "driving_keypoints": reference.keypoints, "driving_skeletons": reference.skeletons,
            "seconds": np.asarray([seconds[p][n] for n in names]),
        })
        per_pair = time.perf_counter() - t_pair
        log["pairs"].append({"pair": p, **meta["pairs"][p], "seconds": round(per_pair, 1), "row_seconds": seconds[p], "tuning_losses": losses})
        log["total_seconds"] = round(time.perf_counter() - started, 1)
        (args.out / "run_log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")
    log["total_seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "run_log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")
    print(json.dumps({"pairs_done": [r["pair"] for r in log["pairs"]], "skipped": log["skipped"], "total_seconds": log["total_seconds"]}), flush=True)
    return log


if __name__ == "__main__":
    main()

"""GPU benchmark of eym at SD 1.5 scale (random-weight replicas), with a plain-SD baseline.

Measures, for each frame count (default 8, 16, 24) at 512x512:
  * ours: DPL stage 1 and stage 2 seconds per step (median of the timed steps) and projected
    for 300 steps; DDIM inversion and two-branch sampling for ``--ddim`` steps; VAE encode and
    decode; peak GPU memory of each phase;
  * plain: the same frames through a plain 2D SD UNet + ControlNet (no RC-Attn, no temporal
    layers): a training step with attn1 trainable (same precision and checkpointing as ours) and
    a sampling step over two branches. ours / plain is the cost of the method itself;
  * optionally (``--full-edit 8 24``) the whole tune (300 + 300) + infer (50 DDIM steps) wall time
    with the defaults of ``eym edit``.
and checks on the GPU that the test-suite invariants hold in low precision (RC-Attn against a
naive per-frame loop; edit branch == reconstruction branch when their inputs match).

Usage (anyone with a CUDA GPU and the repo installed):
    python bench/gpu_bench.py --frames 8 16 24 --json bench.json
    python bench/gpu_bench.py --frames 8 --full-edit 8 --skip-plain
Prints a markdown table last; docs/PERFORMANCE.md records the results.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from replica import build_sd15_replica  # noqa: E402

from eym.editor import Editor, InferConfig  # noqa: E402
from eym.prompts import Prompts  # noqa: E402
from eym.preprocess import Clip, PreprocessConfig  # noqa: E402
from eym.tuning import TuneConfig  # noqa: E402

PROMPTS = Prompts(
    content="A man in a white tai chi suit",
    source="A man in a white tai chi suit is practicing tai chi on the beach.",
    target="A man in a white tai chi suit is raising both arms on the beach.",
)


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if _cuda():
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if _cuda() else float("nan")


def _empty_cache() -> None:
    if _cuda():
        torch.cuda.empty_cache()


def synthetic_clip(num_frames: int, size: int, seed: int) -> Clip:
    """A clip of random content with the real shapes (timings do not depend on pixel values)."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
    skeletons = np.zeros_like(frames)
    skeletons[:, size // 4 : 3 * size // 4, size // 2 - 4 : size // 2 + 4] = (255, 0, 85)  # a "limb"
    masks = np.zeros((num_frames, size, size), dtype=bool)
    masks[:, size // 8 : 7 * size // 8, size // 4 : 3 * size // 4] = True
    keypoints = rng.random((num_frames, 18, 3), dtype=np.float32)
    return Clip(
        frames=frames, keypoints=keypoints, skeletons=skeletons, masks=masks, fps=24.0,
        content_hash=f"bench-{num_frames}-{size}-{seed}", missing=[], path=None,
        config=PreprocessConfig(num_frames=num_frames, size=size),
    )


class PhaseTimer:
    """A progress callback that times every step and each phase (device-synchronised at phase ends) and its peak memory."""

    def __init__(self) -> None:
        self.steps: dict[str, list[float]] = {}
        self.totals: dict[str, float] = {}
        self.peak_gb: dict[str, float] = {}
        self._stage: str | None = None
        self._last = 0.0
        self._start = 0.0

    def begin(self) -> None:
        _sync()
        _reset_peak()
        self._stage, self._last = None, time.perf_counter()

    def __call__(self, stage: str, step: int, total: int) -> None:
        # No device sync per step (it would stop the CPU from queueing ahead, as a user's run
        # does not); in steady state the host-side step interval equals the device's.
        if stage != self._stage:
            _sync()
            now = time.perf_counter()
            self._close(now)
            self._stage, self._start = stage, self._last
        else:
            now = time.perf_counter()
        self.steps.setdefault(stage, []).append(now - self._last)
        self._last = now

    def _close(self, now: float) -> None:
        if self._stage is not None:
            self.totals[self._stage] = self._last - self._start
            self.peak_gb[self._stage] = _peak_gb()
            _reset_peak()

    def end(self) -> None:
        _sync()
        self._close(time.perf_counter())
        self._stage = None


def median_after_warmup(xs: list[float], warmup: int) -> float:
    xs = xs[warmup:] if len(xs) > warmup else xs
    return statistics.median(xs)


def time_cuda(fn, warmup: int = 2, iters: int = 5) -> tuple[float, float]:
    """(median seconds, peak GiB) of ``fn()``."""
    if not _cuda():
        warmup, iters = 0, 1  # CPU smoke run
    for _ in range(warmup):
        fn()
    _sync()
    _reset_peak()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), _peak_gb()


# ---------------------------------------------------------------------------------------------
# ours
# ---------------------------------------------------------------------------------------------
def bench_ours(editor: Editor, num_frames: int, size: int, steps: int, warmup: int, ddim: int, tune_overrides: dict) -> dict:
    from eym.sampling import decode_video, encode_video

    comps = editor.components
    source = synthetic_clip(num_frames, size, seed=num_frames)
    reference = synthetic_clip(num_frames, size, seed=1000 + num_frames)
    cfg = TuneConfig(steps1=warmup + steps, steps2=warmup + steps, checkpoint_every=0, **tune_overrides)
    timer = PhaseTimer()
    timer.begin()
    tuned = editor.tune(source, PROMPTS, cfg, callback=timer)
    timer.end()
    row = {"frames": num_frames}
    for stage in ("stage1", "stage2"):
        per_step = median_after_warmup(timer.steps[stage], warmup)
        row[f"{stage}_s_per_step"] = per_step
        row[f"{stage}_s_300"] = per_step * 300
        row[f"{stage}_peak_gb"] = timer.peak_gb[stage]

    timer = PhaseTimer()
    timer.begin()
    editor.infer(source, reference, PROMPTS, tuned, InferConfig(ddim_steps=ddim, retarget=False), callback=timer)
    timer.end()
    for phase in ("inversion", "sampling", "decode"):
        row[f"{phase}_s"] = timer.totals.get(phase, float("nan"))
        row[f"{phase}_peak_gb"] = timer.peak_gb.get(phase, float("nan"))
    row["inversion_s_per_step"] = median_after_warmup(timer.steps["inversion"], 2)
    row["sampling_s_per_step"] = median_after_warmup(timer.steps["sampling"], 2)

    gen = torch.Generator(comps.device).manual_seed(0)
    enc_s, enc_gb = time_cuda(lambda: encode_video(comps.vae, source.frames, generator=gen), 1, 3)
    latents = encode_video(comps.vae, source.frames, generator=gen)
    dec_s, dec_gb = time_cuda(lambda: decode_video(comps.vae, latents), 1, 3)
    row.update(vae_encode_s=enc_s, vae_encode_peak_gb=enc_gb, vae_decode_s=dec_s, vae_decode_peak_gb=dec_gb)
    return row


def step_summary(timer: PhaseTimer) -> dict:
    """Per phase: its first step (with whatever the phase sets up), the median step, the slowest
    later step, and what the later steps cost beyond the median (checkpoints, stalls)."""
    out = {}
    for phase, ts in timer.steps.items():
        med = statistics.median(ts[1:]) if len(ts) > 1 else ts[0]
        out[phase] = {"first_s": ts[0], "median_s": med, "max_later_s": max(ts[1:], default=0.0),
                      "beyond_median_s": sum(t - med for t in ts[1:] if t > med), "steps": len(ts)}
    return out


def full_edit(editor: Editor, num_frames: int, size: int, tune_overrides: dict, *, re_edit: bool = False) -> dict:
    """Whole tune (defaults: 300 + 300) + infer (defaults: 50 DDIM steps), excluding preprocessing.

    With ``re_edit``, then two re-edits of the tuned source with another motion (inference only,
    the model loaded): one as an Editor that keeps its cached inversion runs it, one inverting again.
    """
    source = synthetic_clip(num_frames, size, seed=7 + num_frames)
    reference = synthetic_clip(num_frames, size, seed=2007 + num_frames)
    timer = PhaseTimer()
    _sync()
    start = time.perf_counter()
    timer.begin()
    tuned = editor.tune(source, PROMPTS, TuneConfig(**tune_overrides), callback=timer)
    editor.infer(source, reference, PROMPTS, tuned, InferConfig(retarget=False), callback=timer)
    timer.end()
    wall = time.perf_counter() - start
    from eym.tuning import needs_gradient_checkpointing

    ckpt = needs_gradient_checkpointing((1, 4, num_frames, size // 8, size // 8), editor.components.device) if _cuda() else False
    row = {"frames": num_frames, "wall_s": wall, "gradient_checkpointing": ckpt, "phase_s": timer.totals, "peak_gb": timer.peak_gb,
           "tune_overrides": tune_overrides, "steps": step_summary(timer)}
    if re_edit:
        other = synthetic_clip(num_frames, size, seed=4007 + num_frames)
        for name, keep_inversion in (("re_edit_cached_inversion", True), ("re_edit_fresh_inversion", False)):
            if not keep_inversion:
                editor._inversions.clear()
            timer = PhaseTimer()
            _sync()
            start = time.perf_counter()
            timer.begin()
            editor.infer(source, other, PROMPTS, tuned, InferConfig(retarget=False), callback=timer)
            timer.end()
            row[name] = {"wall_s": time.perf_counter() - start, "phase_s": timer.totals}
    return row


# ---------------------------------------------------------------------------------------------
# plain SD baseline: the same frames through the 2D UNet + ControlNet
# ---------------------------------------------------------------------------------------------
def bench_plain(comps, num_frames: int, size: int, mixed_precision: str, checkpointing: bool) -> dict:
    from diffusers import UNet2DConditionModel

    h = size // 8
    dev = comps.device
    unet = UNet2DConditionModel.from_config(comps.unet.config).to(dev, comps.dtype)
    unet.load_state_dict({k: v for k, v in comps.unet.state_dict().items() if "temporal" not in k}, strict=True)
    unet.requires_grad_(False)
    attn1 = [p for n, p in unet.named_parameters() if ".attn1." in n]
    for p in attn1:
        p.data = p.data.float()
        p.requires_grad_(True)
    opt = torch.optim.AdamW(attn1, lr=3e-5)
    amp = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    if checkpointing:
        unet.enable_gradient_checkpointing()
    emb = torch.randn(num_frames, 77, 768, device=dev, dtype=comps.dtype)
    z = torch.randn(num_frames, 4, h, h, device=dev, dtype=comps.dtype)
    cond = torch.rand(num_frames, 3, size, size, device=dev, dtype=comps.dtype)
    t = torch.tensor([500], device=dev)

    def train_step():
        with torch.autocast(dev.type, dtype=amp, enabled=dev.type == "cuda"):
            with torch.no_grad():
                down, mid = comps.controlnet(z, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
            eps = unet(z, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
        loss = torch.nn.functional.mse_loss(eps.float(), z.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    unet.train()
    train_s, train_gb = time_cuda(train_step, 3, 10)
    unet.eval()
    if checkpointing:
        unet.disable_gradient_checkpointing()
    for p in attn1:
        p.requires_grad_(False)
        p.data = p.data.to(comps.dtype)
    del opt

    z2, emb2, cond2 = z.repeat(2, 1, 1, 1), emb.repeat(2, 1, 1), cond.repeat(2, 1, 1, 1)

    @torch.no_grad()
    def sample_step():
        down, mid = comps.controlnet(z2, t, encoder_hidden_states=emb2, controlnet_cond=cond2, return_dict=False)
        unet(z2, t, encoder_hidden_states=emb2, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    sample_s, sample_gb = time_cuda(sample_step, 3, 10)
    del unet
    _empty_cache()
    return {"frames": num_frames, "plain_train_s_per_step": train_s, "plain_train_peak_gb": train_gb,
            "plain_sample2_s_per_step": sample_s, "plain_sample2_peak_gb": sample_gb}


# ---------------------------------------------------------------------------------------------
# GPU correctness checks in low precision
# ---------------------------------------------------------------------------------------------
def gpu_checks(comps) -> dict:
    """The tests' invariants on the GPU, in the components' dtype, with stated tolerances."""
    from eym.spacetime import RCAttnProcessor, space_time_kwargs

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_spacetime import naive_rc_attn  # the tests' reference implementation

    out = {}
    block = comps.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    attn = block.attn1
    gen = torch.Generator(comps.device).manual_seed(0)
    ref_attn = copy.deepcopy(attn).to("cpu", torch.float32)
    for F in (8, 9):
        z = torch.randn(F, 32 * 32, 320, device=comps.device, generator=gen).to(comps.dtype)
        proc = attn.processor if isinstance(attn.processor, RCAttnProcessor) else RCAttnProcessor()
        with torch.no_grad():
            fast = proc(attn, z, num_frames=F)  # on the GPU, in the components' dtype
            ref = naive_rc_attn(ref_attn, z.to("cpu", torch.float32), F).reshape(fast.shape).double()  # fp32 loop
        rel = ((fast.cpu().double() - ref).norm() / ref.norm()).item()
        out[f"rc_attn_rel_err_F{F}"] = rel
    # injection invariance on the whole inflated UNet: two identical videos, edit injects recon
    F, h = 8, 32
    x = torch.randn(1, 4, F, h, h, device=comps.device, dtype=comps.dtype, generator=gen).repeat(2, 1, 1, 1, 1)
    emb = torch.randn(1, 77, 768, device=comps.device, dtype=comps.dtype, generator=gen).repeat(2 * F, 1, 1)
    from eym.spacetime import batch_to_frames, frames_to_batch

    with torch.no_grad():
        eps = comps.unet(frames_to_batch(x), 500, encoder_hidden_states=emb,
                         cross_attention_kwargs=space_time_kwargs(F, [-1, 0])).sample
    eps = batch_to_frames(eps, F)
    out["injection_max_abs_diff"] = (eps[0] - eps[1]).abs().max().item()
    out["injection_rel_diff"] = ((eps[0] - eps[1]).double().norm() / eps[0].double().norm()).item()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16, 24])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed tuning steps per stage (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ddim", type=int, default=50)
    p.add_argument("--full-edit", type=int, nargs="*", default=[], help="frame counts for a whole default edit")
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--mixed-precision", default="auto")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--checks", action="store_true", help="run the low-precision GPU correctness checks")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    os.environ.setdefault("EYM_HOME", tempfile.mkdtemp(prefix="eym-bench-"))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    device = "cuda" if _cuda() else "cpu"  # CPU: a smoke run of the script only
    comps = build_sd15_replica(device, dtype if device == "cuda" else torch.float32)
    build_s = time.perf_counter() - t0
    editor = Editor(comps, cache_dir=Path(tempfile.mkdtemp(prefix="eym-bench-tuned-")), disable_progress=True)
    overrides = {"mixed_precision": args.mixed_precision}
    if args.no_checkpointing:
        overrides["gradient_checkpointing"] = False
    result = {
        "device": torch.cuda.get_device_name() if _cuda() else "cpu", "torch": torch.__version__, "dtype": args.dtype,
        "size": args.size, "date": time.strftime("%Y-%m-%d"), "build_s": build_s, "argv": sys.argv[1:],
        "ours": [], "plain": [], "full_edit": [], "checks": {},
    }
    if args.checks:
        # install the processors first (the Editor inflates the UNet on first use)
        from eym.spacetime import inflate

        inflate(comps.unet)
        result["checks"] = gpu_checks(comps)
        print("checks:", json.dumps(result["checks"]), flush=True)
    for F in args.frames:
        if not args.skip_ours:
            row = bench_ours(editor, F, args.size, args.steps, args.warmup, args.ddim, overrides)
            result["ours"].append(row)
            print("ours:", json.dumps(row), flush=True)
            save(result, args.json)
        if not args.skip_plain:
            mp = "bf16" if args.mixed_precision in ("auto", "bf16") else "fp16"
            row = bench_plain(comps, F, args.size, mp, not args.no_checkpointing)
            result["plain"].append(row)
            print("plain:", json.dumps(row), flush=True)
            save(result, args.json)
        _empty_cache()
    for F in args.full_edit:
        row = full_edit(editor, F, args.size, overrides)
        result["full_edit"].append(row)
        print("full edit:", json.dumps(row), flush=True)
        save(result, args.json)
    save(result, args.json)
    print_table(result)
    return 0


def save(result: dict, path: Path | None) -> None:
    """Write the results so far (a run cut short still leaves its finished rows)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


def print_table(result: dict) -> None:
    plain = {r["frames"]: r for r in result["plain"]}
    print(f"\n{result['device']} | torch {result['torch']} | {result['dtype']} | {result['size']}px")
    print("| F | stage1 s/step | stage2 s/step | plain train s/step | ours/plain (s1) | s1 peak GB | s2 peak GB "
          "| inversion s | sampling s | 2-branch step s | plain 2-branch step s | ratio | decode s | sample peak GB |")
    print("|" + "---|" * 15)
    for r in result["ours"]:
        pl = plain.get(r["frames"], {})
        pt, ps = pl.get("plain_train_s_per_step", math.nan), pl.get("plain_sample2_s_per_step", math.nan)
        print(f"| {r['frames']} | {r['stage1_s_per_step']:.3f} | {r['stage2_s_per_step']:.3f} | {pt:.3f} "
              f"| {r['stage1_s_per_step'] / pt:.2f} | {r['stage1_peak_gb']:.1f} | {r['stage2_peak_gb']:.1f} "
              f"| {r['inversion_s']:.1f} | {r['sampling_s']:.1f} | {r['sampling_s_per_step']:.3f} | {ps:.3f} "
              f"| {r['sampling_s_per_step'] / ps:.2f} | {r['decode_s']:.2f} | {r['sampling_peak_gb']:.1f} |")
    for r in result["full_edit"]:
        print(f"full edit F={r['frames']}: {r['wall_s']:.1f} s  phases {json.dumps({k: round(v, 1) for k, v in r['phase_s'].items()})}"
              f"  peak GB {json.dumps({k: round(v, 1) for k, v in r['peak_gb'].items()})}")


if __name__ == "__main__":
    raise SystemExit(main())

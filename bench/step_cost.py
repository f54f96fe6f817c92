"""Where a DPL tuning step's time goes, at identical settings, on SD-1.5-sized replicas.

One run measures, for each frame count at 512x512 (bf16 weights, fp32 trainables, bf16
autocast, the same optimizer, clip norm and gradient checkpointing setting for every row):

  * the method's cost per part, with a bare training step written here (not eym's loop):
    ``plain`` (the 2D SD UNet + ControlNet, attn1 trainable), ``+temporal`` (the inflated UNet
    with plain attn1: temporal attention computed though zero), ``+temporal+rc`` (our full
    model, as stage 1 ran before the zero-temporal skip), ``full (skip)`` (our full model with
    the frozen zero temporal attention skipped, as stage 1 runs now), ``stage2 bare`` (full
    model, temporal attention trainable);
  * eym's own loop (:func:`eym.tuning.train_stage`, stage 1 and stage 2) at the same settings,
    so ``eym / bare`` is the loop's own overhead;
  * the loop's pieces one by one on the bare stage-1 step (accelerate's wrappers, host RNG and
    pinned copies, the one-step-late loss read, scheduler.add_noise, fused AdamW), and kernel
    options (channels_last, cuDNN benchmark);
  * the temporal attention alone, forward + backward, at SD's four token counts, as written
    now and in alternative formulations;
  * the speed-ups of stage 2, each against eym's stage 2 as it was, in the same run and at the
    same settings (``speedups``): ``eym stage 2 (today)`` (foreach AdamW, norms cast by autocast
    every call, the unfused temporal attention), ``lean loop`` (fused AdamW, frozen norms held
    in float32), ``+ fused temporal attention``, ``+ regional compile`` (first step with its
    compile time, steady s/step, and a second process's first step on the warm inductor cache),
    and ``plain``; each row with its loss and update difference from the first;
  * CUDA graphs (``graphs``): eym's stage 1 and stage 2 and its inversion and two-branch
    sampling, eager and replayed as CUDA graphs (``TuneConfig.cuda_graphs``,
    ``InferConfig.cuda_graphs``), from the same start in the same run, with the first steps'
    cost (capture included) and the difference of losses, updates and sampled latents;
  * compiled blocks (``--only blocks``): eym's stage 1 and 2, graphed, with and without the
    UNet's and ControlNet's blocks compiled (``TuneConfig.compile``; ``--blocks "compiled
    resnets"``: the ResNet blocks only), the first steps' cost (compile and capture), and a
    second process's first steps on the compile cache the first left warm;
  * optionally whole edits with the defaults of ``eym edit`` (``--full-edit 8 24``), each followed
    by two re-edits of the tuned source with another motion: one reusing the Editor's cached
    inversion, one inverting again.

Usage (a CUDA machine; a CPU run is a smoke test of the script only):
    python bench/step_cost.py --frames 8 24 --json out.json
    python bench/step_cost.py --frames 8 24 --only speedups --json out.json   # the speed-up rows alone
    python bench/step_cost.py --frames 8 24 --only graphs --full-edit 8 --json out.json   # CUDA graphs, whole edit
    python bench/step_cost.py --frames 8 24 --only attention --json out.json   # PyTorch's attention kernel vs cuDNN's
    python bench/step_cost.py --frames 8 --only blocks --json out.json   # compiled blocks inside the graphs
    python bench/step_cost.py --frames 24 --memcap-gb 24 --memory-only     # a 24 GB card
    python bench/step_cost.py --toy --json out.json    # CPU, tiny model, seconds: tests the script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from optional import stub_if_missing  # noqa: E402

stub_if_missing("cv2")  # a GPU box without OpenCV: eym.editor imports it, the benches never use it

from gpu_bench import PROMPTS, PhaseTimer, full_edit, median_after_warmup, synthetic_clip  # noqa: E402
from replica import build_sd15_replica  # noqa: E402

from eym.editor import Editor, InferConfig  # noqa: E402
from eym.spacetime import (  # noqa: E402
    FrameAwareAttnProcessor,
    TemporalAttention,
    attention_processors,
    batch_to_frames,
    frames_to_batch,
    inflate,
    rc_attn_parameters,
    space_time_kwargs,
    temporal_parameters,
)
from eym.tuning import TuneConfig, TuningData, _assign, init_temporal_attention, train_stage  # noqa: E402


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def timed_steps(step, warmup: int, steps: int) -> tuple[float, float]:
    """(median s/step from host intervals with no per-step sync, peak GiB) of ``step()``."""
    for _ in range(warmup):
        step()
    _sync()
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    times, last = [], time.perf_counter()
    for _ in range(steps):
        step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    _sync()
    total = time.perf_counter() - (last - sum(times))
    peak = torch.cuda.max_memory_allocated() / 2**30 if _cuda() else math.nan
    # the host can run ahead of the device by a few steps; the whole span divided by the steps
    # (synchronised at both ends) is the honest figure, the median shows steadiness
    return max(total / steps, statistics.median(times)), peak


# ---------------------------------------------------------------------------------------------
# the bare training step
# ---------------------------------------------------------------------------------------------
class BareStep:
    """One training step written plainly: noise, t, ControlNet (no grad), UNet, MSE, clip, AdamW.

    Flags switch on eym's loop pieces one at a time, to see what each costs; ``graphed`` replays
    the model call (ControlNet + UNet) as CUDA graphs from the second step on, captured as eym's
    tuning captures it (:func:`eym.graphs.graph_training_call`), so the plain step can be timed
    at the settings of a graphed eym stage.
    """

    def __init__(self, unet, controlnet, scheduler, trainables: list[torch.nn.Parameter], num_frames: int, size: int,
                 *, space_time: bool, fused: bool = True, host_rng: bool = False, late_item: bool = False,
                 use_add_noise: bool = False, use_accelerate: bool = False, graphed: bool = False, seed: int = 0) -> None:
        dev = next(unet.parameters()).device
        dtype = unet.conv_in.weight.dtype
        h = size // 8
        gen = torch.Generator(dev).manual_seed(seed)
        self.unet, self.controlnet, self.scheduler = unet, controlnet, scheduler
        self.F, self.space_time, self.dev = num_frames, space_time, dev
        self.z0 = torch.randn(1, 4, num_frames, h, h, device=dev, generator=gen).to(dtype)
        self.emb = torch.randn(1, 77, unet.config.cross_attention_dim, device=dev, generator=gen).to(dtype)
        self.cond = torch.rand(num_frames, 3, size, size, device=dev, generator=gen).to(dtype)
        self.params = trainables
        for p in trainables:
            p.data = p.data.float()
            p.requires_grad_(True)
        self.host_rng, self.late_item, self.use_add_noise = host_rng, late_item, use_add_noise
        self.cpu_gen = torch.Generator().manual_seed(seed)
        self.dev_gen = torch.Generator(dev).manual_seed(seed)
        self.pending = None
        self.accelerator = None
        if use_accelerate:
            from eym.tuning import _accelerator

            self.accelerator = _accelerator("auto", dev)
        kwargs = {"fused": True} if (fused and dev.type == "cuda") else {}
        self.opt = torch.optim.AdamW(trainables, lr=3e-5, weight_decay=1e-2, **kwargs)
        if self.accelerator is not None:
            self.opt = self.accelerator.prepare_optimizer(self.opt, device_placement=False)
        self.amp = torch.bfloat16 if dev.type == "cuda" else torch.float32
        acp = scheduler.alphas_cumprod.to(dev)
        self.sqrt_a, self.sqrt_1ma = acp.sqrt(), (1 - acp).sqrt()
        self.graphed = graphed and dev.type == "cuda"
        self.model = self.model_call
        self.calls = 0

    def model_call(self, x: torch.Tensor, t: torch.Tensor, *trainables: torch.Tensor) -> torch.Tensor:
        """eps of the noisy frames ``x`` at ``t``; ``trainables`` (unused) let a graph return their gradients."""
        text = self.emb.repeat_interleave(self.F, dim=0)
        with torch.no_grad():
            down, mid = self.controlnet(x, t, encoder_hidden_states=text, controlnet_cond=self.cond, return_dict=False)
        kwargs = {"cross_attention_kwargs": space_time_kwargs(self.F)} if self.space_time else {}
        return self.unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, **kwargs).sample

    def close(self) -> None:
        for p in self.params:
            p.grad = None
            p.requires_grad_(False)
            p.data = p.data.to(self.unet.conv_in.weight.dtype)

    def __call__(self) -> None:
        F_ = self.F
        if self.host_rng:  # as eym's loop: CPU generator (same draws on any device), pinned copies
            from eym.tuning import _to_device

            t = _to_device(torch.randint(0, 1000, (1,), generator=self.cpu_gen), self.dev)
            noise = _to_device(torch.randn(self.z0.shape, generator=self.cpu_gen), self.dev).to(self.z0.dtype)
        else:
            t = torch.randint(0, 1000, (1,), generator=self.dev_gen, device=self.dev)
            noise = torch.randn(self.z0.shape, generator=self.dev_gen, device=self.dev).to(self.z0.dtype)
        if self.use_add_noise:
            z_t = self.scheduler.add_noise(self.z0, noise, t)
        else:
            z_t = self.sqrt_a[t].view(1, 1, 1, 1, 1).to(self.z0.dtype) * self.z0 + self.sqrt_1ma[t].view(1, 1, 1, 1, 1).to(self.z0.dtype) * noise
        x = frames_to_batch(z_t)

        def autocast():  # a graph cannot capture autocast's cast cache (eym's loop runs without one too)
            if self.accelerator is not None:
                return self.accelerator.autocast()
            return torch.autocast(self.dev.type, dtype=self.amp, enabled=self.dev.type == "cuda", cache_enabled=not self.graphed)

        if self.graphed and self.calls == 1:  # after one eager step, whose autograd graph is gone
            from eym.graphs import graph_training_call

            with autocast():
                self.model = graph_training_call(self.model_call, (x, t), self.params)
        self.calls += 1
        with autocast():
            eps = self.model(x, t)
        eps = batch_to_frames(eps, F_)
        loss = F.mse_loss(eps.float(), noise.float())
        if self.accelerator is not None:
            self.accelerator.backward(loss)
            self.accelerator.clip_grad_norm_(self.params, 1.0)
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.late_item:
            if self.pending is not None:
                self.pending.item()
            self.pending = loss.detach()


def _plain_unet(comps):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(comps.unet.config).to(comps.device, comps.dtype)
    unet.load_state_dict({k: v for k, v in comps.unet.state_dict().items() if "temporal" not in k}, strict=True)
    return unet.requires_grad_(False).train()


@contextlib.contextmanager
def temporal_skip(enabled: bool):
    """Compute the temporal attention even when it is zero and frozen (``enabled=False``)."""
    if enabled:
        yield
        return
    original = TemporalAttention.is_zero
    TemporalAttention.is_zero = lambda self: False
    try:
        yield
    finally:
        TemporalAttention.is_zero = original


def decomposition(comps, F_: int, size: int, warmup: int, steps: int) -> dict:
    """The method's cost per part and the loop pieces, all with the bare step (same settings)."""
    unet = comps.unet
    unet.requires_grad_(False)
    comps.controlnet.requires_grad_(False)
    rows: dict[str, tuple[float, float]] = {}
    # every row starts from the untrained model: the temporal attention's output projection at
    # zero (as in stage 1), RC-Attn as SD's; "stage2 bare" trains them, so they are put back
    init_temporal_attention(unet, 0)
    start = {n: p.detach().clone() for n, p in {**rc_attn_parameters(unet), **temporal_parameters(unet)}.items()}

    def measure(name, model, trainables, *, space_time, skip=True, procs=None, **flags):
        with contextlib.ExitStack() as stack:
            stack.enter_context(temporal_skip(skip))
            if procs is not None:
                stack.enter_context(attention_processors(model, procs))
            step = BareStep(model, comps.controlnet, comps.scheduler, trainables, F_, size, space_time=space_time, **flags)
            try:
                model.train()
                rows[name] = timed_steps(step, warmup, steps)
            finally:
                step.close()
                model.eval()
                _assign(unet, start)
        print(f"  F={F_} {name}: {rows[name][0]:.4f} s/step, peak {rows[name][1]:.1f} GB", flush=True)

    plain = _plain_unet(comps)
    measure("plain", plain, [p for n, p in plain.named_parameters() if ".attn1." in n], space_time=False)
    del plain
    torch.cuda.empty_cache() if _cuda() else None
    plain_attn1 = {n: FrameAwareAttnProcessor() for n in unet.attn_processors if n.endswith("attn1.processor") and "temporal" not in n}
    rc = list(rc_attn_parameters(unet).values())
    measure("+temporal", unet, rc, space_time=True, skip=False, procs=plain_attn1)
    measure("+temporal+rc", unet, rc, space_time=True, skip=False)
    measure("full (skip)", unet, rc, space_time=True, skip=True)
    measure("stage2 bare", unet, list(temporal_parameters(unet).values()), space_time=True)
    # the loop's pieces, one at a time, on the stage-1 step as it runs now
    measure("full (skip) +foreach AdamW", unet, rc, space_time=True, fused=False)
    measure("full (skip) +accelerate", unet, rc, space_time=True, use_accelerate=True)
    measure("full (skip) +host rng", unet, rc, space_time=True, host_rng=True)
    measure("full (skip) +late item", unet, rc, space_time=True, late_item=True)
    measure("full (skip) +add_noise", unet, rc, space_time=True, use_add_noise=True)
    if _cuda():
        torch.backends.cudnn.benchmark = True
        measure("full (skip) cudnn.benchmark", unet, rc, space_time=True)
        torch.backends.cudnn.benchmark = False
        unet.to(memory_format=torch.channels_last)
        comps.controlnet.to(memory_format=torch.channels_last)
        measure("full (skip) channels_last", unet, rc, space_time=True)
        unet.to(memory_format=torch.contiguous_format)
        comps.controlnet.to(memory_format=torch.contiguous_format)
    return {name: {"s_per_step": s, "peak_gb": gb} for name, (s, gb) in rows.items()}


def bench_data(comps, F_: int, size: int, seed: int = 1) -> TuningData:
    """Random tuning data of the right shapes on the model's device (timings do not depend on values)."""
    dev, dtype = comps.device, comps.dtype
    h, D = size // 8, comps.unet.config.cross_attention_dim
    gen = torch.Generator(dev).manual_seed(seed)
    return TuningData(
        latents=torch.randn(1, 4, F_, h, h, device=dev, generator=gen).to(dtype),
        masked_latents=torch.randn(1, 4, F_, h, h, device=dev, generator=gen).to(dtype),
        control_images=torch.rand(F_, 3, size, size, device=dev, generator=gen).to(dtype),
        content_embeds=torch.randn(1, 77, D, device=dev, generator=gen).to(dtype),
        source_embeds=torch.randn(1, 77, D, device=dev, generator=gen).to(dtype),
    )


def eym_loop(comps, F_: int, size: int, warmup: int, steps: int, *, skip: bool) -> dict:
    """eym's own train_stage, stage 1 and 2, at the bare step's settings (no checkpoints)."""
    data = bench_data(comps, F_, size)
    cfg = TuneConfig(steps1=warmup + steps, steps2=warmup + steps, checkpoint_every=0, gradient_checkpointing=False)
    init_temporal_attention(comps.unet, cfg.seed)  # as tune_dpl: stage 1 sees a zero temporal attention
    out = {}
    for stage in (1, 2):
        timer = PhaseTimer()
        timer.begin()
        with temporal_skip(skip):
            train_stage(stage, comps.unet, comps.controlnet, comps.scheduler, data, cfg, callback=timer, disable=True)
        timer.end()
        name = f"stage{stage}"
        per_step = max(median_after_warmup(timer.steps[name], warmup), timer.totals[name] / len(timer.steps[name]))
        out[name] = {"s_per_step": per_step, "peak_gb": timer.peak_gb[name]}
        print(f"  F={F_} eym loop {name} (skip={skip}): {per_step:.4f} s/step, peak {timer.peak_gb[name]:.1f} GB", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# stage 2 speed-ups, each checked against eym's stage 2 as it was
# ---------------------------------------------------------------------------------------------
def reference_temporal_forward(self: TemporalAttention, x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """TemporalAttention.forward before the fused form: permute, LayerNorm, diffusers' Attention, permute."""
    BF, N, C = x.shape
    B = BF // num_frames
    y = x.view(B, num_frames, N, C).permute(0, 2, 1, 3).reshape(B * N, num_frames, C)  # (B*N, F, C)
    y = self.attn(self.norm(y))
    return y.view(B, N, num_frames, C).permute(0, 2, 1, 3).reshape(BF, N, C)


@contextlib.contextmanager
def code_as(*, lean: bool, fused: bool):
    """Run eym's loop with the lean-loop pieces and/or the fused temporal attention switched off."""
    import eym.tuning as tuning

    saved = tuning._adamw, tuning.float32_norms, TemporalAttention.forward
    try:
        if not lean:  # foreach AdamW, frozen norms left to autocast's per-call casts
            tuning._adamw = lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            tuning.float32_norms = lambda *models: contextlib.nullcontext()
        if not fused:
            TemporalAttention.forward = reference_temporal_forward
        yield
    finally:
        tuning._adamw, tuning.float32_norms, TemporalAttention.forward = saved


SPEEDUP_ROWS = (  # name, lean loop, fused temporal attention, regional compile
    ("eym stage 2 (today)", False, False, False),
    ("eym stage 2 lean loop", True, False, False),
    ("+ fused temporal attention", True, True, False),
    ("+ regional compile", True, True, True),
)


def stage2_row(comps, data: TuningData, start: dict, warmup: int, steps: int, *, lean: bool, fused: bool, compile_: bool) -> dict:
    """eym's stage 2 from the same start, timed: s/step after warm-up, the first step, losses, the update.

    As these rows were first measured: eager (no CUDA graphs), ``compile_`` compiling the
    temporal attention alone (what ``TuneConfig.compile`` did then)."""
    from eym.compile import compiled_regions

    _assign(comps.unet, start)
    cfg = TuneConfig(steps1=0, steps2=warmup + steps, checkpoint_every=0, gradient_checkpointing=False, cuda_graphs=False)
    losses: list[float] = []
    timer = PhaseTimer()
    timer.begin()
    with code_as(lean=lean, fused=fused), compiled_regions(comps.unet, enabled=compile_, kinds=(TemporalAttention,)):
        out = train_stage(2, comps.unet, comps.controlnet, comps.scheduler, data, cfg, callback=timer,
                          log_fn=lambda r: losses.append(r["loss"]), disable=True)
    timer.end()
    ts = timer.steps["stage2"]
    timed = ts[warmup:] or ts
    return {
        "s_per_step": max(statistics.median(timed), sum(timed) / len(timed)),
        "first_step_s": ts[0],
        "peak_gb": timer.peak_gb["stage2"],
        "losses": losses,
        "update": {n: (v.float() - start[n].float().cpu()) for n, v in out.items()},
    }


def _checked(row: dict, ref: dict | None) -> dict:
    """The row for JSON, with its difference from the reference row (same seed, same start)."""
    update = row.pop("update")
    if ref is None:
        row["vs_first_row"] = {"max_loss_rel_diff": 0.0, "update_rel_diff": 0.0}
        return update
    diff = sum((update[n] - ref[n]).square().sum() for n in ref).sqrt()
    norm = sum(ref[n].square().sum() for n in ref).sqrt().clamp_min(1e-30)
    row["vs_first_row"] = {
        "max_loss_rel_diff": max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(row["losses"], row["ref_losses"])),
        "update_rel_diff": float(diff / norm),  # ||dW - dW_ref|| / ||dW_ref|| over stage 2's tensors
    }
    return update


def compile_probe(args) -> dict:
    """In a fresh process: the compiled stage 2's first step on the inductor cache the parent left warm."""
    comps = build_components(args.toy)
    F_ = args.frames[0]
    init_temporal_attention(comps.unet, 0)
    start = {n: p.detach().clone() for n, p in temporal_parameters(comps.unet).items()}
    row = stage2_row(comps, bench_data(comps, F_, args.size), start, 1, 1, lean=True, fused=True, compile_=True)
    return {"first_step_s": row["first_step_s"], "s_per_step": row["s_per_step"]}


def blocks_probe(args) -> dict:
    """In a fresh process: the first steps of graphed tuning with every block compiled, on the cache the parent left warm."""
    comps = build_components(args.toy)
    rows, _ = tuning_graph_rows(comps, args.frames[0], args.size, 3, 3, variants=[(True, b) for b in args.blocks])
    return {name: {k: row[k] for k in ("setup_s", "first_steps_s", "s_per_step")} for name, row in rows.items()}


def run_probe(flags: list[str], F_: int, size: int, toy: bool) -> dict:
    """Run this script with ``flags`` in a second process sharing this one's caches; its JSON row."""
    out = Path(tempfile.mkdtemp(prefix="eym-probe-")) / "probe.json"
    cmd = [sys.executable, __file__, *flags, "--frames", str(F_), "--size", str(size), "--json", str(out)]
    cmd += ["--toy"] if toy else []
    start_s = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    row = json.loads(out.read_text()) if done.returncode == 0 else {"error": done.stderr[-600:]}
    row["process_wall_s"] = time.perf_counter() - start_s
    print(f"  F={F_} {flags[0][2:]} (second process, warm cache): {json.dumps(row)[:400]}", flush=True)
    return row


def speedups(comps, F_: int, size: int, warmup: int, steps: int, *, toy: bool, probe: bool = True) -> dict:
    """The stage-2 speed-up rows and ``plain`` at one frame count, one run, identical settings."""
    unet = comps.unet
    init_temporal_attention(unet, 0)  # stage 2 starts with the output projection at zero
    start = {n: p.detach().clone() for n, p in temporal_parameters(unet).items()}
    data = bench_data(comps, F_, size)
    rows: dict[str, dict] = {}
    ref_update, ref_losses = None, None
    for name, lean, fused, compile_ in SPEEDUP_ROWS:
        row = stage2_row(comps, data, start, warmup, steps, lean=lean, fused=fused, compile_=compile_)
        row["ref_losses"] = ref_losses or row["losses"]
        update = _checked(row, ref_update)
        if ref_update is None:
            ref_update, ref_losses = update, row["losses"]
        del row["ref_losses"]
        if compile_:
            row["compile_s"] = row["first_step_s"] - row["s_per_step"]  # first step incl. tracing + codegen
        rows[name] = row
        print(f"  F={F_} {name}: {row['s_per_step']:.4f} s/step (first {row['first_step_s']:.2f} s), "
              f"vs first row {json.dumps(row['vs_first_row'])}", flush=True)
    _assign(unet, start)
    if probe:  # a second process on the warm cache: what a restarted Space pays
        rows["+ regional compile"]["warm_cache_second_process"] = run_probe(["--compile-probe"], F_, size, toy)
    rows["plain"] = plain_row(comps, F_, size, warmup, steps)
    for name in rows:
        rows[name]["vs_plain"] = rows[name]["s_per_step"] / rows["plain"]["s_per_step"]
    return rows


def plain_row(comps, F_: int, size: int, warmup: int, steps: int, *, graphed: bool = False, option: str = "auto") -> dict:
    """The bare plain-SD step (2D UNet + ControlNet, attn1 trainable) at the same settings:
    ``graphed`` as CUDA graphs, ``option`` as in :func:`variant_option` (e.g. blocks compiled)."""
    plain = _plain_unet(comps)
    step = BareStep(plain, comps.controlnet, comps.scheduler, [p for n, p in plain.named_parameters() if ".attn1." in n],
                    F_, size, space_time=False, graphed=graphed)
    try:
        plain.train()
        start = time.perf_counter()
        with variant_option(option, SimpleNamespace(unet=plain, controlnet=comps.controlnet)):
            s_step, peak = timed_steps(step, warmup, steps)
        first_steps = time.perf_counter() - start - steps * s_step
    finally:
        step.close()
        del plain
    print(f"  F={F_} plain {_variant_name(graphed, option)}: {s_step:.4f} s/step, first steps {first_steps:.2f} s", flush=True)
    return {"s_per_step": s_step, "peak_gb": peak, "setup_s": first_steps - warmup * s_step}


# ---------------------------------------------------------------------------------------------
# CUDA graphs: eager against replayed, eym's own loops, same start
# ---------------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@contextlib.contextmanager
def attention_kernel(name: str):
    """SDPA prefers cuDNN's kernel inside the block (``"cudnn"``), or PyTorch's own order (``"pytorch"``, ``"auto"``)."""
    if name != "cudnn" or not _cuda():
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        yield


@contextlib.contextmanager
def variant_option(name: str, comps):
    """The second half of a variant: an attention kernel (:func:`attention_kernel`), or
    ``"compiled"``: the UNet's and ControlNet's ResNet and transformer blocks run
    ``torch.compile``'d as ``TuneConfig.compile`` runs them (``"compiled resnets"``: the ResNet
    blocks only), captured into the CUDA graphs like eager ones."""
    if not name.startswith("compiled"):
        with attention_kernel(name):
            yield
        return
    from diffusers.models.resnet import ResnetBlock2D

    from eym.compile import compiled_regions

    kinds = {"compiled": None, "compiled resnets": (ResnetBlock2D,)}[name]  # None: eym's regions (TuneConfig.compile)
    with compiled_regions(comps.unet, comps.controlnet, kinds=kinds):
        yield


GRAPH_VARIANTS = ((False, "auto"), (True, "auto"))  # (CUDA graphs, option) of --only graphs
KERNEL_VARIANTS = ((False, "pytorch"), (False, "cudnn"), (True, "pytorch"), (True, "cudnn"))  # of --only attention
BLOCK_OPTIONS = ("compiled", "compiled resnets")  # what --only blocks may compile (--blocks picks)


def _variant_name(graphs: bool, attention: str) -> str:
    return ("graphed" if graphs else "eager") + ("" if attention == "auto" else f" {attention}")


def tuning_graph_rows(comps, F_: int, size: int, warmup: int, steps: int, variants=GRAPH_VARIANTS,
                      stages=(1, 2)) -> tuple[dict, dict]:
    """eym's stage 1 and 2 per (graphs, attention) variant, each from the untrained start; the diffs
    are against the first variant; (rows, stage 2's tensors trained by the last variant)."""
    unet = comps.unet
    init_temporal_attention(unet, 0)
    start = {n: p.detach().clone() for n, p in {**rc_attn_parameters(unet), **temporal_parameters(unet)}.items()}
    data = bench_data(comps, F_, size)
    rows, trained = {}, {}
    for stage in stages:
        ref = None
        for graphs, attention in variants:
            _assign(unet, start)
            cfg = TuneConfig(steps1=warmup + steps, steps2=warmup + steps, checkpoint_every=0,
                             gradient_checkpointing=False, cuda_graphs=graphs)
            losses: list[float] = []
            timer = PhaseTimer()
            timer.begin()
            with variant_option(attention, comps):
                out = train_stage(stage, unet, comps.controlnet, comps.scheduler, data, cfg, callback=timer,
                                  log_fn=lambda r: losses.append(r["loss"]), disable=True)
            timer.end()
            ts = timer.steps[f"stage{stage}"]
            per_step = max(statistics.median(ts[warmup:]), sum(ts[warmup:]) / len(ts[warmup:]))
            update = {n: v.float() - start[n].float().cpu() for n, v in out.items()}
            row = {"s_per_step": per_step, "first_steps_s": sum(ts[:warmup]), "peak_gb": timer.peak_gb[f"stage{stage}"],
                   "losses": losses}
            # what the first steps cost beyond steady steps: the capture and its warm-up call
            row["setup_s"] = row["first_steps_s"] - warmup * per_step
            if ref is None:
                ref = (update, losses)
            else:
                row["max_loss_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref[1]))
                row["update_rel_diff"] = float(sum((update[n] - ref[0][n]).square().sum() for n in update).sqrt()
                                               / sum(ref[0][n].square().sum() for n in update).sqrt().clamp_min(1e-30))
            name = f"stage{stage} {_variant_name(graphs, attention)}"
            rows[name] = row
            print(f"  F={F_} {name}: {per_step:.4f} s/step, setup {row['setup_s']:.2f} s, peak {row['peak_gb']:.1f} GB, "
                  f"diff {row.get('max_loss_rel_diff', 0):.1e} / {row.get('update_rel_diff', 0):.1e}", flush=True)
            if stage == 2:
                trained = out
    _assign(unet, start)
    return rows, trained


def inference_graph_rows(comps, F_: int, size: int, ddim: int, trained: dict, variants=GRAPH_VARIANTS) -> dict:
    """Inversion and two-branch sampling (injection at every layer and step) per (graphs, attention)
    variant, on tuned weights; the diffs are against the first variant."""
    from eym.injection import InjectionSchedule
    from eym.sampling import ddim_invert, ddim_timesteps, make_eps_fn, sample_two_branch
    from eym.spacetime import injection_processors

    unet = comps.unet
    saved = {n: p.detach().clone() for n, p in temporal_parameters(unet).items()}
    _assign(unet, trained)  # a tuned temporal attention: computed, not skipped, as in a real edit
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, F_, size // 8, size // 8, generator=gen).to(comps.device)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    control = torch.rand(2, 3, F_, size, size, generator=gen)
    timesteps = ddim_timesteps(comps.scheduler, ddim)
    rows, ref = {}, None
    try:
        with attention_processors(unet, injection_processors(unet, InjectionSchedule(), "paper")):
            for graphs, attention in variants:
                invert_fn = make_eps_fn(unet, comps.controlnet, prompt_embeds=emb[:1], control_images=control[:1],
                                        num_frames=F_, cuda_graphs=graphs)
                branch_fn = make_eps_fn(unet, comps.controlnet, prompt_embeds=emb, control_images=control,
                                        num_frames=F_, cuda_graphs=graphs)
                timer = PhaseTimer()
                timer.begin()
                with torch.no_grad(), variant_option(attention, comps):
                    z_T = ddim_invert(invert_fn, latents, timesteps, scheduler=comps.scheduler, callback=timer, disable=True)[-1]
                    out = sample_two_branch(branch_fn, z_T, timesteps, scheduler=comps.scheduler, callback=timer, disable=True)
                timer.end()
                row = {}
                for phase in ("inversion", "sampling"):
                    ts = timer.steps[phase]
                    row[f"{phase}_s"] = timer.totals[phase]
                    row[f"{phase}_s_per_step"] = statistics.median(ts[3:])
                    row[f"{phase}_peak_gb"] = timer.peak_gb[phase]
                if ref is None:
                    ref = (z_T, out)
                else:
                    row["z_T_rel_diff"], row["sampled_rel_diff"] = _rel(z_T, ref[0]), _rel(out, ref[1])
                name = _variant_name(graphs, attention)
                rows[name] = row
                print(f"  F={F_} inference {name} ({ddim} steps): {json.dumps({k: round(v, 4) for k, v in row.items()})}", flush=True)
                del invert_fn, branch_fn
    finally:
        _assign(unet, saved)
    return rows


COUNTED_OPS = ("aten::copy_", "aten::_to_copy", "aten::item")


def op_counts(comps, F_: int, size: int) -> dict:
    """Ops per stage-2 step of eym's loop as it was and as it is, and of the bare plain step
    (torch.profiler, CPU-side events: the difference of a 2- and a 4-step run, per step)."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    init_temporal_attention(comps.unet, 0)
    start = {n: p.detach().clone() for n, p in temporal_parameters(comps.unet).items()}
    data = bench_data(comps, F_, size)

    def count(run, steps: int) -> collections.Counter:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(steps)
        return collections.Counter(e.name for e in prof.events())

    def per_step(run) -> dict:
        run(1)  # warm
        a, b = count(run, 2), count(run, 4)
        per = {k: (b[k] - a[k]) / 2 for k in b}
        return {"all": sum(per.values()), **{k: per.get(k, 0.0) for k in COUNTED_OPS}}

    def eym(lean: bool, fused: bool):
        def run(steps: int) -> None:
            _assign(comps.unet, start)
            cfg = TuneConfig(steps1=0, steps2=steps, checkpoint_every=0, gradient_checkpointing=False)
            with code_as(lean=lean, fused=fused):
                train_stage(2, comps.unet, comps.controlnet, comps.scheduler, data, cfg, disable=True)
        return run

    out = {"eym stage 2 (today)": per_step(eym(False, False)), "eym stage 2 lean + fused": per_step(eym(True, True))}
    plain = _plain_unet(comps)
    step = BareStep(plain, comps.controlnet, comps.scheduler, [p for n, p in plain.named_parameters() if ".attn1." in n],
                    F_, size, space_time=False)
    try:
        out["plain"] = per_step(lambda steps: [step() for _ in range(steps)])
    finally:
        step.close()
    _assign(comps.unet, start)
    for name, r in out.items():
        print(f"  F={F_} ops per step, {name}: {json.dumps(r)}", flush=True)
    return out


def build_components(toy: bool):
    """The SD-1.5-sized replica on the GPU (bf16), or with ``toy`` the tiny bundle on the CPU (fp32)."""
    if toy:
        from eym.models import build_tiny_bundle, load_components

        comps = load_components(str(build_tiny_bundle(Path(tempfile.mkdtemp(prefix="eym-toy-")) / "bundle", seed=0)), device="cpu")
    else:
        device = "cuda" if _cuda() else "cpu"
        comps = build_sd15_replica(device, torch.bfloat16 if device == "cuda" else torch.float32)
    inflate(comps.unet)
    return comps


# ---------------------------------------------------------------------------------------------
# temporal attention alone
# ---------------------------------------------------------------------------------------------
def temporal_variants(module: TemporalAttention):
    """Ways to compute the same temporal attention update (all take x (B*F, N, C), F)."""
    attn = module.attn

    def current(x, Fr):
        return module(x, Fr)

    def einsum(x, Fr):
        BF, N, C = x.shape
        B, H = BF // Fr, attn.heads
        y = module.norm(x)
        q, k, v = attn.to_q(y), attn.to_k(y), attn.to_v(y)  # (B*F, N, C)
        shape = (B, Fr, N, H, C // H)
        q, k, v = (t.view(shape) for t in (q, k, v))
        w = torch.einsum("bfnhd,bgnhd->bnhfg", q, k) * (C // H) ** -0.5  # (B, N, H, F, F)
        o = torch.einsum("bnhfg,bgnhd->bfnhd", w.softmax(-1), v).reshape(BF, N, C)
        return attn.to_out[0](o)

    def sdpa(backend):
        from torch.nn.attention import sdpa_kernel

        def run(x, Fr):
            with sdpa_kernel(backend):
                return module(x, Fr)

        return run

    variants = {"current (SDPA auto)": current, "before: diffusers Attention": lambda x, Fr: reference_temporal_forward(module, x, Fr),
                "einsum softmax": einsum}
    if _cuda():
        from torch.nn.attention import SDPBackend

        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            variants[f"SDPA {backend.name.lower()}"] = sdpa(backend)
    return variants


def temporal_alone(F_: int, dtype: torch.dtype, warmup: int = 3, steps: int = 20) -> list[dict]:
    dev = torch.device("cuda" if _cuda() else "cpu")
    rows = []
    for C, N in ((320, 4096), (640, 1024), (1280, 256), (1280, 64)):
        module = TemporalAttention(C, 8, C // 8).to(dev)
        with torch.no_grad():
            module.attn.to_out[0].weight.normal_(0, 0.02)  # non-zero: the stage-2 case
        module.requires_grad_(True)
        x = torch.randn(F_, N, C, device=dev, dtype=dtype, requires_grad=True)
        ref = None
        for name, fn in temporal_variants(module).items():
            def step():
                with torch.autocast(dev.type, dtype=dtype, enabled=dev.type == "cuda"):
                    y = fn(x, F_)
                y.float().square().mean().backward()

            try:
                with torch.autocast(dev.type, dtype=dtype, enabled=dev.type == "cuda"), torch.no_grad():
                    y = fn(x, F_).float()
                ref = y if ref is None else ref
                err = ((y - ref).norm() / ref.norm().clamp_min(1e-12)).item()
                s, _ = timed_steps(step, warmup, steps)
                rows.append({"C": C, "N": N, "F": F_, "variant": name, "fwd_bwd_ms": s * 1e3, "rel_err": err})
            except RuntimeError as e:  # a backend that does not take these shapes
                rows.append({"C": C, "N": N, "F": F_, "variant": name, "error": str(e).splitlines()[0][:120]})
        x.grad = None
    for r in rows:
        print("  temporal", json.dumps(r), flush=True)
    return rows


def profile_stage1(comps, F_: int, size: int) -> dict:
    """GPU busy time vs wall time of bare stage-1 steps (is the step bound by the host or the GPU?)."""
    if not _cuda():
        return {}
    from torch.profiler import ProfilerActivity, profile

    rc = list(rc_attn_parameters(comps.unet).values())
    comps.unet.requires_grad_(False)
    step = BareStep(comps.unet, comps.controlnet, comps.scheduler, rc, F_, size, space_time=True)
    comps.unet.train()
    try:
        for _ in range(3):
            step()
        _sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(5):
                step()
            _sync()
            wall = (time.perf_counter() - start) / 5
    finally:
        step.close()
        comps.unet.eval()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / 5
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    table = [{"op": e.key[:60], "gpu_ms_per_step": e.self_device_time_total / 5e3, "calls_per_step": e.count / 5} for e in top]
    for r in table:
        print("  profile", json.dumps(r), flush=True)
    return {"wall_s_per_step": wall, "gpu_busy_s_per_step": gpu_us / 1e6, "top_gpu_ops": table}


def memory_only(comps, F_: int, size: int, steps: int) -> dict:
    """Peak memory of the defaults (auto checkpointing) under the process's memory cap."""
    editor = Editor(comps, cache_dir=Path(tempfile.mkdtemp(prefix="eym-mem-")), disable_progress=True)
    source, reference = synthetic_clip(F_, size, 1), synthetic_clip(F_, size, 2)
    timer = PhaseTimer()
    timer.begin()
    tuned = editor.tune(source, PROMPTS, TuneConfig(steps1=steps, steps2=steps, checkpoint_every=0), callback=timer)
    editor.infer(source, reference, PROMPTS, tuned, InferConfig(ddim_steps=5, retarget=False), callback=timer)
    timer.end()
    from eym.tuning import needs_gradient_checkpointing

    ckpt = needs_gradient_checkpointing((1, 4, F_, size // 8, size // 8), comps.device) if _cuda() else False
    out = {"frames": F_, "gradient_checkpointing": ckpt, "peak_gb": timer.peak_gb,
           "max_peak_gb": max(timer.peak_gb.values()), "s_per_step": {k: statistics.median(v[1:] or v) for k, v in timer.steps.items()}}
    print("memory:", json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="*", default=[8, 24], help="frame counts of the rows (none: only --full-edit)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--full-edit", type=int, nargs="*", default=[])
    p.add_argument("--re-edit", type=int, nargs="*", default=[],
                   help="frame counts: tune briefly (20 + 20 steps), then time the two re-edits of --full-edit")
    p.add_argument("--tune", type=json.loads, default={},
                   help='TuneConfig overrides of the --full-edit runs, as JSON, e.g. \'{"checkpoint_every": 0}\'')
    p.add_argument("--memcap-gb", type=float, default=None, help="cap this process's GPU memory (a smaller card)")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--skip-temporal-alone", action="store_true")
    p.add_argument("--only", choices=["all", "speedups", "graphs", "attention", "blocks"], default="all",
                   help="speedups: only the stage-2 speed-up rows and plain; graphs: only the CUDA-graph rows and plain; "
                        "attention: the graph rows with PyTorch's attention kernel and with cuDNN's; "
                        "blocks: graphed tuning with and without every ResNet and transformer block compiled, "
                        "and a second process's first steps on the warm compile cache")
    p.add_argument("--blocks", nargs="+", choices=BLOCK_OPTIONS, default=["compiled"],
                   help="the compiled variants of --only blocks (all ResNet and transformer blocks, or the ResNet blocks)")
    p.add_argument("--stages", type=int, nargs="+", choices=[1, 2], default=[1, 2], help="the tuning stages of the graph rows")
    p.add_argument("--ddim", type=int, default=20, help="DDIM steps of the inference rows of --only graphs")
    p.add_argument("--toy", action="store_true", help="CPU, tiny model, 64 px, 4 frames, 2 steps, aot_eager compile: a smoke test")
    p.add_argument("--no-probe", action="store_true", help="skip the second-process warm-cache compile probe")
    p.add_argument("--op-counts", action="store_true", help="ops per stage-2 step (profiler), today vs now vs plain")
    p.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)  # the second process itself
    p.add_argument("--blocks-probe", action="store_true", help=argparse.SUPPRESS)  # the same for --only blocks
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    os.environ.setdefault("EYM_HOME", tempfile.mkdtemp(prefix="eym-bench-"))
    if args.toy:  # inductor's C++ codegen takes minutes on a small CPU; aot_eager traces the same graphs
        import eym.compile

        eym.compile.BACKEND = "aot_eager"
        torch.set_num_threads(1)
        if "--frames" not in (argv if argv is not None else sys.argv):
            args.frames = [4]
        args.size, args.steps, args.warmup, args.ddim = 64, 2, 1, 4
        args.only, args.op_counts = ("speedups", True) if args.only == "all" else (args.only, False)
    if args.compile_probe or args.blocks_probe:
        row = compile_probe(args) if args.compile_probe else blocks_probe(args)
        args.json.write_text(json.dumps(row))
        return 0
    if args.memcap_gb and _cuda():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memcap_gb * 2**30 / total))
    dtype = torch.bfloat16 if _cuda() and not args.toy else torch.float32
    t0 = time.perf_counter()
    comps = build_components(args.toy)
    import eym.compile

    result = {"device": torch.cuda.get_device_name() if _cuda() and not args.toy else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "size": args.size, "argv": sys.argv[1:] if argv is None else argv,
              "build_s": time.perf_counter() - t0, "memcap_gb": args.memcap_gb, "toy": args.toy,
              "compile_backend": eym.compile.BACKEND, "rows": {}}

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))

    for F_ in args.frames:
        if args.memory_only:
            result["rows"][F_] = {"memory": memory_only(comps, F_, args.size, max(args.steps, 2))}
            save()
            continue
        row = result["rows"].setdefault(F_, {})
        if args.only in ("graphs", "attention", "blocks"):
            blocks = ((True, "auto"), *((True, b) for b in args.blocks))
            variants = {"graphs": GRAPH_VARIANTS, "attention": KERNEL_VARIANTS, "blocks": blocks}[args.only]
            row["graphs"], trained = tuning_graph_rows(comps, F_, args.size, args.warmup, args.steps, variants, args.stages)
            save()
            if args.only == "blocks":
                row["compiled_second_process"] = run_probe(["--blocks-probe", "--blocks", *args.blocks], F_, args.size, args.toy)
                row["graphs"]["plain"] = plain_row(comps, F_, args.size, args.warmup, args.steps)
                # the ratios at equal settings: plain SD graphed, and graphed with its blocks compiled
                for option in ("auto", *args.blocks):
                    row["graphs"][f"plain {_variant_name(True, option)}"] = plain_row(
                        comps, F_, args.size, args.warmup, args.steps, graphed=True, option=option)
                save()
                continue
            row["graphs"]["plain"] = plain_row(comps, F_, args.size, args.warmup, args.steps)
            if args.only == "attention":  # the ratio to plain at equal settings: plain with cuDNN's kernel too
                with attention_kernel("cudnn"):
                    row["graphs"]["plain cudnn"] = plain_row(comps, F_, args.size, args.warmup, args.steps)
            row["inference_graphs"] = inference_graph_rows(comps, F_, args.size, args.ddim, trained, variants)
            save()
            if _cuda():
                torch.cuda.empty_cache()
            continue
        row["speedups"] = speedups(comps, F_, args.size, args.warmup, args.steps, toy=args.toy, probe=not args.no_probe)
        if args.op_counts:
            row["op_counts"] = op_counts(comps, F_, args.size)
        save()
        if args.only == "speedups":
            continue
        row["bare"] = decomposition(comps, F_, args.size, args.warmup, args.steps)
        save()
        row["eym"] = eym_loop(comps, F_, args.size, args.warmup, args.steps, skip=True)
        row["eym_noskip"] = eym_loop(comps, F_, args.size, args.warmup, args.steps, skip=False)
        save()
        row["profile"] = profile_stage1(comps, F_, args.size)
        if not args.skip_temporal_alone:
            row["temporal_alone"] = temporal_alone(F_, dtype)
        save()
        if _cuda():
            torch.cuda.empty_cache()
    if args.full_edit or args.re_edit:
        editor = Editor(comps, cache_dir=Path(tempfile.mkdtemp(prefix="eym-bench-tuned-")), disable_progress=True)
        for key, frames, overrides in (("full_edit", args.full_edit, args.tune), ("re_edit", args.re_edit, {"steps1": 20, "steps2": 20})):
            for i, F_ in enumerate(frames):
                # a frame count given twice tunes twice: another seed is another cache key
                seeded = {**overrides, "seed": overrides.get("seed", 0) + frames[:i].count(F_)}
                r = full_edit(editor, F_, args.size, seeded, re_edit=True)
                r["memory_reserved_gb_after"] = torch.cuda.memory_reserved() / 2**30 if _cuda() else math.nan
                result.setdefault(key, []).append(r)
                print(f"{key}:", json.dumps(r), flush=True)
                save()
    save()
    print_summary(result)
    return 0


def _equal_plain(name: str, rows: dict) -> dict:
    """The plain row at ``name``'s settings ("stage1 graphed compiled" -> "plain graphed compiled") where the run has it, else eager plain."""
    return rows.get("plain " + name.split(" ", 1)[-1], rows["plain"])


def print_summary(result: dict) -> None:
    print(f"\n{result['device']} | torch {result['torch']} | {result['size']}px | {result['date']}")
    for F_, row in result["rows"].items():
        if "graphs" in row:
            print(f"\nF={F_} CUDA graphs: | row | s/step | vs plain | setup s | loss rel diff | update rel diff |\n|---|---|---|---|---|---|")
            for name, r in row["graphs"].items():
                plain = _equal_plain(name, row["graphs"])["s_per_step"]
                print(f"| {name} | {r['s_per_step']:.4f} | {r['s_per_step'] / plain:.3f} | {r.get('setup_s', math.nan):.2f} | "
                      f"{r.get('max_loss_rel_diff', math.nan):.2e} | {r.get('update_rel_diff', math.nan):.2e} |")
            for name, r in row.get("inference_graphs", {}).items():
                print(f"| inference {name} | {json.dumps({k: round(v, 4) for k, v in r.items()})} |")
        if "speedups" in row:
            print(f"\nF={F_} stage 2: | row | s/step | vs plain | first step s | loss rel diff | update rel diff |\n|---|---|---|---|---|---|")
            for name, r in row["speedups"].items():
                check = r.get("vs_first_row", {})
                print(f"| {name} | {r['s_per_step']:.4f} | {r['vs_plain']:.3f} | {r.get('first_step_s', math.nan):.2f} | "
                      f"{check.get('max_loss_rel_diff', math.nan):.2e} | {check.get('update_rel_diff', math.nan):.2e} |")
            probe = row["speedups"]["+ regional compile"].get("warm_cache_second_process")
            if probe:
                print(f"regional compile, second process on the warm cache: first step {probe.get('first_step_s', math.nan):.2f} s")
        if "bare" not in row:
            continue
        bare = row["bare"]
        plain = bare["plain"]["s_per_step"]
        print(f"\nF={F_}: | row | s/step | vs plain | peak GB |\n|---|---|---|---|")
        for name, r in bare.items():
            print(f"| bare {name} | {r['s_per_step']:.4f} | {r['s_per_step'] / plain:.3f} | {r['peak_gb']:.1f} |")
        for key in ("eym", "eym_noskip"):
            for stage, r in row[key].items():
                print(f"| {key} {stage} | {r['s_per_step']:.4f} | {r['s_per_step'] / plain:.3f} | {r['peak_gb']:.1f} |")
    for r in result.get("full_edit", []):
        print(f"full edit F={r['frames']}: {r['wall_s']:.1f} s, phases {json.dumps({k: round(v, 1) for k, v in r['phase_s'].items()})}")


if __name__ == "__main__":
    raise SystemExit(main())

"""DPL, Detailed Prompt-Guided Learning: the one-shot tuning of Edit-Your-Motion (METHOD.md, "Training").

Two stages on the source video alone, each one flat loop (:func:`train_stage`):

- stage 1 learns the subject: shuffled frames (a new permutation each step), background masked
  out in pixel space before the VAE (Eq. 10-11), content prompt P_c, source skeletons through
  the frozen ControlNet (Eq. 12); only RC-Attn (the attn1 projections) trains, on L_rec (Eq. 13);
- stage 2 learns motion and background: ordered frames, no mask, source prompt P_s; only the
  temporal attention trains, on L = (1 - lambda) L_noise + lambda L_rec (Eq. 14-15).

Notation (code name -> paper symbol):
    latents          -> z_0 = E(V), the ordered source video's latents
    masked_latents   -> Z^M = E(U_M), U_M = U * M                              (Eq. 10-11)
    control_images   -> S_sr, the source skeletons fed to ControlNet          (Eq. 12)
    content_embeds   -> P_c (stage 1);  source_embeds -> P_s (stage 2)
    noise            -> eps ~ N(0, I);  t -> t, one per step, shared by all frames
    eps_pred         -> eps_theta(z_t, t, P, C_sr), (B, C, F, h, w)
    rec_weight       -> lambda                                                 (Eq. 15)

Everything that does not change during tuning is prepared once by the caller
(:class:`TuningData`: VAE latents, text embeddings, control images). Per step the only work is
one ControlNet forward (frozen, under ``torch.no_grad``: its residuals depend on z_t) and one
UNet forward/backward with the frames folded into the batch; there is no Python loop over frames.

Checkpoints: every ``checkpoint_every`` steps the trained tensors, the optimizer state, the step
and the RNG state are written atomically to ``checkpoint_dir/checkpoint.pt`` with their sha256
(a damaged checkpoint is ignored, never resumed from); :func:`tune_dpl`
resumes from there, and the result equals that of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import itertools
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch
from tqdm.auto import tqdm

from eym.cache import atomic_output, stable_hash
from eym.compile import compiled_regions
from eym.graphs import GRAPH_MIN_STEPS, can_graph_training, graph_training_call
from eym.config import to_dict
from eym.errors import EymError
from eym.validate import check_ranges
from eym.progress import ProgressCallback

logger = logging.getLogger(__name__)

LogFn = Callable[[dict], None]

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_MAGIC = b"EYMCKPT1"  # then the sha256 of the rest, then torch.save's bytes
_MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


@dataclass(frozen=True)
class TuneConfig:
    """Settings of DPL tuning. The paper's values are the defaults (SD 1.5 at 512x512)."""

    steps1: int = 300  # stage 1 optimizer steps (RC-Attn; shuffled, masked frames; P_c)
    steps2: int = 300  # stage 2 optimizer steps (temporal attention; ordered frames; P_s)
    lr: float = 3e-5  # AdamW learning rate of both stages (the paper's, for SD 1.5 scale)
    weight_decay: float = 1e-2  # AdamW weight decay (diffusers' training scripts' default)
    max_grad_norm: float = 1.0  # gradient norm clipping, as in Tune-A-Video
    rec_weight: float = 0.9  # lambda of Eq. 15: L = (1 - lambda) L_noise + lambda L_rec
    mask_background: bool = True  # stage 1 trains on U * M (Eq. 10); False: whole frames
    shuffle: bool = True  # stage 1 draws a new frame permutation each step
    seed: int = 0  # seeds frame order, timesteps and noise of both stages
    mixed_precision: str = "auto"  # "auto" (bf16, else fp16, on CUDA; none on CPU) | "no" | "fp16" | "bf16"
    gradient_checkpointing: bool | None = None  # recompute activations in backward; None: only where the GPU's free memory needs it
    checkpoint_every: int = 100  # steps between resumable checkpoints (each ~0.6 GB at SD scale, written on a background thread); 0 turns them off
    compile: bool = False  # the UNet's and ControlNet's blocks run torch.compile'd (eym.compile): faster steps after minutes of compiling, for long-lived processes
    cuda_graphs: bool = True  # replay the model call as CUDA graphs where it can be (CUDA, bf16/fp32, no checkpointing): same training, less host time

    def __post_init__(self) -> None:
        check_ranges(self)  # types, finiteness and bounds of eym.validate.RANGES
        if self.steps1 < 0 or self.steps2 < 0:
            raise EymError(f"tuning steps must be >= 0, got steps1={self.steps1}, steps2={self.steps2}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise EymError(f"tuning learning rate must be a positive number, got lr={self.lr}")
        if not 0.0 <= self.rec_weight <= 1.0:
            raise EymError(f"rec_weight (lambda of Eq. 15) must be in [0, 1], got {self.rec_weight}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise EymError(
                f"weight_decay must be >= 0 and max_grad_norm > 0, got {self.weight_decay} and {self.max_grad_norm}"
            )
        if self.mixed_precision not in _MIXED_PRECISION:
            raise EymError(f"mixed_precision {self.mixed_precision!r} is not one of {', '.join(_MIXED_PRECISION)}")
        if self.checkpoint_every < 0:
            raise EymError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

    def result_key(self) -> dict:
        """The settings that change the tuned tensors (cache key); bookkeeping ones are left out."""
        settings = to_dict(self)
        for name in ("checkpoint_every", "gradient_checkpointing", "compile", "cuda_graphs"):  # same result either way (to rounding)
            settings.pop(name)
        return settings


@dataclass
class TuningData:
    """Everything tuning needs from the source, prepared once before the loops (on the UNet's device)."""

    latents: torch.Tensor  # (1, 4, F, h, w) z_0 = E(V) of the ordered source frames
    masked_latents: torch.Tensor  # (1, 4, F, h, w) Z^M = E(U * M) (Eq. 10-11); = latents if no masks
    control_images: torch.Tensor  # (F, 3, H, W) source skeletons S_sr in [0, 1]
    content_embeds: torch.Tensor  # (1, 77, D) text embedding of P_c
    source_embeds: torch.Tensor  # (1, 77, D) text embedding of P_s

    @property
    def num_frames(self) -> int:
        return self.latents.shape[2]


@dataclass
class TuneResult:
    """What :func:`tune_dpl` returns."""

    tensors: dict[str, torch.Tensor]  # trained tensors by UNet parameter name, on the CPU
    history: list[dict] = field(default_factory=list)  # one log dict per step (this run only)
    resumed_from: tuple[int, int] | None = None  # (stage, step) of the checkpoint resumed, if any


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def reconstruction_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """L_rec = ||eps - eps_theta(z_t, t, P, C)||^2, as a mean over elements (Eq. 13).

    Args:
        eps_pred: (B, C, F, h, w) predicted noise.
        noise: (B, C, F, h, w) the noise that was added.
    """
    return torch.nn.functional.mse_loss(eps_pred.float(), noise.float())  # Eq. 13


def noise_constraint_loss(eps_pred: torch.Tensor) -> torch.Tensor:
    """L_noise = 1/(n-1) sum_{i=1}^{n-1} ||eps_theta(z_t^i) - eps_theta(z_t^{i+1})||^2 (Eq. 14).

    The squared norm is taken as a mean over the elements of a frame, the convention of L_rec,
    so that lambda = 0.9 weighs two terms of the same scale.

    Args:
        eps_pred: (B, C, F, h, w) predicted noise of the F frames at the same timestep, F >= 2.

    Returns:
        A scalar; 0 for a single frame (no neighbours).
    """
    if eps_pred.shape[2] < 2:
        return eps_pred.sum() * 0.0
    eps_pred = eps_pred.float()
    diff = eps_pred[:, :, 1:] - eps_pred[:, :, :-1]  # (B, C, F-1, h, w) neighbour differences
    return diff.pow(2).mean()  # Eq. 14: mean over pairs of per-frame means


def stage2_loss(eps_pred: torch.Tensor, noise: torch.Tensor, rec_weight: float) -> tuple[torch.Tensor, dict]:
    """L = (1 - lambda) L_noise + lambda L_rec (Eq. 15); also returns both parts for logging."""
    eps_pred = eps_pred.float()  # cast once: both terms read it in float32
    rec = reconstruction_loss(eps_pred, noise)
    smooth = noise_constraint_loss(eps_pred)
    loss = (1.0 - rec_weight) * smooth + rec_weight * rec  # Eq. 15
    return loss, {"loss_rec": rec.detach(), "loss_noise": smooth.detach()}  # read when logged, not here (no sync)


# ---------------------------------------------------------------------------------------------
# the model call
# ---------------------------------------------------------------------------------------------
def predict_noise(
    unet,
    controlnet,
    z_t: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    control_images: torch.Tensor,
    *,
    controlnet_scale: float = 1.0,
) -> torch.Tensor:
    """eps_theta(z_t, t, P, ControlNet(S)) with the space-time UNet; gradients flow into the UNet only.

    Args:
        unet: the inflated UNet (``eym.spacetime.inflate``).
        controlnet: the frozen 2D ControlNet; run under ``torch.no_grad``.
        z_t: (B, C, F, h, w) noisy latents.
        t: (1,) or (B*F,) integer timesteps.
        embeds: (B, 77, D) prompt embeddings, one per video.
        control_images: (B*F, 3, H, W) skeletons in [0, 1], frames folded into the batch.

    Returns:
        (B, C, F, h, w) predicted noise.
    """
    from eym.spacetime import batch_to_frames, frames_to_batch, space_time_kwargs

    B, C, F, h, w = z_t.shape
    x = frames_to_batch(z_t)  # (B*F, C, h, w)
    text = embeds.repeat_interleave(F, dim=0)  # (B*F, 77, D)
    with torch.no_grad():  # frozen: its residuals depend on z_t, but it never needs gradients
        down, mid = controlnet(
            x, t, encoder_hidden_states=text, controlnet_cond=control_images,
            conditioning_scale=controlnet_scale, return_dict=False,
        )  # Eq. 12
    eps = unet(
        x, t, encoder_hidden_states=text,
        down_block_additional_residuals=down, mid_block_additional_residual=mid,
        cross_attention_kwargs=space_time_kwargs(F),
    ).sample  # (B*F, C, h, w)
    return batch_to_frames(eps, F)  # (B, C, F, h, w)


# ---------------------------------------------------------------------------------------------
# the two stages
# ---------------------------------------------------------------------------------------------
def trainable_parameters(unet, stage: int) -> dict[str, torch.nn.Parameter]:
    """Stage 1: RC-Attn (attn1 projections); stage 2: temporal attention. Sorted by name."""
    from eym.spacetime import rc_attn_parameters, temporal_parameters

    params = rc_attn_parameters(unet) if stage == 1 else temporal_parameters(unet)
    if not params:
        raise RuntimeError(f"stage {stage}: the UNet has no trainable parameters; was it inflated?")
    return dict(sorted(params.items()))


def tune_dpl(
    unet,
    controlnet,
    scheduler,
    data: TuningData,
    config: TuneConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    fingerprint: str = "",
    callback: ProgressCallback | None = None,
    log_fn: LogFn | None = None,
    disable: bool = False,
) -> TuneResult:
    """Run DPL stage 1 then stage 2 on the inflated ``unet`` in place; resume from a checkpoint.

    Args:
        unet: the inflated UNet, with the weights tuning starts from (SD's, not another source's).
        controlnet: the frozen openpose ControlNet.
        scheduler: gives the training noise schedule (``add_noise``, ``num_train_timesteps``).
        data: the prepared source (:class:`TuningData`).
        config: :class:`TuneConfig`.
        checkpoint_dir: where resumable checkpoints go (``None``: no checkpoints).
        fingerprint: identifies the job (the cache key); a checkpoint with another one is ignored.
        callback: ``callback("stage1" | "stage2", step, total)`` after every optimizer step.
        log_fn: receives one dict per step (``stage``, ``step``, ``loss``, ``lr``, ...).
        disable: turn the tqdm bars off.

    Returns:
        :class:`TuneResult` with the trained tensors (RC-Attn and temporal) on the CPU.
    """
    # 1. resume: a checkpoint of this very job, if one was left by an interrupted run
    ckpt = _load_checkpoint(checkpoint_dir, fingerprint)
    start_stage, start_step, resumed_from = 1, 0, None
    if ckpt is not None:
        start_stage, start_step = ckpt["stage"], ckpt["step"]
        resumed_from = (start_stage, start_step)
        if start_stage == 2:  # stage 1 finished before the interruption
            _assign(unet, ckpt["stage1"])
        logger.info("resuming tuning from stage %d step %d", start_stage, start_step)

    # The temporal attention starts from weights drawn from the tuning seed, not from whatever
    # the global RNG held when the UNet was inflated: same seed, same result (a stage 2
    # checkpoint then overwrites them with its trained values).
    init_temporal_attention(unet, config.seed)

    history: list[dict] = []
    stage1_tensors: dict[str, torch.Tensor] = {}
    # 2. stage 1: spatial features (object content)
    if start_stage == 1:
        stage1_tensors = train_stage(
            1, unet, controlnet, scheduler, data, config,
            resume=ckpt, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
            callback=callback, log_fn=_collect(history, log_fn), disable=disable,
        )
        ckpt = None
        # hand-off: stage 2 starts from here after an interruption, with stage 1's result fixed
        _save_checkpoint(checkpoint_dir, fingerprint, stage=2, step=0, stage1=stage1_tensors)
    else:
        stage1_tensors = ckpt["stage1"]
    # 3. stage 2: temporal features (motion, background), stage 1's tensors frozen
    stage2_tensors = train_stage(
        2, unet, controlnet, scheduler, data, config,
        resume=ckpt, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint, stage1=stage1_tensors,
        callback=callback, log_fn=_collect(history, log_fn), disable=disable,
    )
    return TuneResult(tensors={**stage1_tensors, **stage2_tensors}, history=history, resumed_from=resumed_from)


def train_stage(
    stage: int,
    unet,
    controlnet,
    scheduler,
    data: TuningData,
    config: TuneConfig,
    *,
    resume: dict | None = None,
    checkpoint_dir: str | Path | None = None,
    fingerprint: str = "",
    stage1: dict[str, torch.Tensor] | None = None,
    callback: ProgressCallback | None = None,
    log_fn: LogFn | None = None,
    disable: bool = False,
) -> dict[str, torch.Tensor]:
    """One DPL stage: a flat loop of ``steps1``/``steps2`` AdamW steps on its trainable tensors.

    Args:
        stage: 1 (RC-Attn, shuffled masked frames, P_c, L_rec) or 2 (temporal attention,
            ordered frames, P_s, Eq. 15).
        resume: a checkpoint dict of this stage to continue from (see :func:`tune_dpl`).
        stage1: stage 1's final tensors, stored in stage 2's checkpoints.
        Other arguments: as in :func:`tune_dpl`.

    Returns:
        The stage's trained tensors by parameter name, detached copies on the CPU.
    """
    name = f"stage{stage}"
    total = config.steps1 if stage == 1 else config.steps2
    device = next(unet.parameters()).device
    base_dtype = unet.conv_in.weight.dtype  # never trained, so never left in fp32
    F = data.num_frames
    num_train_timesteps = scheduler.config.num_train_timesteps
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise EymError(f"the base model's scheduler predicts {prediction_type!r}; eym tunes epsilon or v_prediction models")

    # stage 1: the masked video and P_c (Eq. 10-13); stage 2: the ordered video and P_s (Eq. 14-15)
    latents = data.masked_latents if stage == 1 else data.latents  # (1, 4, F, h, w)
    embeds = data.content_embeds if stage == 1 else data.source_embeds  # (1, 77, D)

    if resolve_mixed_precision(config.mixed_precision, device) == "no" and base_dtype != torch.float32:
        # the trained tensors are fp32; without autocast they cannot meet the frozen half-precision ones
        raise EymError(
            f"mixed_precision 'no' needs float32 weights, the model is {str(base_dtype).replace('torch.', '')}; "
            "use mixed_precision 'auto' or load the model in float32"
        )
    accelerator = _accelerator(config.mixed_precision, device)
    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        checkpointing = needs_gradient_checkpointing(data.latents.shape, device)
    generator = torch.Generator().manual_seed(config.seed * 10 + stage)  # CPU: same draws on any device

    # Freeze everything, then switch on exactly this stage's tensors. They train in fp32 (the
    # AdamW state and small updates need it); mixed precision only changes the forward pass.
    # Whatever happens from here on, `finally` freezes them again in the model's dtype.
    unet.requires_grad_(False)
    controlnet.requires_grad_(False)
    params = trainable_parameters(unet, stage)
    bar = None
    graphs = False  # whether this stage replays CUDA graphs (decided once the loop is set up)
    stack = contextlib.ExitStack()
    writer = CheckpointWriter()
    try:
        for p in params.values():
            p.data = p.data.float()
            p.requires_grad_(True)
        if device.type == "cuda" and resolve_mixed_precision(config.mixed_precision, device) != "no":
            stack.enter_context(float32_norms(unet, controlnet))  # the frozen ones; exact under CUDA autocast
        stack.enter_context(compiled_regions(unet, controlnet, enabled=config.compile))
        logger.info("%s: training %d tensors (%d values)", name, len(params), sum(p.numel() for p in params.values()))
        optimizer = _adamw(list(params.values()), config)
        optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
        step = 0
        if resume is not None and resume["stage"] == stage and resume["step"] > 0:
            _assign(unet, resume["trained"])
            optimizer.load_state_dict(resume["optimizer"])
            if resume.get("scaler") is not None and accelerator.scaler is not None:
                accelerator.scaler.load_state_dict(resume["scaler"])
            generator.set_state(resume["rng"])
            step = resume["step"]
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        bar = tqdm(total=total, initial=step, desc=f"tuning {name}", disable=disable, leave=False)
        pending: dict | None = None  # the last step's record; its loss is read one step late

        def model_call(z_t: torch.Tensor, t: torch.Tensor, control: torch.Tensor, *trainables: torch.Tensor) -> torch.Tensor:
            """eps_theta of step 3; ``trainables`` (unused here) let a CUDA graph return their gradients."""
            return predict_noise(unet, controlnet, z_t, t, embeds, control)

        graphs = (
            config.cuda_graphs
            and can_graph_training(device, checkpointing=checkpointing, scaler=accelerator.scaler)
            and total - step > GRAPH_MIN_STEPS
        )
        graphed, first_step = False, step

        def flush() -> None:
            """Read the pending step's loss (a device sync), check it, log it."""
            nonlocal pending
            if pending is None:
                return
            names = [k for k, v in pending.items() if torch.is_tensor(v)]
            values = torch.stack([pending[k].float() for k in names]).tolist()  # one device read for all
            record = {**pending, **dict(zip(names, values))}
            pending = None
            if not math.isfinite(record["loss"]):
                raise EymError(f"{name} step {record['step']}: the loss is {record['loss']}; lower the learning rate (lr={config.lr})")
            logger.debug("tune %s", record)
            if log_fn is not None:
                log_fn(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}")

        while step < total:
            # 1. the batch: stage 1 sees the frames in a new random order each step, so that it
            #    can learn appearance but no temporal signal; stage 2 sees them in order
            if stage == 1 and config.shuffle:
                order = _to_device(torch.randperm(F, generator=generator), device)
                z_0 = latents[:, :, order]  # (1, 4, F, h, w)
                control = data.control_images[order]  # (F, 3, H, W)
            else:
                z_0, control = latents, data.control_images

            # 2. forward diffusion at ONE random t for all frames (L_noise compares frames at the same t)
            t_cpu = torch.randint(0, num_train_timesteps, (1,), generator=generator)
            t = _to_device(t_cpu, device)
            noise = _to_device(torch.randn(z_0.shape, generator=generator, dtype=torch.float32), device).to(z_0.dtype)
            z_t = scheduler.add_noise(z_0, noise, t)
            target = noise if prediction_type == "epsilon" else scheduler.get_velocity(z_0, noise, t)

            # 3. predict the noise: frozen ControlNet residuals (no grad), space-time UNet (grad);
            #    after one eager step (it settles lazy inits and AdamW's state), as CUDA graphs
            #    where the stage allows (eym.graphs)
            if graphs and not graphed and step > first_step:
                eps_pred = loss = parts = None  # the eager step's autograd graph must be gone (see _captured)
                model_call = _captured(model_call, (z_t, t, control), list(params.values()), accelerator)
                graphed = True
            with accelerator.autocast():
                eps_pred = model_call(z_t, t, control)  # (1, 4, F, h, w)

            # 4. the stage's loss: L_rec (Eq. 13) or (1 - lambda) L_noise + lambda L_rec (Eq. 15)
            if stage == 1:
                loss = reconstruction_loss(eps_pred, target)
                parts = {}
            else:
                loss, parts = stage2_loss(eps_pred, target, config.rec_weight)

            # 5. update the stage's tensors
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(list(params.values()), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # 6. log the previous step (reading a loss waits for the GPU; one step late, the GPU
            #    already has this step queued and never idles), checkpoint, report
            flush()
            pending = {"stage": stage, "step": step, "loss": loss.detach(), "lr": config.lr, "t": int(t_cpu), **parts}
            if config.checkpoint_every and (step % config.checkpoint_every == 0) and step < total:
                flush()  # never checkpoint tensors updated from a non-finite loss
                writer.submit(  # copies the live tensors and optimizer state to the CPU, once
                    checkpoint_dir, fingerprint, stage=stage, step=step, trained=dict(params),
                    stage1=stage1, optimizer=optimizer.state_dict(), rng=generator.get_state(),
                    scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                )
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(name, step, total)
        flush()
        writer.close()  # the stage's last checkpoint is on disk before the stage returns
    finally:
        with contextlib.suppress(Exception):  # after an error: still let the write in flight land
            writer.close()
        if bar is not None:
            bar.close()
        unet.eval()
        if checkpointing:
            unet.disable_gradient_checkpointing()
        for p in params.values():
            p.grad = None
            p.requires_grad_(False)
            # a new storage even where the dtype is unchanged: the fused optimizer updates in
            # place without bumping version counters, and TemporalAttention.is_zero caches on both
            p.data = p.data.to(base_dtype, copy=True)
        stack.close()
        if graphs:  # the graphs' memory pool goes back before the next stage captures its own
            # every reference to the graphs: the callable, its output buffer (in their pool), the
            # last loss (its autograd graph holds the graphed Function's node)
            model_call = eps_pred = loss = parts = None
            gc.collect()  # the graphed autograd Function sits in a reference cycle
            torch.cuda.empty_cache()
    return _snapshot(params)


def _captured(model_call: Callable, sample_args: tuple, trainables: list, accelerator) -> Callable:
    """``model_call`` as CUDA graphs, or unchanged if the capture fails (the stage then stays eager).

    Called between steps, when the previous step's autograd graph is gone: its gradient
    accumulators were made on the default stream, and capture must make its own.
    """
    try:
        with accelerator.autocast():
            return graph_training_call(model_call, sample_args, trainables)
    except RuntimeError:  # a driver or an op that cannot be captured: eym.graphs logs it and records the card
        gc.collect()  # the failed capture's pool
        torch.cuda.empty_cache()
        return model_call


@contextlib.contextmanager
def float32_norms(*models: torch.nn.Module):
    """Hold the frozen GroupNorm/LayerNorm weights of ``models`` in float32 for the duration.

    CUDA autocast runs group_norm and layer_norm in float32 and casts their half-precision
    weights and biases up on every call (two copies per norm per forward; autocast caches only
    casts of trainable leaves). The up-cast is exact, so storing them in float32 once gives the
    same bits with none of those copies. (CPU autocast keeps these ops in bf16, where mixed
    dtypes would change the rounding, so the loop uses this on CUDA only.) The original dtypes
    come back in ``finally``.
    """
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    saved: list[tuple[torch.nn.Parameter, torch.dtype]] = []
    try:
        for model in models:
            for module in model.modules():
                if not isinstance(module, norms):
                    continue
                for p in module.parameters(recurse=False):
                    if not p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                        saved.append((p, p.dtype))
                        p.data = p.data.float()
        yield
    finally:
        for p, dtype in saved:
            p.data = p.data.to(dtype)


def _adamw(params: list[torch.nn.Parameter], config: TuneConfig) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one launch per step for all tensors) where the device has it."""
    try:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device without the fused kernel
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def init_temporal_attention(unet, seed: int) -> None:
    """(Re)draw the temporal attention's initial weights from ``seed``.

    Same distributions as at inflation: projections as ``nn.Linear`` draws them
    (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), LayerNorm at (1, 0), and the output projection at
    zero, so the inflated UNet still starts equal to SD frame by frame.
    """
    from eym.spacetime import temporal_parameters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(temporal_parameters(unet).items()):
            if ".to_out." in name or (name.endswith(".bias") and ".norm." in name):
                value = torch.zeros(p.shape)
            elif ".norm." in name:
                value = torch.ones(p.shape)
            else:
                bound = 1.0 / math.sqrt(p.shape[1]) if p.ndim == 2 else 1.0 / math.sqrt(p.shape[0])
                value = torch.empty(p.shape).uniform_(-bound, bound, generator=generator)
            p.copy_(value.to(p.device, p.dtype))


# ---------------------------------------------------------------------------------------------
# helpers: accelerate, tensors, checkpoints
# ---------------------------------------------------------------------------------------------
def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """``"auto"`` -> bf16 where the GPU has it, else fp16, on CUDA; plain fp32 (``"no"``) on CPU."""
    if setting == "auto":
        if device.type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "fp16" and device.type != "cuda":
        raise EymError(f"mixed_precision 'fp16' needs a CUDA device, the model is on {device}; use 'no' or 'bf16'")
    return setting


def _accelerator(setting: str, device: torch.device):
    """An ``accelerate.Accelerator`` for autocast, loss scaling and clipping (no model wrapping).

    accelerate keeps one process-wide state and refuses a second Accelerator with another
    precision; a long-lived app may tune with different settings, so that state is reset then.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import AutocastKwargs

    mixed_precision = resolve_mixed_precision(setting, device)
    kwargs = {
        "mixed_precision": mixed_precision, "cpu": device.type == "cpu", "device_placement": False,
        # no cast cache: a CUDA graph cannot capture one, and each weight is cast once per step anyway
        "kwargs_handlers": [AutocastKwargs(cache_enabled=False)],
    }
    try:
        return Accelerator(**kwargs)
    except ValueError:
        AcceleratorState._reset_state(True)
        return Accelerator(**kwargs)


def estimate_tuning_memory_gb(num_frames: int, latent_size: tuple[int, int]) -> float:
    """Peak GPU memory of a tuning step without gradient checkpointing, SD 1.5 in bf16.

    Fitted to H100 measurements at 512x512 (docs/PERFORMANCE.md): 13.1, 22.8 and 32.5 GB at
    8, 16 and 24 frames, i.e. about 3.4 GB of weights plus 1.21 GB per 64x64-latent frame.
    """
    h, w = latent_size
    return 3.4 + 1.21 * num_frames * (h * w) / (64 * 64)


def needs_gradient_checkpointing(latents_shape: tuple[int, ...], device: torch.device) -> bool:
    """Checkpoint only when the step would not fit in the GPU's free memory with a 20% margin.

    Checkpointing costs about 35-60% more time per step (measured), so an 80 GB card tunes 24
    frames without it, while a 24 GB card checkpoints (peak 9.8 GB at 24 frames).
    """
    if device.type != "cuda":
        return False
    *_, num_frames, h, w = latents_shape
    free, total = torch.cuda.mem_get_info(device)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get_fraction is not None:  # a process capped below the card (shared GPU, a 24 GB budget)
        index = device.index if device.index is not None else torch.cuda.current_device()
        free = min(free, get_fraction(index) * total - torch.cuda.memory_allocated(index))
    return 1.2 * estimate_tuning_memory_gb(num_frames, (h, w)) > free / 2**30


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor -> device without a blocking copy (pinned memory, non-blocking) on CUDA."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def _snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}


def _assign(unet, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the UNet's parameters of the same names (dtype/device of the UNet)."""
    own = dict(unet.named_parameters())
    missing = sorted(set(tensors) - set(own))
    if missing:
        raise KeyError(f"the UNet has no parameters {missing[:3]}... ({len(missing)} missing)")
    with torch.no_grad():
        for name, value in tensors.items():
            target = own[name]
            if target.shape != value.shape:
                raise KeyError(f"parameter {name}: shape {tuple(value.shape)} != UNet's {tuple(target.shape)}")
            target.copy_(value.to(target.device, target.dtype))


def _collect(history: list[dict], log_fn: LogFn | None) -> LogFn:
    def log(record: dict) -> None:
        history.append(record)
        if log_fn is not None:
            log_fn(record)

    return log


class CheckpointWriter:
    """Writes checkpoints on a background thread while tuning goes on, one at a time, in order.

    Serialising, hashing and writing a checkpoint (about 0.6 GB at SD scale) takes seconds, on
    the writer's thread. :meth:`submit` only queues the copy of the state to the CPU: CUDA
    tensors go into page-locked buffers, made at the first checkpoint and reused by the later
    ones, without waiting for the GPU; the writer waits for those copies before it serialises,
    streaming into the file so that the training thread keeps the GIL (docs/PERFORMANCE.md).
    The copies are queued before the next step's kernels, so they hold the state at
    :meth:`submit`. Each write is atomic (:func:`_save_checkpoint`), so a kill
    mid-write leaves the previous checkpoint. A failed write raises from the next :meth:`submit`
    or from :meth:`close`.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pinned: list[torch.Tensor | None] = []  # the CUDA tensors' CPU copies, in the state's order

    def submit(self, checkpoint_dir: str | Path | None, fingerprint: str, **state) -> None:
        if checkpoint_dir is None:
            return
        self.wait()  # the last write is done with the buffers this copy reuses
        copied: set[torch.device] = set()
        state = self._cpu_copy(state, itertools.count(), copied)
        done = [_recorded_event(device) for device in copied]

        def write() -> None:
            try:
                for event in done:  # the copies have landed
                    event.synchronize()
                _save_checkpoint(checkpoint_dir, fingerprint, **state)
            except BaseException as err:  # re-raised on the training thread
                self._error = err

        self._thread = threading.Thread(target=write, name="eym-checkpoint", daemon=True)
        self._thread.start()

    def _cpu_copy(self, obj, index: Iterator[int], copied: set[torch.device]):
        """``obj`` with every tensor copied to the CPU: a state the training loop can no longer change."""
        if isinstance(obj, torch.Tensor):
            x = obj.detach()
            if x.device.type != "cuda":
                return x.to("cpu", copy=True)
            i = next(index)
            if i == len(self._pinned):
                self._pinned.append(None)
            buffer = self._pinned[i]
            if buffer is None or buffer.shape != x.shape or buffer.dtype != x.dtype:
                buffer = self._pinned[i] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            copied.add(x.device)
            return buffer.copy_(x, non_blocking=True)
        if isinstance(obj, dict):
            return {k: self._cpu_copy(v, index, copied) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._cpu_copy(v, index, copied) for v in obj)
        return obj

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    close = wait


def _recorded_event(device: torch.device) -> torch.cuda.Event:
    """An event behind the work queued so far on ``device``'s current stream."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _save_checkpoint(checkpoint_dir: str | Path | None, fingerprint: str, **state) -> None:
    """Write the resumable state atomically: a kill leaves the previous checkpoint or this one.

    ``torch.save`` streams into the file through a hashing writer: every write releases the
    GIL, so the training thread keeps launching steps meanwhile. (Serialising into memory
    first held the GIL for about a second per 0.6 GB checkpoint and made the whole state
    three more times.) The digest goes in front of the payload once it is known; the one
    atomic rename publishes both together.
    """
    if checkpoint_dir is None:
        return
    with atomic_output(Path(checkpoint_dir) / CHECKPOINT) as tmp, open(tmp, "wb") as f:
        f.write(CHECKPOINT_MAGIC + bytes(32))  # the digest's place
        payload = _HashingWriter(f)
        torch.save({"fingerprint": fingerprint, **state}, payload)
        f.seek(len(CHECKPOINT_MAGIC))
        f.write(payload.sha256.digest())
        f.flush()
        os.fsync(f.fileno())


class _HashingWriter:
    """A write-only file that hashes what passes through it (sha256 releases the GIL on big writes)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _load_checkpoint(checkpoint_dir: str | Path | None, fingerprint: str) -> dict | None:
    """The checkpoint of this job, or ``None`` (none, another job's, or unreadable: start over)."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        ckpt = read_checkpoint(path)
        if ckpt is None:
            logger.warning("ignoring damaged checkpoint %s (sha256 mismatch); tuning starts over", path)
            return None
        if ckpt["fingerprint"] != fingerprint or ckpt["stage"] not in (1, 2):
            logger.warning("ignoring checkpoint %s: it belongs to another tuning job", path)
            return None
        return ckpt
    except Exception as err:  # a torn or foreign file: any unpickling error means "start over"
        logger.warning("ignoring unreadable checkpoint %s (%s); tuning starts over", path, type(err).__name__)
        return None


def read_checkpoint(path: str | Path) -> dict | None:
    """A checkpoint file's state, or ``None`` if its sha256 does not match (a flipped bit, a torn file)."""
    data = Path(path).read_bytes()
    start = len(CHECKPOINT_MAGIC)
    head, digest, payload = data[:start], data[start : start + 32], data[start + 32 :]
    if head != CHECKPOINT_MAGIC or hashlib.sha256(payload).digest() != digest:
        return None
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def config_fingerprint(config: TuneConfig) -> str:
    """Hash of the settings that change the result (part of the tuned-weights cache key)."""
    return stable_hash(config.result_key())


__all__ = [
    "TuneConfig",
    "TuningData",
    "TuneResult",
    "tune_dpl",
    "train_stage",
    "predict_noise",
    "reconstruction_loss",
    "noise_constraint_loss",
    "stage2_loss",
    "trainable_parameters",
    "init_temporal_attention",
    "resolve_mixed_precision",
    "config_fingerprint",
]

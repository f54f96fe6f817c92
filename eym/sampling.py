"""DDIM inversion and two-branch DDIM sampling, as pure functions (k-diffusion style).

METHOD.md "Inference": the source latents are inverted with DDIM (prompt P_s, source skeletons,
no guidance) to z_T^s; then a reconstruction branch and an editing branch are denoised side by
side from that same z_T^s, the editing branch attending to the reconstruction branch's keys and
values in RC-Attn (see :mod:`eym.spacetime`). Finally the editing branch is decoded by the VAE.

Every function here takes the model as an ``eps_fn`` callable::

    eps_fn(latents (B, C, F, h, w), t: int, inject_from: list[int] | None) -> eps (B, C, F, h, w)

built by :func:`make_eps_fn` (which folds frames into the batch and calls ControlNet and the
inflated UNet once per step for all branches), so no model detail reaches the DDIM math.

Notation (code name -> DDIM paper, Song et al. 2021):
    ``t``, ``s``          -> the current and the next noise level (timesteps; -1 = the final level)
    ``alpha_t``           -> alpha_t in DDIM's notation (diffusers' ``alphas_cumprod[t]``, i.e. alpha-bar)
    ``eps``               -> epsilon_theta(x_t, t)
    ``x0``                -> the predicted x_0, "predicted x_0" of Eq. 12
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from eym.graphs import ForwardGraphs
from eym.progress import ProgressCallback
from eym.spacetime import batch_to_frames, frames_to_batch, space_time_kwargs

logger = logging.getLogger(__name__)

EpsFn = Callable[[torch.Tensor, int, "list[int] | None"], torch.Tensor]

__all__ = [
    "EpsFn",
    "ddim_invert",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "decode_video",
    "encode_video",
    "make_eps_fn",
    "sample_two_branch",
]


# ---------------------------------------------------------------------------------------------
# DDIM math
# ---------------------------------------------------------------------------------------------
def ddim_timesteps(scheduler, num_steps: int = 50) -> list[int]:
    """The scheduler's DDIM timesteps for ``num_steps`` steps, descending (e.g. 981, 961, ..., 1).

    Uses a copy of ``scheduler`` so the shared one keeps its state.
    """
    if num_steps < 1 or num_steps > scheduler.config.num_train_timesteps:
        raise ValueError(f"num_steps {num_steps} is not in [1, {scheduler.config.num_train_timesteps}]")
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_steps)
    return [int(t) for t in sched.timesteps]


def _alpha(scheduler, t: int) -> float:
    """alpha-bar at timestep ``t``; ``t < 0`` is the final level (``final_alpha_cumprod``)."""
    return float(scheduler.alphas_cumprod[t]) if t >= 0 else float(scheduler.final_alpha_cumprod)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: float, alpha_s: float) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) from level alpha_t to level alpha_s, either direction.

    Implements Eq. 12 of Song et al. (2021) with sigma_t = 0; inversion uses the same update
    with the levels swapped (Eq. 13's ODE reading of it).
    """
    x0 = (x_t - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5  # Eq. 12, "predicted x_0"
    return alpha_s**0.5 * x0 + (1 - alpha_s) ** 0.5 * eps  # Eq. 12, "direction pointing to x_t"


def _levels(timesteps: Sequence[int]) -> list[int]:
    """Noise levels of a sampling run: the timesteps (descending) then the final level -1."""
    ts = [int(t) for t in timesteps]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts[:5]}...")
    return ts + [-1]


def _report(callback: ProgressCallback | None, stage: str, step: int, total: int) -> None:
    if callback is not None:
        callback(stage, step, total)


@torch.no_grad()
def ddim_invert(
    eps_fn: EpsFn,
    latents: torch.Tensor,
    timesteps: Sequence[int],
    *,
    scheduler,
    callback: ProgressCallback | None = None,
    disable: bool = False,
) -> list[torch.Tensor]:
    """DDIM inversion: clean latents -> z_T, walking the sampling timesteps backwards.

    From level s to the next-noisier level t the update is DDIM's with eps_theta evaluated at
    the known point (x_s, t), the usual approximation of eps_theta(x_t, t) (Tune-A-Video,
    null-text inversion, diffusers' ``DDIMInverseScheduler``); its error shrinks with the step.

    Args:
        eps_fn: ``eps_fn(latents, t, None)``; inversion never injects.
        latents: source latents z_0, ``(B, C, F, h, w)`` (the VAE mean, times 0.18215).
        timesteps: the *sampling* timesteps, descending (:func:`ddim_timesteps`), so that
            :func:`ddim_sample` with the same list retraces the trajectory.
        scheduler: gives the noise schedule (``alphas_cumprod``, ``final_alpha_cumprod``); read only.
        callback: ``callback("inversion", step, total)`` after each step.
        disable: hide the tqdm bar.

    Returns:
        The trajectory ``[z_0, ..., z_T]`` in fp32 (``len(timesteps) + 1`` tensors, least noisy first).
    """
    levels = _levels(timesteps)[::-1]  # -1, t_N, ..., t_1 (ascending)
    x = latents.float()  # the trajectory stays fp32 whatever the model's dtype (METHOD.md)
    trajectory = [x]
    total = len(levels) - 1
    for i in tqdm(range(total), desc="inversion", disable=disable):
        s, t = levels[i], levels[i + 1]
        eps = eps_fn(x, t, None)
        x = ddim_step(x, eps, _alpha(scheduler, s), _alpha(scheduler, t))
        trajectory.append(x)
        _report(callback, "inversion", i + 1, total)
    return trajectory


def _inject_at(inject_steps: Sequence[int] | None, total: int) -> set[int]:
    """Step indices that inject: ``None`` all, else the given indices (checked)."""
    if inject_steps is None:
        return set(range(total))
    steps = {int(i) for i in inject_steps}
    bad = sorted(i for i in steps if not 0 <= i < total)
    if bad:
        raise ValueError(f"inject_steps {bad} are not step indices in [0, {total})")
    return steps


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    z_T: torch.Tensor,
    timesteps: Sequence[int],
    *,
    scheduler,
    inject_from: Sequence[int] | None = None,
    inject_steps: Sequence[int] | None = None,
    callback: ProgressCallback | None = None,
    disable: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM sampling (eta = 0), optionally with key/value injection.

    Args:
        eps_fn: ``eps_fn(latents, t, inject_from_or_None)``.
        z_T: starting latents ``(B, C, F, h, w)``.
        timesteps: descending timesteps (:func:`ddim_timesteps`).
        scheduler: noise schedule source, read only.
        inject_from: per-video injection sources (see :func:`eym.spacetime.space_time_kwargs`),
            passed to ``eps_fn`` on injecting steps; ``None`` never injects.
        inject_steps: the step indices that inject (0 = the noisiest), e.g.
            :meth:`eym.injection.InjectionSchedule.steps`; ``None`` all.
        callback: ``callback("sampling", step, total)`` after each step.
        disable: hide the tqdm bar.

    Returns:
        Latents at the final level, ``(B, C, F, h, w)``, fp32.
    """
    levels = _levels(timesteps)
    total = len(levels) - 1
    injecting = _inject_at(inject_steps, total) if inject_from is not None else set()
    x = z_T.float()  # the trajectory stays fp32 whatever the model's dtype (METHOD.md)
    for i in tqdm(range(total), desc="sampling", disable=disable):
        t, s = levels[i], levels[i + 1]
        eps = eps_fn(x, t, list(inject_from) if i in injecting else None)
        x = ddim_step(x, eps, _alpha(scheduler, t), _alpha(scheduler, s))
        _report(callback, "sampling", i + 1, total)
    return x


def sample_two_branch(
    eps_fn: EpsFn,
    z_T: torch.Tensor,
    timesteps: Sequence[int],
    *,
    scheduler,
    inject_steps: Sequence[int] | None = None,
    callback: ProgressCallback | None = None,
    disable: bool = False,
) -> torch.Tensor:
    """Denoise the reconstruction and the editing branch side by side from the same z_T^s.

    METHOD.md "Inference" 3: the batch is ``[reconstruction, editing]`` and, on injecting
    steps, the editing branch also attends to the reconstruction branch's current-frame keys
    and values (``inject_from = [-1, 0]``). ``eps_fn`` must take a batch of two videos in that
    order (:func:`make_eps_fn` with prompts ``[P_s, P_t]`` and skeletons ``[S_sr, S_rf]``).

    Args:
        eps_fn: see :func:`ddim_sample`.
        z_T: the inverted source latents, ``(1, C, F, h, w)``.
        timesteps: descending timesteps, the ones used for the inversion.
        scheduler: noise schedule source, read only.
        inject_steps: see :func:`ddim_sample`; default all steps.
        callback, disable: progress, see :func:`ddim_sample`.

    Returns:
        ``(2, C, F, h, w)``: index 0 the reconstruction, index 1 the edit.
    """
    if z_T.shape[0] != 1:
        raise ValueError(f"sample_two_branch starts both branches from one video's z_T, got batch {z_T.shape[0]}")
    x = torch.cat([z_T, z_T])  # (2, C, F, h, w): [reconstruction, editing]
    return ddim_sample(
        eps_fn, x, timesteps, scheduler=scheduler, inject_from=[-1, 0], inject_steps=inject_steps,
        callback=callback, disable=disable,
    )


# ---------------------------------------------------------------------------------------------
# The model as an eps_fn
# ---------------------------------------------------------------------------------------------
def _control_tensor(images, num_videos: int, num_frames: int, device, dtype) -> torch.Tensor:
    """Skeleton images -> ``(B*F, 3, H, W)`` float in [0, 1] (ControlNet's input range)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 5 or images.shape[-1] != 3:
            raise ValueError(f"control images as numpy must be uint8 (B, F, H, W, 3), got {images.dtype} {images.shape}")
        images = torch.from_numpy(images).permute(0, 4, 1, 2, 3).float() / 255.0  # -> (B, 3, F, H, W)
    if images.ndim != 5 or images.shape[1] != 3:
        raise ValueError(f"control images must be (B, 3, F, H, W) in [0, 1], got shape {tuple(images.shape)}")
    if images.shape[0] != num_videos or images.shape[2] != num_frames:
        raise ValueError(f"control images are for {images.shape[0]} videos x {images.shape[2]} frames, expected {num_videos} x {num_frames}")
    return frames_to_batch(images.to(device=device, dtype=dtype))


def make_eps_fn(
    unet,
    controlnet,
    *,
    prompt_embeds: torch.Tensor,
    control_images: torch.Tensor | np.ndarray,
    num_frames: int,
    guidance_scale: float = 1.0,
    negative_embeds: torch.Tensor | None = None,
    controlnet_scale: float = 1.0,
    cuda_graphs: bool = False,
) -> EpsFn:
    """Build ``eps_fn(latents, t, inject_from)`` from an inflated UNet and a 2D ControlNet.

    Everything per-video (prompt embeddings repeated per frame, skeleton images folded into the
    batch, the guidance batch) is prepared once here, not at every step. Each call runs the
    ControlNet once and the UNet once for all videos (and both guidance halves).

    Args:
        unet: an inflated UNet (:func:`eym.spacetime.inflate`).
        controlnet: the ControlNet, 2D (it sees every frame on its own).
        prompt_embeds: ``(B, 77, D)``, one prompt per video of the latents batch (for two-branch
            sampling: ``[P_s, P_t]``).
        control_images: skeletons, ``(B, 3, F, H, W)`` float in [0, 1] or uint8 numpy
            ``(B, F, H, W, 3)``, with H, W = 8x the latent size.
        num_frames: F.
        guidance_scale: classifier-free guidance w; 1 (the paper: no guidance) runs no
            unconditional pass. With w > 1 the batch doubles to ``[uncond..., cond...]`` and
            injection sources are remapped into each half explicitly.
        negative_embeds: ``(B or 1, 77, D)`` unconditional embeddings; required if w > 1.
        controlnet_scale: multiplies the ControlNet residuals.
        cuda_graphs: on a CUDA device, replay the model call as CUDA graphs, one per injection
            pattern (:class:`eym.graphs.ForwardGraphs`); the attention processors installed
            when ``eps_fn`` is first called must stay installed while it is used.

    Returns:
        The callable; the latents are cast to the UNet's dtype only for the model call, and eps
        comes back in fp32, ``(B, C, F, h, w)``.
    """
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    B = prompt_embeds.shape[0]
    guided = guidance_scale != 1.0
    if guided and negative_embeds is None:
        raise ValueError(f"guidance_scale {guidance_scale} needs negative_embeds (the empty prompt's embeddings)")

    embeds = prompt_embeds.to(device, dtype)
    cond = _control_tensor(control_images, B, num_frames, device, dtype)  # (B*F, 3, H, W)
    if guided:
        negative = negative_embeds.to(device, dtype).expand(B, -1, -1)
        embeds = torch.cat([negative, embeds])  # (2B, 77, D): [uncond..., cond...]
        cond = torch.cat([cond, cond])
    embeds = embeds.repeat_interleave(num_frames, dim=0)  # (B'*F, 77, D), frame-major within a video
    videos = embeds.shape[0] // num_frames

    def eps_fn(latents: torch.Tensor, t: int, inject_from: Sequence[int] | None) -> torch.Tensor:
        if latents.shape[0] != B or latents.shape[2] != num_frames:
            raise ValueError(f"eps_fn was built for {B} videos x {num_frames} frames, got {tuple(latents.shape)}")
        x = latents.to(device, dtype)
        if guided:
            x = torch.cat([x, x])
            if inject_from is not None:  # each half injects from its own half
                inject_from = list(inject_from) + [j + B if j >= 0 else -1 for j in inject_from]
        x = frames_to_batch(x)  # (B'*F, C, h, w)
        # a device tensor made on the device: an int would become a blocking host-to-device copy
        t = torch.full((), int(t), dtype=torch.long, device=device) if not torch.is_tensor(t) else t
        call = functools.partial(model_call, inject_from=inject_from)
        if graphs is not None:
            eps = graphs(None if inject_from is None else tuple(inject_from), call, x, t)
        else:
            eps = call(x, t)
        eps = batch_to_frames(eps, num_frames)  # (B', C, F, h, w)
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # classifier-free guidance
        # the DDIM update runs in fp32 (a bf16 latent state drifts); a copy, never a graph's buffer
        return eps.to(torch.float32, copy=True)

    def model_call(x: torch.Tensor, t: torch.Tensor, *, inject_from: Sequence[int] | None) -> torch.Tensor:
        """ControlNet, then the space-time UNet: eps for the (B'*F, C, h, w) frames."""
        down, mid = controlnet(
            x, t, encoder_hidden_states=embeds, controlnet_cond=cond, conditioning_scale=controlnet_scale, return_dict=False
        )
        return unet(
            x, t, encoder_hidden_states=embeds, down_block_additional_residuals=down, mid_block_additional_residual=mid,
            cross_attention_kwargs=space_time_kwargs(num_frames, inject_from),
        ).sample

    graphs = ForwardGraphs() if (cuda_graphs and device.type == "cuda") else None

    logger.debug("eps_fn: %d videos x %d frames per UNet call, guidance %.2f", videos, num_frames, guidance_scale)
    return eps_fn


# ---------------------------------------------------------------------------------------------
# VAE, in chunks of frames
# ---------------------------------------------------------------------------------------------
def _frames_tensor(frames, device, dtype) -> torch.Tensor:
    """uint8 ``(F, H, W, 3)`` (numpy or torch) -> float ``(F, 3, H, W)`` in [-1, 1]."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got shape {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2).to(device=device, dtype=torch.float32)  # (F, 3, H, W)
    if frames.dtype == torch.uint8:
        x = x / 127.5 - 1.0
    return x.to(dtype)


@torch.no_grad()
def encode_video(
    vae,
    frames: np.ndarray | torch.Tensor,
    *,
    chunk: int = 8,
    generator: torch.Generator | None = None,
    sample: bool = False,
) -> torch.Tensor:
    """Frames -> SD latents, ``chunk`` frames per VAE call.

    Args:
        vae: ``AutoencoderKL``.
        frames: uint8 ``(F, H, W, 3)`` RGB (numpy or torch; a float tensor is taken as [-1, 1]).
            H and W must be multiples of 8.
        chunk: frames per VAE call (memory bound; the result does not depend on it).
        generator: used only with ``sample=True``.
        sample: draw from the latent distribution (training) instead of taking its mean
            (inversion: the deterministic choice).

    Returns:
        ``(1, 4, F, H/8, W/8)`` latents, times the VAE's scaling factor (0.18215 for SD 1.5).
    """
    param = next(vae.parameters())
    x = _frames_tensor(frames, param.device, param.dtype)
    if chunk < 1:
        raise ValueError(f"chunk {chunk} must be >= 1")
    parts = []
    for start in range(0, x.shape[0], chunk):
        dist = vae.encode(x[start : start + chunk]).latent_dist
        parts.append(dist.sample(generator=generator) if sample else dist.mean)
    latents = torch.cat(parts) * vae.config.scaling_factor  # (F, 4, h, w)
    return batch_to_frames(latents, latents.shape[0])  # (1, 4, F, h, w)


@torch.no_grad()
def decode_video(
    vae, latents: torch.Tensor, *, chunk: int = 8, callback: ProgressCallback | None = None
) -> np.ndarray:
    """SD latents -> uint8 frames, ``chunk`` frames per VAE call.

    Args:
        vae: ``AutoencoderKL``.
        latents: ``(1, 4, F, h, w)``, scaled as :func:`encode_video` returns them.
        chunk: frames per VAE call (the result does not depend on it).
        callback: ``callback("decode", frames_done, total_frames)`` after each chunk.

    Returns:
        ``(F, 8h, 8w, 3)`` uint8 RGB.
    """
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"decode_video takes one video's latents (1, C, F, h, w), got shape {tuple(latents.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk {chunk} must be >= 1")
    param = next(vae.parameters())
    z = frames_to_batch(latents).to(param.device, param.dtype) / vae.config.scaling_factor  # (F, 4, h, w)
    parts = []
    for start in range(0, z.shape[0], chunk):
        parts.append(vae.decode(z[start : start + chunk]).sample)
        _report(callback, "decode", min(start + chunk, z.shape[0]), z.shape[0])
    images = torch.cat(parts).float().clamp(-1, 1)  # (F, 3, H, W)
    images = ((images + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()  # (F, H, W, 3)

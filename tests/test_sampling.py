"""eym.sampling: DDIM inversion round trip, two-branch sampling, guidance layout, VAE chunks."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from eym.sampling import (
    ddim_invert,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    decode_video,
    encode_video,
    make_eps_fn,
    sample_two_branch,
)
from eym.injection import InjectionSchedule
from eym.spacetime import attention_processors, inflate, injection_processors

FRAMES = 3




def _embed(components, prompts):
    tok = components.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return components.text_encoder(ids)[0]  # (B, 77, D)


def _skeletons(num_videos, seed):
    """Random sparse 'skeleton' images, uint8 (B, F, 64, 64, 3)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((num_videos, FRAMES, 64, 64, 3), np.uint8)
    for b in range(num_videos):
        for f in range(FRAMES):
            x, y = rng.integers(8, 56, size=2)
            images[b, f, y - 6 : y + 6, x - 2 : x + 2] = rng.integers(64, 255, size=3)
    return images


@pytest.fixture(scope="module")
def model(tiny_components):
    """(components, inflated UNet copy, source latents (1, 4, F, 8, 8))."""
    unet = inflate(copy.deepcopy(tiny_components.unet))
    rng = np.random.default_rng(0)
    frames = np.clip(rng.normal(128, 40, size=(FRAMES, 64, 64, 3)), 0, 255).astype(np.uint8)
    latents = encode_video(tiny_components.vae, frames)
    return tiny_components, unet, latents


def _eps_fn(model, prompts, skeleton_seeds, **kw):
    components, unet, _ = model
    control = np.concatenate([_skeletons(1, s) for s in skeleton_seeds])
    return make_eps_fn(unet, components.controlnet, prompt_embeds=_embed(components, prompts), control_images=control,
                       num_frames=FRAMES, **kw)


def test_ddim_step_inverts_itself():
    x = torch.randn(1, 4, 2, 3, 3)
    eps = torch.randn_like(x)
    y = ddim_step(x, eps, 0.9, 0.3)
    assert torch.allclose(ddim_step(y, eps, 0.3, 0.9), x, atol=1e-5)


def test_timesteps_match_diffusers_ddim(tiny_components):
    sched = tiny_components.scheduler
    ts = ddim_timesteps(sched, 50)
    assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50
    # one sampling run equals diffusers' DDIMScheduler.step (eta 0) on the same eps model
    eps_model = lambda x, t: torch.sin(x * (1 + t / 1000))  # noqa: E731  any smooth function of (x, t)
    x0 = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = ddim_sample(lambda x, t, inj: eps_model(x, t), x0, ddim_timesteps(sched, 10), scheduler=sched, disable=True)
    ref_sched = copy.deepcopy(sched)
    ref_sched.set_timesteps(10)
    ref = x0
    for t in ref_sched.timesteps:
        ref = ref_sched.step(eps_model(ref, int(t)), t, ref, eta=0.0).prev_sample
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)  # float32: values reach ~20 here


def test_inversion_round_trip_error_falls_with_steps(model):
    """Invert, then sample with the same prompt and skeletons: the source comes back, better with more steps.

    The steps span the same noise range (981 -> 1) at every count, so only the step size
    changes. Latents are unit-variance like SD's (the tiny VAE's are ~20x smaller, which would
    only scale the relative error). A random-weight UNet is a poor denoiser, so the error is
    far larger than with SD 1.5; its decrease is the property under test.
    """
    components, _, _ = model
    latents = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(0))
    eps_fn = _eps_fn(model, ["a man dancing"], [1])
    errors = []
    for steps in (5, 20, 50):
        ts = [int(round(t)) for t in np.linspace(981, 1, steps)]
        calls = []
        trajectory = ddim_invert(eps_fn, latents, ts, scheduler=components.scheduler, disable=True,
                                 callback=lambda *a: calls.append(a))
        assert len(trajectory) == steps + 1 and torch.equal(trajectory[0], latents)
        assert calls[-1] == ("inversion", steps, steps)
        recon = ddim_sample(eps_fn, trajectory[-1], ts, scheduler=components.scheduler, disable=True)
        errors.append(((recon - latents).abs().mean() / latents.abs().mean()).item())
    assert errors[0] > 1.5 * errors[1] > 1.5 * 1.5 * errors[2], errors


def test_inversion_round_trip_of_a_smooth_model_is_accurate(tiny_components):
    """The same with a smooth, well-behaved eps model: 50 SD-style steps reconstruct within 6 %."""
    sched = tiny_components.scheduler
    latents = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(1))
    eps_fn = lambda x, t, inject_from: 0.5 * torch.tanh(x)  # noqa: E731
    ts = ddim_timesteps(sched, 50)
    z_T = ddim_invert(eps_fn, latents, ts, scheduler=sched, disable=True)[-1]
    recon = ddim_sample(eps_fn, z_T, ts, scheduler=sched, disable=True)
    assert ((recon - latents).abs().mean() / latents.abs().mean()) < 0.06


def test_trajectory_stays_fp32_with_a_bf16_model(model):
    """bf16 UNet and ControlNet: eps comes back fp32 and every latent of the trajectory is fp32;
    the bf16 model's round-trip error is within one point of the fp32 model's (the random tiny
    UNet is a poor denoiser, so the error itself is large; measured 0.8137 vs 0.8120)."""
    components, unet, _ = model
    sched = components.scheduler
    latents = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = ddim_timesteps(sched, 10)
    control = _skeletons(1, 1)
    embeds = _embed(components, ["a man dancing"])
    fp32_fn = make_eps_fn(unet, components.controlnet, prompt_embeds=embeds, control_images=control, num_frames=FRAMES)
    bf16_fn = make_eps_fn(copy.deepcopy(unet).to(torch.bfloat16), copy.deepcopy(components.controlnet).to(torch.bfloat16),
                          prompt_embeds=embeds, control_images=control, num_frames=FRAMES)
    assert bf16_fn(latents, int(ts[0]), None).dtype == torch.float32
    runs = {}
    for name, eps_fn in (("fp32", fp32_fn), ("bf16", bf16_fn)):
        trajectory = ddim_invert(eps_fn, latents.to(torch.bfloat16), ts, scheduler=sched, disable=True)
        assert all(x.dtype == torch.float32 for x in trajectory), name
        recon = ddim_sample(eps_fn, trajectory[-1].to(torch.bfloat16), ts, scheduler=sched, disable=True)
        assert recon.dtype == torch.float32
        runs[name] = float((recon - latents).abs().mean() / latents.abs().mean())
    assert abs(runs["bf16"] - runs["fp32"]) < 0.01, runs


def test_bf16_model_round_trip_bound_with_an_analytic_denoiser(tiny_components):
    """An exact-in-spirit analytic eps evaluated in bf16 (as a bf16 UNet would): with the fp32
    state the round trip is as accurate as in fp32 (within 0.2 points of relative error)."""
    sched = tiny_components.scheduler
    latents = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(1))
    ts = ddim_timesteps(sched, 50)

    def bf16_eps(x, t, inject_from):
        return (0.5 * torch.tanh(x.to(torch.bfloat16))).float()  # model in bf16, eps back in fp32

    errors = {}
    for name, eps_fn in (("fp32", lambda x, t, inj: 0.5 * torch.tanh(x)), ("bf16", bf16_eps)):
        z_T = ddim_invert(eps_fn, latents, ts, scheduler=sched, disable=True)[-1]
        recon = ddim_sample(eps_fn, z_T, ts, scheduler=sched, disable=True)
        errors[name] = float((recon - latents).abs().mean() / latents.abs().mean())
    assert errors["bf16"] < 0.06 and abs(errors["bf16"] - errors["fp32"]) < 0.002, errors


def test_two_branch_sampling_injects_and_keeps_the_reconstruction(model):
    components, _, latents = model
    ts = ddim_timesteps(components.scheduler, 8)
    single = _eps_fn(model, ["a man dancing"], [1])
    z_T = ddim_invert(single, latents, ts, scheduler=components.scheduler, disable=True)[-1]
    plain = ddim_sample(single, z_T, ts, scheduler=components.scheduler, disable=True)
    same = _eps_fn(model, ["a man dancing", "a man dancing"], [1, 1])
    out = sample_two_branch(same, z_T, ts, scheduler=components.scheduler, disable=True)
    assert out.shape == (2, 4, FRAMES, 8, 8)
    # Eq. 18 literally (the default) weighs the current frame twice: identical inputs, other output
    assert (out[0] - out[1]).abs().max() > 1e-4 and (out[0] - plain[0]).abs().max() < 1e-4
    unet = model[1]
    with attention_processors(unet, injection_processors(unet, InjectionSchedule(), "balanced")):
        balanced = sample_two_branch(same, z_T, ts, scheduler=components.scheduler, disable=True)
    assert (balanced[0] - balanced[1]).abs().max() < 1e-5
    # a real edit (other prompt and skeletons): the reconstruction branch is untouched by it,
    # the editing branch changes, and injection matters for it
    edit = _eps_fn(model, ["a man dancing", "a woman jumping"], [1, 2])
    both = sample_two_branch(edit, z_T, ts, scheduler=components.scheduler, disable=True)
    # (batch of 2 vs 1: float32 BLAS sums in another order, amplified over 8 steps -> 1e-4)
    assert (both[0] - plain[0]).abs().max() < 1e-4
    assert (both[1] - both[0]).abs().max() > 1e-3
    no_injection = sample_two_branch(edit, z_T, ts, scheduler=components.scheduler, inject_steps=[], disable=True)
    assert (no_injection[1] - both[1]).abs().max() > 1e-4
    half = sample_two_branch(edit, z_T, ts, scheduler=components.scheduler, inject_steps=[0, 1, 2, 3], disable=True)
    assert torch.equal(no_injection[0], half[0]) and not torch.equal(half[1], both[1])


def test_inject_steps_are_passed_to_eps_fn():
    seen = []

    def eps_fn(x, t, inject_from):
        seen.append((t, inject_from))
        return torch.zeros_like(x)

    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, steps_offset=1)
    ts = ddim_timesteps(sched, 4)
    sample_two_branch(eps_fn, torch.zeros(1, 4, 2, 2, 2), ts, scheduler=sched, inject_steps=[0, 2], disable=True)
    assert seen == [(ts[0], [-1, 0]), (ts[1], None), (ts[2], [-1, 0]), (ts[3], None)]
    with pytest.raises(ValueError, match=r"\[7\]"):
        sample_two_branch(eps_fn, torch.zeros(1, 4, 2, 2, 2), ts, scheduler=sched, inject_steps=[7], disable=True)


def test_guidance_batches_and_remaps_injection(model):
    """w > 1: one UNet call of [uncond x2, cond x2], each half injecting within itself."""
    components, unet, latents = model
    negative = _embed(components, [""])
    eps_fn = _eps_fn(model, ["a man dancing", "a man dancing"], [1, 1], guidance_scale=3.0, negative_embeds=negative)
    seen = []
    proc = next(p for n, p in unet.attn_processors.items() if n.endswith("attn1.processor"))
    original = type(proc).__call__

    @functools.wraps(original)  # diffusers passes only the kwargs the signature names
    def spy(self, attn, hidden_states, *a, inject_from=None, **kw):
        seen.append((hidden_states.shape[0], inject_from))
        return original(self, attn, hidden_states, *a, inject_from=inject_from, **kw)

    x = torch.cat([latents, latents])
    type(proc).__call__ = spy
    try:
        with attention_processors(unet, injection_processors(unet, InjectionSchedule(), "balanced")):
            eps = eps_fn(x, 500, [-1, 0])
    finally:
        type(proc).__call__ = original
    assert seen and all(s == (4 * FRAMES, [-1, 0, -1, 2]) for s in seen)
    assert (eps[0] - eps[1]).abs().max() < 1e-5  # identical branches stay identical under guidance (balanced)
    # guidance really extrapolates: eps differs from the unguided prediction
    with attention_processors(unet, injection_processors(unet, InjectionSchedule(), "balanced")):
        unguided = _eps_fn(model, ["a man dancing", "a man dancing"], [1, 1])(x, 500, [-1, 0])
    assert (eps - unguided).abs().max() > 1e-4
    with pytest.raises(ValueError, match="negative_embeds"):
        _eps_fn(model, ["a"], [1], guidance_scale=2.0)


def test_sampling_is_seeded_reproducible(model):
    components, _, _ = model
    ts = ddim_timesteps(components.scheduler, 4)
    eps_fn = _eps_fn(model, ["a man dancing", "a woman jumping"], [1, 2])

    def run(seed):
        z_T = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(seed))
        return sample_two_branch(eps_fn, z_T, ts, scheduler=components.scheduler, disable=True)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_encode_decode_shapes_and_chunk_invariance(tiny_components):
    vae = tiny_components.vae
    frames = np.random.default_rng(1).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    a = encode_video(vae, frames, chunk=1)
    b = encode_video(vae, frames, chunk=8)
    assert a.shape == (1, 4, 5, 8, 8)
    assert torch.allclose(a, b, atol=1e-5)
    # the mean, scaled by SD's 0.18215
    mean = vae.encode(torch.from_numpy(frames[:1]).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
    assert torch.allclose(a[:, :, 0], mean * 0.18215, atol=1e-5)
    # sampling from the latent distribution is seeded
    s1 = encode_video(vae, frames, sample=True, generator=torch.Generator().manual_seed(0))
    s2 = encode_video(vae, frames, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2) and not torch.equal(s1, a)
    progress = []
    video = decode_video(vae, a, chunk=2, callback=lambda *p: progress.append(p))
    assert video.shape == (5, 64, 64, 3) and video.dtype == np.uint8
    assert progress == [("decode", 2, 5), ("decode", 4, 5), ("decode", 5, 5)]
    assert np.abs(video.astype(int) - decode_video(vae, a, chunk=8).astype(int)).max() <= 1
    with pytest.raises(ValueError, match="one video"):
        decode_video(vae, torch.cat([a, a]))
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        encode_video(vae, frames[0])

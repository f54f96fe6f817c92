"""Data routing of the method (METHOD.md "Properties"): what each model call sees, pinned without real weights.

Recording doubles wrap the real tiny models (forward pre-hooks on the UNet and the ControlNet, a
spy on the scheduler's ``add_noise``), and the inputs carry their identity: latent frame f is
filled with the value f (masked latents: 100 + f), skeleton frame f of the source with the
pixel value 10 + f and of the reference with 100 + f, and P_c, P_s, P_t have different
embeddings. Every deliberately broken variant below was tried (then reverted) and fails the
named tests:

1. inversion evaluates the noise at the wrong timestep (``eps_fn(x, s, None)``, the less noisy level):
   test_inversion_matches_diffusers_ddim_inverse_scheduler, test_inference_routes_prompts_skeletons_and_the_decoded_branch
2. stage-1 skeletons not shuffled with the latents (``control = data.control_images``):
   test_stage1_shuffles_latents_and_skeletons_alike_with_the_mask_and_p_c
3. stage 1 with P_s instead of P_c (in tuning: test_stage1_shuffles_latents_and_skeletons_alike_with_the_mask_and_p_c;
   in Editor._tuning_data: test_editor_prepares_masked_latents_p_c_and_p_s_for_tuning)
4. stage 1 without the mask (``latents = data.latents`` in tuning: test_stage1_shuffles_...; ``masked_latents=latents``
   in Editor._tuning_data: test_editor_prepares_masked_latents_p_c_and_p_s_for_tuning)
5. the branches' skeletons swapped: test_inference_routes_prompts_skeletons_and_the_decoded_branch,
   test_preview_shows_the_skeletons_that_drive_the_edit
6. P_s given to the editing branch (``embeds[[0, 0]]``): test_inference_routes_prompts_skeletons_and_the_decoded_branch
7. stage 2 shuffled (``if config.shuffle:``): test_stage2_sees_ordered_frames_and_p_s
8. the reconstruction branch decoded (``both[0:1]``): test_inference_routes_prompts_skeletons_and_the_decoded_branch
Also: a preset retargeted a second time (``fitted_to`` not set): test_preview_shows_the_skeletons_that_drive_the_edit;
injection processors left on the shared UNet: test_injection_settings_live_for_one_call_only; a bf16 latent
state (no ``.float()`` in ddim_invert): tests/test_sampling.py::test_trajectory_stays_fp32_with_a_bf16_model,
test_bf16_models_keep_an_fp32_trajectory_and_cache.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eym.editor import Editor, InferConfig
from eym.prompts import Prompts, encode_prompts
from eym.motion import motion_skeletons
from eym.errors import EymError
from eym.injection import InjectionSchedule
from eym.sampling import ddim_invert, ddim_timesteps
from eym.spacetime import batch_to_frames, inflate
from eym.tuning import TuneConfig, TuningData, tune_dpl

F = 4  # frames
SIZE = 64  # pixels; the tiny VAE gives 8x8 latents
PROMPTS = Prompts(
    content="A man in a red coat.",
    source="A man in a red coat is walking in a park.",
    target="A man in a red coat is jumping in a park.",
)


# ---------------------------------------------------------------------------------------------
# recording doubles
# ---------------------------------------------------------------------------------------------
class Recorder:
    """Forward pre-hooks on the UNet and the ControlNet: what each call received, in call order."""

    def __init__(self, unet, controlnet):
        self.unet_calls: list[dict] = []
        self.controlnet_calls: list[dict] = []
        self._handles = [
            unet.register_forward_pre_hook(self._unet, with_kwargs=True),
            controlnet.register_forward_pre_hook(self._controlnet, with_kwargs=True),
        ]

    def _unet(self, module, args, kwargs):
        kw = kwargs.get("cross_attention_kwargs") or {}
        self.unet_calls.append({
            "sample": args[0].detach().clone(),
            "t": int(args[1].flatten()[0]) if torch.is_tensor(args[1]) else int(args[1]),
            "text": kwargs["encoder_hidden_states"].detach().float().clone(),
            "num_frames": kw.get("num_frames"),
            "inject_from": kw.get("inject_from"),
        })

    def _controlnet(self, module, args, kwargs):
        self.controlnet_calls.append({
            "cond": kwargs["controlnet_cond"].detach().float().clone(),
            "text": kwargs["encoder_hidden_states"].detach().float().clone(),
        })

    def close(self):
        for h in self._handles:
            h.remove()


def frame_ids(cond: torch.Tensor) -> list[int]:
    """Skeleton identities of a ControlNet input (B*F, 3, H, W): the pixel value of each frame."""
    return [int(round(float(v))) for v in (cond[:, 0].mean(dim=(1, 2)) * 255)]


def latent_ids(z: torch.Tensor) -> list[int]:
    """Latent identities of (1, C, F, h, w): the value each frame is filled with."""
    return [int(round(float(v))) for v in z[0].mean(dim=(0, 2, 3))]


def same_text(text: torch.Tensor, embeds: torch.Tensor) -> bool:
    """``text`` (n*F, 77, D) is ``embeds`` (1, 77, D) repeated for every frame."""
    return torch.allclose(text, embeds.float().expand_as(text), atol=1e-5)


def skeleton_clip(base: int, *, frames=None, keypoints=None, masks=None, content_hash: str):
    """A clip whose skeleton frame f has every pixel (channel 0) at ``base + f``."""
    skeletons = np.zeros((F, SIZE, SIZE, 3), np.uint8)
    for f in range(F):
        skeletons[f, :, :, 0] = base + f
    if frames is None:
        frames = np.random.default_rng(base).integers(0, 256, (F, SIZE, SIZE, 3), dtype=np.uint8)
    return SimpleNamespace(frames=frames, skeletons=skeletons, masks=masks, keypoints=keypoints, fps=8.0,
                           content_hash=content_hash, path=None)


@pytest.fixture(scope="module")
def components(tiny_bundle):
    """This module's own tiny model (tuning and the Editor change its UNet)."""
    from eym.models import load_components

    return load_components(str(tiny_bundle), device="cpu")


# ---------------------------------------------------------------------------------------------
# inversion: the timestep pairs of diffusers' DDIMInverseScheduler
# ---------------------------------------------------------------------------------------------
def test_inversion_matches_diffusers_ddim_inverse_scheduler(components):
    """With a timestep-dependent analytic noise model, ddim_invert == DDIMInverseScheduler's loop,
    and eps is asked for at exactly the scheduler's timesteps (the noisier end of each step)."""
    from diffusers import DDIMInverseScheduler

    sched = components.scheduler
    x0 = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))

    def eps_model(x, t):
        return torch.sin(x * (1 + t / 250)) * (0.2 + t / 1000)  # depends strongly on t

    asked = []

    def eps_fn(x, t, inject_from):
        asked.append(int(t))
        return eps_model(x, t)

    steps = 10
    ours = ddim_invert(eps_fn, x0, ddim_timesteps(sched, steps), scheduler=sched, disable=True)[-1]
    inverse = DDIMInverseScheduler.from_config(sched.config)
    inverse.set_timesteps(steps)
    ref, expected = x0, []
    for t in inverse.timesteps:
        expected.append(int(t))
        ref = inverse.step(eps_model(ref, int(t)), t, ref).prev_sample
    assert asked == expected
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# tuning: what stage 1 and stage 2 see
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuning_run(components):
    """Run DPL (3 + 3 steps) on identity-carrying data; record every model call and every z_0."""
    unet = inflate(copy.deepcopy(components.unet))
    controlnet = components.controlnet
    scheduler = copy.deepcopy(components.scheduler)
    clean = []
    real_add_noise = scheduler.add_noise

    def add_noise(z_0, noise, t):
        clean.append(z_0.detach().clone())
        return real_add_noise(z_0, noise, t)

    scheduler.add_noise = add_noise
    gen = torch.Generator().manual_seed(0)
    latents = torch.arange(F, dtype=torch.float32).view(1, 1, F, 1, 1).expand(1, 4, F, 8, 8).contiguous()
    control = torch.zeros(F, 3, SIZE, SIZE)
    for f in range(F):
        control[f, 0] = (10 + f) / 255
    data = TuningData(
        latents=latents,
        masked_latents=latents + 100,
        control_images=control,
        content_embeds=torch.randn(1, 77, components.text_encoder.config.hidden_size, generator=gen),
        source_embeds=torch.randn(1, 77, components.text_encoder.config.hidden_size, generator=gen),
    )
    config = TuneConfig(steps1=3, steps2=3, lr=1e-6, checkpoint_every=0, seed=1)
    recorder = Recorder(unet, controlnet)
    try:
        tune_dpl(unet, controlnet, scheduler, data, config, disable=True)
    finally:
        recorder.close()
    return data, clean, recorder


def test_stage1_shuffles_latents_and_skeletons_alike_with_the_mask_and_p_c(tuning_run):
    data, clean, rec = tuning_run
    orders = []
    for step in range(3):
        z_ids = latent_ids(clean[step])
        assert all(z >= 100 for z in z_ids), f"stage 1 step {step} trained on unmasked latents {z_ids}"
        order = [z - 100 for z in z_ids]
        assert sorted(order) == list(range(F))
        # the ControlNet sees the skeleton of the same frame as each latent: one permutation
        assert [s - 10 for s in frame_ids(rec.controlnet_calls[step]["cond"])] == order
        assert same_text(rec.unet_calls[step]["text"], data.content_embeds), "stage 1 must use P_c"
        assert same_text(rec.controlnet_calls[step]["text"], data.content_embeds)
        orders.append(order)
    assert any(o != list(range(F)) for o in orders), f"stage 1 never shuffled: {orders}"


def test_stage2_sees_ordered_frames_and_p_s(tuning_run):
    data, clean, rec = tuning_run
    assert len(clean) == len(rec.unet_calls) == 6
    for step in range(3, 6):
        assert latent_ids(clean[step]) == list(range(F)), "stage 2 trains on the ordered, unmasked video"
        assert frame_ids(rec.controlnet_calls[step]["cond"]) == [10 + f for f in range(F)]
        assert same_text(rec.unet_calls[step]["text"], data.source_embeds), "stage 2 must use P_s"
        assert same_text(rec.controlnet_calls[step]["text"], data.source_embeds)
        assert rec.unet_calls[step]["num_frames"] == F and rec.unet_calls[step]["inject_from"] is None


def test_editor_prepares_masked_latents_p_c_and_p_s_for_tuning(components, tmp_path):
    """Editor._tuning_data: Z^M = E(U * M) (Eq. 10-11), P_c and P_s embeddings, the source skeletons."""
    from eym.sampling import encode_video

    editor = Editor(components, cache_dir=tmp_path, disable_progress=True)
    masks = np.zeros((F, SIZE, SIZE), bool)
    masks[:, 16:48, 20:44] = True
    source = skeleton_clip(10, masks=masks, content_hash="src")
    data = editor._tuning_data(source, PROMPTS, TuneConfig())
    c = components
    expected_masked = encode_video(c.vae, (source.frames * masks[..., None]).astype(np.uint8))
    assert torch.allclose(data.masked_latents, expected_masked, atol=1e-6)
    assert torch.allclose(data.latents, encode_video(c.vae, source.frames), atol=1e-6)
    assert not torch.allclose(data.masked_latents, data.latents)
    p_c, p_s = encode_prompts(c.tokenizer, c.text_encoder, [PROMPTS.content, PROMPTS.source]).split(1)
    assert torch.allclose(data.content_embeds, p_c) and torch.allclose(data.source_embeds, p_s)
    assert frame_ids(data.control_images) == [10 + f for f in range(F)]


# ---------------------------------------------------------------------------------------------
# inference: inversion, both branches, the decoded branch
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned_editor(components, tmp_path_factory):
    editor = Editor(components, cache_dir=tmp_path_factory.mktemp("tuned"), disable_progress=True)
    source = skeleton_clip(10, content_hash="routing-source")
    tuned = editor.tune(source, PROMPTS, TuneConfig(steps1=1, steps2=1, checkpoint_every=0))
    return editor, source, tuned


def test_inference_routes_prompts_skeletons_and_the_decoded_branch(tuned_editor, monkeypatch):
    import eym.sampling as sampling

    editor, source, tuned = tuned_editor
    c = editor.components
    reference = skeleton_clip(100, content_hash="routing-reference")
    p_s, p_t = encode_prompts(c.tokenizer, c.text_encoder, [PROMPTS.source, PROMPTS.target]).split(1)
    assert not torch.allclose(p_s, p_t)
    branches, decoded = [], []
    real_two_branch, real_decode = sampling.sample_two_branch, sampling.decode_video

    def two_branch(*args, **kwargs):
        out = real_two_branch(*args, **kwargs)
        branches.append(out.clone())
        return out

    def decode(vae, latents, **kwargs):
        decoded.append(latents.clone())
        return real_decode(vae, latents, **kwargs)

    monkeypatch.setattr(sampling, "sample_two_branch", two_branch)
    monkeypatch.setattr(sampling, "decode_video", decode)
    config = InferConfig(ddim_steps=3, retarget=False, injection=InjectionSchedule(start_step=1))
    editor._inversions.clear()
    recorder = Recorder(c.unet, c.controlnet)
    try:
        editor.infer(source, reference, PROMPTS, tuned, config)
    finally:
        recorder.close()
    timesteps = ddim_timesteps(c.scheduler, 3)
    unet_calls, cn_calls = recorder.unet_calls, recorder.controlnet_calls
    assert len(unet_calls) == len(cn_calls) == 6  # 3 inversion steps, then 3 steps of both branches

    # inversion: one video, P_s, the source skeletons, no injection, timesteps ascending
    for call, cn in zip(unet_calls[:3], cn_calls[:3]):
        assert call["sample"].shape[0] == F and call["inject_from"] is None
        assert same_text(call["text"], p_s) and same_text(cn["text"], p_s)
        assert frame_ids(cn["cond"]) == [10 + f for f in range(F)]
    assert [call["t"] for call in unet_calls[:3]] == timesteps[::-1]

    # both branches: [reconstruction (P_s, S_sr), editing (P_t, S_rf)], injecting from step 1 on
    for step, (call, cn) in enumerate(zip(unet_calls[3:], cn_calls[3:])):
        assert call["t"] == timesteps[step]
        assert call["sample"].shape[0] == 2 * F
        assert same_text(call["text"][:F], p_s) and same_text(cn["text"][:F], p_s), "reconstruction branch: P_s"
        assert same_text(call["text"][F:], p_t) and same_text(cn["text"][F:], p_t), "editing branch: P_t"
        assert frame_ids(cn["cond"][:F]) == [10 + f for f in range(F)], "reconstruction branch: source skeletons"
        assert frame_ids(cn["cond"][F:]) == [100 + f for f in range(F)], "editing branch: reference skeletons"
        assert call["inject_from"] == (None if step == 0 else [-1, 0])
        # both branches start from the same z_T^s
        if step == 0:
            start = batch_to_frames(call["sample"], F)
            assert torch.equal(start[0], start[1])

    # the editing branch is decoded, not the reconstruction
    assert len(branches) == len(decoded) == 1
    assert not torch.allclose(branches[0][0], branches[0][1])
    assert torch.equal(decoded[0], branches[0][1:2])


def test_bf16_models_keep_an_fp32_trajectory_and_cache(tiny_bundle, tmp_path, monkeypatch):
    """The Editor on a bf16 tiny model (CPU): the inverted latents, every latent of the inversion,
    eps, the branches and the cached z_T are fp32; only the model calls run in bf16."""
    import eym.sampling as sampling
    from eym.models import load_components

    c = load_components(str(tiny_bundle), dtype=torch.bfloat16, device="cpu")
    assert c.unet.dtype == torch.bfloat16
    editor = Editor(c, cache_dir=tmp_path, disable_progress=True)
    source = skeleton_clip(10, content_hash="bf16-source")
    tuned = editor.tune(source, PROMPTS, TuneConfig(steps1=1, steps2=1, checkpoint_every=0, mixed_precision="bf16"))
    seen = {}
    real_invert, real_two_branch = sampling.ddim_invert, sampling.sample_two_branch

    def invert(eps_fn, latents, timesteps, **kwargs):
        trajectory = real_invert(eps_fn, latents, timesteps, **kwargs)
        seen["invert"] = (latents.dtype, {z.dtype for z in trajectory}, eps_fn(latents, timesteps[0], None).dtype)
        return trajectory

    def two_branch(eps_fn, z_T, timesteps, **kwargs):
        out = real_two_branch(eps_fn, z_T, timesteps, **kwargs)
        seen["branches"] = (z_T.dtype, out.dtype)
        return out

    monkeypatch.setattr(sampling, "ddim_invert", invert)
    monkeypatch.setattr(sampling, "sample_two_branch", two_branch)
    frames = editor.infer(source, skeleton_clip(100, content_hash="r"), PROMPTS, tuned, InferConfig(ddim_steps=2, retarget=False))
    assert frames.dtype == np.uint8
    assert seen["invert"] == (torch.float32, {torch.float32}, torch.float32)
    assert seen["branches"] == (torch.float32, torch.float32)
    assert [z.dtype for z in editor._inversions.values()] == [torch.float32]
    # a re-edit starts from the cached z_T, still fp32
    editor.infer(source, skeleton_clip(120, content_hash="r2"), PROMPTS, tuned, InferConfig(ddim_steps=2, retarget=False))
    assert seen["branches"] == (torch.float32, torch.float32)


# ---------------------------------------------------------------------------------------------
# the motion: one retargeting, and the preview shows what drives the edit
# ---------------------------------------------------------------------------------------------
def _person(num: int) -> np.ndarray:
    """Keypoints of a smaller person standing left of centre (a retarget visibly moves a preset)."""
    from eym.presets import preset_motion

    kps = preset_motion("step", num).copy()
    kps[..., :2] = kps[..., :2] * 0.6 + np.array([0.05, 0.25])
    return kps


@pytest.mark.parametrize("preset", ["squat", "wave"])
def test_preview_shows_the_skeletons_that_drive_the_edit(tuned_editor, preset):
    """The app's preview skeletons == the ControlNet input of the editing branch; a preset is
    fitted to the source once (a second retarget would move its joints)."""
    from eym.motion import resolve_motion
    from eym.pose import draw_skeletons
    from eym.preprocess import PreprocessConfig
    from eym.presets import preset_motion
    from eym.request import MOTION_PRESET, PreviewRequest

    editor, _, _ = tuned_editor
    source = skeleton_clip(10, keypoints=_person(F), content_hash=f"person-{preset}")
    tuned = editor.tune(source, PROMPTS, TuneConfig(steps1=1, steps2=1, checkpoint_every=0))
    config = PreprocessConfig(num_frames=F, size=SIZE)
    # the preview (eym.request.preview) and the edit (serve_edit) both call resolve_motion(**req.motion())
    req = PreviewRequest(mode=MOTION_PRESET, preset=preset, num_frames=F, size=SIZE, retarget=True)
    shown = resolve_motion(source, **req.motion(), config=config, retarget=req.retarget).skeletons
    motion = resolve_motion(source, **req.motion(), config=config, retarget=True)
    reference = motion.reference
    assert np.array_equal(motion.skeletons, shown) and motion.label == f"preset:{preset}"
    assert np.array_equal(shown, draw_skeletons(preset_motion(preset, F, source.keypoints), SIZE, SIZE))

    recorder = Recorder(editor.components.unet, editor.components.controlnet)
    try:
        editor.infer(source, motion, PROMPTS, tuned, InferConfig(ddim_steps=1, retarget=True))
    finally:
        recorder.close()
    driving = recorder.controlnet_calls[-1]["cond"][F:]  # the editing branch's ControlNet input
    assert torch.equal(driving, torch.from_numpy(shown).permute(0, 3, 1, 2).float() / 255)
    assert np.array_equal(motion_skeletons(source, reference, retarget=True), shown)
    with pytest.raises(EymError, match="fitted to another source"):  # a preset fitted to this source drives no other
        motion_skeletons(skeleton_clip(10, keypoints=_person(F), content_hash="someone-else"), reference)


def test_injection_settings_live_for_one_call_only(tuned_editor):
    """An edit's injection layers and weighting are on the shared UNet during its call only: after
    it returns, and also when it fails half-way, the UNet has the processors it had before."""
    from eym.spacetime import RCAttnProcessor

    editor, source, tuned = tuned_editor
    unet = editor.components.unet
    reference = skeleton_clip(100, content_hash="routing-reference")
    before = dict(unet.attn_processors)
    seen = []

    def callback(stage, step, total):
        procs = [p for p in unet.attn_processors.values() if isinstance(p, RCAttnProcessor)]
        seen.append(({p.weighting for p in procs}, sum(p.inject for p in procs)))
        if stage == "sampling":
            raise KeyboardInterrupt  # a cancel or a crash mid-job

    config = InferConfig(ddim_steps=2, retarget=False, injection=InjectionSchedule(layers="up"), injection_weighting="balanced")
    editor.infer(source, reference, PROMPTS, tuned, config)  # returns: the processors before are back
    returned = dict(unet.attn_processors)
    assert returned.keys() == before.keys() and all(returned[n] is before[n] for n in before)
    editor._inversions.clear()  # the failing call below inverts again, so the callback sees inversion too
    with pytest.raises(KeyboardInterrupt):
        editor.infer(source, reference, PROMPTS, tuned, config, callback=callback)
    up = sum(n.startswith("up_blocks") for n in before if n.endswith("attn1.processor"))
    assert seen and all(s == ({"balanced"}, up) for s in seen), seen
    after = dict(unet.attn_processors)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)

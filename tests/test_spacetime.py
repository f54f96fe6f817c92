"""eym.spacetime: RC-Attn against a naive per-frame reference, inflation invariances, injection."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from eym.errors import EymError
from eym.injection import InjectionSchedule, injection_preset
from eym.spacetime import (
    FrameAwareAttnProcessor,
    RCAttnProcessor,
    TemporalAttention,
    attention_processors,
    batch_to_frames,
    frames_to_batch,
    inflate,
    injection_processors,
    is_inflated,
    load_temporal_state_dict,
    rc_attn_layers,
    rc_attn_parameters,
    space_time_kwargs,
    temporal_parameters,
    temporal_state_dict,
)




# ---------------------------------------------------------------------------------------------
# A naive reference: METHOD.md's equations, one frame and one head at a time
# ---------------------------------------------------------------------------------------------
def naive_rc_attn(attn, z, num_frames, inject_from=None, weighting="paper"):
    """z: (B*F, N, C). Loops over videos, frames and heads; softmax written out."""
    BF, N, C = z.shape
    B = BF // num_frames
    z = z.view(B, num_frames, N, C)
    heads = attn.heads
    out = torch.empty(B, num_frames, N, attn.inner_dim)
    for b in range(B):
        for i in range(num_frames):
            prev = z[b, (i - 1) % num_frames]  # frame 0's predecessor is the last frame
            blocks = [prev, z[b, i]]
            bias = [0.0, 0.0]
            if inject_from is not None and inject_from[b] >= 0 and weighting == "source":
                r = inject_from[b]  # the reconstruction's own RC-Attn blocks only
                blocks, bias = [z[r, (i - 1) % num_frames], z[r, i]], [0.0, 0.0]
            elif inject_from is not None and inject_from[b] >= 0:
                blocks.append(z[inject_from[b], i])  # the reconstruction branch's current frame
                # balanced: both current-frame blocks share the current slot (logit bias -log 2)
                bias = [0.0, 0.0, 0.0] if weighting == "paper" else [0.0, -math.log(2), -math.log(2)]
            q = attn.to_q(z[b, i])
            k = torch.cat([attn.to_k(x) for x in blocks])
            v = torch.cat([attn.to_v(x) for x in blocks])
            logit_bias = torch.cat([torch.full((N,), s) for s in bias])
            d = attn.inner_dim // heads
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d) + logit_bias, dim=-1)
                out[b, i, :, sl] = w @ v[:, sl]
    return attn.to_out[0](out.reshape(BF, N, -1))


@pytest.fixture()
def attn():
    from diffusers.models.attention_processor import Attention

    gen = torch.Generator().manual_seed(0)
    module = Attention(query_dim=24, heads=3, dim_head=8, bias=False)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


@pytest.mark.parametrize("num_frames", [1, 2, 3, 8, 9])
def test_rc_attn_equals_naive_loop(attn, num_frames):
    z = torch.randn(2 * num_frames, 5, 24, generator=torch.Generator().manual_seed(num_frames))
    with torch.no_grad():
        fast = RCAttnProcessor()(attn, z, num_frames=num_frames)
        ref = naive_rc_attn(attn, z, num_frames)
    assert (fast - ref).abs().max() < 1e-5


@pytest.mark.parametrize("weighting", ["balanced", "paper", "source"])
@pytest.mark.parametrize("num_frames", [1, 3, 8])
def test_injection_equals_naive_loop(attn, weighting, num_frames):
    inject_from = [-1, 0, -1, 2]  # two (recon, edit) pairs, as with classifier-free guidance
    z = torch.randn(4 * num_frames, 5, 24, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fast = RCAttnProcessor(weighting=weighting)(attn, z, num_frames=num_frames, inject_from=inject_from)
        ref = naive_rc_attn(attn, z, num_frames, inject_from, weighting)
    assert (fast - ref).abs().max() < 1e-5


def test_rc_attn_single_frame_is_plain_self_attention(attn):
    from diffusers.models.attention_processor import AttnProcessor2_0

    z = torch.randn(4, 6, 24)
    with torch.no_grad():
        assert (RCAttnProcessor()(attn, z, num_frames=1) - AttnProcessor2_0()(attn, z)).abs().max() < 1e-5


def test_layer_without_inject_flag_ignores_inject_from(attn):
    z = torch.randn(2 * 3, 5, 24)
    with torch.no_grad():
        a = RCAttnProcessor(inject=False)(attn, z, num_frames=3, inject_from=[-1, 0])
        b = RCAttnProcessor()(attn, z, num_frames=3)
    assert torch.equal(a, b)


def test_bad_frame_counts_and_inject_from_raise(attn):
    z = torch.randn(6, 5, 24)
    with pytest.raises(ValueError, match="space_time_kwargs"):
        RCAttnProcessor()(attn, z)
    with pytest.raises(ValueError, match="whole number of 4-frame"):
        RCAttnProcessor()(attn, z, num_frames=4)
    with pytest.raises(ValueError, match="3 entries for 2 videos"):
        RCAttnProcessor()(attn, z, num_frames=3, inject_from=[-1, 0, 1])
    with pytest.raises(ValueError, match=r"\[5\]"):
        RCAttnProcessor()(attn, z, num_frames=3, inject_from=[-1, 5])
    with pytest.raises(ValueError, match="weighting"):
        RCAttnProcessor(weighting="equal")


def test_frames_batch_round_trip():
    x = torch.randn(2, 4, 5, 3, 3)
    folded = frames_to_batch(x)
    assert folded.shape == (10, 4, 3, 3)
    assert torch.equal(folded[7], x[1, :, 2])  # video-major: video 1, frame 2
    assert torch.equal(batch_to_frames(folded, 5), x)
    assert space_time_kwargs(5, (-1, 0)) == {"num_frames": 5, "inject_from": [-1, 0]}


# ---------------------------------------------------------------------------------------------
# The inflated tiny UNet
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def unet2d(tiny_components):
    return copy.deepcopy(tiny_components.unet)  # the session fixture stays 2D


def _inputs(num_videos, num_frames, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_videos, 4, num_frames, 8, 8, generator=gen)
    emb = torch.randn(num_videos, 77, 32, generator=gen)
    emb = emb.repeat_interleave(num_frames, dim=0)  # (B*F, 77, D): each frame gets its video's prompt
    return x, emb


def _run(unet, x, emb, t=500, inject_from=None):
    B, C, Fr, h, w = x.shape
    out = unet(frames_to_batch(x), t, encoder_hidden_states=emb, cross_attention_kwargs=space_time_kwargs(Fr, inject_from))
    return batch_to_frames(out.sample, Fr)


def _plain_attn1(unet):
    return {name: FrameAwareAttnProcessor() for name in unet.attn_processors if name.endswith("attn1.processor") and "temporal" not in name}


@torch.no_grad()
def test_fresh_inflated_unet_with_plain_attn1_equals_2d_unet(unet2d):
    x, emb = _inputs(2, 3)
    ref = batch_to_frames(unet2d(frames_to_batch(x), 500, encoder_hidden_states=emb).sample, 3)
    unet = inflate(unet2d)
    assert is_inflated(unet) and inflate(unet) is unet  # idempotent, same object
    with attention_processors(unet, _plain_attn1(unet)):
        out = _run(unet, x, emb)
    assert (out - ref).abs().max() < 1e-5
    # with RC-Attn on, frames see each other: not the 2D result any more
    assert (_run(unet, x, emb) - ref).abs().max() > 1e-3


@torch.no_grad()
def test_rc_attn_with_one_frame_equals_2d_unet(unet2d):
    x, emb = _inputs(3, 1)
    ref = unet2d(frames_to_batch(x), 500, encoder_hidden_states=emb).sample
    out = _run(inflate(unet2d), x, emb)
    assert (frames_to_batch(out) - ref).abs().max() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("layers", ["all", "mid,up"])
def test_injection_with_identical_branches(unet2d, layers):
    unet = inflate(unet2d)
    schedule = InjectionSchedule(layers=layers)
    x, emb = _inputs(1, 3)
    x2, emb2 = x.repeat(2, 1, 1, 1, 1), emb.repeat(2, 1, 1)
    plain = _run(unet, x, emb)
    # the literal Eq. 18 (default) double-counts the current frame, so the branches differ
    with attention_processors(unet, injection_processors(unet, schedule)):
        paper = _run(unet, x2, emb2, inject_from=[-1, 0])
    assert (paper[0] - plain[0]).abs().max() < 1e-5  # recon branch == plain RC-Attn
    assert (paper[1] - paper[0]).abs().max() > 1e-4
    # balanced: the two current-frame blocks share a slot, so edit == recon when inputs match
    with attention_processors(unet, injection_processors(unet, schedule, "balanced")):
        out = _run(unet, x2, emb2, inject_from=[-1, 0])
    assert (out[0] - out[1]).abs().max() < 1e-5
    assert (out[0] - plain[0]).abs().max() < 1e-5
    # source: the edit reads the reconstruction's keys/values only, so it equals it too
    with attention_processors(unet, injection_processors(unet, schedule, "source")):
        src = _run(unet, x2, emb2, inject_from=[-1, 0])
    assert (src[0] - src[1]).abs().max() < 1e-5
    assert (src[0] - plain[0]).abs().max() < 1e-5


@torch.no_grad()
def test_injection_processors_follow_the_schedule_and_are_per_call(unet2d):
    unet = inflate(unet2d)
    before = dict(unet.attn_processors)
    names = rc_attn_layers(unet)
    assert [n.split(".")[0] for n in names] == sorted((n.split(".")[0] for n in names), key=["down_blocks", "mid_block", "up_blocks"].index)

    def flags(layers):
        return [p.inject for p in injection_processors(unet, InjectionSchedule(layers=layers)).values()]

    assert flags("up") == [n.startswith("up_blocks") for n in names]
    assert flags("mid") == [n.startswith("mid_block") for n in names]
    assert flags("0,2-3") == [i in (0, 2, 3) for i in range(len(names))]
    assert flags("up_blocks.1.*") == [n.startswith("up_blocks.1.") for n in names]
    assert flags(names[1]) == [i == 1 for i in range(len(names))]
    assert not any(flags("none")) and all(flags("all"))
    with pytest.raises(EymError, match="selects no RC-Attn layer"):
        injection_processors(unet, InjectionSchedule(layers=f"{len(names)}"))
    with pytest.raises(EymError, match="is not all, none"):
        InjectionSchedule(layers="up,sideways")
    # injection from a different video changes the editing branch only where layers inject
    x, emb = _inputs(2, 3)
    with attention_processors(unet, injection_processors(unet, InjectionSchedule(layers="up"))):
        assert (_run(unet, x, emb, inject_from=[-1, 0])[1] - _run(unet, x, emb)[1]).abs().max() > 1e-5
    with attention_processors(unet, injection_processors(unet, InjectionSchedule(layers="none"))):
        assert torch.equal(_run(unet, x, emb, inject_from=[-1, 0]), _run(unet, x, emb))
    # the shared UNet gets its own processors back, even when the call fails
    with pytest.raises(RuntimeError):
        with attention_processors(unet, injection_processors(unet, InjectionSchedule(layers="none"))):
            raise RuntimeError("boom")
    assert {n: type(p) for n, p in unet.attn_processors.items()} == {n: type(p) for n, p in before.items()}
    assert all(p.inject and p.weighting == "paper" for p in unet.attn_processors.values() if isinstance(p, RCAttnProcessor))


def test_injection_schedule_steps_and_presets():
    assert InjectionSchedule().steps(10) == list(range(10))
    assert InjectionSchedule(end=0.5).steps(10) == [0, 1, 2, 3, 4]
    assert InjectionSchedule(start=0.2, end=0.6).steps(10) == [2, 3, 4, 5]
    assert InjectionSchedule(start_step=4).steps(10) == [4, 5, 6, 7, 8, 9]
    assert InjectionSchedule(start_step=2, end_step=5).steps(10) == [2, 3, 4]
    assert InjectionSchedule(layers="none").steps(10) == []
    me = injection_preset("MotionEditor-like: decoder, after step 4")
    assert me == injection_preset("motioneditor-like-decoder-after-step-4") == InjectionSchedule(layers="up", start_step=4)
    assert me.injects("up_blocks.1.attentions.0.transformer_blocks.0.attn1", 9, 4, 50)
    assert not me.injects("up_blocks.1.attentions.0.transformer_blocks.0.attn1", 9, 3, 50)
    assert not me.injects("down_blocks.0.attentions.0.transformer_blocks.0.attn1", 0, 10, 50)
    assert injection_preset("paper: all") == InjectionSchedule()
    with pytest.raises(EymError, match="unknown"):
        injection_preset("sometimes")
    with pytest.raises(EymError, match="fractions"):
        InjectionSchedule(start=0.7, end=0.2)


def test_temporal_attention_trains_and_mixes_frames(unet2d):
    unet = inflate(unet2d)
    params = temporal_parameters(unet)
    assert params and all(".temporal_attn." in n for n in params)
    assert not set(params) & set(rc_attn_parameters(unet))
    # tiny UNet: 1 block down, 1 mid, 2 up; to_q, to_k, to_v weights + to_out.0 weight and bias
    assert len(rc_attn_parameters(unet)) == 4 * 5 and len(params) == 4 * 7
    x, emb = _inputs(1, 4)
    plain = _plain_attn1(unet)
    with attention_processors(unet, plain), torch.no_grad():
        before = _run(unet, x, emb)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.SGD(params.values(), lr=1.0)
    with attention_processors(unet, _plain_attn1(unet)):
        loss = _run(unet, x, emb).pow(2).mean()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in params.values())
    x_changed = x.clone()
    x_changed[:, :, 3] += 1.0  # perturb the last frame only
    with attention_processors(unet, _plain_attn1(unet)), torch.no_grad():
        after = _run(unet, x, emb)
        moved = _run(unet, x_changed, emb)
    assert (after - before).abs().max() > 1e-4  # no longer identity
    # attn1 is plain self-attention here, so only temporal attention can carry frame 3 to frame 0
    assert (moved[:, :, 0] - after[:, :, 0]).abs().max() > 1e-6
    # save / load round trip into a fresh inflation
    state = temporal_state_dict(unet)
    other = inflate(copy.deepcopy(unet2d))
    load_temporal_state_dict(other, state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())


def _stage1_pass(unet, x, emb):
    """Output and RC-Attn gradients of one pass with RC-Attn trainable, temporal attention frozen (stage 1)."""
    params = rc_attn_parameters(unet)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    out = _run(unet, x, emb)
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    return out.detach(), grads


def test_zero_frozen_temporal_attention_is_skipped_bit_equal(unet2d, monkeypatch):
    unet = inflate(unet2d).requires_grad_(False)  # as tuning freezes all but the stage's tensors
    x, emb = _inputs(2, 3)
    calls = []
    for module in unet.modules():
        if isinstance(module, TemporalAttention):
            module.register_forward_hook(lambda *_: calls.append(1))
    skipped, skipped_grads = _stage1_pass(unet, x, emb)
    assert not calls  # zero output projection, frozen: never computed
    with monkeypatch.context() as m:
        m.setattr(TemporalAttention, "is_zero", lambda self: False)
        computed, computed_grads = _stage1_pass(unet, x, emb)
    assert len(calls) == 4  # one per transformer block of the tiny UNet
    assert torch.equal(skipped, computed)
    assert all(torch.equal(skipped_grads[n], computed_grads[n]) for n in skipped_grads)


def test_temporal_attention_zero_check_follows_the_weights():
    module = TemporalAttention(8, 2, 4)
    out = module.attn.to_out[0]
    module.requires_grad_(False)
    assert module.is_zero()
    out.weight.requires_grad_(True)
    assert not module.is_zero()  # being trained: its forward pass feeds its gradient
    with torch.no_grad():
        assert module.is_zero()  # no gradient taken: skipping is exact
    out.weight.requires_grad_(False)
    with torch.no_grad():
        out.bias[0] = 1.0  # changed in place (a loaded tuned tensor, an optimizer step)
    assert not module.is_zero()
    x = torch.randn(6, 5, 8)
    assert module(x, 3).abs().max() > 0
    with torch.no_grad():
        out.bias.zero_()
    assert module.is_zero()
    out.weight.data = torch.ones_like(out.weight)  # replaced storage (a dtype change when a stage ends)
    assert not module.is_zero()


def reference_temporal_attention(module, x, num_frames):
    """The first formulation: frames to the sequence axis, then diffusers' ``Attention`` as it is."""
    BF, N, C = x.shape
    B = BF // num_frames
    y = x.view(B, num_frames, N, C).permute(0, 2, 1, 3).reshape(B * N, num_frames, C)  # (B*N, F, C)
    y = module.attn(module.norm(y))
    return y.view(B, N, num_frames, C).permute(0, 2, 1, 3).reshape(BF, N, C)


def _temporal_pass(fn, module, x, num_frames):
    """Output and gradients (input and every parameter) of one pass through ``fn``."""
    x = x.clone().requires_grad_(True)
    y = fn(x, num_frames)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum().backward()  # sees every output
    grads = {"x": x.grad, **{n: p.grad.clone() for n, p in module.named_parameters()}}
    module.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("videos,num_frames,heads,dim_head", [(1, 8, 2, 8), (2, 3, 4, 5), (1, 1, 1, 16), (3, 24, 8, 4)])
def test_fused_temporal_attention_equals_diffusers_attention(videos, num_frames, heads, dim_head):
    gen = torch.Generator().manual_seed(num_frames)
    C = heads * dim_head
    module = TemporalAttention(C, heads, dim_head)
    with torch.no_grad():
        for p in module.parameters():  # every tensor non-trivial: a fresh module's output is zero
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(videos * num_frames, 7, C, generator=gen)
    reference = lambda a, f: reference_temporal_attention(module, a, f)  # noqa: E731
    fused, _ = _temporal_pass(module, module, x, num_frames)
    ref, _ = _temporal_pass(reference, module, x, num_frames)
    assert fused.shape == x.shape
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)  # float32
    # gradients: the same function, so equal up to rounding; in float64, rounding is ~1e-15
    module.double()
    _, fused_grads = _temporal_pass(module, module, x.double(), num_frames)
    _, ref_grads = _temporal_pass(reference, module, x.double(), num_frames)
    assert fused_grads.keys() == ref_grads.keys() and len(fused_grads) == 1 + 7
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], atol=1e-10, rtol=1e-10, msg=name)
    # the fused form reads the diffusers module's weights: the state-dict keys did not move
    assert sorted(module.state_dict()) == [
        "attn.to_k.weight", "attn.to_out.0.bias", "attn.to_out.0.weight", "attn.to_q.weight", "attn.to_v.weight",
        "norm.bias", "norm.weight",
    ]


def test_processors_restored_after_exception(unet2d):
    unet = inflate(unet2d)
    before = {n: p for n, p in unet.attn_processors.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with attention_processors(unet, FrameAwareAttnProcessor()):
            assert all(isinstance(p, FrameAwareAttnProcessor) for p in unet.attn_processors.values())
            raise RuntimeError("boom")
    assert unet.attn_processors == before
    with pytest.raises(ValueError, match="no such layers"):
        with attention_processors(unet, {"nowhere.attn1.processor": FrameAwareAttnProcessor()}):
            pass
    assert unet.attn_processors == before


def test_gradient_checkpointing_same_output_and_grads(unet2d):
    unet = inflate(unet2d)
    with torch.no_grad():  # make temporal attention non-trivial first
        for p in temporal_parameters(unet).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    unet.train()
    params = {**rc_attn_parameters(unet), **temporal_parameters(unet)}
    x, emb = _inputs(2, 3)

    def grads():
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        out = _run(unet, x, emb, inject_from=[-1, 0])
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in params.items()}

    out_a, grads_a = grads()
    unet.enable_gradient_checkpointing()
    out_b, grads_b = grads()
    unet.disable_gradient_checkpointing()
    assert (out_a - out_b).abs().max() < 1e-5
    for name in params:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def test_sd15_state_dict_loads_into_inflated_unet():
    """The real SD 1.5 UNet architecture (meta device: shapes only, no memory): only temporal keys are new."""
    from diffusers import UNet2DConditionModel

    from eym.models import SD15_CONFIG_DIR

    config = json.loads((SD15_CONFIG_DIR / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    sd = {k: v.shape for k, v in unet.state_dict().items()}
    inflate(unet)
    inflated = {k: v.shape for k, v in unet.state_dict().items()}
    missing = set(inflated) - set(sd)
    unexpected = set(sd) - set(inflated)
    assert not unexpected
    assert missing and all(".temporal_attn." in k for k in missing)
    assert all(inflated[k] == shape for k, shape in sd.items())
    assert len(temporal_parameters(unet)) == 16 * 7  # 16 transformer blocks in SD 1.5

"""The space-time UNet: SD 1.5's 2D UNet made to see whole videos, without forking it.

METHOD.md "Backbone". Frames fold into the batch for every 2D module (so every SD weight loads
unchanged), and each transformer block of the UNet gets two things:

1. **RC-Attn** (:class:`RCAttnProcessor`), an attention processor installed on ``attn1``: frame
   i attends to its predecessor (frame 0 to the last frame) and to itself, with attn1's own
   weights. At inference it also implements the two-branch key/value injection (METHOD.md
   "Inference" step 3, paper Eq. 17-18).
2. **Temporal attention** (:class:`TemporalAttention`), a new module stored as
   ``block.temporal_attn`` and hooked in after the block's cross-attention with two PyTorch
   hooks (see :func:`inflate`), so the diffusers block code runs unchanged.

Calling convention (everything in eym does it this way)::

    x = frames_to_batch(latents)                      # (B, C, F, h, w) -> (B*F, C, h, w)
    eps = unet(x, t, encoder_hidden_states=emb,       # emb: (B*F, 77, D)
               down_block_additional_residuals=..., mid_block_additional_residual=...,
               cross_attention_kwargs=space_time_kwargs(F, inject_from)).sample
    eps = batch_to_frames(eps, F)                     # -> (B, C, F, h, w)

The frame count is a run-time value passed in explicitly (never inferred), so one inflated UNet
serves 8, 16, 24 or any odd number of frames.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FrameAwareAttnProcessor",
    "RCAttnProcessor",
    "TemporalAttention",
    "attention_processors",
    "batch_to_frames",
    "frames_to_batch",
    "inflate",
    "injection_processors",
    "is_inflated",
    "load_temporal_state_dict",
    "rc_attn_layers",
    "rc_attn_parameters",
    "space_time_kwargs",
    "temporal_parameters",
    "temporal_state_dict",
]

InjectionWeighting = Literal["paper", "balanced", "source"]
INJECTION_WEIGHTINGS: tuple[str, ...] = ("paper", "balanced", "source")
TEMPORAL_ATTR = "temporal_attn"  # attribute name on each BasicTransformerBlock -> state-dict keys


# ---------------------------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------------------------
def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """Fold frames into the batch, next to a 2D module.

    Args:
        x: ``(B, C, F, H, W)``.

    Returns:
        ``(B*F, C, H, W)``, video-major (all frames of video 0, then video 1, ...).
    """
    B, C, Fr, H, W = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)  # (B, F, C, H, W) -> (B*F, C, H, W)


def batch_to_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Inverse of :func:`frames_to_batch`: ``(B*F, C, H, W)`` -> ``(B, C, F, H, W)``."""
    BF, C, H, W = x.shape
    if BF % num_frames:
        raise ValueError(f"batch of {BF} frames is not a whole number of {num_frames}-frame videos")
    return x.reshape(BF // num_frames, num_frames, C, H, W).permute(0, 2, 1, 3, 4)


def space_time_kwargs(num_frames: int, inject_from: Sequence[int] | None = None) -> dict:
    """``cross_attention_kwargs`` for an inflated UNet call.

    Args:
        num_frames: frames per video, F (the UNet input holds B*F frames).
        inject_from: ``None`` (no injection on this call) or one entry per video in the batch:
            the index of the video whose current-frame keys/values this video also attends to
            in RC-Attn (the reconstruction branch, for an editing branch), or -1 for none.
    """
    return {"num_frames": int(num_frames), "inject_from": None if inject_from is None else [int(j) for j in inject_from]}


# ---------------------------------------------------------------------------------------------
# Attention processors
# ---------------------------------------------------------------------------------------------
def _check_frames(batch_frames: int, num_frames: int | None, inject_from: Sequence[int] | None) -> int:
    """Number of videos B in a (B*F)-frame batch; explicit errors instead of silent reshapes."""
    if num_frames is None:
        raise ValueError(
            "an inflated UNet needs the frame count: call it with cross_attention_kwargs=space_time_kwargs(num_frames)"
        )
    if num_frames < 1 or batch_frames % num_frames:
        raise ValueError(f"batch of {batch_frames} frames is not a whole number of {num_frames}-frame videos")
    B = batch_frames // num_frames
    if inject_from is not None:
        if len(inject_from) != B:
            raise ValueError(f"inject_from has {len(inject_from)} entries for {B} videos in the batch")
        bad = [j for j in inject_from if not -1 <= j < B]
        if bad:
            raise ValueError(f"inject_from entries {bad} are not -1 or a video index in [0, {B})")
    return B


class FrameAwareAttnProcessor:
    """Plain attention (``AttnProcessor2_0``) that accepts and ignores the space-time kwargs.

    Installed on attn2 (cross-attention): frames are independent there, but diffusers would
    warn on every call about ``num_frames``/``inject_from`` kwargs a processor does not take.
    """

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._plain = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        num_frames: int | None = None,
        inject_from: Sequence[int] | None = None,
    ) -> torch.Tensor:
        return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class RCAttnProcessor:
    """Recurrent-Causal Attention for attn1, with optional two-branch key/value injection.

    Notation (code -> METHOD.md / paper):
        ``z``            -> z_i, the tokens of frame i (attn1's input), ``(B, F, N, C)``
        ``q, k, v``      -> W_Q z_i, W_K z_i, W_V z_i
        ``k_prev``       -> W_K z_{(i-1) mod n}: ``torch.roll`` over frames, frame 0 gets the last
        ``k_r, v_r``     -> K_r = W_K z^r_i, V_r = W_V z^r_i, the injected video's current frame

    Plain RC-Attn (METHOD.md "Backbone" 1)::

        Q = W_Q z_i,  K = W_K [z_{i-1}, z_i],  V = W_V [z_{i-1}, z_i]

    Injection (METHOD.md "Inference" 3, paper Eq. 17-18), for a video b with
    ``inject_from[b] = r >= 0`` in a layer whose ``inject`` flag is on::

        K_e = [W_K z^e_{i-1}, W_K z^e_i, K_r],  V_e = [W_V z^e_{i-1}, W_V z^e_i, V_r]

    ``weighting="paper"`` (default) is Eq. 18 literally, K = [k_prev, k_e, k_r]. With P_t = P_s
    and equal skeletons the editing branch then differs from the reconstruction branch: softmax
    over [prev, cur, cur] gives the current frame twice its weight in [prev, cur] (METHOD.md).
    ``weighting="balanced"``, an option of this project, lets the two current-frame blocks share
    one slot, a logit bias of -log 2 each, computed without a mask by duplicating the
    predecessor block, K = [k_prev, k_prev, k_e, k_r] (same softmax, keeps flash attention
    available); then the editing branch equals the reconstruction branch when their inputs
    match. ``weighting="source"``, another option, lets the editing branch's queries read the
    reconstruction only, K_e = W_K [z^r_{i-1}, z^r_i], V_e likewise (mutual self-attention as in
    MasaCtrl, in RC-Attn's form): appearance can come only from the source while the layout
    follows the edit's own queries, and edit == reconstruction when the inputs match. Which gives
    better edits is measured, not assumed (docs/QUALITY.md).

    No new parameters: the projections are attn1's (to_q, to_k, to_v, to_out).

    Args:
        inject: whether this layer takes part in injection (``inject_from`` is ignored if not).
        weighting: ``"paper"``, ``"balanced"`` or ``"source"``, see above.
    """

    def __init__(self, inject: bool = True, weighting: InjectionWeighting = "paper") -> None:
        if weighting not in INJECTION_WEIGHTINGS:
            raise ValueError(f"injection weighting {weighting!r} is not one of {', '.join(INJECTION_WEIGHTINGS)}")
        self.inject = inject
        self.weighting = weighting
        # Index tensors per (inject_from, device), made once: building a CUDA tensor from a Python
        # list is a blocking host-to-device copy, which would stall every attn1 call.
        self._index_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _indices(self, sources: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(videos without injection, videos with injection, their injection sources) as index tensors."""
        key = (sources, str(device))
        if key not in self._index_cache:
            plain = [b for b, j in enumerate(sources) if j < 0]
            injected = [b for b, j in enumerate(sources) if j >= 0]
            self._index_cache[key] = tuple(
                torch.tensor(ix, dtype=torch.long, device=device) for ix in (plain, injected, [sources[b] for b in injected])
            )
        return self._index_cache[key]

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        num_frames: int | None = None,
        inject_from: Sequence[int] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("RCAttnProcessor is a self-attention processor (attn1): no encoder states or masks")
        if hidden_states.ndim != 3:
            raise ValueError(f"RCAttnProcessor expects (B*F, N, C) tokens, got shape {tuple(hidden_states.shape)}")
        BF, N, C = hidden_states.shape
        Fr = num_frames
        B = _check_frames(BF, Fr, inject_from)
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        q = attn.to_q(hidden_states)  # (B*F, N, inner)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        inner = k.shape[-1]
        heads = attn.heads
        # (B*F, N, inner) -> (B, F, N, inner): frames on their own axis for the ring shift
        k = k.view(B, Fr, N, inner)
        v = v.view(B, Fr, N, inner)
        k_prev = torch.roll(k, shifts=1, dims=1)  # k_prev[:, i] = k[:, (i-1) mod n]
        v_prev = torch.roll(v, shifts=1, dims=1)

        def attend(rows: torch.Tensor | None, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
            """SDPA of the queries of videos ``rows`` (None: all) over the token-axis concatenation of ``keys``."""
            nb = B if rows is None else rows.numel()
            q_rows = q.view(B, Fr, N, inner) if rows is None else q.view(B, Fr, N, inner)[rows]
            q_rows = q_rows.reshape(nb * Fr, N, heads, inner // heads).transpose(1, 2)
            k_cat = torch.cat(keys, dim=2).reshape(nb * Fr, -1, heads, inner // heads).transpose(1, 2)
            v_cat = torch.cat(values, dim=2).reshape(nb * Fr, -1, heads, inner // heads).transpose(1, 2)
            # (nb*F, heads, N, head_dim) queries over (nb*F, heads, L*N, head_dim) keys
            out = F.scaled_dot_product_attention(q_rows, k_cat, v_cat, dropout_p=0.0, is_causal=False)
            return out.transpose(1, 2).reshape(nb, Fr, N, inner)

        sources = (-1,) * B if (inject_from is None or not self.inject) else tuple(inject_from)
        if all(j < 0 for j in sources):
            # K = W_K [z_{i-1}, z_i], V = W_V [z_{i-1}, z_i]   (RC-Attn, METHOD.md Backbone 1)
            # The common case (tuning, inversion, the reconstruction branch alone): no indexing.
            out = attend(None, [k_prev, k], [v_prev, v])
        else:
            plain, injected, src = self._indices(sources, q.device)
            out = q.new_empty(B, Fr, N, inner)
            if plain.numel():
                out[plain] = attend(plain, [k_prev[plain], k[plain]], [v_prev[plain], v[plain]])
            k_r, v_r = k[src], v[src]  # K_r = W_K z^r_i, V_r = W_V z^r_i   (Eq. 17)
            kp, vp, ke, ve = k_prev[injected], v_prev[injected], k[injected], v[injected]
            if self.weighting == "paper":
                # K_e = [W_K z^e_{i-1}, W_K z^e_i, K_r], V_e likewise   (Eq. 18, literal)
                out[injected] = attend(injected, [kp, ke, k_r], [vp, ve, v_r])
            elif self.weighting == "source":
                # K_e = W_K [z^r_{i-1}, z^r_i], V_e likewise: the editing branch's queries read the
                # reconstruction's RC-Attn keys only (mutual self-attention, as MasaCtrl)
                out[injected] = attend(injected, [k_prev[src], k_r], [v_prev[src], v_r])
            else:
                # Eq. 18 with the two current-frame blocks sharing one slot (-log 2 each),
                # written as a duplicated predecessor block: exact, no mask needed
                out[injected] = attend(injected, [kp, kp, ke, k_r], [vp, vp, ve, v_r])

        hidden_states = out.reshape(BF, N, inner).to(q.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# ---------------------------------------------------------------------------------------------
# Temporal attention
# ---------------------------------------------------------------------------------------------
class TemporalAttention(nn.Module):
    """Self-attention across the n frames at each spatial position (METHOD.md "Backbone" 2).

    norm (LayerNorm, as the block's own norms) -> attention over the frame axis -> the caller
    adds the result to the residual stream. The output projection starts at zero, so a freshly
    inflated UNet computes exactly what SD computes frame by frame. Like Tune-A-Video's
    temporal attention it has no positional encoding; the order of frames reaches it through
    RC-Attn, which is order-aware.

    Args:
        dim: channels C of the block's tokens.
        heads: attention heads (the block's attn1 count).
        dim_head: channels per head.
    """

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(query_dim=dim, heads=heads, dim_head=dim_head, bias=False, out_bias=True)
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)
        self._zero_key: tuple | None = None  # which output-projection tensors _zero was read from
        self._zero = False

    def is_zero(self) -> bool:
        """Whether the update is exactly zero: the output projection is all zeros and frozen.

        Then ``forward`` returns ``0 * y + 0`` for any finite input, so the block may skip it
        (bit-equal), e.g. in DPL stage 1 and before stage 2 has trained it. The answer is
        cached against the tensors' storage and version counters, so the check reads the GPU
        only after the weights were replaced or changed in place, never once per call.
        """
        out = self.attn.to_out[0]
        if torch.is_grad_enabled() and (out.weight.requires_grad or out.bias.requires_grad):
            return False  # being trained: its gradient needs the forward pass
        key = (out.weight.data_ptr(), out.weight._version, out.bias.data_ptr(), out.bias._version)
        if key != self._zero_key:
            self._zero = not bool(out.weight.any() or out.bias.any())
            self._zero_key = key
        return self._zero

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Args: x ``(B*F, N, C)`` tokens; num_frames F. Returns the update, ``(B*F, N, C)``.

        Computes ``to_out(attention_over_F(norm(x)))`` as diffusers' ``Attention`` would on the
        frame-major tokens, in fewer kernels (the module is launch-bound: F is 8-24 tokens):
        LayerNorm works per token, so it runs before any permute; one matmul with the three
        projections stacked makes q, k and v; the permutes into SDPA's ``(B*N, heads, F, d)``
        are views of that one tensor; one copy brings the result back to frame-major order.
        The weights stay in ``attn`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), so state-dict
        keys are those of the diffusers module.
        """
        BF, N, C = x.shape
        Fr = num_frames
        B = BF // Fr
        attn = self.attn
        heads = attn.heads
        inner = attn.to_q.out_features
        d = inner // heads
        y = self.norm(x)  # (B*F, N, C), per token: commutes with the frame permute
        w_qkv = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])  # (3*inner, C), no biases
        qkv = F.linear(y, w_qkv).view(B, Fr, N, 3, heads, d)
        # (B, F, N, 3, heads, d) -> (3, B, N, heads, F, d): attention over the frame axis
        q, k, v = qkv.permute(3, 0, 2, 4, 1, 5).reshape(3, B * N, heads, Fr, d).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=attn.scale)  # (B*N, heads, F, d)
        o = o.view(B, N, heads, Fr, d).permute(0, 3, 1, 2, 4).reshape(BF, N, inner)  # (B*F, N, inner)
        return attn.to_out[0](o)  # to_out[1] is Dropout(p=0): the identity


# The two hooks are module-level functions and find their block through a plain (unregistered)
# reference, not a closure, so that copy.deepcopy of an inflated UNet hooks up the copies.
def _stash_residual(norm2: nn.Module, args: tuple) -> None:
    """Forward pre-hook on ``block.norm2``: keep h, the residual stream before cross-attention."""
    norm2.__dict__["_eym_residual"] = args[0]


def _add_temporal(attn2: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on ``block.attn2``: o -> o + temporal(h + o).

    The block then computes ``hidden_states = o + h``, i.e. h + o + temporal(h + o): the
    temporal residual added right after cross-attention, without touching the block's code.
    """
    block = attn2.__dict__["_eym_block"]
    h = block.norm2.__dict__.pop("_eym_residual", None)  # popped: no tensor outlives the call
    if h is None:
        raise RuntimeError("temporal attention hook: norm2 did not run before attn2 (unsupported block type)")
    num_frames = kwargs.get("num_frames")
    _check_frames(output.shape[0], num_frames, None)
    temporal = getattr(block, TEMPORAL_ATTR)
    if temporal.is_zero():
        return output  # o + 0: a zero, frozen temporal attention cannot change anything
    return output + temporal(h + output, num_frames)


# ---------------------------------------------------------------------------------------------
# Inflation and parameter groups
# ---------------------------------------------------------------------------------------------
def _transformer_blocks(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from diffusers.models.attention import BasicTransformerBlock

    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock) and TEMPORAL_ATTR not in name:
            yield name, module


def inflate(unet: nn.Module) -> nn.Module:
    """Make a diffusers ``UNet2DConditionModel`` space-time, in place (idempotent).

    Adds :class:`TemporalAttention` as ``block.temporal_attn`` to every transformer block
    (zero-initialised, so outputs are unchanged until it is trained), hooks it in after
    cross-attention, and installs :class:`RCAttnProcessor` on every attn1 and
    :class:`FrameAwareAttnProcessor` on every attn2. Calling it again only re-installs the
    processors; trained temporal weights are kept. The installed RC-Attn processors inject in
    every layer with Eq. 18's weighting whenever a call passes ``inject_from``; an edit's own
    layers and weighting are installed for that call only (:func:`injection_processors`).

    Args:
        unet: the UNet (any dtype/device; new modules follow the block's).

    Returns:
        The same ``unet`` object.
    """
    for _, block in _transformer_blocks(unet):
        if block.attn2 is None or getattr(block, "norm2", None) is None:
            raise ValueError("inflate: every transformer block needs cross-attention (attn2) and norm2, as in SD 1.5")
        if not hasattr(block, TEMPORAL_ATTR):
            attn1 = block.attn1
            dim = attn1.to_q.in_features
            param = attn1.to_q.weight
            temporal = TemporalAttention(dim, attn1.heads, attn1.inner_dim // attn1.heads).to(param.device, param.dtype)
            setattr(block, TEMPORAL_ATTR, temporal)  # state-dict keys ...transformer_blocks.N.temporal_attn.*
            block.attn2.__dict__["_eym_block"] = block  # a reference, not a submodule: no new state-dict keys
            block.norm2.register_forward_pre_hook(_stash_residual)
            block.attn2.register_forward_hook(_add_temporal, with_kwargs=True)
    procs = dict(unet.attn_processors)
    for name in procs:
        module_name = name.removesuffix(".processor")
        if module_name.endswith("attn1") and TEMPORAL_ATTR not in module_name:
            procs[name] = RCAttnProcessor()
        elif module_name.endswith("attn2"):
            procs[name] = FrameAwareAttnProcessor()
    unet.set_attn_processor(procs)
    return unet


def rc_attn_layers(unet: nn.Module) -> list[str]:
    """The processor names of the RC-Attn layers (attn1), in data-flow order: down, mid, up blocks.

    (``unet.attn_processors`` lists the mid block last; injection layer indices count in this order.)
    """
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    names = [n for n in unet.attn_processors if n.removesuffix(".processor").endswith("attn1") and TEMPORAL_ATTR not in n]
    return sorted(names, key=lambda n: rank.get(n.split(".")[0], 3))  # stable: keeps the order within a block


def injection_processors(unet: nn.Module, schedule, weighting: InjectionWeighting = "paper") -> dict[str, "RCAttnProcessor"]:
    """RC-Attn processors for one edit: ``{attn1 name: RCAttnProcessor}``, injecting where ``schedule`` says.

    Install them for the call only: ``with attention_processors(unet, injection_processors(...)):``.

    Args:
        unet: an inflated UNet.
        schedule: an :class:`eym.injection.InjectionSchedule` (its layer set is used here; the
            sampler takes its steps).
        weighting: ``"paper"`` (Eq. 18 literally), ``"balanced"`` or ``"source"``, see :class:`RCAttnProcessor`.
    """
    names = rc_attn_layers(unet)
    mask = schedule.layer_mask(names)
    return {name: RCAttnProcessor(inject=mask[name.removesuffix(".processor")], weighting=weighting) for name in names}


def is_inflated(unet: nn.Module) -> bool:
    """Whether :func:`inflate` has been applied (every transformer block has temporal attention)."""
    blocks = [b for _, b in _transformer_blocks(unet)]
    return bool(blocks) and all(hasattr(b, TEMPORAL_ATTR) for b in blocks)


def rc_attn_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    """DPL stage 1 trainables: attn1's to_q/to_k/to_v/to_out of every transformer block."""
    out = {}
    for block_name, block in _transformer_blocks(unet):
        for name, p in block.attn1.named_parameters():
            if name.split(".")[0] in ("to_q", "to_k", "to_v", "to_out"):
                out[f"{block_name}.attn1.{name}"] = p
    return out


def temporal_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    """DPL stage 2 trainables: every parameter of the temporal attention modules."""
    if not is_inflated(unet):
        raise ValueError("temporal_parameters: the UNet is not inflated; call eym.spacetime.inflate(unet) first")
    return {name: p for name, p in unet.named_parameters() if f".{TEMPORAL_ATTR}." in name}


def temporal_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The temporal attention weights (detached copies), keyed as in ``unet.state_dict()``."""
    return {name: p.detach().clone() for name, p in temporal_parameters(unet).items()}


def load_temporal_state_dict(unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights saved by :func:`temporal_state_dict` into an inflated UNet (all keys must match)."""
    params = temporal_parameters(unet)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"temporal weights do not match this UNet: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


@contextlib.contextmanager
def attention_processors(unet: nn.Module, procs) -> Iterator[nn.Module]:
    """Temporarily install attention processors; the previous ones come back in ``finally``.

    Args:
        unet: any diffusers model with ``attn_processors``/``set_attn_processor``.
        procs: one processor for every layer, or ``{name: processor}``; a dict may name only
            some layers (the others keep theirs).
    """
    saved = dict(unet.attn_processors)
    if isinstance(procs, dict):
        unknown = sorted(set(procs) - set(saved))
        if unknown:
            raise ValueError(f"attention_processors: no such layers {unknown[:3]}")
        procs = {**saved, **procs}
    try:
        unet.set_attn_processor(procs)
        yield unet
    finally:
        unet.set_attn_processor(saved)

"""Train the quality lab's mini Stable Diffusion from scratch on TaiChi-HD frames (GPU).

Builds, in the real diffusers/transformers classes and formats,

1. an ``AutoencoderKL`` (128 x 128 x 3 -> 16 x 16 x 4, SD 1.5's 8x), trained alone first
   (L1 reconstruction + a KL term of SD's weight); its latent scale is set as SD's was, to
   1 / std of the training latents;
2. a ``UNet2DConditionModel`` with SD 1.5's block kinds (CrossAttnDownBlock2D x 2, DownBlock2D;
   UpBlock2D, CrossAttnUpBlock2D x 2; a cross-attention mid block), so eym's RC-Attn and temporal
   attention attach exactly as on SD 1.5;
3. a ``ControlNetModel.from_unet`` on the openpose skeleton images, and a small ``CLIPTextModel``
   on CLIP-format byte-level BPE (eym.models.write_tiny_tokenizer), both trained jointly with
   the UNet on the epsilon loss of SD, captions "<who> is <motion> <where>." with a random motion
   phrase (the skeleton carries the pose), "<who> <where>." (P_c's form) and "" (for guidance);
4. SD 1.5's DDIM scheduler config.

It saves the diffusers layout (``model_index.json``, ``vae/``, ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, ``controlnet/``) in fp16 to ``--model-dir``, so that
``eym.models.load_components(<dir>)`` and ``--model <dir>`` load it unchanged, and packs it
into ``<out>/mini.tar.NN`` parts of at most 15 MB (reassembled by ``unpack_model.py``), with
``train_log.json`` (settings, data, losses, seconds, the tar's sha256) and ``preview.npz``
(VAE reconstructions and 25-step DDIM samples of each clip's held-out skeletons).

Each phase runs ``--*-steps`` steps or until its ``--*-seconds`` budget is spent, whichever
comes first; the learning rate follows the further of the two (cosine), and the log records
the steps run, so ``--vae-seconds inf --unet-seconds inf`` with the logged steps repeats a run.

    python bench/quality/train_mini.py --out $OUT             # H200: ~8 minutes
    python bench/quality/train_mini.py --toy --out /tmp/mini  # CPU: seconds, tiny widths
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lab  # noqa: E402

PART_BYTES = 15 * 2**20  # each returned file stays under the 16 MB limit
TAR_NAME = "mini.tar"
LAB_MARKER = "quality_lab.json"  # written into the model folder: how it was trained


@dataclass(frozen=True)
class MiniConfig:
    """Sizes and training settings of the mini model (defaults: the H200 run)."""

    vae_channels: tuple[int, ...] = (32, 64, 64, 128)  # 4 levels -> 8x, as SD 1.5
    unet_channels: tuple[int, ...] = (96, 192, 192)  # 16 -> 8 -> 4 latent cells
    layers_per_block: int = 1
    heads: int = 8  # attention heads (diffusers' attention_head_dim, as SD 1.5's config)
    text_dim: int = 256  # CLIP hidden size = cross-attention dim
    text_layers: int = 2
    norm_groups: int = 32
    vae_steps: int = 3000
    vae_batch: int = 64
    vae_lr: float = 2e-4
    vae_seconds: float = 140.0
    kl_weight: float = 1e-6  # SD's KL weight (on the summed KL)
    unet_steps: int = 6000
    unet_batch: int = 256
    unet_lr: float = 3e-4
    unet_seconds: float = 300.0
    warmup: int = 200
    # "joint": UNet, ControlNet and text encoder trained together (the first lab model: its
    # ControlNet learned pose -> person and place, docs/QUALITY.md); "after": as ControlNet itself
    # is trained, the UNet and text encoder first without it, then a ControlNet copied from the
    # trained UNet learns the skeletons with everything else frozen
    controlnet_phase: str = "joint"
    controlnet_steps: int = 3000
    controlnet_lr: float = 1e-4
    controlnet_seconds: float = 150.0
    p_empty: float = 0.1  # captions dropped (guidance needs an unconditional model)
    p_content: float = 0.2  # captions of P_c's form (stage 1 of tuning uses P_c)
    seed: int = 0


TOY = dict(
    vae_channels=(8, 16, 16, 16), unet_channels=(16, 32, 32), heads=2, text_dim=32, text_layers=1, norm_groups=8,
    vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, warmup=1, controlnet_steps=2,
)


def progress(step: int, steps: int, started: float, seconds: float) -> float:
    """Fraction of a phase done: the further of steps and seconds."""
    return max(step / steps, (time.perf_counter() - started) / seconds)


def lr_at(fraction: float, step: int, base: float, warmup: int) -> float:
    """Linear warmup, then cosine from ``base`` to ``base / 10`` over the phase's progress."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0))))


def to_pixels(frames: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1], as SD's VAE takes them."""
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def build_models(cfg: MiniConfig, tokenizer, size: int):
    """Fresh VAE, UNet, ControlNet, text encoder and DDIM scheduler (global torch RNG)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=cfg.vae_channels,
        layers_per_block=1, latent_channels=4, norm_num_groups=cfg.norm_groups, sample_size=size,
    )
    latent = size // 2 ** (levels - 1)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cfg.text_dim, attention_head_dim=cfg.heads, norm_num_groups=cfg.norm_groups,
    )
    controlnet = controlnet_from(unet, cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_dim, intermediate_size=4 * cfg.text_dim,
        num_hidden_layers=cfg.text_layers, num_attention_heads=max(cfg.text_dim // 64, 2), max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        projection_dim=cfg.text_dim,
    ))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return vae, unet, controlnet, text_encoder, scheduler


def controlnet_from(unet, cfg: MiniConfig):
    """A ControlNet whose encoder is a copy of ``unet``'s (zero convolutions out, as ControlNet starts)."""
    from diffusers import ControlNetModel

    # the skeleton encoder downsamples 2 ** (len - 1) = 8x: pixels -> latent cells
    embed = (16, 32, 96, 256) if cfg.norm_groups == 32 else (8, 16, 16, 32)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embed[: len(cfg.vae_channels)])


def caption_table(meta: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """All training captions: [""] + per clip [P_c form, then one per motion phrase].

    Returns the strings, the index of each clip's P_c form ``(C,)`` and of its motion captions ``(C, M)``.
    """
    captions = [""]
    content, motions = [], []
    for clip in meta["clips"]:
        info = lab.ClipInfo(clip["name"], clip["subject"], clip["place"])
        content.append(len(captions))
        captions.append(lab.caption(info, None))
        motions.append([])
        for motion in meta["motions"]:
            motions[-1].append(len(captions))
            captions.append(lab.caption(info, motion))
    return captions, np.asarray(content), np.asarray(motions)


def train_vae(vae, frames: torch.Tensor, cfg: MiniConfig, device: torch.device, log: list, autocast) -> int:
    """L1 + KL training of the autoencoder; returns the steps run."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, **_fused(device))
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    started, step = time.perf_counter(), 0
    vae.train()
    while (fraction := progress(step, cfg.vae_steps, started, cfg.vae_seconds)) < 1.0:
        idx = torch.randint(len(frames), (cfg.vae_batch,), generator=gen)
        x = to_pixels(frames[idx.to(frames.device)])
        for group in opt.param_groups:
            group["lr"] = lr_at(fraction, step, cfg.vae_lr, cfg.warmup)
        with autocast():
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample
        l1 = F.l1_loss(rec.float(), x)
        kl = posterior.kl().mean()
        loss = l1 + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == 1:
            record = {"phase": "vae", "step": step, "l1": round(l1.item(), 5), "kl": round(kl.item(), 2), "s": round(time.perf_counter() - started, 1)}
            log.append(record)
            print(json.dumps(record), flush=True)
    vae.eval()
    return step


@torch.no_grad()
def latent_stats(vae, frames: torch.Tensor, autocast, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std ``(N, 4, h, w)`` of every training frame."""
    means, stds = [], []
    for i in range(0, len(frames), chunk):
        with autocast():
            dist = vae.encode(to_pixels(frames[i : i + chunk])).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def train_diffusion(unet, controlnet, text_encoder, scheduler, data: dict, cfg: MiniConfig, device, log: list, autocast,
                    *, phase: str = "unet", trained: tuple = (), steps: int | None = None, seconds: float | None = None,
                    lr: float | None = None) -> int:
    """Epsilon-prediction training of the modules in ``trained`` (the others frozen); returns the steps run.

    ``controlnet=None`` trains without skeletons (the "after" schedule's first phase).
    """
    trained = trained or tuple(m for m in (unet, controlnet, text_encoder) if m is not None)
    steps, seconds, lr = steps or cfg.unet_steps, seconds or cfg.unet_seconds, lr or cfg.unet_lr
    for module in (unet, controlnet, text_encoder):
        if module is not None:
            module.requires_grad_(any(module is m for m in trained))
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, **_fused(device))
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    mean, std, scale = data["mean"], data["std"], data["scale"]
    clip_of, ids = data["clip"], data["ids"]
    content_idx, motion_idx = data["content_idx"], data["motion_idx"]
    alphas = scheduler.alphas_cumprod.to(device)
    N, M = len(mean), motion_idx.shape[1]
    started, step = time.perf_counter(), 0
    for module in trained:
        module.train()
    while (fraction := progress(step, steps, started, seconds)) < 1.0:
        B = cfg.unet_batch
        idx = torch.randint(N, (B,), generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=gen)
        u = torch.rand(B, generator=gen)
        motion = torch.randint(M, (B,), generator=gen)
        clips = clip_of[idx]
        cap = torch.where(u < cfg.p_empty, 0, torch.where(u < cfg.p_empty + cfg.p_content, content_idx[clips], motion_idx[clips, motion]))
        idx, t, cap = idx.to(device), t.to(device), cap.to(device)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, device=device)) * scale  # z_0 ~ E(x), scaled as SD
        noise = torch.randn_like(z0)
        a = alphas[t].view(B, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise  # forward diffusion q(z_t | z_0)
        control = data["skeletons"][idx].permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1], as eym feeds it
        for group in opt.param_groups:
            group["lr"] = lr_at(fraction, step, lr, cfg.warmup)
        with autocast():
            table = text_encoder(ids)[0]  # (U, 77, D): every distinct caption once
            emb = table[cap]  # (B, 77, D)
            down, mid = (None, None) if controlnet is None else controlnet(
                z_t, t, encoder_hidden_states=emb, controlnet_cond=control, return_dict=False)
            eps = unet(z_t, t, encoder_hidden_states=emb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == 1:
            record = {"phase": phase, "step": step, "loss": round(loss.item(), 5), "lr": round(opt.param_groups[0]["lr"], 7), "s": round(time.perf_counter() - started, 1)}
            log.append(record)
            print(json.dumps(record), flush=True)
    for module in (unet, controlnet, text_encoder):
        if module is not None:
            module.eval()
            module.requires_grad_(False)
    return step


def _fused(device: torch.device) -> dict:
    return {"fused": True} if device.type == "cuda" else {}


def save_bundle(folder: Path, vae, unet, controlnet, text_encoder, scheduler, info: dict) -> Path:
    """The diffusers layout in fp16 (+ CLIP's vocab.json/merges.txt and ``quality_lab.json``), atomically."""
    import copy

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from eym.cache import building
    from eym.models import write_tiny_tokenizer

    half = [copy.deepcopy(m).to("cpu", torch.float16) for m in (vae, unet, controlnet, text_encoder)]
    with building(folder, meta={"kind": "quality-lab-mini", "seed": info["config"]["seed"]}) as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp / "tokenizer")))
        pipe = StableDiffusionPipeline(
            vae=half[0], text_encoder=half[3], tokenizer=tokenizer, unet=half[1], scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp)
        half[2].save_pretrained(tmp / "controlnet")
        # transformers 5 saves only tokenizer.json; keep CLIP's own files too (as eym's tiny bundle)
        shutil.rmtree(tmp / "tokenizer")
        write_tiny_tokenizer(tmp / "tokenizer")
        (tmp / LAB_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def pack(folder: Path, out: Path) -> dict:
    """Tar ``folder`` (as ``mini/``) into ``out/mini.tar.00, .01, ...`` of <= PART_BYTES; returns names + sha256."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname="mini")
    data = buffer.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(data), PART_BYTES):
        name = f"{TAR_NAME}.{i // PART_BYTES:02d}"
        (out / name).write_bytes(data[i : i + PART_BYTES])
        parts.append(name)
    return {"parts": parts, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@torch.no_grad()
def preview(vae, unet, controlnet, text_encoder, tokenizer, scheduler, windows: dict, meta: dict, scale: float, device, autocast, steps: int = 25) -> dict:
    """VAE reconstructions and plain DDIM samples (P_s, held-out skeletons) of frame 0 of each window."""
    from diffusers import DDIMScheduler

    frames = torch.from_numpy(windows["window_frames"][:, 0]).to(device)  # (C, H, W, 3)
    skeletons = torch.from_numpy(windows["window_skeletons"][:, 0]).to(device)
    with autocast():
        rec = vae.decode(vae.encode(to_pixels(frames)).latent_dist.mean).sample
    prompts = [lab.caption(lab.ClipInfo(c["name"], c["subject"], c["place"]), lab.SOURCE_MOTION) for c in meta["clips"]]
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(steps)
    gen = torch.Generator(device="cpu").manual_seed(0)
    C, H = len(frames), frames.shape[1]
    latent = H // 2 ** (len(vae.config.block_out_channels) - 1)
    z = torch.randn((C, 4, latent, latent), generator=gen).to(device)
    control = skeletons.permute(0, 3, 1, 2).float() / 255.0
    with autocast():
        emb = text_encoder(ids)[0]
        for t in sampler.timesteps:
            tt = t.to(device).expand(C)
            down, mid = controlnet(z, tt, encoder_hidden_states=emb, controlnet_cond=control, return_dict=False)
            eps = unet(z, tt, encoder_hidden_states=emb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
            z = sampler.step(eps.float(), t, z.float()).prev_sample
        samples = vae.decode(z / scale).sample

    def to_uint8(x: torch.Tensor) -> np.ndarray:
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    return {"frames": frames.cpu().numpy(), "skeletons": skeletons.cpu().numpy(), "reconstructions": to_uint8(rec), "samples": to_uint8(samples)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=lab.DATA_DIR, help="folder with train.npz, edits.npz, data.json (prepare_data.py)")
    parser.add_argument("--model-dir", type=Path, default=lab.MODEL_DIR, help="where the diffusers folder is written")
    parser.add_argument("--out", type=Path, required=True, help="where mini.tar.NN, train_log.json and preview.npz go ($OUT)")
    parser.add_argument("--toy", action="store_true", help="tiny widths, 2 steps per phase (CPU tests)")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    numbers = ("vae_steps", "unet_steps", "controlnet_steps", "vae_seconds", "unet_seconds", "controlnet_seconds", "seed")
    for name in numbers:
        parser.add_argument("--" + name.replace("_", "-"), type=float if "seconds" in name else int, default=None)
    parser.add_argument("--controlnet-phase", choices=("joint", "after"), default=None,
                        help="joint (default): one phase for all; after: UNet + text encoder, then the ControlNet alone")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in (*numbers, "controlnet_phase") if getattr(args, k) is not None}
    cfg = MiniConfig(**{**(TOY if args.toy else {}), **overrides})

    from transformers import CLIPTokenizer

    from eym.models import write_tiny_tokenizer

    started = time.perf_counter()
    if args.toy:
        torch.set_num_threads(1)  # tiny ops: threads only add overhead on a small CPU
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    train, meta = lab.load_data(args.data / lab.TRAIN_FILE)
    windows, _ = lab.load_data(args.data / lab.EDITS_FILE)
    size = int(meta["size"])
    torch.manual_seed(cfg.seed)
    tok_dir = write_tiny_tokenizer(args.out / ".tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    shutil.rmtree(tok_dir)
    vae, unet, controlnet, text_encoder, scheduler = build_models(cfg, tokenizer, size)
    for m in (vae, unet, controlnet, text_encoder):
        m.to(device)
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in (("vae", vae), ("unet", unet), ("controlnet", controlnet), ("text_encoder", text_encoder))}
    print(json.dumps({"device": str(device), "frames": len(train["train_frames"]), "parameters": counts}), flush=True)

    frames = torch.from_numpy(train["train_frames"]).to(device)  # (N, H, W, 3) uint8
    log: list[dict] = []
    t0 = time.perf_counter()
    vae_steps = train_vae(vae, frames, cfg, device, log, autocast)
    vae.requires_grad_(False)
    mean, std = latent_stats(vae, frames, autocast)
    scale = float(1.0 / mean.std())  # SD's recipe: unit-variance latents (0.18215 for SD's VAE)
    vae.register_to_config(scaling_factor=scale)
    vae_seconds = time.perf_counter() - t0

    captions, content_idx, motion_idx = caption_table(meta)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
    data = {
        "mean": mean, "std": std, "scale": scale, "ids": ids,
        "clip": torch.from_numpy(train["train_clip"].astype(np.int64)),
        "content_idx": torch.from_numpy(content_idx), "motion_idx": torch.from_numpy(motion_idx),
        "skeletons": torch.from_numpy(train["train_skeletons"]).to(device),
    }
    t1 = time.perf_counter()
    steps_run = {"vae": vae_steps}
    if cfg.controlnet_phase == "joint":
        steps_run["unet"] = train_diffusion(unet, controlnet, text_encoder, scheduler, data, cfg, device, log, autocast)
        unet_seconds = time.perf_counter() - t1
        phase_seconds = {"unet": round(unet_seconds, 1)}
    else:
        steps_run["unet"] = train_diffusion(unet, None, text_encoder, scheduler, data, cfg, device, log, autocast)
        unet_seconds = time.perf_counter() - t1
        controlnet = controlnet_from(unet, cfg).to(device)  # the trained UNet's encoder, zero convolutions out
        t2 = time.perf_counter()
        steps_run["controlnet"] = train_diffusion(
            unet, controlnet, text_encoder, scheduler, data, cfg, device, log, autocast, phase="controlnet",
            trained=(controlnet,), steps=cfg.controlnet_steps, seconds=cfg.controlnet_seconds, lr=cfg.controlnet_lr)
        phase_seconds = {"unet": round(unet_seconds, 1), "controlnet": round(time.perf_counter() - t2, 1)}

    info = {
        "config": asdict(cfg), "steps_run": steps_run,
        "seconds": {"vae": round(vae_seconds, 1), **phase_seconds},
        "scaling_factor": scale, "parameters": counts, "device": str(device),
        "data": {"frames": len(train["train_frames"]), "clips": [{k: c[k] for k in ("name", "subject", "place") if k in c} | {"train": c.get("train")} for c in meta["clips"]],
                 "held_out": "the last %d frames (every %d-th) of each clip and %d before them" % (lab.EVAL_RAW_FRAMES, lab.FRAME_STEP, lab.GAP_RAW_FRAMES)},
        "captions": captions,
        "final": {phase: next((r for r in reversed(log) if r["phase"] == phase), None) for phase in ("vae", "unet", "controlnet")},
    }
    save_bundle(args.model_dir, vae, unet, controlnet, text_encoder, scheduler, info)
    packed = pack(args.model_dir, args.out)
    shots = preview(vae, unet, controlnet, text_encoder, tokenizer, scheduler, windows, meta, scale, device, autocast, steps=2 if args.toy else 25)
    np.savez_compressed(args.out / "preview.npz", **shots)
    info |= {"packed": packed, "log": log, "total_seconds": round(time.perf_counter() - started, 1)}
    (args.out / "train_log.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({"saved": str(args.model_dir), "parts": packed["parts"], "bytes": packed["bytes"], "total_seconds": info["total_seconds"]}), flush=True)
    return info


if __name__ == "__main__":
    main()

"""Random-weight replicas of SD 1.5 + ControlNet-openpose at true size, for GPU benchmarks.

Built from the architecture configs in ``eym/configs`` (the published ones), so every layer has
the real shape and the real count of parameters (UNet 859.52M, ControlNet 361.28M, VAE 83.65M,
CLIP text encoder 123.06M). Weights are random: timings and memory are real, images are noise.
The tokenizer is the tiny byte-level BPE one (token ids fall inside CLIP's 49,408 vocabulary).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from eym.models import SD15_CONFIG_DIR, CONFIGS_DIR, Components, write_tiny_tokenizer


def _config(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def controlnet_config_dir() -> Path:
    return CONFIGS_DIR / "controlnet-openpose"


def build_sd15_replica(device: str = "cuda", dtype: torch.dtype = torch.float16, seed: int = 0) -> Components:
    """SD 1.5 + ControlNet-openpose with random weights, built directly on ``device``."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)  # bench script only: the library never seeds globally
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(_config(SD15_CONFIG_DIR / "unet" / "config.json"))
        controlnet = ControlNetModel.from_config(_config(controlnet_config_dir() / "config.json"))
        vae = AutoencoderKL.from_config(_config(SD15_CONFIG_DIR / "vae" / "config.json"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_config(SD15_CONFIG_DIR / "text_encoder" / "config.json")))
    for m in (unet, controlnet, vae, text_encoder):
        m.to(dtype=dtype).eval().requires_grad_(False)
    tok_dir = Path(tempfile.mkdtemp(prefix="eym-replica-tok-"))
    write_tiny_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = DDIMScheduler.from_config(_config(SD15_CONFIG_DIR / "scheduler" / "scheduler_config.json"))
    return Components(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=controlnet,
        scheduler=scheduler,
        model_id="sd15-replica (random weights)",
        controlnet_id="controlnet-openpose-replica (random weights)",
        is_tiny=False,
        dtype=dtype,
        device=torch.device(device),
    )

"""Single-file (original LDM / CompVis layout) checkpoints load back weight for weight.

The tiny bundle's UNet, VAE and CLIP text encoder are written into ONE state dict in the layout
of the original SD 1.5 ``.safetensors`` files (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``) by :func:`to_ldm_checkpoint`, the
inverse of diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` /
``convert_ldm_clip_checkpoint`` (diffusers/loaders/single_file_utils.py). Loading that file
through eym's real single-file path must give back exactly the bundle's tensors.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from eym.models import _load_sd_single_file, load_components

# ---------------------------------------------------------------------------------------------
# diffusers -> original LDM key conversion (the inverse of diffusers' single-file converters)
# ---------------------------------------------------------------------------------------------
# UNet resnet sub-module names, diffusers -> LDM (ResBlock: in_layers = [norm, SiLU, conv], ...)
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# UNet layers outside the blocks, diffusers -> LDM
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# VAE mid-block attention, diffusers -> LDM (AttnBlock: norm, q, k, v, proj_out; 1x1 convs)
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split(key: str, prefix: str) -> tuple[list[str], str]:
    """``prefix.a.b.c.weight`` -> (["a", "b", "c"], "weight")."""
    parts = key[len(prefix):].split(".")
    return parts[:-1], parts[-1]


def _unet_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys.

    LDM numbers the UNet's layers flatly: ``input_blocks.0`` is conv_in, then per level
    ``layers_per_block`` entries ``[resnet, attention?]`` and one downsampler entry (``.0.op``,
    not after the last level); ``middle_block`` is [resnet, attention, resnet];
    ``output_blocks`` has ``layers_per_block + 1`` entries per level, the last of each level
    (but the final level) carrying the upsampler after the resnet and attention (``.1.conv`` or
    ``.2.conv``).
    """
    per_down = config["layers_per_block"] + 1  # input_blocks entries per level (layers + downsampler)
    per_up = config["layers_per_block"] + 1  # output_blocks entries per level
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, value in sd.items():
        module, leaf = key.rsplit(".", 1)
        parts = module.split(".")
        if module in _UNET_TOP:
            ldm = _UNET_TOP[module]
        elif parts[0] == "down_blocks":
            block, kind, idx, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "resnets":
                ldm = f"input_blocks.{1 + block * per_down + idx}.0.{_UNET_RESNET['.'.join(rest)]}"
            elif kind == "attentions":
                ldm = ".".join([f"input_blocks.{1 + block * per_down + idx}.1", *rest])
            else:  # downsamplers.0.conv
                assert kind == "downsamplers" and rest == ["conv"], key
                ldm = f"input_blocks.{1 + block * per_down + config['layers_per_block']}.0.op"
        elif parts[0] == "mid_block":
            kind, idx, rest = parts[1], int(parts[2]), parts[3:]
            if kind == "resnets":
                ldm = f"middle_block.{2 * idx}.{_UNET_RESNET['.'.join(rest)]}"
            else:
                assert kind == "attentions" and idx == 0, key
                ldm = ".".join(["middle_block.1", *rest])
        elif parts[0] == "up_blocks":
            block, kind, idx, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "resnets":
                ldm = f"output_blocks.{block * per_up + idx}.0.{_UNET_RESNET['.'.join(rest)]}"
            elif kind == "attentions":
                ldm = ".".join([f"output_blocks.{block * per_up + idx}.1", *rest])
            else:  # upsamplers.0.conv: after the resnet (and the attention, if the level has one)
                assert kind == "upsamplers" and rest == ["conv"], key
                slot = 2 if up_has_attn[block] else 1
                ldm = f"output_blocks.{block * per_up + per_up - 1}.{slot}.conv"
        else:
            raise KeyError(f"UNet key without an LDM counterpart in this converter: {key}")
        out[f"model.diffusion_model.{ldm}.{leaf}"] = value
    return out


def _vae_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL state dict -> ``first_stage_model.*`` keys.

    The decoder's levels are numbered the other way round in LDM (``up.0`` is the highest
    resolution, diffusers' last up block); the mid-block attention's linear layers are 1x1
    convolutions there.
    """
    num_up = len(config["up_block_types"])
    out = {}
    for key, value in sd.items():
        module, leaf = key.rsplit(".", 1)
        parts = module.split(".")
        side = parts[0]  # encoder / decoder / quant_conv / post_quant_conv
        if module in ("quant_conv", "post_quant_conv") or parts[1:] in (["conv_in"], ["conv_out"]):
            ldm = module
        elif parts[1:] == ["conv_norm_out"]:
            ldm = f"{side}.norm_out"
        elif parts[1] in ("down_blocks", "up_blocks"):
            level, kind, rest = int(parts[2]), parts[3], parts[4:]
            name, ldm_level = ("down", level) if parts[1] == "down_blocks" else ("up", num_up - 1 - level)
            if kind == "resnets":
                sub = ".".join(rest[1:]).replace("conv_shortcut", "nin_shortcut")
                ldm = f"{side}.{name}.{ldm_level}.block.{rest[0]}.{sub}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                assert kind in ("downsamplers", "upsamplers") and rest == ["0", "conv"], key
                ldm = f"{side}.{name}.{ldm_level}.{'downsample' if name == 'down' else 'upsample'}.conv"
        elif parts[1] == "mid_block":
            kind, idx, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                ldm = f"{side}.mid.block_{idx + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                assert kind == "attentions" and idx == 0, key
                ldm = f"{side}.mid.attn_1.{_VAE_ATTN[rest]}"
                if leaf == "weight" and value.ndim == 2:  # linear (C, C) -> 1x1 conv (C, C, 1, 1)
                    value = value[:, :, None, None]
        else:
            raise KeyError(f"VAE key without an LDM counterpart in this converter: {key}")
        out[f"first_stage_model.{ldm}.{leaf}"] = value
    return out


def _clip_to_ldm(sd: dict[str, torch.Tensor], max_positions: int) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel state dict -> ``cond_stage_model.transformer.text_model.*``.

    SD 1.5 files hold transformers 4's names, under ``text_model.`` (transformers 5 dropped that
    level), and the ``position_ids`` buffer, which transformers 5 no longer saves.
    """
    out = {f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v for k, v in sd.items()}
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(max_positions)[None]
    return out


def to_ldm_checkpoint(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One original-SD-1.5-layout state dict from diffusers/transformers models of any size."""
    parts = [
        _unet_to_ldm(unet.state_dict(), unet.config),
        _vae_to_ldm(vae.state_dict(), vae.config),
        _clip_to_ldm(text_encoder.state_dict(), text_encoder.config.max_position_embeddings),
    ]
    checkpoint = {}
    for part in parts:
        assert not checkpoint.keys() & part.keys()
        checkpoint.update(part)
    # safetensors wants contiguous tensors that share no memory
    return {k: v.detach().clone().contiguous() for k, v in checkpoint.items()}


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def originals(tiny_bundle):
    """The bundle's models, loaded by the ordinary folder path (fp32, CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    src = str(tiny_bundle)
    return {
        "unet": UNet2DConditionModel.from_pretrained(src, subfolder="unet", local_files_only=True),
        "vae": AutoencoderKL.from_pretrained(src, subfolder="vae", local_files_only=True),
        "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder", local_files_only=True),
    }


@pytest.fixture(scope="module")
def ldm_checkpoint(originals):
    return to_ldm_checkpoint(originals["unet"], originals["vae"], originals["text_encoder"])


def _assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module, name: str):
    got, want = loaded.state_dict(), original.state_dict()
    assert got.keys() == want.keys(), f"{name}: keys differ {sorted(got.keys() ^ want.keys())[:5]}"
    different = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:5]}"


def test_converter_writes_the_original_ldm_layout(ldm_checkpoint, originals):
    """The converted dict looks like an SD 1.5 .safetensors: its three prefixes, LDM block names,
    1x1-conv VAE attention, and one tensor per diffusers tensor."""
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
    assert all(k.startswith(prefixes) for k in ldm_checkpoint)
    counts = {p: sum(k.startswith(p) for k in ldm_checkpoint) for p in prefixes}
    assert counts == {
        "model.diffusion_model.": len(originals["unet"].state_dict()),
        "first_stage_model.": len(originals["vae"].state_dict()),
        "cond_stage_model.transformer.": len(originals["text_encoder"].state_dict()) + 1,  # + position_ids
    }
    # names SD 1.5 checkpoints carry (tiny config: 2 UNet levels, 1 layer each, attention on
    # the first down / last up level; 4 VAE levels)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler of a level without attention
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.ff.net.2.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",  # 16 -> 8 channels
        "first_stage_model.encoder.norm_out.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    ):
        assert key in ldm_checkpoint, key
    q = ldm_checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"]
    channels = originals["vae"].config.block_out_channels[-1]
    assert q.shape == (channels, channels, 1, 1)


def test_single_file_loads_back_exactly(tmp_path, tiny_bundle, originals, ldm_checkpoint):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(ldm_checkpoint, str(path))
    shutil.copytree(tiny_bundle / "tokenizer", tmp_path / "tokenizer")

    parts = _load_sd_single_file(path, torch.float32, config_dir=tiny_bundle)

    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(parts[name], originals[name], name)
    # the tokenizer came from tokenizer/ next to the file: the tiny vocabulary, not CLIP's 49408
    vocab = json.loads((tiny_bundle / "tokenizer" / "vocab.json").read_text())
    assert len(parts["tokenizer"]) == len(vocab) == parts["text_encoder"].config.vocab_size
    assert parts["scheduler"].config.clip_sample is False
    # same weights, same function: the loaded UNet predicts what the original does. Not bit for
    # bit: CPU kernels depend on where the weights lie in memory (measured: cloning the original's
    # own parameters moves its output by ~8e-7), so compare to float32 rounding
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        want = originals["unet"](latents, 10, encoder_hidden_states=text).sample
        got = parts["unet"](latents, 10, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 0.1  # a real prediction, not zeros


def test_single_file_through_load_components(tmp_path, tiny_bundle, originals, ldm_checkpoint):
    """A .safetensors file inside a tiny bundle folder takes that folder's (tiny) architecture.

    The bundle copy keeps its configs and tokenizer but loses its UNet/VAE/text-encoder
    weights, so everything those models hold must come from the single file.
    """
    from safetensors.torch import save_file

    folder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, folder)
    for sub in ("unet", "vae", "text_encoder"):
        weights = [p for p in (folder / sub).iterdir() if p.suffix in (".safetensors", ".bin")]
        assert weights, sub
        for p in weights:
            p.unlink()
    path = folder / "model.safetensors"
    save_file(ldm_checkpoint, str(path))

    components = load_components(str(path), controlnet=str(tiny_bundle / "controlnet"), device="cpu")

    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(components, name), originals[name], name)
    assert components.model_id == str(path)
    assert components.dtype == torch.float32 and components.device == torch.device("cpu")
    assert not any(p.requires_grad for p in components.unet.parameters())
    assert components.vae_scale_factor == 8

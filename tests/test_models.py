"""eym.models: the tiny bundle, loading from folders, hub ids offline, single files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from eym.errors import EymError
from eym.models import (
    DEFAULT_CONTROLNET,
    DEFAULT_MODEL,
    Components,
    build_tiny_bundle,
    describe,
    load_components,
    tiny_bundle_path,
)




def _folder_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_bundle_layout_and_size(tiny_bundle):
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "controlnet"):
        assert (tiny_bundle / sub).is_dir(), sub
    index = json.loads((tiny_bundle / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert (tiny_bundle / "tokenizer" / "vocab.json").is_file() and (tiny_bundle / "tokenizer" / "merges.txt").is_file()
    size = _folder_bytes(tiny_bundle)
    assert 100_000 < size < 15_000_000, size  # "a few MB"


def test_components_shapes_and_sd15_conventions(tiny_components: Components):
    c = tiny_components
    assert c.is_tiny and c.dtype == torch.float32 and c.device.type == "cpu"
    assert c.vae_scale_factor == 8 and c.vae.config.scaling_factor == pytest.approx(0.18215)
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size
    sched = c.scheduler.config
    assert type(c.scheduler).__name__ == "DDIMScheduler"
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (sched.num_train_timesteps, sched.set_alpha_to_one, sched.steps_offset, sched.clip_sample) == (1000, False, 1, False)
    # everything frozen: training switches on what it trains
    for m in (c.unet, c.vae, c.text_encoder, c.controlnet):
        assert not any(p.requires_grad for p in m.parameters())
    assert "tiny" in describe(c)


def test_tokenizer_roundtrip_and_padding(tiny_components):
    tok = tiny_components.tokenizer
    text = "a girl in a red dress is waving her arms, 2 times!"
    ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")
    # learned merges make known prompt words single tokens
    assert len(tok("dancing").input_ids) == 3


def test_tiny_bundle_is_deterministic(tmp_path, tiny_bundle):
    other = build_tiny_bundle(tmp_path / "again", seed=0)
    for rel in ("unet/diffusion_pytorch_model.safetensors", "controlnet/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json"):
        assert (other / rel).read_bytes() == (tiny_bundle / rel).read_bytes(), rel
    third = build_tiny_bundle(tmp_path / "seed1", seed=1)
    rel = "unet/diffusion_pytorch_model.safetensors"
    assert (third / rel).read_bytes() != (tiny_bundle / rel).read_bytes()


def test_tiny_bundle_path_is_cached_and_rebuilt_when_damaged():
    first = tiny_bundle_path()
    assert (first / "MANIFEST.json").is_file()
    stamp = (first / "MANIFEST.json").stat().st_mtime_ns
    assert tiny_bundle_path() == first and (first / "MANIFEST.json").stat().st_mtime_ns == stamp
    (first / "unet" / "config.json").write_text("{}")  # damage it: the manifest hash no longer matches
    again = tiny_bundle_path()
    assert json.loads((again / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"


def test_controlnet_denoise_two_steps_offline(tiny_components):
    """The bundle loaded offline runs in diffusers' own ControlNet pipeline."""
    from diffusers import StableDiffusionControlNetPipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    c = tiny_components
    pipe = StableDiffusionControlNetPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, controlnet=c.controlnet,
        scheduler=c.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    skeleton = np.zeros((64, 64, 3), np.uint8)
    skeleton[10:50, 30:34] = (255, 0, 0)
    from PIL import Image

    def run(image):
        out = pipe("a man dancing", image=Image.fromarray(image), num_inference_steps=2, height=64, width=64,
                   generator=torch.Generator().manual_seed(0), output_type="np")
        return out.images

    images = run(skeleton)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(images, run(skeleton))  # seeded: reproducible
    # the ControlNet's outputs are not zero in the tiny bundle: the skeleton matters
    assert np.abs(images - run(np.zeros_like(skeleton))).max() > 1e-4


def test_load_from_folder_and_explicit_controlnet(tiny_bundle):
    c = load_components(str(tiny_bundle), str(tiny_bundle / "controlnet"), device="cpu")
    assert c.controlnet_id == str(tiny_bundle / "controlnet") and c.is_tiny
    d = load_components(str(tiny_bundle), str(tiny_bundle), device="cpu")  # a bundle folder: its controlnet/
    assert d.controlnet_id == str(tiny_bundle)


def test_hub_id_offline_fails_fast_naming_local_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # surely nothing cached
    with pytest.raises(EymError) as e:
        load_components(DEFAULT_MODEL, device="cpu")
    msg = str(e.value)
    assert DEFAULT_MODEL in msg and "--model /path/to/folder" in msg and "\n" not in msg


def test_controlnet_hub_id_offline_fails_fast(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(EymError, match="--controlnet /path/to"):
        load_components(str(tiny_bundle), DEFAULT_CONTROLNET, device="cpu")


@pytest.mark.parametrize("bad", ["/no/such/folder", "./missing.safetensors", "~/nothing/here/model.ckpt"])
def test_missing_paths_are_clear_errors(bad):
    with pytest.raises(EymError, match="does not exist"):
        load_components(bad, device="cpu")


def test_folder_without_model_is_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(EymError, match="lacks vae/, text_encoder/, tokenizer/, scheduler/"):
        load_components(str(tmp_path), device="cpu")


def test_single_file_bad_files_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(EymError, match="could not read checkpoint"):
        load_components(str(junk), device="cpu")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"some.other.weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(EymError, match="no SD UNet weights"):
        load_components(str(foreign), device="cpu")


def test_cuda_unavailable_is_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(EymError, match="CUDA is not available"):
        load_components("tiny", device="cuda")


def test_resolve_device_names():
    from eym.models import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == expected
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(EymError, match="not a torch device"):
        resolve_device("gpu0")

"""Loading the base model: SD 1.5 + ControlNet-openpose, or the tiny random-weight bundle.

:func:`load_components` is the only function in eym that calls ``from_pretrained`` (STYLE.md
rule 2). It accepts

- ``"tiny"``: a tiny SD-1.5-shaped bundle with random weights (a few MB), built on demand under
  ``eym_home()/tiny`` by :func:`build_tiny_bundle`. It runs the whole method on a CPU in seconds
  (tests, the offline demo); its output is noise-like, by construction.
- a Hugging Face hub id (default :data:`DEFAULT_MODEL`), read from the local HF cache first and
  downloaded only when the user asked for a hub id and the network is allowed;
- a local diffusers folder (hub layout: ``unet/``, ``vae/``, ``text_encoder/``, ...);
- a single-file SD 1.5 checkpoint (``.safetensors`` / ``.ckpt``, e.g. a DreamBooth fine-tune),
  converted by diffusers' ``from_single_file`` with the architecture configs shipped in
  ``eym/configs`` so that no network is needed.

The ControlNet is chosen the same way (hub id, folder or single file); a bundle folder with its
own ``controlnet/`` subfolder (the tiny bundle has one) uses that by default.

All weights come back frozen (``requires_grad_(False)``) and in eval mode: whoever trains
(``eym/tuning.py``) switches on exactly the parameters it trains.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from eym.errors import EymError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CONTROLNET = "lllyasviel/sd-controlnet-openpose"
TINY = "tiny"

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
SD15_CONFIG_DIR = CONFIGS_DIR / "sd15"  # diffusers layout of SD 1.5, configs only (no weights)
CONTROLNET_CONFIG_DIR = CONFIGS_DIR / "controlnet-openpose"  # config.json of sd-controlnet-openpose

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
BUNDLE_MARKER = "eym_bundle.json"  # written into tiny bundles; says what built them

# The VAE latent scale of SD 1.5 (latents = scaling_factor * VAE mean).
SD15_SCALING_FACTOR = 0.18215


@dataclass
class Components:
    """Everything the method needs, as the diffusers pipelines take it (STYLE.md rule 2)."""

    vae: "diffusers.AutoencoderKL"  # noqa: F821  pixels <-> latents, 8x downsampling
    text_encoder: "transformers.CLIPTextModel"  # noqa: F821  prompts -> (B, 77, D) embeddings
    tokenizer: "transformers.CLIPTokenizer"  # noqa: F821  prompts -> ids, padded to 77
    unet: "diffusers.UNet2DConditionModel"  # noqa: F821  2D; eym.spacetime.inflate makes it space-time
    controlnet: "diffusers.ControlNetModel"  # noqa: F821  openpose skeleton conditioning, stays 2D
    scheduler: "diffusers.DDIMScheduler"  # noqa: F821  SD 1.5's noise schedule, DDIM
    model_id: str  # what the base model was loaded from ("tiny", hub id, folder or file)
    controlnet_id: str  # what the ControlNet was loaded from
    is_tiny: bool  # random-weight tiny bundle (outputs are meaningless, shapes are real)
    dtype: torch.dtype  # dtype of all weights
    device: torch.device  # device of all weights

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Components":
        """Move (and/or cast) every model in place; returns ``self``."""
        device = torch.device(device) if device is not None else self.device
        cast = dtype is not None and dtype != self.dtype
        for module in (self.vae, self.text_encoder, self.unet, self.controlnet):
            module.to(device=device, dtype=dtype) if cast else module.to(device=device)
        self.device, self.dtype = device, (dtype if cast else self.dtype)
        return self

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD 1.5 and the tiny bundle)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def describe(components: Components) -> str:
    """One line naming the loaded models, for logs, the app and settings files."""
    base = "tiny random-weight bundle (outputs are noise)" if components.is_tiny else components.model_id
    controlnet = "bundled" if components.controlnet_id == components.model_id else components.controlnet_id
    dtype = str(components.dtype).replace("torch.", "")
    return f"{base} + ControlNet {controlnet} ({dtype}, {components.device})"


# ---------------------------------------------------------------------------------------------
# load_components
# ---------------------------------------------------------------------------------------------
def load_components(
    model: str = TINY,
    controlnet: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Components:
    """Load the SD 1.5 components and the openpose ControlNet.

    Args:
        model: ``"tiny"``, a hub id (e.g. :data:`DEFAULT_MODEL`), a local diffusers folder or a
            single-file SD 1.5 checkpoint (``.safetensors``/``.ckpt``).
        controlnet: hub id, local folder or single file. ``None``: the bundle's own
            ``controlnet/`` subfolder if ``model`` is a folder that has one (the tiny bundle
            does), else :data:`DEFAULT_CONTROLNET`.
        dtype: weight dtype; default bfloat16 on CUDA cards that have it (A100, H100, RTX 30xx+), else
            float16 on CUDA, float32 elsewhere. bf16 matches the tuning's mixed precision, so no
            weight is cast at every step (measured in docs/PERFORMANCE.md).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; default CUDA if available, else CPU.

    Returns:
        :class:`Components`, frozen, in eval mode, on ``device`` in ``dtype``.

    Raises:
        EymError: a path that does not exist or is not a model, a hub id that is neither cached
            nor downloadable (offline), a device that is not available.
    """
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.float32 if device.type != "cuda" else torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    model_id = str(model)
    folder: Path | None = None  # the base model's folder, when it is one
    if model_id == TINY:
        folder = tiny_bundle_path()
        parts = _load_sd_folder(folder, dtype, local_only=True)
    elif _is_path_like(model_id):
        path = Path(model_id).expanduser()
        if path.is_dir():
            folder = path
            parts = _load_sd_folder(path, dtype, local_only=True)
        elif path.is_file():
            # a file inside a tiny bundle folder has the tiny architecture (tests); any other is SD 1.5
            config_dir = path.parent if _is_tiny_bundle(path.parent) else SD15_CONFIG_DIR
            parts = _load_sd_single_file(path, dtype, config_dir=config_dir)
        else:
            raise EymError(f"model {model_id!r} does not exist; pass a diffusers folder, a .safetensors/.ckpt file, a hub id or 'tiny'")
    else:
        parts = _load_sd_hub(model_id, dtype)

    bundled = folder is not None and (folder / "controlnet" / "config.json").is_file()
    if controlnet is None:
        controlnet = model_id if bundled else DEFAULT_CONTROLNET
    if bundled and controlnet == model_id:
        parts["controlnet"] = _from_pretrained_local(folder, "controlnet", dtype)
    else:
        parts["controlnet"] = _load_controlnet(controlnet, dtype)

    components = Components(
        **parts,
        model_id=model_id,
        controlnet_id=str(controlnet),
        is_tiny=folder is not None and _is_tiny_bundle(folder),
        dtype=dtype,
        device=torch.device("cpu"),
    )
    for module in (components.vae, components.text_encoder, components.unet, components.controlnet):
        module.requires_grad_(False)
        module.eval()
    components.to(device)  # dtype was set by from_pretrained
    logger.info("loaded %s", describe(components))
    return components


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """A torch device by name: ``None`` or ``"auto"`` is CUDA if available, else the CPU.

    Raises:
        EymError: not a device name, or CUDA asked for on a machine without it.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise EymError(f"device {device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EymError(f"device {str(device)!r} requested but CUDA is not available; use --device cpu")
    return device


def _is_path_like(name: str) -> bool:
    """A local path (existing, or written like one) rather than a hub id ``owner/name``."""
    if Path(name).expanduser().exists():
        return True
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.lower().endswith(SINGLE_FILE_SUFFIXES)
        or re.match(r"^[A-Za-z]:[\\/]", name) is not None
        or name.count("/") > 1
    )


def _is_tiny_bundle(folder: Path) -> bool:
    try:
        return json.loads((folder / BUNDLE_MARKER).read_text()).get("kind") == TINY
    except (OSError, ValueError, AttributeError):
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _load_sd_folder(source: str | Path, dtype: torch.dtype, *, local_only: bool) -> dict:
    """vae, text_encoder, tokenizer, unet, scheduler from a diffusers-layout folder or hub id."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if isinstance(source, Path):
        missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (source / sub).is_dir()]
        if missing:
            raise EymError(
                f"model folder {str(source)!r} lacks {', '.join(m + '/' for m in missing)}; "
                "pass a diffusers folder (hub layout), a .safetensors/.ckpt file or 'tiny'"
            )
    src = str(source)
    kw = {"local_files_only": local_only}
    scheduler_config = DDIMScheduler.load_config(src, subfolder="scheduler", **kw)
    return {
        "unet": UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, **kw),
        "vae": AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, **kw),
        "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype, **kw),
        "tokenizer": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw),
        "scheduler": _ddim_from_config(scheduler_config),
    }


def _ddim_from_config(config: dict) -> "diffusers.DDIMScheduler":  # noqa: F821
    """DDIM with the model's noise schedule.

    SD 1.5 ships a PNDM scheduler config; DDIM's own defaults would then turn on
    ``clip_sample`` (clipping latents to [-1, 1], wrong for latent diffusion), so the SD 1.5
    DDIM settings are forced here.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _hub_error(repo_id: str, what: str, err: Exception) -> EymError:
    why = "HF_HUB_OFFLINE is set" if _offline() else f"it could not be downloaded ({type(err).__name__})"
    flag = "--controlnet" if what == "ControlNet" else "--model"
    return EymError(
        f"{what} {repo_id!r} is not in the local Hugging Face cache and {why}; "
        f"download it once with network access, or pass a local copy: {flag} /path/to/folder or {flag} /path/to/file.safetensors"
    )


def _load_sd_hub(repo_id: str, dtype: torch.dtype) -> dict:
    """Hub id: the local HF cache first (no network at all); download only if that fails and allowed."""
    try:
        return _load_sd_folder(repo_id, dtype, local_only=True)
    except (OSError, ValueError) as err:
        if _offline():
            raise _hub_error(repo_id, "model", err) from err
        logger.info("%s not cached, downloading", repo_id)
    try:
        return _load_sd_folder(repo_id, dtype, local_only=False)
    except (OSError, ValueError) as err:
        raise _hub_error(repo_id, "model", err) from err


def _load_sd_single_file(path: Path, dtype: torch.dtype, config_dir: Path = SD15_CONFIG_DIR) -> dict:
    """A single-file SD 1.5 checkpoint, converted with the local architecture configs.

    The checkpoint holds the UNet, VAE and text encoder weights but not the tokenizer's
    vocabulary; that comes from ``tokenizer/`` next to the file, from ``config_dir`` if it has
    one, or from the cached :data:`DEFAULT_MODEL` (SD 1.5 fine-tunes keep CLIP's tokenizer).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, load_single_file_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise EymError(f"model file {str(path)!r} is not a checkpoint; expected one of {', '.join(SINGLE_FILE_SUFFIXES)}")
    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as err:  # safetensors/torch raise many types for a damaged file
        raise EymError(f"could not read checkpoint {str(path)!r} ({type(err).__name__}: {err}); is it a complete SD 1.5 .safetensors/.ckpt?") from err
    if not any(k.startswith("model.diffusion_model.") for k in checkpoint):
        raise EymError(f"checkpoint {str(path)!r} has no SD UNet weights (model.diffusion_model.*); pass an SD 1.5 checkpoint")

    kw = {"config": str(config_dir), "local_files_only": True, "torch_dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **kw)
        vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **kw)
        text_config = CLIPTextConfig.from_pretrained(str(config_dir), subfolder="text_encoder")
        text_encoder = CLIPTextModel(text_config)
        # SD files hold transformers 4's names (``text_model.*``, plus the ``position_ids`` buffer);
        # transformers 5's CLIPTextModel has no ``text_model.`` level and does not save position_ids
        expected = text_encoder.state_dict().keys()
        clip_state = {}
        for key, value in convert_ldm_clip_checkpoint(checkpoint).items():
            if key.endswith("position_ids"):
                continue
            if key not in expected and key.startswith("text_model."):
                key = key[len("text_model.") :]
            clip_state[key] = value
        missing, unexpected = text_encoder.load_state_dict(clip_state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer, not always saved
        if missing or unexpected:
            raise KeyError(f"text encoder keys: {len(missing)} missing, {len(unexpected)} unexpected")
        text_encoder.to(dtype)
    except (KeyError, RuntimeError, ValueError) as err:
        raise EymError(f"checkpoint {str(path)!r} does not match the SD 1.5 architecture ({type(err).__name__}: {err}); pass an SD 1.5 checkpoint") from err
    scheduler_config = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text())
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": _tokenizer_for_single_file(path, config_dir),
        "scheduler": _ddim_from_config(scheduler_config),
    }


def _tokenizer_for_single_file(path: Path, config_dir: Path):
    from transformers import CLIPTokenizer

    for folder in (path.parent / "tokenizer", config_dir / "tokenizer"):
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return CLIPTokenizer.from_pretrained(str(folder))
    try:
        return CLIPTokenizer.from_pretrained(DEFAULT_MODEL, subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError) as err:
        raise EymError(
            f"checkpoint {str(path)!r} needs CLIP's tokenizer, which is not in the file: put vocab.json and merges.txt "
            f"of {DEFAULT_MODEL} into {str(path.parent / 'tokenizer')!r}, or cache {DEFAULT_MODEL} once with network access"
        ) from err


def _from_pretrained_local(folder: Path, subfolder: str | None, dtype: torch.dtype) -> "diffusers.ControlNetModel":  # noqa: F821
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(str(folder), subfolder=subfolder, torch_dtype=dtype, local_files_only=True)


def _load_controlnet(source: str, dtype: torch.dtype) -> "diffusers.ControlNetModel":  # noqa: F821
    """ControlNet from a folder, a single file or a hub id."""
    from diffusers import ControlNetModel

    if _is_path_like(source):
        path = Path(source).expanduser()
        if path.is_dir():
            sub = "controlnet" if (path / "controlnet" / "config.json").is_file() else None
            if sub is None and not (path / "config.json").is_file():
                raise EymError(f"ControlNet folder {source!r} has no config.json; pass a diffusers ControlNet folder or a .safetensors file")
            return _from_pretrained_local(path, sub, dtype)
        if path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise EymError(f"ControlNet file {source!r} is not a checkpoint; expected one of {', '.join(SINGLE_FILE_SUFFIXES)}")
            try:
                return ControlNetModel.from_single_file(
                    str(path), config=str(CONTROLNET_CONFIG_DIR), local_files_only=True, torch_dtype=dtype
                )
            except Exception as err:  # a damaged or foreign file fails in many ways inside diffusers
                raise EymError(f"could not load ControlNet file {source!r} ({type(err).__name__}); pass an SD 1.5 openpose ControlNet") from err
        raise EymError(f"ControlNet {source!r} does not exist; pass a folder, a .safetensors file or a hub id")
    try:
        return ControlNetModel.from_pretrained(source, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        if _offline():
            raise _hub_error(source, "ControlNet", err) from err
    try:
        return ControlNetModel.from_pretrained(source, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise _hub_error(source, "ControlNet", err) from err


# ---------------------------------------------------------------------------------------------
# The tiny bundle
# ---------------------------------------------------------------------------------------------
# Words the tiny tokenizer's merges are learned from: the kind of prompts eym sees.
_TOKENIZER_CORPUS = """
a an the boy girl man woman person child clothes clothing dancer player is are wearing with and in on at of
black white gray grey red blue green yellow brown pink purple orange dark light long short
shirt t-shirt jacket coat dress skirt pants jeans shorts shoes sneakers hat cap hair glasses
dancing dance playing basketball football soccer tennis walking walk running run jumping jump
waving wave raising raise arms arm hands hand legs leg squat squatting step stepping tai chi
kung fu boxing kicking kick spinning turning sitting standing stretching yoga exercise
park street room stage studio beach field court road garden city indoor outdoor background
video photo high quality detailed realistic sunny day night young old smiling
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _learn_bpe(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE merges in CLIP's format (end of word marked by ``</w>``), deterministic."""
    byte_char = _bytes_to_unicode()
    words = collections.Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", corpus.lower()))
    # each word: its byte characters, the last one carrying the end-of-word suffix
    vocab = {}
    for word, count in words.items():
        chars = [byte_char[b] for b in word.encode()]
        chars[-1] += "</w>"
        vocab[tuple(chars)] = count
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for symbols, count in vocab.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties broken by the pair itself: deterministic
        merges.append(best)
        merged = {}
        for symbols, count in vocab.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        vocab = merged
    return merges


def write_tiny_tokenizer(folder: str | Path, num_merges: int = 400) -> Path:
    """Write a CLIP-style byte-level BPE tokenizer (vocab.json, merges.txt, configs) to ``folder``.

    Vocabulary layout as CLIP's: 256 byte characters, the same with ``</w>``, the merged
    symbols, then ``<|startoftext|>`` and ``<|endoftext|>``. Any text tokenizes (bytes are
    always in the vocabulary); the merges only make prompts shorter.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = _learn_bpe(_TOKENIZER_CORPUS, num_merges)
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True, add_prefix_space=False, errors="replace")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def _tiny_models(vocab_size: int, bos_id: int, eos_id: int):
    """Random-weight models of SD 1.5's shape, small. Uses the global torch RNG (caller forks it)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=8,  # latents 8x8 <-> 64x64 pixels by default; any multiple of 4 works
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # SD 1.5 has attention at high resolution and none at the lowest; keep both kinds and all
        # three places (down, mid, up) so that layer filters ("up", "mid,up") have something to pick
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,  # diffusers' historical name: the number of heads, as in SD 1.5's config
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # four levels -> three 2x downsamplings: the real 8x latent scale of SD 1.5
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=SD15_SCALING_FACTOR,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            projection_dim=32,
        )
    )
    # conditioning embedding: 4 levels -> 8x, so it takes RGB skeletons at pixel resolution
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    # ControlNet starts with zero convolutions, so a fresh one has no effect at all, and
    # PyTorch's default init shrinks the signal through the 8-conv skeleton encoder. Re-draw
    # both with variance-preserving (He) init so that skeletons visibly change the tiny model's
    # predictions; otherwise tests could not tell one skeleton from another.
    for conv in controlnet.controlnet_cond_embedding.modules():
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    for conv in [controlnet.controlnet_mid_block, *controlnet.controlnet_down_blocks]:
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="linear")
        conv.weight.data.mul_(0.5)  # residuals half the size of the UNet's own features
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return unet, vae, text_encoder, controlnet, scheduler


def build_tiny_bundle(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny SD-1.5-shaped bundle with random weights in the hub's diffusers layout.

    The folder holds ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/`` and ``controlnet/`` (a few MB), and loads back through
    :func:`load_components` like any diffusers folder. The same seed gives the same weights.
    The folder is written atomically (``eym.cache.building``): a crash leaves no half bundle.

    Args:
        out_dir: where the bundle goes (replaced if it exists).
        seed: weight initialisation seed.

    Returns:
        ``out_dir`` as a :class:`Path`.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from eym.cache import building

    out_dir = Path(out_dir)
    with building(out_dir, meta={"kind": TINY, "seed": seed}) as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp / "tokenizer")))
        # the global RNG is forked, not reseeded: the caller's random state is left untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet, vae, text_encoder, controlnet, scheduler = _tiny_models(
                len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
            )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp)
        controlnet.save_pretrained(tmp / "controlnet")
        # transformers 5 saves only tokenizer.json; keep CLIP's own vocab.json + merges.txt, the
        # files other tools (and older transformers) read
        shutil.rmtree(tmp / "tokenizer")
        write_tiny_tokenizer(tmp / "tokenizer")
        (tmp / BUNDLE_MARKER).write_text(json.dumps({"kind": TINY, "seed": seed}, indent=2) + "\n")
    logger.info("tiny bundle (seed %d) written to %s", seed, out_dir)
    return out_dir


def tiny_bundle_path(seed: int = 0) -> Path:
    """The cached tiny bundle under ``eym_home()/tiny`` (built on first use, verified after)."""
    from eym.cache import load_entry
    from eym.env import eym_home

    folder = eym_home() / TINY
    if seed != 0:
        folder = folder.with_name(f"{TINY}-seed{seed}")
    if load_entry(folder) is None:
        build_tiny_bundle(folder, seed=seed)
    return folder

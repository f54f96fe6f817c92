"""Numbers for an edited video: the paper's four (Table 1) and three that need no extra weights.

The paper's metrics (METHOD.md, "Evaluation in the paper"), on the edited frames x_1..x_n, the
source frames s_1..s_n and the target prompt P_t:

    TA  = 1/n     sum_i   cos(E_text(P_t), E_img(x_i))          text alignment        (higher better)
    TC  = 1/(n-1) sum_i   cos(E_img(x_i), E_img(x_{i+1}))       temporal consistency  (higher)
    L-N = 1/(n-1) sum_i   LPIPS(x_i, x_{i+1})                   neighbour LPIPS       (lower)
    L-S = 1/n     sum_i   LPIPS(x_i, s_i)                       source LPIPS          (lower)

E_text / E_img are CLIP's projected text and image embeddings (default
``openai/clip-vit-large-patch14``, the text encoder family of SD 1.5); LPIPS is the ``lpips``
package with its AlexNet trunk (torchvision's ImageNet weights from the torch hub cache) and the
linear layers shipped in its wheel.

Beyond the paper (only the pose and mask backends are needed):

- Motion alignment. p_ik: keypoint k detected in edited frame i; q_ik: the same keypoint of the
  reference skeleton that drove the edit; V: the (i, k) visible (confidence >= min_confidence)
  in both; s_i: the larger side of the bounding box of frame i's visible reference keypoints
  (normalised coordinates, so independent of resolution).
      PCK@a = |{(i,k) in V : ||p_ik - q_ik|| <= a * s_i}| / |V|       (a = 0.1 by default)
      MKD   = 1/|V| sum_V ||p_ik - q_ik|| / s_i                       mean normalised distance
      detection rate = |V| / |{(i,k): q_ik visible}|   (a person who vanished scores low here,
                                                        not a meaningless perfect PCK)
- Background preservation, over the pixels B outside dilate(M_source | M_edited):
      BG-PSNR = 10 log10(255^2 / MSE_B)      MSE_B pooled over B, all frames and channels
      BG-SSIM = mean over B of the SSIM map  (Wang et al. 2004: Gaussian window sigma 1.5,
                                              K1 0.01, K2 0.03, L 255, per RGB channel;
                                              scikit-image's structural_similarity)
- Temporal stability: MAFD = 1/(n-1) sum_i mean|x_{i+1} - x_i| (0..255), and its ratio to the
  source's MAFD (1 = as steady as the source; above 1 = flicker the source does not have).

A metric whose model or backend is missing is reported with ``value=None`` and the reason,
never as a number. Weights are only ever read from local caches: nothing here downloads.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from eym.errors import EymError
from eym.models import resolve_device
from eym.progress import ProgressCallback

logger = logging.getLogger(__name__)


# Metric groups; each can be switched on or off as a whole (EvalConfig.metrics).
GROUPS = ("clip", "lpips", "motion", "background", "temporal")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig:
    clip_model: str = "openai/clip-vit-large-patch14"  # hub id (read from the local HF cache only) or folder
    lpips_net: str = "alex"  # LPIPS trunk; the paper's tables use AlexNet ("alex" | "vgg" | "squeeze")
    pose: str = "auto"  # pose backend that detects the edited frames' skeletons (eym.pose)
    mask: str = "mediapipe"  # person-mask backend for the background metrics (eym.masks)
    pck_threshold: float = 0.1  # PCK radius, as a fraction of the reference skeleton's bbox size
    min_confidence: float = 0.3  # a keypoint counts as visible at this confidence or more
    mask_dilation: float = 0.03  # person masks grow by this fraction of the frame side (blur, halo)
    metrics: tuple[str, ...] = GROUPS  # which groups to compute
    device: str = "cpu"  # torch device for CLIP and LPIPS ("cpu" | "cuda" | "auto")
    batch_size: int = 8  # frames per CLIP / LPIPS forward pass

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        unknown = [m for m in self.metrics if m not in GROUPS]
        if unknown:
            raise EymError(f"unknown metric group(s) {unknown}; choose from {list(GROUPS)}")
        if not 0 < self.pck_threshold <= 1:
            raise EymError(f"pck_threshold={self.pck_threshold} must be in (0, 1]")
        if not 0 <= self.min_confidence <= 1:
            raise EymError(f"min_confidence={self.min_confidence} must be in [0, 1]")
        if not 0 <= self.mask_dilation < 0.5:
            raise EymError(f"mask_dilation={self.mask_dilation} must be in [0, 0.5)")
        if self.lpips_net not in ("alex", "vgg", "squeeze"):
            raise EymError(f"lpips_net={self.lpips_net!r}; choose alex, vgg or squeeze")
        if self.batch_size < 1:
            raise EymError(f"batch_size={self.batch_size} must be at least 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalConfig":
        """Build from a dict (JSON/YAML), rejecting unknown keys and values of the wrong type."""
        from eym.config import from_dict

        return from_dict(cls, data, where="eval")


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass
class Metric:
    """One number, or the reason it could not be computed."""

    name: str  # "TA", "TC", "L-N", "L-S", "PCK", "MKD", ...
    value: float | None  # None when unavailable
    higher_is_better: bool | None  # None: neither (e.g. MAFD, a raw level)
    unavailable: str | None = None  # why value is None
    per_frame: list[float] | None = None  # per frame (or per neighbouring pair) values

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value"] = _json_float(self.value)
        if self.per_frame is not None:
            d["per_frame"] = [_json_float(v) for v in self.per_frame]
        return d


@dataclass
class EvalReport:
    """All metrics of one edited video plus everything needed to reproduce them."""

    metrics: dict[str, Metric]
    settings: dict[str, Any]  # EvalConfig, sampling, prompt, inputs
    models: dict[str, Any] = field(default_factory=dict)  # what was loaded, from where

    def values(self) -> dict[str, float | None]:
        """Metric name -> value (None where unavailable), in table order."""
        return {name: m.value for name, m in self.metrics.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": {name: m.to_dict() for name, m in self.metrics.items()},
            "settings": self.settings,
            "models": self.models,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=str) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalReport":
        metrics = {}
        for name, m in data["metrics"].items():
            m = dict(m)
            m["value"] = _from_json_float(m["value"])
            if m.get("per_frame") is not None:
                m["per_frame"] = [_from_json_float(v) for v in m["per_frame"]]
            metrics[name] = Metric(**m)
        return cls(metrics=metrics, settings=data["settings"], models=data.get("models", {}))


# (name, higher_is_better, group) in the order tables show them: the paper's four first.
METRICS: tuple[tuple[str, bool | None, str], ...] = (
    ("TA", True, "clip"),
    ("TC", True, "clip"),
    ("L-N", False, "lpips"),
    ("L-S", False, "lpips"),
    ("PCK", True, "motion"),
    ("MKD", False, "motion"),
    ("DET", True, "motion"),
    ("BG-PSNR", True, "background"),
    ("BG-SSIM", True, "background"),
    ("MAFD", None, "temporal"),
    ("MAFD-ratio", None, "temporal"),
)

# Column headings of metric tables (the suite's results.md, the batch summary): arrows say which way is better.
HEADINGS = {
    "TA": "TA ↑", "TC": "TC ↑", "L-N": "L-N ↓", "L-S": "L-S ↓",
    "PCK": "PCK ↑", "MKD": "MKD ↓", "DET": "Det ↑",
    "BG-PSNR": "BG-PSNR ↑", "BG-SSIM": "BG-SSIM ↑",
    "MAFD": "MAFD", "MAFD-ratio": "MAFD ratio",
}  # fmt: skip


def table_columns(names: Iterable[str]) -> list[str]:
    """The metric names among ``names``, once each, in table order (:data:`METRICS`)."""
    present = set(names)
    return [name for name, _, _ in METRICS if name in present]


def format_value(value: float | None, name: str) -> str:
    """A metric as a table shows it: dB and pixel levels to 2 decimals, the rest to 3; ``n/a`` when unavailable."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.2f}" if name in ("BG-PSNR", "MAFD") else f"{value:.3f}"


def csv_value(value: float | None) -> str:
    """A metric as a CSV cell: the full float, empty when unavailable."""
    return "" if value is None else repr(float(value))


def _json_float(v: float | None) -> float | str | None:
    # JSON has no infinity; PSNR of identical backgrounds is +inf, written as the string "inf".
    if v is not None and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _from_json_float(v: float | str | None) -> float | None:
    return float(v) if isinstance(v, str) else v


class MetricUnavailable(Exception):
    """Internal: a metric group cannot run here (missing weights or backend); carries the reason."""


# ---------------------------------------------------------------------------------------------
# Pure metric functions (numpy in, float out)
# ---------------------------------------------------------------------------------------------
def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def text_alignment(image_embeds: np.ndarray, text_embed: np.ndarray) -> tuple[float, list[float]]:
    """TA: mean cosine similarity of the prompt embedding with each frame embedding.

    Args:
        image_embeds: (F, D) CLIP image embeddings of the edited frames.
        text_embed: (D,) CLIP text embedding of the target prompt.
    Returns:
        (mean, per-frame cosines).
    """
    cos = _normalise(image_embeds) @ _normalise(text_embed)  # (F,)
    return float(cos.mean()), cos.tolist()


def temporal_consistency(image_embeds: np.ndarray) -> tuple[float, list[float]]:
    """TC: mean cosine similarity of the CLIP image embeddings of neighbouring frames.

    Args:
        image_embeds: (F, D), F >= 2.
    """
    e = _normalise(image_embeds)
    cos = np.sum(e[:-1] * e[1:], axis=-1)  # (F-1,)
    return float(cos.mean()), cos.tolist()


def pose_alignment(
    detected: np.ndarray, reference: np.ndarray, *, threshold: float = 0.1, min_confidence: float = 0.3
) -> dict[str, Any]:
    """PCK@threshold, mean normalised keypoint distance and detection rate (module docstring).

    Args:
        detected: (F, 18, 3) keypoints detected in the edited frames (x, y in [0, 1], confidence).
        reference: (F, 18, 3) the reference skeletons that drove the edit.
        threshold: PCK radius as a fraction of the reference bbox size s_i.
        min_confidence: keypoints below this confidence count as not visible.
    Returns:
        {"pck", "mkd", "detection_rate", "visible_both", "visible_reference",
         "pck_per_frame"}; pck and mkd are None when no keypoint is visible in both.
    """
    detected = np.asarray(detected, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if detected.shape != reference.shape or detected.ndim != 3 or detected.shape[1:] != (18, 3):
        raise EymError(
            f"keypoint shapes {detected.shape} and {reference.shape} differ or are not (F, 18, 3); "
            "evaluate with the same frame sampling as the edit"
        )
    ref_vis = reference[..., 2] >= min_confidence  # (F, 18)
    both = ref_vis & (detected[..., 2] >= min_confidence)  # (F, 18)

    # s_i: larger side of the bounding box of the visible reference keypoints of frame i.
    xy = reference[..., :2]
    big = np.where(ref_vis[..., None], xy, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN frames (no reference person)
        side = np.nanmax(big, axis=1) - np.nanmin(big, axis=1)  # (F, 2)
    scale = np.nanmax(side, axis=1)  # (F,)
    usable = np.isfinite(scale) & (scale > 1e-6)  # a single visible point has no size
    both &= usable[:, None]

    dist = np.linalg.norm(detected[..., :2] - xy, axis=-1) / np.where(usable, scale, 1.0)[:, None]  # (F, 18)
    n_both, n_ref = int(both.sum()), int((ref_vis & usable[:, None]).sum())
    per_frame = [
        float(np.mean(dist[i][both[i]] <= threshold)) if both[i].any() else float("nan") for i in range(len(dist))
    ]
    return {
        "pck": float(np.mean(dist[both] <= threshold)) if n_both else None,
        "mkd": float(np.mean(dist[both])) if n_both else None,
        "detection_rate": n_both / n_ref if n_ref else None,
        "visible_both": n_both,
        "visible_reference": n_ref,
        "pck_per_frame": per_frame,
    }


def background_region(source_masks: np.ndarray, edited_masks: np.ndarray, dilation: float) -> np.ndarray:
    """Pixels that belong to neither person: ~dilate(M_source | M_edited).

    Args:
        source_masks, edited_masks: (F, H, W) bool person masks.
        dilation: grow the union by this fraction of the frame's larger side (at least 1 px if > 0).
    Returns:
        (F, H, W) bool, True where the background is compared.
    """
    import cv2

    union = np.asarray(source_masks, bool) | np.asarray(edited_masks, bool)
    radius = int(math.ceil(dilation * max(union.shape[1:]))) if dilation > 0 else 0
    if radius == 0:
        return ~union
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    grown = np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in union])
    return ~grown


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None, data_range: float = 255.0) -> float:
    """PSNR = 10 log10(L^2 / MSE), MSE pooled over ``region`` (all pixels if None) and channels.

    Args:
        a, b: (F, H, W, 3) uint8 or float frames.
        region: (F, H, W) bool, pixels to compare.
    Returns:
        dB; +inf when the compared pixels are identical.
    """
    diff2 = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2  # (F, H, W, 3)
    mse = float(diff2[region].mean()) if region is not None else float(diff2.mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, sigma: float = 1.5) -> np.ndarray:
    """SSIM map of two images (Wang et al. 2004, Gaussian window), channel by channel.

    SSIM = ((2 mu_a mu_b + C1)(2 s_ab + C2)) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, local statistics under a Gaussian window (sigma 1.5, 11
    taps, reflected borders), population covariance: scikit-image's ``structural_similarity``.

    Args:
        a, b: (H, W) or (H, W, C) images.
    Returns:
        (H, W) or (H, W, C) float64 map.
    """
    from skimage.metrics import structural_similarity

    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    # skimage refuses images smaller than its window; the Gaussian itself is set by sigma, the
    # window size only decides that check and the border crop of the mean (unused here).
    side = min(a.shape[:2])
    win_size = min(2 * int(3.5 * sigma + 0.5) + 1, side if side % 2 else side - 1)
    _, full = structural_similarity(
        a, b, win_size=max(win_size, 1), gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
        data_range=data_range, channel_axis=-1 if a.ndim == 3 else None, full=True,
    )
    return full


def ssim(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean SSIM over ``region`` of two videos.

    Args:
        a, b: (F, H, W, 3) frames, 0..255.
        region: (F, H, W) bool; None compares every pixel.
    """
    maps = np.stack([ssim_map(x, y) for x, y in zip(a, b)])  # (F, H, W, 3)
    return float(maps[region].mean()) if region is not None else float(maps.mean())


def mean_abs_frame_difference(frames: np.ndarray) -> tuple[float, list[float]]:
    """MAFD: mean over neighbouring frames of mean |x_{i+1} - x_i| (0..255 units).

    Args:
        frames: (F, H, W, 3), F >= 2.
    """
    f = np.asarray(frames, np.float64)
    per = np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3))  # (F-1,)
    return float(per.mean()), per.tolist()


# ---------------------------------------------------------------------------------------------
# Models (loaded from local files only; cached by (name, device))
# ---------------------------------------------------------------------------------------------
_CLIP_CACHE: dict[tuple[str, str], "ClipEmbedder"] = {}
_LPIPS_CACHE: dict[tuple[str, str, str], torch.nn.Module] = {}


class ClipEmbedder:
    """CLIP's projected text and image embeddings (any transformers model with get_*_features)."""

    def __init__(self, model: torch.nn.Module, processor: Any, name: str, device: torch.device):
        self.model, self.processor, self.name, self.device = model, processor, name, device

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        # transformers 5 returns an output object whose pooler_output is the projected embedding.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def embed_images(self, frames: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """(F, H, W, 3) uint8 -> (F, D) float64 embeddings (the processor resizes and normalises)."""
        out = []
        for i in range(0, len(frames), batch_size):
            inputs = self.processor(images=list(frames[i : i + batch_size]), return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
            out.append(self._features(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(out).double().numpy()

    @torch.no_grad()
    def embed_text(self, text: str) -> np.ndarray:
        """One prompt -> (D,) float64 embedding (truncated to the model's context length)."""
        max_len = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return self._features(self.model.get_text_features(**inputs))[0].float().cpu().double().numpy()

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "name": self.name,
            "class": type(self.model).__name__,
            "resolved": getattr(cfg, "_name_or_path", self.name),
            "commit": getattr(cfg, "_commit_hash", None),
            "projection_dim": getattr(cfg, "projection_dim", None),
        }


def load_clip(name: str, device: str = "cpu") -> ClipEmbedder:
    """Load CLIP from a local folder or the local Hugging Face cache; never from the network.

    Raises:
        MetricUnavailable: the weights are not on this machine (the reason says how to get them).
    """
    dev = resolve_device(device)
    key = (name, str(dev))
    if key in _CLIP_CACHE:
        return _CLIP_CACHE[key]
    from transformers import AutoModel, AutoProcessor

    path = Path(name).expanduser()
    local = path.exists()
    if local and not (path / "config.json").is_file():
        raise MetricUnavailable(f"CLIP folder {path} has no config.json; pass a transformers CLIP folder")
    try:
        # local_files_only: a missing model must say so at once, not hang on a download.
        model = AutoModel.from_pretrained(str(path) if local else name, local_files_only=True)
        processor = AutoProcessor.from_pretrained(str(path) if local else name, local_files_only=True)
    except (OSError, ValueError) as err:
        logger.debug("loading CLIP %s failed: %s", name, err)
        if local:
            raise MetricUnavailable(f"CLIP folder {path} could not be loaded ({type(err).__name__}): "
                                    f"{str(err).splitlines()[0][:160]}") from err
        raise MetricUnavailable(
            f"CLIP weights {name} are not in the local Hugging Face cache; download them once with "
            f"`huggingface-cli download {name}` or pass a local folder with --clip-model"
        ) from err
    if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
        raise MetricUnavailable(f"{name} ({type(model).__name__}) is not a CLIP-style text-image model")
    model.requires_grad_(False).eval().to(dev)
    embedder = ClipEmbedder(model, processor, name, dev)
    _CLIP_CACHE[key] = embedder
    logger.info("loaded CLIP %s on %s", name, dev)
    return embedder


def _lpips_files(net: str) -> tuple[Path, Path]:
    """(trunk weights in the torch hub cache, LPIPS linear layers in the lpips wheel)."""
    import lpips
    from torchvision import models as tv

    weights = {
        "alex": tv.AlexNet_Weights.IMAGENET1K_V1,
        "vgg": tv.VGG16_Weights.IMAGENET1K_V1,
        "squeeze": tv.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }[net]
    # torchvision's load_state_dict_from_url looks for <hub dir>/checkpoints/<basename of url>.
    trunk = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    linear = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    return trunk, linear


def load_lpips(net: str = "alex", device: str = "cpu") -> torch.nn.Module:
    """LPIPS v0.1 through the ``lpips`` package, only if every weight file is already local.

    Raises:
        MetricUnavailable: the trunk (torch hub cache) or linear weights (lpips wheel) are missing.
    """
    dev = resolve_device(device)
    trunk, linear = _lpips_files(net)
    key = (net, str(dev), str(trunk))
    if key in _LPIPS_CACHE:
        return _LPIPS_CACHE[key]
    # Checked first: otherwise torchvision would try to download the trunk (and hang offline).
    if not trunk.is_file():
        raise MetricUnavailable(
            f"LPIPS {net} trunk weights {trunk.name} not in the torch hub cache {trunk.parent}; "
            f"download them once (torchvision {net} ImageNet weights) or set TORCH_HOME"
        )
    if not linear.is_file():
        raise MetricUnavailable(f"LPIPS linear weights {linear} missing; reinstall the lpips package")
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained=' deprecation, inside lpips
        try:
            model = lpips.LPIPS(net=net, version="0.1", verbose=False)
        except (RuntimeError, OSError) as err:  # a damaged or mismatching weights file
            raise MetricUnavailable(f"LPIPS {net} weights in {trunk} could not be loaded: {err}") from err
    model.requires_grad_(False).eval().to(dev)
    _LPIPS_CACHE[key] = model
    logger.info("loaded LPIPS (%s) from %s on %s", net, trunk, dev)
    return model


def lpips_distances(model: torch.nn.Module, a: np.ndarray, b: np.ndarray, batch_size: int = 8) -> list[float]:
    """LPIPS between a[i] and b[i] for each i.

    Args:
        model: an ``lpips.LPIPS`` module.
        a, b: (N, H, W, 3) uint8 frames.
    Returns:
        N distances.
    """
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(a), batch_size):
            # uint8 -> (n, 3, H, W) in [-1, 1], the range LPIPS was trained on.
            x = torch.from_numpy(np.ascontiguousarray(a[i : i + batch_size])).permute(0, 3, 1, 2).float() / 127.5 - 1
            y = torch.from_numpy(np.ascontiguousarray(b[i : i + batch_size])).permute(0, 3, 1, 2).float() / 127.5 - 1
            d = model(x.to(device), y.to(device))  # (n, 1, 1, 1)
            out.extend(d.flatten().cpu().tolist())
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation of one edited video
# ---------------------------------------------------------------------------------------------
def _check_frames(edited: np.ndarray, source: np.ndarray) -> None:
    if edited.ndim != 4 or edited.shape[-1] != 3 or edited.dtype != np.uint8:
        raise EymError(f"edited frames must be (F, H, W, 3) uint8, got {edited.shape} {edited.dtype}")
    if edited.shape != source.shape:
        raise EymError(
            f"edited video {tuple(edited.shape)} and source {tuple(source.shape)} differ in frames or size; "
            "evaluate with the same --frames/--size/--start/--stride as the edit"
        )
    if len(edited) < 2:
        raise EymError(f"need at least 2 frames to evaluate, got {len(edited)}")


def evaluate(
    edited: np.ndarray,
    source: np.ndarray,
    target_prompt: str,
    *,
    reference_keypoints: np.ndarray | None = None,
    source_masks: np.ndarray | None = None,
    config: EvalConfig = EvalConfig(),
    settings: dict[str, Any] | None = None,
    callback: ProgressCallback | None = None,
) -> EvalReport:
    """Compute every metric group in ``config.metrics`` for one edited video.

    Args:
        edited: (F, H, W, 3) uint8 edited frames.
        source: (F, H, W, 3) uint8 source frames, sampled exactly as for the edit.
        target_prompt: P_t, the prompt of the editing branch.
        reference_keypoints: (F, 18, 3) the (retargeted, if the edit retargeted) reference
            skeletons that drove the edit; None makes the motion metrics unavailable.
        source_masks: (F, H, W) bool person masks of the source (recomputed with
            ``config.mask`` when None).
        config: metric settings.
        settings: extra settings to record (sampling, inputs); merged into the report.
        callback: ``callback("eval", step, total)`` after each metric group.
    Returns:
        An :class:`EvalReport`; unavailable metrics carry their reason instead of a value.
    """
    edited = np.asarray(edited)
    source = np.asarray(source)
    _check_frames(edited, source)
    if reference_keypoints is not None and np.asarray(reference_keypoints).shape[0] != len(edited):
        raise EymError(
            f"{np.asarray(reference_keypoints).shape[0]} reference skeletons for {len(edited)} edited frames; "
            "evaluate with the same frame sampling as the edit"
        )

    results: dict[str, Metric] = {}
    models: dict[str, Any] = {}
    context = {"edited": edited, "source": source, "prompt": target_prompt, "reference": reference_keypoints,
               "source_masks": source_masks}
    groups = [g for g in GROUPS if g in config.metrics]
    for step, group in enumerate(groups, start=1):
        try:
            metrics, used = _GROUP_RUNNERS[group](context, config)
        except MetricUnavailable as err:
            logger.warning("%s metrics unavailable: %s", group, err)
            metrics = [Metric(n, None, hib, unavailable=str(err)) for n, hib, g in METRICS if g == group]
            used = {"unavailable": str(err)}
        results.update({m.name: m for m in metrics})
        models[group] = used
        if callback is not None:
            callback("eval", step, len(groups))

    ordered = {n: results[n] for n, _, _ in METRICS if n in results}
    recorded = {"eval": asdict(config), "target_prompt": target_prompt, "num_frames": int(len(edited)),
                "size": [int(edited.shape[1]), int(edited.shape[2])], **(settings or {})}
    return EvalReport(metrics=ordered, settings=recorded, models=models)


def _run_clip(ctx: dict[str, Any], cfg: EvalConfig) -> tuple[list[Metric], dict[str, Any]]:
    clip = load_clip(cfg.clip_model, cfg.device)
    img = clip.embed_images(ctx["edited"], cfg.batch_size)  # (F, D)
    txt = clip.embed_text(ctx["prompt"])  # (D,)
    ta, ta_per = text_alignment(img, txt)  # METHOD.md Table 1: TA
    tc, tc_per = temporal_consistency(img)  # METHOD.md Table 1: TC
    return [Metric("TA", ta, True, per_frame=ta_per), Metric("TC", tc, True, per_frame=tc_per)], clip.describe()


def _run_lpips(ctx: dict[str, Any], cfg: EvalConfig) -> tuple[list[Metric], dict[str, Any]]:
    model = load_lpips(cfg.lpips_net, cfg.device)
    x, s = ctx["edited"], ctx["source"]
    ln = lpips_distances(model, x[:-1], x[1:], cfg.batch_size)  # METHOD.md Table 1: L-N
    ls = lpips_distances(model, x, s, cfg.batch_size)  # METHOD.md Table 1: L-S
    trunk, linear = _lpips_files(cfg.lpips_net)
    used = {"package": "lpips", "version": "0.1", "net": cfg.lpips_net, "trunk_weights": str(trunk),
            "linear_weights": str(linear)}
    return [
        Metric("L-N", float(np.mean(ln)), False, per_frame=ln),
        Metric("L-S", float(np.mean(ls)), False, per_frame=ls),
    ], used


def _backend(kind: str, name: str) -> Any:
    """A pose or mask backend; a missing one makes its metrics unavailable, not the run fail."""
    try:
        if kind == "pose":
            from eym.pose import get_pose_backend

            return get_pose_backend(name)
        from eym.masks import get_mask_backend

        return get_mask_backend(name)
    except (EymError, ImportError, OSError, RuntimeError) as err:
        raise MetricUnavailable(f"{kind} backend {name!r} unavailable: {err}") from err


def _run_motion(ctx: dict[str, Any], cfg: EvalConfig) -> tuple[list[Metric], dict[str, Any]]:
    if ctx["reference"] is None:
        raise MetricUnavailable("no reference skeletons given (pass --reference)")
    backend = _backend("pose", cfg.pose)
    detected = backend.detect(ctx["edited"])  # (F, 18, 3)
    r = pose_alignment(detected, ctx["reference"], threshold=cfg.pck_threshold, min_confidence=cfg.min_confidence)
    used = {"pose_backend": getattr(backend, "name", cfg.pose), "visible_both": r["visible_both"],
            "visible_reference": r["visible_reference"], "pck_threshold": cfg.pck_threshold,
            "normaliser": "larger side of the reference skeleton's bounding box"}
    if r["pck"] is None:
        reason = "no keypoint visible in both the edited frames and the reference skeletons"
        return [Metric("PCK", None, True, reason), Metric("MKD", None, False, reason),
                Metric("DET", r["detection_rate"], True)], used
    return [
        Metric("PCK", r["pck"], True, per_frame=r["pck_per_frame"]),
        Metric("MKD", r["mkd"], False),
        Metric("DET", r["detection_rate"], True),
    ], used


def _run_background(ctx: dict[str, Any], cfg: EvalConfig) -> tuple[list[Metric], dict[str, Any]]:
    backend = _backend("mask", cfg.mask)
    edited_masks = backend.segment(ctx["edited"])  # (F, H, W)
    source_masks = ctx["source_masks"] if ctx["source_masks"] is not None else backend.segment(ctx["source"])
    region = background_region(source_masks, edited_masks, cfg.mask_dilation)
    used = {"mask_backend": getattr(backend, "name", cfg.mask), "background_fraction": float(region.mean()),
            "mask_dilation": cfg.mask_dilation}
    if not region.any():
        reason = "no background left outside the (dilated) person masks"
        return [Metric("BG-PSNR", None, True, reason), Metric("BG-SSIM", None, True, reason)], used
    x, s = ctx["edited"], ctx["source"]
    return [
        Metric("BG-PSNR", psnr(x, s, region), True),
        Metric("BG-SSIM", ssim(x, s, region), True),
    ], used


def _run_temporal(ctx: dict[str, Any], cfg: EvalConfig) -> tuple[list[Metric], dict[str, Any]]:
    mafd, per = mean_abs_frame_difference(ctx["edited"])
    src, _ = mean_abs_frame_difference(ctx["source"])
    ratio = Metric("MAFD-ratio", mafd / src, None) if src > 0 else Metric(
        "MAFD-ratio", None, None, unavailable="the source frames do not change (MAFD 0)")
    return [Metric("MAFD", mafd, None, per_frame=per), ratio], {"source_mafd": src}


_GROUP_RUNNERS: dict[str, Callable[[dict[str, Any], EvalConfig], tuple[list[Metric], dict[str, Any]]]] = {
    "clip": _run_clip,
    "lpips": _run_lpips,
    "motion": _run_motion,
    "background": _run_background,
    "temporal": _run_temporal,
}


# ---------------------------------------------------------------------------------------------
# Evaluation from files (the CLI's `eym eval`)
# ---------------------------------------------------------------------------------------------
def evaluate_files(
    edited: str | Path,
    source: str | Path,
    target_prompt: str,
    *,
    reference: str | Path | None = None,
    num_frames: int | None = 8,
    size: int = 512,
    start: int = 0,
    stride: int | None = None,
    resize_mode: str = "crop",
    retarget: bool = True,
    config: EvalConfig = EvalConfig(),
    callback: ProgressCallback | None = None,
) -> EvalReport:
    """Evaluate an edited video file against its source and reference, sampled as the edit was.

    The source (and reference) go through :func:`eym.preprocess.preprocess` with the edit's
    sampling, so the frames, skeletons and masks are the ones the edit saw (and come from its
    cache when the edit ran on this machine). The edited video is read whole, at its own size.

    Args:
        edited: the edited video (every frame of it is one edited frame).
        source: the source video or frame folder the edit started from.
        target_prompt: P_t.
        reference: the reference video / frame folder, or a preset motion name
            (:data:`eym.presets.PRESETS`); None skips the motion metrics.
        num_frames, size, start, stride, resize_mode: the edit's sampling settings.
        retarget: the edit retargeted the reference skeletons to the source person, so
            compare against the retargeted skeletons (:func:`eym.pose.retarget`).
        config: metric settings (its pose and mask backends also preprocess the inputs).
        callback: ``callback(stage, step, total)``: ``"preprocess"`` then ``"eval"``.
    Returns:
        :class:`EvalReport` whose settings record the inputs and the sampling.
    """
    from eym.preprocess import PreprocessConfig, preprocess
    from eym.video import read_video

    prep = PreprocessConfig(num_frames=num_frames, size=size, start=start, stride=stride,
                            resize_mode=resize_mode, pose=config.pose, mask=config.mask)
    edited_video = read_video(edited, num_frames=None, size=None)
    frames = edited_video.frames
    if frames.shape[1:3] != (size, size):
        raise EymError(
            f"edited video {edited} is {frames.shape[2]}x{frames.shape[1]}, not {size}x{size}; "
            f"pass the edit's --size"
        )
    if num_frames is not None and len(frames) != num_frames:
        raise EymError(f"edited video {edited} has {len(frames)} frames, not {num_frames}; pass the edit's --frames")
    needs_masks = "background" in config.metrics
    src = preprocess(source, prep, with_masks=needs_masks, callback=callback)

    ref_kp, ref_desc = None, None
    if reference is not None:
        motion = _reference_motion(reference, prep, src, retarget, callback)
        ref_kp, ref_desc = motion.keypoints, motion.label  # as the edit did: presets fitted once
    settings = {
        "inputs": {"edited": str(edited), "source": str(source), "reference": ref_desc},
        "sampling": {"num_frames": num_frames, "size": size, "start": start, "stride": stride,
                     "resize_mode": resize_mode},
        "retarget": retarget,
        "source_content_hash": getattr(src, "content_hash", None),
    }
    return evaluate(frames, src.frames, target_prompt, reference_keypoints=ref_kp,
                    source_masks=src.masks if needs_masks else None, config=config, settings=settings,
                    callback=callback)


def _reference_motion(reference: str | Path, prep: Any, source: Any, retarget: bool,
                      callback: ProgressCallback | None) -> Any:
    """The motion of ``--reference``: a video/folder, or (when no such path exists) a preset name."""
    from eym.motion import resolve_motion
    from eym.presets import PRESETS

    path = Path(reference)
    if path.exists():
        return resolve_motion(source, reference=path, config=prep, retarget=retarget, callback=callback)
    if str(reference) in PRESETS:
        return resolve_motion(source, preset=str(reference), config=prep, retarget=retarget)
    raise EymError(
        f"reference {reference} is neither a file/folder nor a preset; presets: {', '.join(sorted(PRESETS))}"
    )

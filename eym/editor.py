"""The Editor: tune once per source video, then edit it with any reference motion.

This is the API the CLI, the app, the suite and batch share. An edit is

1. preprocess the source (frames, skeletons, masks) and the reference (skeletons only), or take
   a built-in preset motion as the reference (:mod:`eym.preprocess`, :mod:`eym.presets`);
2. tune: DPL stage 1 + 2 on the source (:mod:`eym.tuning`), or reuse a cached result. The
   result depends on the source, its prompts, the base model and the tuning settings, never on
   the reference, so it is cached under a key of exactly those (``<cache_dir>/<key>/``:
   ``tuned.safetensors`` with only the trained tensors, ``manifest.json``);
3. infer: DDIM inversion of the source with the tuned model, then the reconstruction and the
   editing branch side by side with key/value injection (:mod:`eym.sampling`);
4. write the edited video, a side-by-side (source | reference skeleton | edited) and the
   run's settings next to it.

The Editor inflates the UNet once and keeps a CPU copy of the weights tuning starts from
(SD's RC-Attn weights and the fresh temporal attention), so tuning source B after source A
starts from SD, not from A's result; it swaps tuned tensors in and out per source.
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import re
import shutil
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eym.cache import atomic_write_json, building, load_entry, sha256_bytes, stable_hash
from eym.config import to_dict
from eym.errors import EymError
from eym.validate import check_ddim_steps, check_ranges
from eym.injection import InjectionSchedule, injection_preset
from eym.motion import Motion, motion_skeletons, resolve_motion
from eym.preprocess import PreprocessConfig
from eym.progress import ProgressCallback
from eym.tuning import TuneConfig, TuningData, tune_dpl

logger = logging.getLogger(__name__)

TUNED_FILE = "tuned.safetensors"
TUNED_MANIFEST = "manifest.json"
TUNED_KIND = "eym-tuned"
# Bump when tuning changes what it computes: older cache entries then stop matching.
TUNING_VERSION = 1
INVERSION_CACHE_SIZE = 4  # inverted sources an Editor keeps (CPU tensors of (1, 4, F, h, w))


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompts:
    """The paper's three prompts."""

    content: str  # P_c: the subject alone, "A boy wearing black clothes and gray pants."
    source: str  # P_s: P_c plus the source motion, "... is dancing."
    target: str  # P_t: P_c plus the target motion, "... is playing basketball."


# "is/are <verb>ing": where the motion phrase of a prompt starts
_BE = {"is", "are"}


def _words(text: str) -> list[str]:
    return text.split()


def _bare(word: str) -> str:
    return re.sub(r"[^\w-]", "", word.lower())


def _sentence(text: str) -> str:
    """Collapse whitespace, capitalise the first letter, end with one period."""
    text = " ".join(text.split()).rstrip(" .,;:")
    if not text:
        return ""
    return text[0].upper() + text[1:] + "."


def derive_content_prompt(source: str) -> str:
    """P_c from P_s alone: the subject, i.e. the words before the motion phrase.

    Rule: the motion phrase starts at the last "is/are <word>ing" of P_s ("A girl who is
    wearing a dress is dancing" gives "A girl who is wearing a dress."); without an "-ing" word
    at the last "is/are"; failing that, P_s itself (minus its final period) is P_c. P_t plays no
    part: tuning, and so its cache key, depends on the source side only (METHOD.md "Training").

    Args:
        source: P_s, e.g. "A boy in black is dancing on the beach."

    Returns:
        P_c as a sentence, e.g. "A boy in black."
    """
    words = _words(source)
    be = [i for i, w in enumerate(words) if i > 0 and _bare(w) in _BE]
    verbs = [i for i in be if i + 1 < len(words) and _bare(words[i + 1]).endswith("ing")]
    cut = (verbs or be or [None])[-1]
    return _sentence(" ".join(words[:cut]) if cut is not None else source)


def derive_prompts(
    subject: str | None = None,
    source_motion: str | None = None,
    target_motion: str | None = None,
    *,
    content: str | None = None,
    source: str | None = None,
    target: str | None = None,
) -> Prompts:
    """Compose the three prompts, either from a subject and two motions or from whole prompts.

    Two ways in (the app uses the first, the CLI the second):

    - ``subject`` + ``source_motion`` + ``target_motion``: P_c = subject, P_s = "<subject> is
      <source motion>.", P_t = "<subject> is <target motion>." ("is" is not doubled if the
      motion already starts with "is"/"are").
    - ``source`` + ``target`` (+ ``content``): whole prompts; a missing P_c is derived from P_s
      alone by :func:`derive_content_prompt`.

    Args:
        subject: the subject alone, e.g. "A girl in a white dress".
        source_motion: what the subject does in the source video, e.g. "dancing on the beach".
        target_motion: what it should do instead; may be empty when only tuning.
        content, source, target: whole prompts, overriding the composed ones.

    Returns:
        :class:`Prompts`; ``target`` may be "" (only :meth:`Editor.infer` needs it).

    Raises:
        EymError: neither a subject nor a source prompt.
    """
    if subject and subject.strip():
        content = content or _sentence(subject)
        source = source or (_sentence(_with_be(subject, source_motion)) if source_motion else content)
        target = target or (_sentence(_with_be(subject, target_motion)) if target_motion else "")
    if not (source and source.strip()):
        raise EymError("no source prompt: give --source-prompt (e.g. 'A girl in a white dress is dancing.') or a subject")
    source = " ".join(source.split())
    target = " ".join((target or "").split())
    content = " ".join(content.split()) if content and content.strip() else derive_content_prompt(source)
    return Prompts(content=content, source=source, target=target)


def _with_be(subject: str, motion: str) -> str:
    motion = motion.strip()
    first = _bare(motion.split()[0]) if motion else ""
    return f"{subject.strip()} {motion}" if first in _BE else f"{subject.strip()} is {motion}"


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferConfig:
    """Settings of inversion + two-branch sampling (the paper's defaults; docs/METHOD.md says why each)."""

    ddim_steps: int = 50  # DDIM steps of inversion and of sampling
    guidance_scale: float = 1.0  # classifier-free guidance of the branches; 1.0 = none (the paper)
    injection: InjectionSchedule | str = InjectionSchedule()  # where the editing branch sees the reconstruction's K/V; a schedule or a preset name (eym.injection)
    injection_weighting: str = "paper"  # "paper": Eq. 18 literally; "balanced": the two current-frame key blocks share one slot (edit = reconstruction when inputs match)
    retarget: bool = True  # fit the reference skeletons to the source person's size and position
    controlnet_scale: float = 1.0  # strength of the ControlNet residuals
    decode_chunk: int = 8  # frames per VAE encode/decode call (memory)

    def __post_init__(self) -> None:
        check_ranges(self)  # types, finiteness and bounds of eym.validate.RANGES
        if self.ddim_steps < 1:
            raise EymError(f"ddim_steps must be >= 1, got {self.ddim_steps}")
        if self.guidance_scale < 1.0:
            raise EymError(f"guidance_scale must be >= 1.0 (1.0 = no guidance), got {self.guidance_scale}")
        if isinstance(self.injection, str):  # a preset name; kept as its schedule so the settings record say what ran
            object.__setattr__(self, "injection", injection_preset(self.injection))
        if self.injection_weighting not in ("paper", "balanced"):
            raise EymError(f"injection_weighting {self.injection_weighting!r} is not 'paper' or 'balanced'")
        if self.decode_chunk < 1:
            raise EymError(f"decode_chunk must be >= 1, got {self.decode_chunk}")


@dataclass(frozen=True)
class EditConfig:
    """All settings of one edit."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # frames, size, pose/mask backends
    tune: TuneConfig = field(default_factory=TuneConfig)  # DPL tuning
    infer: InferConfig = field(default_factory=InferConfig)  # inversion + sampling


@dataclass
class TunedWeights:
    """A tuned model for one source: only the trained tensors, and what they were tuned from."""

    path: Path  # the cache entry folder (tuned.safetensors, manifest.json)
    manifest: dict  # base model, ControlNet, prompts, settings, source content hash, losses
    reused: bool  # True when found in the cache (no tuning steps ran)

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def tensors_path(self) -> Path:
        return self.path / TUNED_FILE


@dataclass
class EditResult:
    """What :meth:`Editor.edit` wrote and returns."""

    video: Path  # the edited video (H.264 yuv420p mp4, the source's fps and soundtrack)
    side_by_side: Path  # source | motion (reference skeleton) | edit, labelled
    settings: Path  # the run's settings and prompts (JSON)
    reused_tuning: bool  # the tuned weights came from the cache
    frames: np.ndarray  # (F, H, W, 3) uint8, the edited frames
    motion: Motion  # the motion that drove the editing branch (its skeletons S_rf, keypoints, reference)

    @property
    def skeletons(self) -> np.ndarray:
        """(F, H, W, 3) uint8, the skeletons S_rf that drove the editing branch."""
        return self.motion.skeletons


# ---------------------------------------------------------------------------------------------
# the Editor
# ---------------------------------------------------------------------------------------------
# Per UNet: the CPU copy of the tensors tuning starts from, and the key of the tuned tensors it
# holds now. Kept per model object (not per Editor) so that two Editors over one set of
# components never take each other's tuned weights for the base weights.
_BASE_WEIGHTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()
_LOADED: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()


class Editor:
    """Tune and edit with one set of loaded components.

    Args:
        components: :class:`eym.models.Components`; the UNet is inflated in place (once).
        cache_dir: where tuned weights are cached; default ``eym_home()/"tuned"``.
        disable_progress: turn the tqdm bars off (callbacks still fire).
    """

    def __init__(self, components, *, cache_dir: str | Path | None = None, disable_progress: bool = False):
        from eym.env import eym_home
        from eym.spacetime import inflate, rc_attn_parameters, temporal_parameters

        self.components = components
        self.cache_dir = Path(cache_dir) if cache_dir is not None else eym_home() / "tuned"
        self.disable_progress = disable_progress
        unet = components.unet
        inflate(unet)
        if unet not in _BASE_WEIGHTS:
            trained = {**rc_attn_parameters(unet), **temporal_parameters(unet)}
            _BASE_WEIGHTS[unet] = {name: p.detach().to("cpu", copy=True) for name, p in trained.items()}
            _LOADED[unet] = None
        self._model_fingerprint = _model_fingerprint(components)
        # Inverted latents z_T^s of recent sources, keyed by everything inversion depends on
        # (tuned weights, source, P_s, steps, ControlNet scale) and never by the reference or
        # P_t: a re-edit of a source with another motion skips inversion. A few (1, 4, F, h, w)
        # tensors on the CPU, least recently used dropped first.
        self._inversions: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        controlnet: str | None = None,
        *,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        tiny_fallback: bool = False,
        cache_dir: str | Path | None = None,
        disable_progress: bool = False,
    ) -> "Editor":
        """Load the components and wrap them in an Editor: the one factory of the app, CLI, suite and batch.

        Args:
            model: as :func:`eym.models.load_components`; ``None``: :data:`eym.models.DEFAULT_MODEL`.
            controlnet: as :func:`eym.models.load_components`.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; default CUDA if available.
            dtype: a torch dtype or its name (``"bfloat16"``); ``None`` or ``"auto"``: the device's default.
            tiny_fallback: with ``model=None``, start on the tiny random-weight model when SD 1.5 is
                not on the machine (the app's offline start) instead of raising.
            cache_dir, disable_progress: as :class:`Editor`.

        Raises:
            EymError: a named model that cannot be loaded.
        """
        from eym.models import DEFAULT_MODEL, TINY, load_components

        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        try:
            components = load_components(model or DEFAULT_MODEL, controlnet, dtype=dtype, device=device)
        except EymError as err:
            if model is not None or not tiny_fallback:
                raise
            logger.warning("no Stable Diffusion weights available (%s); starting on the tiny demo model", err)
            components = load_components(TINY, None, dtype=dtype, device=device)
        return cls(components, cache_dir=cache_dir, disable_progress=disable_progress)

    # -- tuning ------------------------------------------------------------------------------
    def tuned_key(self, source, prompts: Prompts, config: TuneConfig) -> str:
        """The cache key of tuning ``source``: content hash, models, P_c, P_s, settings. No reference."""
        c = self.components
        masked = config.mask_background and _masks(source) is not None
        return stable_hash(
            {
                "version": TUNING_VERSION,
                "source": source.content_hash,
                "shape": list(np.asarray(source.frames).shape),
                "masked": masked,
                "model": c.model_id,
                "controlnet": c.controlnet_id,
                "weights": self._model_fingerprint,
                "content_prompt": prompts.content,
                "source_prompt": prompts.source,
                "tune": config.result_key(),
            }
        )[:32]

    def find_tuned(self, source, prompts: Prompts, config: TuneConfig) -> TunedWeights | None:
        """The cached tuned weights of this source and settings, or ``None`` (damaged ones are removed)."""
        entry = self.cache_dir / self.tuned_key(source, prompts, config)
        cached = load_entry(entry)
        if cached is None:
            return None
        try:
            return self.open_tuned(entry, reused=True)
        except EymError as err:
            logger.warning("discarding tuned weights %s: %s", entry, err)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def open_tuned(self, path: str | Path, *, reused: bool = True) -> TunedWeights:
        """Open a tuned-weights folder, checking that it belongs to this base model.

        Raises:
            EymError: not a tuned folder, damaged, or tuned from another base model/ControlNet.
        """
        path = Path(path)
        if load_entry(path) is None or not (path / TUNED_MANIFEST).is_file():
            raise EymError(f"{path} is not an intact tuned-weights folder (missing or damaged files); tune again")
        manifest = json.loads((path / TUNED_MANIFEST).read_text())
        c = self.components
        if manifest.get("kind") != TUNED_KIND or manifest.get("version") != TUNING_VERSION:
            raise EymError(f"{path} is not a tuned-weights folder of this eym version; tune again")
        if manifest.get("weights") != self._model_fingerprint or manifest.get("controlnet") != c.controlnet_id:
            raise EymError(
                f"{path} was tuned from {manifest.get('model')!r} + {manifest.get('controlnet')!r}, not the loaded "
                f"{c.model_id!r} + {c.controlnet_id!r}; load that model or tune again"
            )
        return TunedWeights(path=path, manifest=manifest, reused=reused)

    def tune(self, source, prompts: Prompts, config: TuneConfig = TuneConfig(), *, callback: ProgressCallback | None = None) -> TunedWeights:
        """Tune the model on ``source`` (DPL stage 1 + 2), or reuse the cached result.

        Args:
            source: a :class:`eym.preprocess.Clip` (frames, skeletons, masks, content_hash).
            prompts: P_c and P_s are used (P_t is not: one tuning serves every edit).
            config: :class:`TuneConfig`.
            callback: ``callback("stage1" | "stage2", step, total)``.

        Returns:
            :class:`TunedWeights`; ``reused`` says whether tuning ran. The UNet holds them afterwards.
        """
        _check_source(source, self.components.vae_scale_factor)
        _check_prompt(prompts.content, "content prompt (P_c)")
        _check_prompt(prompts.source, "source prompt (P_s)")
        check_prompt_lengths(self.components.tokenizer, Prompts(prompts.content, prompts.source, ""))
        key = self.tuned_key(source, prompts, config)
        found = self.find_tuned(source, prompts, config)
        if found is not None:
            logger.info("reusing tuned weights %s", found.path)
            return found

        c = self.components
        unet = c.unet
        self._restore_base()
        started = time.perf_counter()
        data = self._tuning_data(source, prompts, config)
        partial = self.cache_dir / f".partial-{key}"
        partial.mkdir(parents=True, exist_ok=True)
        try:
            result = tune_dpl(
                unet, c.controlnet, c.scheduler, data, config,
                checkpoint_dir=partial if config.checkpoint_every else None, fingerprint=key,
                callback=callback, disable=self.disable_progress,
            )
        finally:
            _LOADED[unet] = None  # whatever happened, the UNet no longer holds the base weights
            del data
            _free_memory(c.device)
            if partial.is_dir() and not any(partial.iterdir()):
                partial.rmdir()  # stopped before its first checkpoint: nothing to resume from

        manifest = {
            "kind": TUNED_KIND,
            "version": TUNING_VERSION,
            "key": key,
            "model": c.model_id,
            "controlnet": c.controlnet_id,
            "weights": self._model_fingerprint,
            "prompts": {"content": prompts.content, "source": prompts.source},
            "source": {
                "content_hash": source.content_hash,
                "path": str(getattr(source, "path", "") or ""),
                "shape": list(np.asarray(source.frames).shape),
            },
            "tune": to_dict(config),
            "tensors": len(result.tensors),
            "values": int(sum(t.numel() for t in result.tensors.values())),
            "final_loss": {f"stage{r['stage']}": r["loss"] for r in result.history},
            "resumed_from": list(result.resumed_from) if result.resumed_from else None,
            "seconds": round(time.perf_counter() - started, 2),
        }
        entry = self.cache_dir / key
        from safetensors.torch import save_file

        with building(entry, meta={"kind": TUNED_KIND, "key": key}) as tmp:
            save_file(result.tensors, str(tmp / TUNED_FILE), metadata={"key": key, "model": c.model_id})
            atomic_write_json(tmp / TUNED_MANIFEST, manifest)
        shutil.rmtree(partial, ignore_errors=True)
        _LOADED[unet] = key
        logger.info("tuned %s in %.1f s -> %s", source.content_hash[:12], manifest["seconds"], entry)
        return TunedWeights(path=entry, manifest=manifest, reused=False)

    def _tuning_data(self, source, prompts: Prompts, config: TuneConfig) -> TuningData:
        """Everything constant during tuning, computed once: latents, embeddings, control images."""
        from eym.sampling import encode_video

        c = self.components
        frames = np.asarray(source.frames)
        masks = _masks(source)
        # The VAE posterior's mean, encoded once: the latents every step starts from.
        latents = encode_video(c.vae, frames)  # (1, 4, F, h, w) z_0 = E(V)
        if config.mask_background and masks is not None:
            masked = frames * masks[..., None]  # Eq. 10: U_M = U * M, background set to 0 (black)
            masked_latents = encode_video(c.vae, masked.astype(np.uint8))  # Eq. 11: Z^M = E(U_M)
        else:
            masked_latents = latents
        embeds = encode_prompts(c.tokenizer, c.text_encoder, [prompts.content, prompts.source])  # (2, 77, D)
        return TuningData(
            latents=latents,
            masked_latents=masked_latents,
            control_images=control_tensor(source.skeletons, c.device, c.dtype),
            content_embeds=embeds[:1],
            source_embeds=embeds[1:],
        )

    # -- tuned tensors in and out ------------------------------------------------------------
    def _restore_base(self) -> None:
        """Put the weights tuning starts from back (SD's RC-Attn, fresh temporal attention)."""
        unet = self.components.unet
        if _LOADED.get(unet) == "":
            return
        _assign_tensors(unet, _BASE_WEIGHTS[unet])
        _LOADED[unet] = ""  # "" = base weights

    def load_tuned(self, tuned: TunedWeights) -> None:
        """Make the UNet hold ``tuned``'s tensors (no-op if it already does).

        Raises:
            EymError: the file is damaged or does not fit this model (then tune again).
        """
        unet = self.components.unet
        if _LOADED.get(unet) == tuned.key:
            return
        from safetensors.torch import load_file

        from eym.jobs import pinned

        try:
            with pinned(tuned.path):  # another job's disk-cap eviction must not delete it mid-read
                tensors = load_file(str(tuned.tensors_path))
        except Exception as err:  # safetensors raises several types for a damaged file
            raise EymError(f"tuned weights {tuned.tensors_path} cannot be read ({type(err).__name__}); delete the folder and tune again") from None
        base = _BASE_WEIGHTS[unet]
        if set(tensors) != set(base):
            raise EymError(f"tuned weights {tuned.tensors_path} do not match this model's layers; tune again")
        _assign_tensors(unet, tensors)
        _LOADED[unet] = tuned.key

    # -- inference ---------------------------------------------------------------------------
    def infer(
        self,
        source,
        reference,
        prompts: Prompts,
        tuned: TunedWeights,
        config: InferConfig = InferConfig(),
        *,
        callback: ProgressCallback | None = None,
    ) -> np.ndarray:
        """Edit ``source`` to move like ``reference``: inversion, two branches, decoding.

        Args:
            source: the tuned source :class:`~eym.preprocess.Clip`.
            reference: a :class:`~eym.motion.Motion` for this source (its skeletons drive the
                editing branch), or a reference Clip (a preprocessed video or a preset), resolved
                here with ``config.retarget``. Same frame count.
            prompts: P_s (inversion, reconstruction branch) and P_t (editing branch).
            tuned: from :meth:`tune` (or :meth:`open_tuned`) for this source.
            config: :class:`InferConfig`.
            callback: ``callback("inversion" | "sampling" | "decode", step, total)``.

        Returns:
            (F, H, W, 3) uint8 edited frames.
        """
        from eym.sampling import ddim_invert, ddim_timesteps, decode_video, encode_video, make_eps_fn, sample_two_branch
        from eym.spacetime import attention_processors, injection_processors

        c = self.components
        _check_source(source, c.vae_scale_factor)
        _check_prompt(prompts.source, "source prompt (P_s)")
        _check_prompt(prompts.target, "target prompt (P_t)")
        check_prompt_lengths(c.tokenizer, prompts)
        if isinstance(reference, Motion):
            reference_skeletons = reference.skeletons
        else:
            reference_skeletons = motion_skeletons(source, reference, retarget=config.retarget)
        if tuned.manifest.get("source", {}).get("content_hash") != source.content_hash:
            raise EymError(f"tuned weights {tuned.path} were tuned on another source video; tune this one first")
        self.load_tuned(tuned)
        # this edit's injection layers and weighting, on the shared UNet for this call only
        processors = injection_processors(c.unet, config.injection, config.injection_weighting)

        F = len(source.frames)
        timesteps = ddim_timesteps(c.scheduler, config.ddim_steps)
        embeds = encode_prompts(c.tokenizer, c.text_encoder, [prompts.source, prompts.target, ""])  # (3, 77, D)

        with attention_processors(c.unet, processors):
            # 1. DDIM inversion with P_s and the source skeletons, no guidance (the paper): z_T^s.
            #    Latents, z_T and the cached inversion stay fp32; only the model calls run in the
            #    model's dtype (a bf16 latent state drifts, METHOD.md)
            inversion_key = stable_hash([tuned.key, source.content_hash, prompts.source, config.ddim_steps, config.controlnet_scale])
            if inversion_key in self._inversions:
                self._inversions.move_to_end(inversion_key)
                z_T = self._inversions[inversion_key].to(c.device, torch.float32)
                logger.info("reusing the DDIM inversion of this source (same tuned weights, P_s and steps)")
            else:
                latents = encode_video(c.vae, np.asarray(source.frames), chunk=config.decode_chunk).float()  # (1, 4, F, h, w)
                invert_fn = make_eps_fn(
                    c.unet, c.controlnet, prompt_embeds=embeds[:1], control_images=np.asarray(source.skeletons)[None],
                    num_frames=F, controlnet_scale=config.controlnet_scale,
                )
                z_T = ddim_invert(invert_fn, latents, timesteps, scheduler=c.scheduler, callback=callback, disable=self.disable_progress)[-1]
                self._inversions[inversion_key] = z_T.detach().to("cpu", torch.float32, copy=True)
                while len(self._inversions) > INVERSION_CACHE_SIZE:
                    self._inversions.popitem(last=False)

            # 2. both branches from z_T^s: [reconstruction (P_s, S_sr), editing (P_t, S_rf)],
            #    the editing branch attending to the reconstruction's keys/values (Eq. 17-18)
            #    at the schedule's steps and layers
            branch_fn = make_eps_fn(
                c.unet, c.controlnet, prompt_embeds=embeds[:2],
                control_images=np.stack([np.asarray(source.skeletons), reference_skeletons]),
                num_frames=F, guidance_scale=config.guidance_scale, negative_embeds=embeds[2:],
                controlnet_scale=config.controlnet_scale,
            )
            both = sample_two_branch(
                branch_fn, z_T, timesteps, scheduler=c.scheduler, inject_steps=config.injection.steps(len(timesteps)),
                callback=callback, disable=self.disable_progress,
            )  # (2, 4, F, h, w)

        # 3. decode the editing branch in chunks of frames
        frames = decode_video(c.vae, both[1:2], chunk=config.decode_chunk, callback=callback)
        _free_memory(c.device)
        return frames

    # -- the whole edit ----------------------------------------------------------------------
    def edit(
        self,
        source,
        reference,
        prompts: Prompts,
        config: EditConfig | None = None,
        *,
        preset: str | None = None,
        out_dir: str | Path,
        name: str = "edited",
        tuned: TunedWeights | None = None,
        callback: ProgressCallback | None = None,
    ) -> EditResult:
        """Preprocess, tune (or reuse), infer, and write the results.

        Args:
            source: a Clip, or a video file / frame folder (preprocessed with masks).
            reference: a :class:`~eym.motion.Motion` resolved for this source, a reference Clip,
                or a video file / frame folder; None with ``preset``.
            prompts: :class:`Prompts` (see :func:`derive_prompts`).
            config: :class:`EditConfig`; the source's frame count and size come from ``config.preprocess``.
            preset: a preset motion name (:data:`eym.presets.PRESETS`) instead of ``reference``.
            out_dir: where ``<name>.mp4``, ``<name>.side_by_side.mp4`` and ``<name>.settings.json`` go.
            name: file name stem of the outputs.
            tuned: use these tuned weights instead of tuning (or looking up the cache).
            callback: progress of every stage ("preprocess", "stage1", ..., "decode").

        Returns:
            :class:`EditResult`.
        """
        from eym.video import labelled_side_by_side, mux_audio, sampled_span, write_mp4

        config = config or EditConfig()
        _check_prompt(prompts.target, "target prompt (P_t)")
        check_ddim_steps(config.infer.ddim_steps, self.components.scheduler)  # before tuning, not after it
        check_prompt_lengths(self.components.tokenizer, prompts)  # before tuning, not after it
        started = time.perf_counter()
        source_clip = self.load_source(source, config, callback=callback)
        if isinstance(reference, Motion):
            motion = reference
        else:
            motion = resolve_motion(source_clip, reference=reference, preset=preset, config=config.preprocess,
                                    retarget=config.infer.retarget, callback=callback)
        if tuned is None:
            tuned = self.tune(source_clip, prompts, config.tune, callback=callback)
        frames = self.infer(source_clip, motion, prompts, tuned, config.infer, callback=callback)
        ref_skeletons = motion.skeletons

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        fps = float(source_clip.fps)
        video = write_mp4(frames, out_dir / f"{name}.mp4", fps)
        # The source's soundtrack over the span the sampled frames cover (presets and frame folders have none).
        source_video, indices = getattr(source_clip, "source", ""), getattr(source_clip, "indices", [])
        soundtrack = bool(source_video and indices) and mux_audio(video, source_video, *sampled_span(indices, fps))
        panels = {"source": np.asarray(source_clip.frames), "motion": ref_skeletons, "edit": frames}
        panel = write_mp4(labelled_side_by_side(panels, fps), out_dir / f"{name}.side_by_side.mp4", fps)
        settings = {
            "prompts": {"content": prompts.content, "source": prompts.source, "target": prompts.target},
            "source": {"input": _describe_input(source), "content_hash": source_clip.content_hash},
            "reference": {"input": motion.label, "content_hash": motion.reference.content_hash},
            "model": self.components.model_id,
            "controlnet": self.components.controlnet_id,
            "config": to_dict(config),
            "tuned": {"path": str(tuned.path), "key": tuned.key, "reused": tuned.reused},
            "frames": list(frames.shape),
            "fps": fps,
            "seconds": round(time.perf_counter() - started, 2),
            "outputs": {"video": video.name, "side_by_side": panel.name, "soundtrack": soundtrack},
        }
        settings_path = atomic_write_json(out_dir / f"{name}.settings.json", settings)
        return EditResult(video=video, side_by_side=panel, settings=settings_path, reused_tuning=tuned.reused, frames=frames,
                          motion=motion)

    def load_source(self, source, config: EditConfig, *, callback: ProgressCallback | None = None):
        """A Clip as given, or a video file / frame folder preprocessed with person masks."""
        if isinstance(source, (str, Path)):
            from eym.preprocess import preprocess

            return preprocess(Path(source), config.preprocess, with_masks=config.tune.mask_background, callback=callback)
        return source


def _describe_input(value) -> str:
    if isinstance(value, (str, Path)):
        return str(value)
    return str(getattr(value, "source", "") or getattr(value, "path", "") or "clip")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def prompt_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` as the text encoder sees them, start and end tokens included."""
    return len(tokenizer(text, truncation=False).input_ids)


def check_prompt_lengths(tokenizer, prompts: Prompts) -> None:
    """Refuse prompts longer than the text encoder reads (77 tokens for CLIP, start and end included).

    The encoder would cut such a prompt silently, and the cut is the end: the motion phrase of
    P_s and P_t. Empty prompts are not checked here.

    Raises:
        EymError: naming the prompt, its length and the limit.
    """
    limit = tokenizer.model_max_length
    for what, text in (("subject prompt P_c", prompts.content), ("source prompt P_s", prompts.source),
                       ("target prompt P_t", prompts.target)):
        if text and (length := prompt_tokens(tokenizer, text)) > limit:
            raise EymError(
                f"the {what} is {length} tokens long and the text encoder reads at most {limit}, "
                f"so its end (the motion) would be cut off; shorten it by about {length - limit} words"
            )


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings of prompts within the tokenizer's limit (:func:`check_prompt_lengths`).

    Args:
        prompts: N strings.

    Returns:
        (N, 77, D) embeddings on the text encoder's device and dtype.

    Raises:
        EymError: a prompt over the limit.
    """
    limit = tokenizer.model_max_length
    for prompt in prompts:
        if (length := prompt_tokens(tokenizer, prompt)) > limit:
            raise EymError(f"a prompt is {length} tokens long, more than the text encoder's {limit}; shorten it: {prompt!r}")
    ids = tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
    device = next(text_encoder.parameters()).device
    with torch.no_grad():
        return text_encoder(ids.to(device))[0]  # (N, 77, D) last hidden state, as SD 1.5 uses


def control_tensor(skeletons: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Skeleton images (F, H, W, 3) uint8 -> ControlNet input (F, 3, H, W) in [0, 1]."""
    images = torch.from_numpy(np.ascontiguousarray(skeletons)).to(device)
    return images.permute(0, 3, 1, 2).to(dtype) / 255.0  # (F, 3, H, W)


def _masks(clip) -> np.ndarray | None:
    """The clip's person masks (F, H, W) bool, or None when it has none (presets, references)."""
    masks = getattr(clip, "masks", None)
    if masks is None:
        return None
    masks = np.asarray(masks)
    return masks.astype(bool) if masks.ndim == 3 and masks.shape[1] > 0 else None


def _check_prompt(text: str, what: str) -> None:
    if not (text and text.strip()):
        raise EymError(f"the {what} is empty; describe the video in words, e.g. 'A girl in a white dress is dancing.'")


def _check_source(clip, scale: int, what: str = "source") -> None:
    """Frames, skeletons and masks must agree in shape; sides must be multiples of the VAE scale."""
    frames = np.asarray(clip.frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise EymError(f"{what} frames must be (F, H, W, 3) uint8 with F >= 1, got {frames.shape} {frames.dtype}")
    F, H, W, _ = frames.shape
    if H % scale or W % scale:
        raise EymError(f"{what} frames are {W}x{H}; use a size that is a multiple of {scale} (e.g. --size 512)")
    if np.asarray(clip.skeletons).shape != frames.shape:
        raise EymError(f"{what} skeletons {np.asarray(clip.skeletons).shape} do not match its frames {frames.shape}; preprocess it again")
    masks = _masks(clip)
    if masks is not None and masks.shape != (F, H, W):
        raise EymError(f"{what} masks {np.asarray(masks).shape} do not match its frames {frames.shape}; preprocess it again")


def _model_fingerprint(components) -> str:
    """A cheap hash of a few weights: tells two base models apart even if loaded from one path."""
    probes = [components.unet.conv_in.weight, components.unet.conv_out.weight, components.controlnet.conv_in.weight]
    digest = b"".join(sha256_bytes(p.detach().float().cpu().numpy().tobytes()).encode() for p in probes)
    return sha256_bytes(digest)[:16]


def _assign_tensors(unet: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    own = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in own or own[name].shape != value.shape:
                raise EymError(f"tuned tensor {name} does not fit the loaded UNet; tune again with this model")
            own[name].copy_(value.to(own[name].device, own[name].dtype))


def _free_memory(device: torch.device) -> None:
    """Give the memory of finished work back (tuning's activations and optimizer state) before the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

"""The Editor: tune once per source video, then edit it with any reference motion.

This is the API the CLI, the app, the suite and batch share. :meth:`Editor.edit` is the whole
edit as a numbered recipe:

1. check inputs (prompts, steps: before any work);
2. source and motion: preprocess the source (frames, skeletons, masks) and resolve the motion
   from a reference video or a preset (:mod:`eym.preprocess`, :mod:`eym.motion`);
3. encode the three prompts once (:mod:`eym.prompts`);
4. tune: DPL stage 1 + 2 on the source (:mod:`eym.tuning`), or reuse the cached result; the
   tuned tensors live in :mod:`eym.tuned` (their key, their folder, which ones the UNet holds);
5. invert the source with the tuned model (DDIM, cached per source);
6. sample the reconstruction and the editing branch side by side with key/value injection
   (:mod:`eym.sampling`);
7. decode the editing branch;
8. write the edited video, a side-by-side (source | reference skeleton | edited) and the run's
   settings next to it.

The Editor inflates the UNet once; :class:`eym.tuned.TunedStore` keeps a CPU copy of the weights
tuning starts from (SD's RC-Attn weights and the fresh temporal attention), so tuning source B
after source A starts from SD, not from A's result.
"""

from __future__ import annotations

import collections
import gc
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eym.cache import atomic_write_json, sha256_bytes, stable_hash
from eym.config import to_dict
from eym.errors import EymError
from eym.injection import InjectionSchedule, injection_preset
from eym.motion import Motion, motion_skeletons, resolve_motion
from eym.preprocess import Clip, PreprocessConfig
from eym.progress import ProgressCallback
from eym.prompts import (
    PromptEmbeds, Prompts, check_prompt_filled, check_prompt_lengths, encode_prompt_embeds,
    encode_prompts,
)
from eym.tuned import TUNED_KIND, TUNING_VERSION, TunedStore, TunedWeights, find_tuned, open_tuned, save_tuned, tuning_key
from eym.tuning import TuneConfig, TuningData, tune_dpl
from eym.validate import check_ddim_steps, check_ranges

logger = logging.getLogger(__name__)

INVERSION_CACHE_SIZE = 4  # inverted sources an Editor keeps (CPU tensors of (1, 4, F, h, w))


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferConfig:
    """Settings of inversion + two-branch sampling (the paper's defaults; docs/METHOD.md says why each)."""

    ddim_steps: int = 50  # DDIM steps of inversion and of sampling
    guidance_scale: float = 1.0  # classifier-free guidance of the branches; 1.0 = none (the paper)
    injection: InjectionSchedule | str = InjectionSchedule()  # where the editing branch sees the reconstruction's K/V; a schedule or a preset name (eym.injection)
    injection_weighting: str = "paper"  # "paper": Eq. 18 literally; "balanced": the two current-frame key blocks share one slot (edit = reconstruction when inputs match); "source": the edit attends to K_r, V_r only
    retarget: bool = True  # fit the reference skeletons to the source person's size and position
    controlnet_scale: float = 1.0  # strength of the ControlNet residuals
    decode_chunk: int = 8  # frames per VAE encode/decode call (memory)
    cuda_graphs: bool = True  # on CUDA, replay inversion's and sampling's model calls as CUDA graphs (same result)

    def __post_init__(self) -> None:
        check_ranges(self)  # types, finiteness and bounds of eym.validate.RANGES
        if self.ddim_steps < 1:
            raise EymError(f"ddim_steps must be >= 1, got {self.ddim_steps}")
        if self.guidance_scale < 1.0:
            raise EymError(f"guidance_scale must be >= 1.0 (1.0 = no guidance), got {self.guidance_scale}")
        if isinstance(self.injection, str):  # a preset name; kept as its schedule so the settings record say what ran
            object.__setattr__(self, "injection", injection_preset(self.injection))
        from eym.spacetime import INJECTION_WEIGHTINGS

        if self.injection_weighting not in INJECTION_WEIGHTINGS:
            raise EymError(f"injection_weighting {self.injection_weighting!r} is not one of {', '.join(INJECTION_WEIGHTINGS)}")
        if self.decode_chunk < 1:
            raise EymError(f"decode_chunk must be >= 1, got {self.decode_chunk}")


@dataclass(frozen=True)
class EditConfig:
    """All settings of one edit."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # frames, size, pose/mask backends
    tune: TuneConfig = field(default_factory=TuneConfig)  # DPL tuning
    infer: InferConfig = field(default_factory=InferConfig)  # inversion + sampling


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
class Editor:
    """Tune and edit with one set of loaded components.

    Args:
        components: :class:`eym.models.Components`; the UNet is inflated in place (once).
        cache_dir: where tuned weights are cached; default ``eym_home()/"tuned"``.
        disable_progress: turn the tqdm bars off (callbacks still fire).
    """

    def __init__(self, components, *, cache_dir: str | Path | None = None, disable_progress: bool = False):
        from eym.env import eym_home
        from eym.spacetime import inflate

        self.components = components
        self.cache_dir = Path(cache_dir) if cache_dir is not None else eym_home() / "tuned"
        self.disable_progress = disable_progress
        inflate(components.unet)
        # shared by every Editor over this UNet: its base tensors and which tensors it holds
        self.store = TunedStore.of(components.unet)
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

    # -- the whole edit ----------------------------------------------------------------------
    def edit(
        self,
        source: Clip | str | Path,
        reference: Motion | Clip | str | Path | None,
        prompts: Prompts,
        config: EditConfig | None = None,
        *,
        preset: str | None = None,
        out_dir: str | Path,
        name: str = "edited",
        tuned: TunedWeights | None = None,
        callback: ProgressCallback | None = None,
    ) -> EditResult:
        """Preprocess, tune (or reuse), invert, sample, decode, and write the results.

        Args:
            source: a :class:`~eym.preprocess.Clip`, or a video file / frame folder (preprocessed with masks).
            reference: a :class:`~eym.motion.Motion` resolved for this source, a reference Clip,
                or a video file / frame folder; None with ``preset``.
            prompts: :class:`~eym.prompts.Prompts` (see :func:`eym.prompts.compose_prompts`).
            config: :class:`EditConfig`; the source's frame count and size come from ``config.preprocess``.
            preset: a preset motion name (:data:`eym.presets.PRESETS`) instead of ``reference``.
            out_dir: where ``<name>.mp4``, ``<name>.side_by_side.mp4`` and ``<name>.settings.json`` go.
            name: file name stem of the outputs.
            tuned: use these tuned weights instead of tuning (or looking up the cache).
            callback: progress of every stage ("preprocess", "stage1", ..., "decode").

        Returns:
            :class:`EditResult`.
        """
        c = self.components
        config = config or EditConfig()
        started = time.perf_counter()

        # 1. check inputs: before preprocessing and tuning, not after them
        check_prompt_filled(prompts.target, "target prompt (P_t)")
        check_ddim_steps(config.infer.ddim_steps, c.scheduler)
        check_prompt_lengths(c.tokenizer, prompts)

        # 2. source and motion
        source_clip = self.load_source(source, config, callback=callback)
        if isinstance(reference, Motion):
            motion = reference
        else:
            motion = resolve_motion(source_clip, reference=reference, preset=preset, config=config.preprocess,
                                    retarget=config.infer.retarget, callback=callback)

        # 3. encode the three prompts once: P_c and P_s for tuning, P_s and P_t for the branches
        embeds = encode_prompt_embeds(c.tokenizer, c.text_encoder, prompts)

        # 4. tune or reuse
        if tuned is None:
            tuned = self.tune(source_clip, prompts, config.tune, callback=callback, embeds=embeds)
        skeletons = self._check_infer_inputs(source_clip, motion, prompts, tuned, config.infer)
        self.load_tuned(tuned)

        with self._edit_processors(config.infer):
            # 5. invert: z_T^s
            z_T = self._invert(source_clip, prompts, embeds, tuned, config.infer, callback)
            # 6. sample both branches from z_T^s
            latents = self._sample(source_clip, skeletons, z_T, embeds, config.infer, callback)

        # 7. decode the editing branch
        frames = self._decode(latents, config.infer, callback)

        # 8. write
        return self._write(source, source_clip, motion, prompts, config, tuned, frames, Path(out_dir), name, started)

    def load_source(self, source: Clip | str | Path, config: EditConfig, *, callback: ProgressCallback | None = None) -> Clip:
        """A Clip as given, or a video file / frame folder preprocessed with person masks."""
        if isinstance(source, (str, Path)):
            from eym.preprocess import preprocess

            return preprocess(Path(source), config.preprocess, with_masks=config.tune.mask_background, callback=callback)
        return source

    # -- tuning ------------------------------------------------------------------------------
    def tuned_key(self, source: Clip, prompts: Prompts, config: TuneConfig) -> str:
        """The cache key of tuning ``source`` (:func:`eym.tuned.tuning_key`): content hash, models, P_c, P_s, settings."""
        c = self.components
        return tuning_key(
            source=source.content_hash, shape=np.asarray(source.frames).shape,
            masked=config.mask_background and _masks(source) is not None, prompts=prompts, tune=config,
            model=c.model_id, controlnet=c.controlnet_id, weights=self._model_fingerprint,
        )

    def find_tuned(self, source: Clip, prompts: Prompts, config: TuneConfig) -> TunedWeights | None:
        """The cached tuned weights of this source and settings, or ``None`` (damaged ones are removed)."""
        return self._find_entry(self.tuned_key(source, prompts, config))

    def _find_entry(self, key: str) -> TunedWeights | None:
        c = self.components
        return find_tuned(self.cache_dir / key, model=c.model_id, controlnet=c.controlnet_id, weights=self._model_fingerprint)

    def open_tuned(self, path: str | Path, *, reused: bool = True) -> TunedWeights:
        """Open a tuned-weights folder, checking that it belongs to this base model.

        Raises:
            EymError: not a tuned folder, damaged, or tuned from another base model/ControlNet.
        """
        c = self.components
        return open_tuned(path, model=c.model_id, controlnet=c.controlnet_id, weights=self._model_fingerprint, reused=reused)

    def tune(
        self,
        source: Clip,
        prompts: Prompts,
        config: TuneConfig = TuneConfig(),
        *,
        callback: ProgressCallback | None = None,
        embeds: PromptEmbeds | None = None,
    ) -> TunedWeights:
        """Tune the model on ``source`` (DPL stage 1 + 2), or reuse the cached result.

        Args:
            source: a :class:`eym.preprocess.Clip` (frames, skeletons, masks, content_hash).
            prompts: P_c and P_s are used (P_t is not: one tuning serves every edit).
            config: :class:`TuneConfig`.
            callback: ``callback("stage1" | "stage2", step, total)``.
            embeds: the prompts' embeddings when the caller has them (:meth:`edit`); else encoded here.

        Returns:
            :class:`TunedWeights`; ``reused`` says whether tuning ran. The UNet holds them afterwards.
        """
        c = self.components
        _check_source(source, c.vae_scale_factor)
        check_prompt_filled(prompts.content, "content prompt (P_c)")
        check_prompt_filled(prompts.source, "source prompt (P_s)")
        check_prompt_lengths(c.tokenizer, Prompts(prompts.content, prompts.source, ""))
        key = self.tuned_key(source, prompts, config)
        found = self._find_entry(key)
        if found is not None:
            logger.info("reusing tuned weights %s", found.path)
            return found

        self.store.restore_base()
        started = time.perf_counter()
        data = self._tuning_data(source, prompts, config, embeds=embeds)
        partial = self.cache_dir / f".partial-{key}"
        partial.mkdir(parents=True, exist_ok=True)
        try:
            result = tune_dpl(
                c.unet, c.controlnet, c.scheduler, data, config,
                checkpoint_dir=partial if config.checkpoint_every else None, fingerprint=key,
                callback=callback, disable=self.disable_progress,
            )
        finally:
            self.store.mark_modified()  # whatever happened, the UNet no longer holds the base weights
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
        tuned = save_tuned(self.cache_dir / key, result.tensors, manifest)
        shutil.rmtree(partial, ignore_errors=True)
        self.store.mark_tuned(key)
        logger.info("tuned %s in %.1f s -> %s", source.content_hash[:12], manifest["seconds"], tuned.path)
        return tuned

    def _tuning_data(self, source: Clip, prompts: Prompts, config: TuneConfig, *,
                     embeds: PromptEmbeds | None = None) -> TuningData:
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
        if embeds is None:
            content_embeds, source_embeds = encode_prompts(c.tokenizer, c.text_encoder, [prompts.content, prompts.source]).split(1)
        else:
            content_embeds, source_embeds = embeds.content, embeds.source
        return TuningData(
            latents=latents,
            masked_latents=masked_latents,
            control_images=control_tensor(source.skeletons, c.device, c.dtype),
            content_embeds=content_embeds,  # (1, 77, D) P_c
            source_embeds=source_embeds,  # (1, 77, D) P_s
        )

    def load_tuned(self, tuned: TunedWeights) -> None:
        """Make the UNet hold ``tuned``'s tensors (no-op if it already does; :meth:`eym.tuned.TunedStore.load`)."""
        self.store.load(tuned)

    # -- inference ---------------------------------------------------------------------------
    def infer(
        self,
        source: Clip,
        reference: Motion | Clip,
        prompts: Prompts,
        tuned: TunedWeights,
        config: InferConfig = InferConfig(),
        *,
        callback: ProgressCallback | None = None,
        embeds: PromptEmbeds | None = None,
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
            embeds: the prompts' embeddings when the caller has them; else encoded here.

        Returns:
            (F, H, W, 3) uint8 edited frames.
        """
        c = self.components
        skeletons = self._check_infer_inputs(source, reference, prompts, tuned, config)
        if embeds is None:
            embeds = encode_prompt_embeds(c.tokenizer, c.text_encoder, prompts)
        self.load_tuned(tuned)
        with self._edit_processors(config):
            z_T = self._invert(source, prompts, embeds, tuned, config, callback)
            latents = self._sample(source, skeletons, z_T, embeds, config, callback)
        return self._decode(latents, config, callback)

    def _check_infer_inputs(self, source: Clip, reference: Motion | Clip, prompts: Prompts, tuned: TunedWeights,
                            config: InferConfig) -> np.ndarray:
        """Check what inference takes; return the skeletons S_rf that drive the editing branch, (F, H, W, 3) uint8."""
        c = self.components
        _check_source(source, c.vae_scale_factor)
        check_prompt_filled(prompts.source, "source prompt (P_s)")
        check_prompt_filled(prompts.target, "target prompt (P_t)")
        check_prompt_lengths(c.tokenizer, prompts)
        if isinstance(reference, Motion):
            skeletons = reference.skeletons
        else:
            skeletons = motion_skeletons(source, reference, retarget=config.retarget)
        if tuned.manifest.get("source", {}).get("content_hash") != source.content_hash:
            raise EymError(f"tuned weights {tuned.path} were tuned on another source video; tune this one first")
        return skeletons

    def _edit_processors(self, config: InferConfig):
        """This edit's injection layers and weighting on the shared UNet, for the ``with`` block only (restored in ``finally``)."""
        from eym.spacetime import attention_processors, injection_processors

        unet = self.components.unet
        return attention_processors(unet, injection_processors(unet, config.injection, config.injection_weighting))

    def _invert(self, source: Clip, prompts: Prompts, embeds: PromptEmbeds, tuned: TunedWeights, config: InferConfig,
                callback: ProgressCallback | None) -> torch.Tensor:
        """DDIM inversion with P_s and the source skeletons, no guidance (the paper): z_T^s, (1, 4, F, h, w) fp32.

        Latents, z_T and the cached inversion stay fp32; only the model calls run in the model's
        dtype (a bf16 latent state drifts, METHOD.md).
        """
        from eym.sampling import ddim_invert, ddim_timesteps, encode_video, make_eps_fn

        c = self.components
        key = stable_hash([tuned.key, source.content_hash, prompts.source, config.ddim_steps, config.controlnet_scale])
        if key in self._inversions:
            self._inversions.move_to_end(key)
            logger.info("reusing the DDIM inversion of this source (same tuned weights, P_s and steps)")
            return self._inversions[key].to(c.device, torch.float32)
        latents = encode_video(c.vae, np.asarray(source.frames), chunk=config.decode_chunk).float()  # (1, 4, F, h, w)
        invert_fn = make_eps_fn(
            c.unet, c.controlnet, prompt_embeds=embeds.source, control_images=np.asarray(source.skeletons)[None],
            num_frames=len(source.frames), controlnet_scale=config.controlnet_scale, cuda_graphs=config.cuda_graphs,
        )
        timesteps = ddim_timesteps(c.scheduler, config.ddim_steps)
        z_T = ddim_invert(invert_fn, latents, timesteps, scheduler=c.scheduler, callback=callback, disable=self.disable_progress)[-1]
        self._inversions[key] = z_T.detach().to("cpu", torch.float32, copy=True)
        while len(self._inversions) > INVERSION_CACHE_SIZE:
            self._inversions.popitem(last=False)
        return z_T

    def _sample(self, source: Clip, skeletons: np.ndarray, z_T: torch.Tensor, embeds: PromptEmbeds, config: InferConfig,
                callback: ProgressCallback | None) -> torch.Tensor:
        """Both branches from z_T^s: [reconstruction (P_s, S_sr), editing (P_t, S_rf)], (2, 4, F, h, w).

        The editing branch attends to the reconstruction's keys/values (Eq. 17-18) at the
        schedule's steps and layers.
        """
        from eym.sampling import ddim_timesteps, make_eps_fn, sample_two_branch

        c = self.components
        timesteps = ddim_timesteps(c.scheduler, config.ddim_steps)
        branch_fn = make_eps_fn(
            c.unet, c.controlnet, prompt_embeds=torch.cat([embeds.source, embeds.target]),  # (2, 77, D)
            control_images=np.stack([np.asarray(source.skeletons), skeletons]),
            num_frames=len(source.frames), guidance_scale=config.guidance_scale, negative_embeds=embeds.negative,
            controlnet_scale=config.controlnet_scale, cuda_graphs=config.cuda_graphs,
        )
        return sample_two_branch(
            branch_fn, z_T, timesteps, scheduler=c.scheduler, inject_steps=config.injection.steps(len(timesteps)),
            callback=callback, disable=self.disable_progress,
        )  # (2, 4, F, h, w)

    def _decode(self, latents: torch.Tensor, config: InferConfig, callback: ProgressCallback | None) -> np.ndarray:
        """The editing branch (``latents[1]``) decoded in chunks of frames: (F, H, W, 3) uint8."""
        from eym.sampling import decode_video

        c = self.components
        frames = decode_video(c.vae, latents[1:2], chunk=config.decode_chunk, callback=callback)
        _free_memory(c.device)
        return frames

    def _write(self, given: Clip | str | Path, source: Clip, motion: Motion, prompts: Prompts, config: EditConfig,
               tuned: TunedWeights, frames: np.ndarray, out_dir: Path, name: str, started: float) -> EditResult:
        """The edited video (with the source's soundtrack), the side-by-side and the settings record."""
        from eym.video import labelled_side_by_side, mux_audio, sampled_span, write_mp4

        out_dir.mkdir(parents=True, exist_ok=True)
        fps = float(source.fps)
        video = write_mp4(frames, out_dir / f"{name}.mp4", fps)
        # The source's soundtrack over the span the sampled frames cover (presets and frame folders have none).
        source_video, indices = getattr(source, "source", ""), getattr(source, "indices", [])
        soundtrack = bool(source_video and indices) and mux_audio(video, source_video, *sampled_span(indices, fps))
        panels = {"source": np.asarray(source.frames), "motion": motion.skeletons, "edit": frames}
        panel = write_mp4(labelled_side_by_side(panels, fps), out_dir / f"{name}.side_by_side.mp4", fps)
        settings = {
            "prompts": {"content": prompts.content, "source": prompts.source, "target": prompts.target},
            "source": {"input": _describe_input(given), "content_hash": source.content_hash},
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


def _describe_input(value) -> str:
    if isinstance(value, (str, Path)):
        return str(value)
    return str(getattr(value, "source", "") or getattr(value, "path", "") or "clip")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
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


def _check_source(clip: Clip, scale: int, what: str = "source") -> None:
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


def _free_memory(device: torch.device) -> None:
    """Give the memory of finished work back (tuning's activations and optimizer state) before the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

"""Tuned weights: their key, their folder on disk, and which of them a UNet holds.

Tuning (:mod:`eym.tuning`) trains two sets of UNet tensors: the RC-Attn projections (stage 1)
and the temporal attention (stage 2). Everything else stays SD's. So a tuned model is stored
as only those tensors, in a cache entry ``<cache_dir>/<key>/`` (``tuned.safetensors`` +
``manifest.json``, built atomically by :func:`eym.cache.building`), and one loaded UNet serves
every source by swapping them in and out:

- :func:`tuning_key`: the one key of tuned weights (the Editor and batch's planner both call it);
- :func:`open_tuned` / :func:`find_tuned` / :func:`save_tuned`: the folder on disk;
- :class:`TunedStore`: per UNet, the CPU copy of the tensors tuning starts from and which
  tensors the UNet holds now (the base ones, one tuned key, or neither mid-tuning).
"""

from __future__ import annotations

import json
import logging
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from eym.cache import atomic_write_json, building, load_entry, stable_hash
from eym.errors import EymError
from eym.prompts import Prompts
from eym.tuning import TuneConfig

logger = logging.getLogger(__name__)

TUNED_FILE = "tuned.safetensors"
TUNED_MANIFEST = "manifest.json"
TUNED_KIND = "eym-tuned"
# Bump when tuning changes what it computes: older cache entries then stop matching.
TUNING_VERSION = 1


def tuning_key(
    *,
    source: str,
    shape: tuple[int, ...] | list[int],
    masked: bool,
    prompts: Prompts,
    tune: TuneConfig,
    model: str,
    controlnet: str | None,
    weights: str | None,
) -> str:
    """The key of tuned weights: a hash of exactly what they depend on (no reference, no P_t).

    Every field is a required keyword, so a field added here reaches every caller:
    :meth:`eym.editor.Editor.tuned_key` (the cache entry's name) and :func:`eym.batch.group_key`
    (which edits share a tuning, planned before any model is loaded).

    Args:
        source: the source clip's identity: its content hash (the Editor), or a hash of the
            file's bytes and the preprocess settings that make the clip from it (batch).
        shape: ``(F, H, W, 3)`` of the source frames.
        masked: L_rec sees the person only (``mask_background`` and the clip has masks).
        prompts: P_c and P_s are used; P_t is not (one tuning serves every edit).
        tune: the tuning settings; only those that change the tensors count (``result_key``).
        model, controlnet: the base model and ControlNet names.
        weights: a fingerprint of the loaded weights (tells two models at one path apart);
            ``None`` while planning without a model.

    Returns:
        32 hex characters.
    """
    return stable_hash({
        "version": TUNING_VERSION,
        "source": source,
        "shape": list(shape),
        "masked": bool(masked),
        "model": model,
        "controlnet": controlnet,
        "weights": weights,
        "content_prompt": prompts.content,
        "source_prompt": prompts.source,
        "tune": tune.result_key(),
    })[:32]


# ---------------------------------------------------------------------------------------------
# the folder on disk
# ---------------------------------------------------------------------------------------------
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


def open_tuned(path: str | Path, *, model: str, controlnet: str | None, weights: str, reused: bool = True) -> TunedWeights:
    """Open a tuned-weights folder, checking that it belongs to the loaded base model.

    Args:
        path: the folder.
        model, controlnet, weights: the loaded model's names and weights fingerprint.
        reused: recorded on the result.

    Raises:
        EymError: not a tuned folder, damaged, or tuned from another base model/ControlNet.
    """
    path = Path(path)
    if load_entry(path) is None or not (path / TUNED_MANIFEST).is_file():
        raise EymError(f"{path} is not an intact tuned-weights folder (missing or damaged files); tune again")
    manifest = json.loads((path / TUNED_MANIFEST).read_text())
    if manifest.get("kind") != TUNED_KIND or manifest.get("version") != TUNING_VERSION:
        raise EymError(f"{path} is not a tuned-weights folder of this eym version; tune again")
    if manifest.get("weights") != weights or manifest.get("controlnet") != controlnet:
        raise EymError(
            f"{path} was tuned from {manifest.get('model')!r} + {manifest.get('controlnet')!r}, not the loaded "
            f"{model!r} + {controlnet!r}; load that model or tune again"
        )
    return TunedWeights(path=path, manifest=manifest, reused=reused)


def find_tuned(entry: Path, *, model: str, controlnet: str | None, weights: str) -> TunedWeights | None:
    """The cache entry ``entry`` if it is intact and fits the loaded model, else ``None`` (damaged ones are removed)."""
    if load_entry(entry) is None:
        return None
    try:
        return open_tuned(entry, model=model, controlnet=controlnet, weights=weights, reused=True)
    except EymError as err:
        logger.warning("discarding tuned weights %s: %s", entry, err)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def save_tuned(entry: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> TunedWeights:
    """Write ``tensors`` and ``manifest`` as the cache entry ``entry``, atomically."""
    from safetensors.torch import save_file

    key = manifest["key"]
    with building(entry, meta={"kind": TUNED_KIND, "key": key}) as tmp:
        save_file(tensors, str(tmp / TUNED_FILE), metadata={"key": key, "model": manifest["model"]})
        atomic_write_json(tmp / TUNED_MANIFEST, manifest)
    return TunedWeights(path=entry, manifest=manifest, reused=False)


# ---------------------------------------------------------------------------------------------
# which tensors a UNet holds
# ---------------------------------------------------------------------------------------------
# One store per UNet object, so that two Editors over one set of components share it and never
# take each other's tuned weights for the base weights. A cache keyed by the UNet (weakly: it
# goes with the model).
_STORES: "weakref.WeakKeyDictionary[torch.nn.Module, TunedStore]" = weakref.WeakKeyDictionary()

Holding = Literal["base", "tuned", "modified"]


class TunedStore:
    """The tensors tuning trains, for one inflated UNet: a CPU copy of their base values, and what it holds now.

    ``holds`` is ``"base"`` (SD's RC-Attn weights and the fresh temporal attention),
    ``"tuned"`` (the tensors of :attr:`key`), or ``"modified"`` (tuning ran, or failed, since:
    neither). Get the store of a UNet with :meth:`of`, never by constructing one.
    """

    def __init__(self, unet: torch.nn.Module):
        from eym.spacetime import rc_attn_parameters, temporal_parameters

        self.unet = unet
        trained = {**rc_attn_parameters(unet), **temporal_parameters(unet)}
        # copied now, before any tuning: what every tuning starts from
        self.base: dict[str, torch.Tensor] = {name: p.detach().to("cpu", copy=True) for name, p in trained.items()}
        self.holds: Holding = "base"
        self.key: str | None = None  # the tuned key when holds == "tuned"

    @classmethod
    def of(cls, unet: torch.nn.Module) -> "TunedStore":
        """The store of ``unet`` (an inflated UNet), made on first use from the tensors it holds then."""
        store = _STORES.get(unet)
        if store is None:
            store = _STORES[unet] = cls(unet)
        return store

    def holds_key(self, key: str) -> bool:
        return self.holds == "tuned" and self.key == key

    def restore_base(self) -> None:
        """Put the base tensors back (no-op if the UNet holds them)."""
        if self.holds == "base":
            return
        _assign(self.unet, self.base)
        self.holds, self.key = "base", None

    def mark_modified(self) -> None:
        """Tuning changes the tensors in place: the UNet holds neither the base nor a tuned set."""
        self.holds, self.key = "modified", None

    def mark_tuned(self, key: str) -> None:
        """Tuning finished: the UNet holds the tensors just saved under ``key``."""
        self.holds, self.key = "tuned", key

    def load(self, tuned: TunedWeights) -> None:
        """Make the UNet hold ``tuned``'s tensors (no-op if it already does).

        Raises:
            EymError: the file is damaged or does not fit this model (then tune again).
        """
        if self.holds_key(tuned.key):
            return
        from safetensors.torch import load_file

        from eym.jobs import pinned

        try:
            with pinned(tuned.path):  # another job's disk-cap eviction must not delete it mid-read
                tensors = load_file(str(tuned.tensors_path))
        except Exception as err:  # safetensors raises several types for a damaged file
            raise EymError(f"tuned weights {tuned.tensors_path} cannot be read ({type(err).__name__}); delete the folder and tune again") from None
        if set(tensors) != set(self.base):
            raise EymError(f"tuned weights {tuned.tensors_path} do not match this model's layers; tune again")
        self.mark_modified()  # a failed copy half-way leaves neither set
        _assign(self.unet, tensors)
        self.mark_tuned(tuned.key)


def _assign(unet: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the UNet's parameters of the same names (tuning's helper), in the user's words."""
    from eym.tuning import _assign as assign_parameters

    try:
        assign_parameters(unet, tensors)
    except KeyError as err:
        raise EymError(f"tuned tensors do not fit the loaded UNet ({err.args[0]}); tune again with this model") from None


__all__ = ["TUNED_FILE", "TUNED_MANIFEST", "TUNED_KIND", "TUNING_VERSION", "TunedWeights", "TunedStore",
           "tuning_key", "open_tuned", "find_tuned", "save_tuned"]

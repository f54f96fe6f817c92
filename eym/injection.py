"""Where the editing branch takes the reconstruction branch's keys and values: the injection schedule.

METHOD.md "Inference" 3: in RC-Attn the editing branch also attends to the reconstruction
branch's current-frame keys and values (paper Eq. 17-18). The paper does not say at which
denoising steps or in which layers; MotionEditor, the design it follows, injects only after the
first steps and only in decoder layers. An :class:`InjectionSchedule` says both, and this module
is the one place that turns a schedule into "inject at (layer, step)?" decisions:
:meth:`InjectionSchedule.injects_layer` for an attn1 module name, :meth:`InjectionSchedule.steps`
for the step indices of a run (0 = the noisiest), :meth:`InjectionSchedule.injects` for both.

Layer sets (``layers``, a comma list; a layer injects when any item selects it):

- ``all`` / ``none``;
- ``down`` / ``mid`` / ``up``: the UNet's encoder, middle or decoder blocks;
- an index or range of the RC-Attn layers in UNet order, 0-based: ``3``, ``10-15``
  (SD 1.5 has 16: 0-5 down, 6 mid, 7-15 up);
- a glob pattern on the attn1 module names: ``up_blocks.3.*``, ``*attentions.1*``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Sequence

from eym.errors import EymError

__all__ = ["DEFAULT_PRESET", "INJECTION_PRESETS", "InjectionSchedule", "injection_preset", "preset_slug"]

_BLOCKS = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class InjectionSchedule:
    """Injection at the layers of ``layers`` during the denoising steps [start, end).

    Steps count from 0, the noisiest. The window is given as fractions of the run
    (``start``, ``end``) or as step indices (``start_step``, ``end_step``), an index winning
    over the fraction on its side.
    """

    layers: str = "all"  # RC-Attn layers that inject: all | none | down, mid, up | index or range (3, 10-15) | glob on attn1 names
    start: float = 0.0  # first injecting step, as a fraction of the denoising steps (0 = the noisiest)
    end: float = 1.0  # injection stops at this fraction of the steps (exclusive)
    start_step: int | None = None  # first injecting step as an index; overrides start
    end_step: int | None = None  # injection stops before this step index; overrides end

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise EymError(f"injection start {self.start} and end {self.end} must be fractions with 0 <= start <= end <= 1")
        for name in ("start_step", "end_step"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise EymError(f"injection {name} {value} must be a step index >= 0")
        if self.start_step is not None and self.end_step is not None and self.start_step > self.end_step:
            raise EymError(f"injection start_step {self.start_step} is after end_step {self.end_step}")
        items = self._items()
        if not items:
            raise EymError("injection layers are empty; use 'all', 'none', 'down', 'mid', 'up', an index or a name pattern")
        if len(items) > 1 and {"all", "none"} & set(items):
            raise EymError(f"injection layers {self.layers!r}: 'all' and 'none' stand alone")
        for item in items:
            m = _RANGE.match(item)
            if m and m.group(2) is not None and int(m.group(2)) < int(m.group(1)):
                raise EymError(f"injection layers {self.layers!r}: range {item} runs backwards")
            if not (item in ("all", "none", "down", "mid", "up") or m or _is_pattern(item)):
                raise EymError(
                    f"injection layers {self.layers!r}: {item!r} is not all, none, down, mid, up, an index (3, 10-15) "
                    "or a name pattern with * (up_blocks.3.*)"
                )

    def _items(self) -> list[str]:
        return [p.strip() for p in self.layers.split(",") if p.strip()]

    # -- layers ------------------------------------------------------------------------------
    def injects_layer(self, name: str, index: int) -> bool:
        """Whether the RC-Attn layer ``name`` (an attn1 module name), the ``index``-th in UNet order, injects."""
        name = name.removesuffix(".processor")
        for item in self._items():
            if item == "all":
                return True
            if item == "none":
                return False
            m = _RANGE.match(item)
            if m:
                lo = int(m.group(1))
                hi = int(m.group(2)) if m.group(2) is not None else lo
                if lo <= index <= hi:
                    return True
            elif item in ("down", "mid", "up"):
                if _BLOCKS.get(name.split(".")[0]) == item:
                    return True
            elif fnmatch.fnmatchcase(name, item.removesuffix(".processor")):
                return True
        return False

    def layer_mask(self, names: Sequence[str]) -> dict[str, bool]:
        """``{name: injects}`` for the RC-Attn layers ``names`` given in UNet order.

        Raises:
            EymError: an index or a name pattern selects none of these layers (a typo, or
                indices of another UNet).
        """
        names = [n.removesuffix(".processor") for n in names]
        for item in self._items():
            if item in ("all", "none"):
                continue
            if not any(InjectionSchedule(layers=item).injects_layer(n, i) for i, n in enumerate(names)):
                raise EymError(
                    f"injection layers item {item!r} selects no RC-Attn layer of this model "
                    f"({len(names)} layers, indices 0-{len(names) - 1}, e.g. {names[-1]})"
                )
        return {n: self.injects_layer(n, i) for i, n in enumerate(names)}

    # -- steps -------------------------------------------------------------------------------
    def steps(self, total: int) -> list[int]:
        """The injecting step indices of a run of ``total`` denoising steps (0 = the noisiest)."""
        lo = self.start_step if self.start_step is not None else self.start * total
        hi = self.end_step if self.end_step is not None else self.end * total
        return [i for i in range(total) if lo <= i < hi] if self._items() != ["none"] else []

    def injects(self, name: str, index: int, step: int, total: int) -> bool:
        """Whether layer ``name`` (the ``index``-th RC-Attn layer) injects at denoising step ``step`` of ``total``."""
        return self.injects_layer(name, index) and step in self.steps(total)


# Named for what they do. "paper: all" is the reading of the paper's text (every layer, every step).
INJECTION_PRESETS: dict[str, InjectionSchedule] = {
    "paper: all": InjectionSchedule(),
    "MotionEditor-like: decoder, after step 4": InjectionSchedule(layers="up", start_step=4),
    "none": InjectionSchedule(layers="none"),
}
DEFAULT_PRESET = "paper: all"  # InjectionSchedule()'s defaults


def preset_slug(name: str) -> str:
    """A preset name as one would type it on a command line: ``"paper: all"`` -> ``"paper-all"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def injection_preset(name: str) -> InjectionSchedule:
    """The schedule of a preset, by its name or its slug (:func:`preset_slug`).

    Raises:
        EymError: no such preset.
    """
    for preset, schedule in INJECTION_PRESETS.items():
        if name.strip() in (preset, preset_slug(preset)):
            return schedule
    names = ", ".join(f"{p!r} ({preset_slug(p)})" for p in INJECTION_PRESETS)
    raise EymError(f"injection preset {name!r} is unknown; use one of {names}")


def _is_pattern(item: str) -> bool:
    return any(ch in item for ch in "*?[") or "." in item

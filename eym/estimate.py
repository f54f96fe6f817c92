"""What an edit costs: expected seconds per stage from measured per-step figures, and a progress
bar weighted by them.

The figures are the ones in docs/PERFORMANCE.md (one table here, :data:`FIGURES`). A step's time
is modelled as ``fixed + per_frame * frames`` at the size it was measured at (two frame counts
fix the line); the per-frame part scales with the pixel count, the fixed part (kernel launches,
optimizer) does not. Estimates are for planning, never asserted: machines differ, and the first
edit of a process also pays for CUDA start-up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

# The stages an edit reports through callback(stage, step, total), in the order they run.
STAGE_ORDER = ("preprocess", "stage1", "stage2", "inversion", "sampling", "decode")


@dataclass(frozen=True)
class Line:
    """Seconds as ``fixed + per_frame * frames`` (at the figures' reference size)."""

    fixed: float
    per_frame: float

    @classmethod
    def through(cls, frames_a: int, seconds_a: float, frames_b: int, seconds_b: float) -> "Line":
        """The line through two measurements (frame count, seconds)."""
        per_frame = (seconds_b - seconds_a) / (frames_b - frames_a)
        return cls(fixed=seconds_a - per_frame * frames_a, per_frame=per_frame)

    def at(self, frames: int, pixel_ratio: float) -> float:
        return max(0.0, self.fixed + self.per_frame * frames * pixel_ratio)


@dataclass(frozen=True)
class StepFigures:
    """Per-step times of one kind of machine, and where they come from."""

    label: str  # shown with the estimate: "NVIDIA H200 (measured)"
    size: int  # side the figures were measured at
    stage1: Line  # seconds per DPL stage 1 step
    stage2: Line  # seconds per DPL stage 2 step
    inversion: Line  # seconds per DDIM inversion step
    sampling: Line  # seconds per two-branch sampling step
    preprocess: Line  # seconds for the whole preprocessing of source + reference (CPU)
    decode: Line  # seconds for the VAE decode of the edit
    scale: float = 1.0  # multiplier for machines estimated from another's figures


_PREPROCESS = Line.through(8, 1.0, 24, 3.0)  # mediapipe on the CPU, 512 px: "about 1-3 s for 8-24 frames"
_DECODE = Line.through(8, 0.13, 24, 0.14)

# docs/PERFORMANCE.md. H200: stage 1 0.16-0.20 / stage 2 0.14-0.17 s/step at 8 frames (midpoints),
# 0.32 / 0.31 at 24; 50-step inversion + sampling 5.6 + 5.8 s at 8 frames, 7.4 + 13.9 s at 24.
_H200 = StepFigures(
    label="NVIDIA H200 (measured)", size=512,
    stage1=Line.through(8, 0.18, 24, 0.32), stage2=Line.through(8, 0.155, 24, 0.31),
    inversion=Line.through(8, 5.6 / 50, 24, 7.4 / 50), sampling=Line.through(8, 5.8 / 50, 24, 13.9 / 50),
    preprocess=_PREPROCESS, decode=_DECODE,
)
# H100, no gradient checkpointing (what an 80 GB card runs): 0.211 / 0.205 s/step at 8 frames,
# 0.351 / 0.339 at 24; inversion 4.0 / 8.0 s and sampling 6.6 / 16.2 s at 8 / 24 frames.
_H100 = StepFigures(
    label="NVIDIA H100 (measured)", size=512,
    stage1=Line.through(8, 0.211, 24, 0.351), stage2=Line.through(8, 0.205, 24, 0.339),
    inversion=Line.through(8, 4.0 / 50, 24, 8.0 / 50), sampling=Line.through(8, 6.6 / 50, 24, 16.2 / 50),
    preprocess=_PREPROCESS, decode=_DECODE,
)
# The tiny bundle on the 2-core CI machine (bench/cpu_tiny.py, 8 frames at 64 px, 20 + 20 tuning
# steps, 10 DDIM steps): preprocess 1.3 s, tune 1.6-6.2 s (~0.1 s/step), infer 0.7-0.8 s. Only
# 8-frame totals were measured: the split into fixed and per-frame parts is assumed.
_CPU_TINY = StepFigures(
    label="tiny model on a CPU (measured on 2 cores)", size=64,
    stage1=Line(0.02, 0.01), stage2=Line(0.02, 0.01),
    inversion=Line(0.01, 0.0025), sampling=Line(0.01, 0.0035),
    preprocess=Line(0.3, 0.125), decode=Line(0.05, 0.005),
)

FIGURES: dict[str, StepFigures] = {
    "h200": _H200,
    "h100": _H100,
    # Not measured: an A100 runs these launch-bound small steps at roughly 1.6x an H100's time.
    "a100": StepFigures(**{**_H100.__dict__, "label": "NVIDIA A100 (estimated: H100 figures x 1.6)", "scale": 1.6}),
    "gpu": StepFigures(**{**_H100.__dict__, "label": "this GPU (rough: H100 figures x 2)", "scale": 2.0}),
    "cpu-tiny": _CPU_TINY,
}


def figures_for(device_name: str, *, is_tiny: bool, on_gpu: bool) -> StepFigures | None:
    """The figures for a machine; ``None`` for a real model on the CPU (nothing measured: hours)."""
    if not on_gpu:
        return FIGURES["cpu-tiny"] if is_tiny else None
    name = device_name.upper()
    for key in ("H200", "H100", "A100"):
        if key in name:
            return FIGURES[key.lower()]
    return FIGURES["gpu"]


@dataclass(frozen=True)
class Estimate:
    """Expected seconds per stage of one edit, in run order."""

    stages: dict[str, float]
    label: str  # which figures it came from

    @property
    def total(self) -> float:
        return sum(self.stages.values())

    def describe(self) -> str:
        """One line for the page: total, the tuning share, and where the figures come from."""
        tuning = self.stages.get("stage1", 0.0) + self.stages.get("stage2", 0.0)
        inference = self.stages.get("inversion", 0.0) + self.stages.get("sampling", 0.0)
        parts = f"tuning {format_seconds(tuning)}, inversion + sampling {format_seconds(inference)}"
        return f"about {format_seconds(self.total)} ({parts}); figures: {self.label}"


def estimate(*, num_frames: int, size: int, steps1: int, steps2: int, ddim_steps: int,
             figures: StepFigures, reused_tuning: bool = False) -> Estimate:
    """Expected seconds per stage of one edit with these settings on the machine ``figures`` describe.

    Args:
        num_frames, size: the clip (frames of ``size`` x ``size``).
        steps1, steps2: DPL stage 1 and 2 steps.
        ddim_steps: steps of the inversion and of the sampling.
        figures: from :func:`figures_for` or :data:`FIGURES`.
        reused_tuning: the source's tuned weights are cached (no tuning stages).
    """
    ratio = (size / figures.size) ** 2
    s = figures.scale
    stages = {
        "preprocess": figures.preprocess.at(num_frames, ratio),
        "stage1": 0.0 if reused_tuning else steps1 * figures.stage1.at(num_frames, ratio) * s,
        "stage2": 0.0 if reused_tuning else steps2 * figures.stage2.at(num_frames, ratio) * s,
        "inversion": ddim_steps * figures.inversion.at(num_frames, ratio) * s,
        "sampling": ddim_steps * figures.sampling.at(num_frames, ratio) * s,
        "decode": figures.decode.at(num_frames, ratio) * s,
    }
    return Estimate(stages=stages, label=figures.label)


def format_seconds(seconds: float) -> str:
    """``"45 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@dataclass
class WeightedProgress:
    """One progress fraction across the stages, each weighted by its expected time.

    Equal shares per stage would leave the bar near 50% for most of a run (tuning is about 87%
    of an edit); weighting by :class:`Estimate` makes it move with the clock. The ETA is the
    expected remaining time scaled by how fast the run has gone so far against the estimate.
    """

    expected: dict[str, float]  # seconds per stage (Estimate.stages); unknown stages weigh nothing
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=-1.0)
    fraction: float = 0.0  # never moves backwards

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()
        # a stage with no expected time still gets a sliver, so the bar moves while it runs
        total = sum(self.expected.values())
        floor = 0.002 * total if total > 0 else 1.0
        self._weights = {stage: max(float(self.expected.get(stage, 0.0)), floor) for stage in STAGE_ORDER}
        self._total = sum(self._weights.values())

    def update(self, stage: str, step: int, total: int) -> tuple[float, float, float | None]:
        """Record ``step`` of ``total`` in ``stage``.

        Returns:
            ``(fraction done 0-1, seconds elapsed, seconds left or None before any progress)``.
        """
        if stage not in self._weights:
            return self.fraction, self.clock() - self.started, None
        before = sum(self._weights[s] for s in STAGE_ORDER[:STAGE_ORDER.index(stage)])
        within = self._weights[stage] * min(max(step, 0), max(total, 1)) / max(total, 1)
        self.fraction = max(self.fraction, min(1.0, (before + within) / self._total))
        elapsed = self.clock() - self.started
        if self.fraction <= 0:
            return 0.0, elapsed, None
        # the estimate's remaining seconds, trusted less as the run's own pace becomes known
        planned = self._total * (1 - self.fraction)
        observed = elapsed * (1 - self.fraction) / self.fraction
        return self.fraction, elapsed, (1 - self.fraction) * planned + self.fraction * observed

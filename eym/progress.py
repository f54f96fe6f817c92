"""The progress hook every long-running library function takes (docs/ARCHITECTURE.md, "Progress")."""

from __future__ import annotations

from typing import Callable

# callback(stage, step, total): stage is "preprocess", "stage1", "stage2", "inversion",
# "sampling", "decode", "eval" or "suite"; step counts from 1 to total.
ProgressCallback = Callable[[str, int, int], None]

# The stages in the order they run, with the label a progress bar shows for each.
STAGE_LABELS: dict[str, str] = {
    "preprocess": "Preprocessing",
    "stage1": "Stage 1 - learning the person (RC-Attn)",
    "stage2": "Stage 2 - learning motion and background",
    "inversion": "DDIM inversion",
    "sampling": "Two-branch sampling",
    "decode": "Decoding",
}


class StageBar:
    """A :data:`ProgressCallback` that drives one bar ``progress(fraction, desc=...)`` across all stages.

    The bar is weighted by each stage's expected time (:class:`eym.estimate.WeightedProgress`)
    and its label names the stage, its step, the elapsed time and an ETA. Wrap it in
    :meth:`eym.runner.Ticket.callback` so that a stopped job stops at its next step.
    """

    def __init__(self, progress: Callable[..., object] | None, expected: dict[str, float] | None = None):
        from eym.estimate import STAGE_ORDER, WeightedProgress

        self.progress = progress
        self.seen: list[str] = []  # stages in the order they reported
        self.plan = WeightedProgress(expected if expected is not None else {s: 1.0 for s in STAGE_ORDER})

    def __call__(self, stage: str, step: int, total: int) -> None:
        from eym.estimate import format_seconds

        if stage not in self.seen:
            self.seen.append(stage)
        fraction, elapsed, left = self.plan.update(stage, step, total)
        clock = f"{format_seconds(elapsed)} elapsed" + (f", about {format_seconds(left)} left" if left is not None else "")
        if self.progress is not None:
            label = STAGE_LABELS.get(stage, stage)
            self.progress(fraction, desc=f"{label} ({step}/{max(int(total), 1)}) - {clock}")

"""The progress hook every long-running library function takes (docs/ARCHITECTURE.md, "Progress")."""

from __future__ import annotations

from typing import Callable

# callback(stage, step, total): stage is "preprocess", "stage1", "stage2", "inversion",
# "sampling", "decode", "eval" or "suite"; step counts from 1 to total.
ProgressCallback = Callable[[str, int, int], None]

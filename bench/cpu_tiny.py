"""CPU benchmark: the whole edit with the tiny random-weight model, offline.

8 frames at 64x64 from MotionEditor case-1 (source -> reference), DPL 20 + 20 steps, 10 DDIM
steps: preprocess, tune, infer (inversion + two branches + decode), write the mp4s. Every stage
is timed with a fresh cache, so nothing is reused. Target: under 60 s on a 2-core CPU.

    python bench/cpu_tiny.py [--media ../shared/media] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SOURCE_PROMPT = "A girl in a white crop top and a blue pleated skirt is dancing on the beach."
TARGET_PROMPT = "A girl in a white crop top and a blue pleated skirt is dancing with her arms stretched out on the beach."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", type=Path, default=Path(os.environ.get("EYM_MEDIA", REPO.parent / "shared" / "media")))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the timings here")
    args = parser.parse_args(argv)
    case = args.media / "MotionEditor" / "case-1"
    if not case.is_dir():
        print(f"footage not found at {case}; pass --media", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="eym-bench-") as home:
        os.environ["EYM_HOME"] = home  # fresh caches: every stage really runs
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from eym.editor import EditConfig, Editor, InferConfig
        from eym.prompts import derive_prompts
        from eym.motion import resolve_motion
        from eym.models import load_components
        from eym.preprocess import PreprocessConfig
        from eym.tuning import TuneConfig

        config = EditConfig(
            preprocess=PreprocessConfig(num_frames=8, size=64),
            tune=TuneConfig(steps1=20, steps2=20, lr=1e-3),
            infer=InferConfig(ddim_steps=10),
        )
        prompts = derive_prompts(source=SOURCE_PROMPT, target=TARGET_PROMPT)
        times: dict[str, float] = {}
        start = t = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            times[name] = round(now - t, 2)
            t = now

        editor = Editor(load_components("tiny", device="cpu"), disable_progress=True)
        lap("load model (builds the tiny bundle)")
        source = editor.load_source(case / "images", config)
        reference = resolve_motion(source, reference=case / "target_images", config=config.preprocess,
                                   retarget=config.infer.retarget)
        lap("preprocess source + reference")
        tuned = editor.tune(source, prompts, config.tune)
        lap("tune 20 + 20 steps")
        frames = editor.infer(source, reference, prompts, tuned, config.infer)
        lap("infer 10 DDIM steps (inversion + 2 branches + decode)")
        result = editor.edit(source, reference, prompts, config, out_dir=Path(home) / "out")
        lap("edit again (tuning reused) + write mp4s")
        times["total"] = round(time.perf_counter() - start, 2)
        assert result.reused_tuning and frames.shape == (8, 64, 64, 3)

    width = max(map(len, times))
    print(f"CPU tiny end to end, torch threads = {torch.get_num_threads()}")
    for name, seconds in times.items():
        print(f"  {name:<{width}}  {seconds:7.2f} s")
    if args.json:
        args.json.write_text(json.dumps(times, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where an edit loses the source: the VAE, the tuned reconstruction branch, or the editing branch.

For each pair, with the full method's tuning (as ``run_edits.py``): PSNR and mean absolute
difference against the source window of

- ``vae``: the source encoded and decoded (the ceiling of anything the model draws);
- ``reconstruction``: branch 0 of the two-branch sampler (inverted z_T^s, P_s, the source's own
  skeletons): if this does not look like the source, injection has nothing right to inject;
- ``self_edit``: the full edit driven by the source's own skeletons (METHOD.md: with balanced
  weighting edit == reconstruction when the inputs match);
- ``edit`` / ``edit_no_injection``: the real edit with and without key/value injection, and
  their difference (how much injection changes the output);
- ``edit_with_P_s``: the driving skeletons with the source prompt P_s as P_t (prompt or skeleton:
  which one takes the edit away from the source);
- ``edit_source_kv`` / ``edit_source_kv_decoder_after_k``: the edit whose queries read the
  reconstruction's keys/values only (``injection_weighting="source"``), in all layers and steps,
  and in the decoder from step 10 of 50 on (MasaCtrl's schedule).

CPU or GPU::

    python bench/quality/diagnose.py --pairs 3 --out /tmp/diag   # writes diag.json and pair<N>_diag.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab  # noqa: E402
import run_edits  # noqa: E402  (also stands in for a missing OpenCV)

from eym.config import replace  # noqa: E402
from eym.editor import Editor, InferConfig  # noqa: E402
from eym.injection import InjectionSchedule  # noqa: E402
from eym.models import load_components  # noqa: E402
from eym.motion import Motion  # noqa: E402
from eym.prompts import encode_prompt_embeds  # noqa: E402
from eym.sampling import decode_video, encode_video  # noqa: E402
from eym.tuning import TuneConfig  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def branches(editor: Editor, source, skeletons: np.ndarray, prompts, tuned, config: InferConfig) -> tuple[np.ndarray, np.ndarray]:
    """(reconstruction, edit) frames of one two-branch run, each (F, H, W, 3) uint8."""
    c = editor.components
    embeds = encode_prompt_embeds(c.tokenizer, c.text_encoder, prompts)
    editor.load_tuned(tuned)
    with editor._edit_processors(config):
        z_T = editor._invert(source, prompts, embeds, tuned, config, None)
        latents = editor._sample(source, skeletons, z_T, embeds, config, None)
    return decode_video(c.vae, latents[0:1]), decode_video(c.vae, latents[1:2])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".carry/quality/mini"))
    parser.add_argument("--data", type=Path, default=Path(".carry/quality"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=str, default="3", help="comma list of pair indices")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps1", type=int, default=120)
    parser.add_argument("--steps2", type=int, default=120)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--device", default=None)
    parser.add_argument("--cache", type=Path, default=None, help="tuned-weights cache to reuse across runs (default: a new temporary one)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data, meta = lab.load_data(args.data / lab.EDITS_FILE)
    components = load_components(str(args.model), device=args.device)
    import tempfile

    editor = Editor(components, cache_dir=args.cache or Path(tempfile.mkdtemp(prefix="eym-diag-")), disable_progress=True)
    tune = TuneConfig(steps1=args.steps1, steps2=args.steps2, lr=args.lr, checkpoint_every=0, gradient_checkpointing=False)
    infer = InferConfig(ddim_steps=args.ddim_steps, retarget=False)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"settings": vars(args) | {"model": str(args.model), "data": str(args.data), "out": str(args.out)}, "pairs": []}
    for p in [int(x) for x in args.pairs.split(",")]:
        t0 = time.perf_counter()
        source, reference, prompts = run_edits.pair_clips(data, meta, p, args.frames)
        src = np.asarray(source.frames)
        tuned = editor.tune(source, prompts, tune)
        vae = decode_video(components.vae, encode_video(components.vae, src).to(components.dtype))
        recon, edit = branches(editor, source, reference.skeletons, prompts, tuned, infer)
        _, self_edit = branches(editor, source, np.asarray(source.skeletons), prompts, tuned, infer)
        _, self_balanced = branches(editor, source, np.asarray(source.skeletons), prompts, tuned,
                                    replace(infer, injection_weighting="balanced"))
        _, no_inj = branches(editor, source, reference.skeletons, prompts, tuned,
                             replace(infer, injection=InjectionSchedule(layers="none")))
        _, with_ps = branches(editor, source, reference.skeletons, replace(prompts, target=prompts.source), tuned, infer)
        _, source_kv = branches(editor, source, reference.skeletons, prompts, tuned, replace(infer, injection_weighting="source"))
        _, source_kv_late = branches(editor, source, reference.skeletons, prompts, tuned,
                                     replace(infer, injection_weighting="source", injection=InjectionSchedule(layers="up", start=0.2)))
        videos = {"vae": vae, "reconstruction": recon, "self_edit": self_edit, "self_edit_balanced": self_balanced,
                  "edit": edit, "edit_no_injection": no_inj, "edit_with_P_s": with_ps, "edit_source_kv": source_kv,
                  "edit_source_kv_decoder_after_k": source_kv_late}
        row = {"pair": p, **meta["pairs"][p], "final_loss": tuned.manifest.get("final_loss"),
               "vs_source": {k: {"PSNR": round(psnr(v, src), 2), "MAD": round(mad(v, src), 2)} for k, v in videos.items()},
               "edit_vs_no_injection_MAD": round(mad(edit, no_inj), 2),
               "edit_vs_reconstruction_MAD": round(mad(edit, recon), 2),
               "MAD_vs_edit": {k: round(mad(v, edit), 2) for k, v in videos.items() if k.startswith("edit_")},
               "seconds": round(time.perf_counter() - t0, 1)}
        report["pairs"].append(row)
        print(json.dumps(row), flush=True)
        from report import contact_sheet

        contact_sheet([("source", src), ("driving skeleton", reference.skeletons), *videos.items()], args.out / f"pair{p}_diag.png")
    (args.out / "diag.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()

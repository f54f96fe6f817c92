"""The quality lab's GPU scripts on their CPU toy path: train, pack, load, edit, score.

bench/quality/train_mini.py --toy trains a tiny mini SD for 2 steps per phase on synthetic data
in the lab's layout; the saved folder must load through ``load_components`` unchanged and edit
through ``Editor.edit``; run_edits.py and report.py run end to end on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

LAB = Path(__file__).resolve().parents[1] / "bench" / "quality"
sys.path.insert(0, str(LAB))

import lab  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic data + a toy-trained mini model: (data dir, model dir, train_mini's $OUT)."""
    import prepare_data
    import train_mini

    root = tmp_path_factory.mktemp("quality")
    data = root / "data"
    prepare_data.synthetic(data, frames_per_clip=2, size=64)
    out = root / "out"
    train_mini.main(["--toy", "--data", str(data), "--model-dir", str(root / "mini"), "--out", str(out), "--device", "cpu"])
    return data, root / "mini", out


def test_data_layout_and_delta_coding(trained):
    data, _, _ = trained
    rng = np.random.default_rng(0)
    for shape in ((5, 8, 8, 3), (3, 5, 8, 8, 3)):  # a frame sequence; clips of frame sequences
        frames = rng.integers(0, 256, shape, dtype=np.uint8)
        deltas = lab.delta_encode(frames)
        assert np.array_equal(lab.delta_decode(deltas), frames)
        assert np.array_equal(deltas.take(0, axis=frames.ndim - 4), frames.take(0, axis=frames.ndim - 4))  # along frames
    arrays, meta = lab.load_data(data / lab.EDITS_FILE)
    C, F = len(lab.CLIPS), lab.EVAL_FRAMES
    assert arrays["window_frames"].shape == (C, F, 64, 64, 3) and arrays["window_frames"].dtype == np.uint8
    assert arrays["driving_skeletons"].shape == (len(lab.PAIRS), F, 64, 64, 3)
    assert [p["prompts"]["source"] for p in meta["pairs"]] == [lab.pair_prompts(p)["source"] for p in lab.PAIRS]


def test_split_holds_out_the_window():
    import prepare_data

    train, window = prepare_data.split_indices(237)
    assert len(window) == lab.EVAL_FRAMES and window[-1] == 235
    assert max(train) < window[0] - lab.GAP_RAW_FRAMES  # nothing trained near the edited frames
    assert len(prepare_data.split_indices(2000)[0]) == lab.MAX_TRAIN_PER_CLIP


def test_mini_bundle_loads_as_a_diffusers_folder(trained):
    from safetensors import safe_open

    from eym.models import load_components

    _, model, out = trained
    c = load_components(str(model), device="cpu")
    info = json.loads((model / "quality_lab.json").read_text())
    assert not c.is_tiny and c.controlnet_id == str(model)  # the bundled controlnet/ is picked up
    assert c.vae_scale_factor == 8
    assert c.vae.config.scaling_factor == pytest.approx(info["scaling_factor"])
    assert [type(b).__name__ for b in c.unet.down_blocks] == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert [type(b).__name__ for b in c.unet.up_blocks] == ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size
    with safe_open(str(model / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps_run"] == {"vae": 2, "unet": 2} and all(np.isfinite(r.get("loss", r.get("l1"))) for r in log["log"])
    preview = np.load(out / "preview.npz")
    assert preview["samples"].shape == (len(lab.CLIPS), 64, 64, 3)


def test_pack_round_trip_and_damage(trained, tmp_path):
    import shutil

    import unpack_model

    _, model, out = trained
    restored = unpack_model.unpack(out, tmp_path / "a")
    originals = sorted(p.relative_to(model) for p in model.rglob("*") if p.is_file())
    assert sorted(p.relative_to(restored) for p in restored.rglob("*") if p.is_file()) == originals
    assert all((restored / p).read_bytes() == (model / p).read_bytes() for p in originals)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    part = broken / "mini.tar.00"
    part.write_bytes(part.read_bytes()[:-1] + b"x")
    with pytest.raises(SystemExit, match="sha256"):
        unpack_model.unpack(broken, tmp_path / "b")
    assert not (tmp_path / "b" / "mini").exists()


def test_editor_edit_on_the_mini_model(trained, tmp_path):
    import run_edits

    from eym.editor import EditConfig, Editor, InferConfig
    from eym.motion import motion_skeletons
    from eym.models import load_components
    from eym.tuning import TuneConfig

    data, model, _ = trained
    arrays, meta = lab.load_data(data / lab.EDITS_FILE)
    source, reference, prompts = run_edits.pair_clips(arrays, meta, 0, 4)
    editor = Editor(load_components(str(model), device="cpu"), cache_dir=tmp_path / "tuned", disable_progress=True)
    config = EditConfig(tune=TuneConfig(steps1=1, steps2=1, checkpoint_every=0), infer=InferConfig(ddim_steps=2, retarget=False))
    result = editor.edit(source, reference, prompts, config, out_dir=tmp_path / "edit")
    assert result.frames.shape == (4, 64, 64, 3) and result.video.is_file()
    assert np.array_equal(motion_skeletons(source, reference, retarget=False), arrays["driving_skeletons"][0, :4])


def test_run_edits_and_report_end_to_end(trained, tmp_path):
    import report
    import run_edits

    data, model, _ = trained
    edits = tmp_path / "edits"
    log = run_edits.main(["--toy", "--pairs", "1", "--rows", "full,no_injection,plain_generation", "--model", str(model),
                          "--data", str(data), "--out", str(edits), "--device", "cpu"])
    assert [p["pair"] for p in log["pairs"]] == [0] and not log["skipped"]
    with np.load(edits / "pair0.npz") as npz:
        assert npz["rows"].tolist() == ["full", "no_injection", "plain_generation"]
        assert npz["edits"].shape == (3, 4, 64, 64, 3)
        assert not np.array_equal(npz["edits"][0], npz["edits"][2])  # the baseline is another computation
    results = report.main(["--edits", str(edits), "--data", str(data), "--out", str(tmp_path / "report")])
    rows = results["pairs"][0]["rows"]
    assert list(rows) == ["source", "reference_video", "full", "no_injection", "plain_generation"]
    assert rows["source"]["MAFD-ratio"] == pytest.approx(1.0)
    assert rows["source"]["BG-SSIM"] == pytest.approx(1.0)
    assert (tmp_path / "report" / "pair0.png").is_file()
    assert "`plain_generation`" in (tmp_path / "report" / "table.md").read_text()


def test_appearance_score_is_pose_invariant_and_colour_sensitive():
    import report

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((3, 32, 32), bool)
    masks[:, 8:24, 10:20] = True
    assert report.appearance_score(frames, masks, frames, masks) == pytest.approx(1.0)
    # the same person pixels elsewhere (a moved person): still 1
    moved, moved_masks = np.roll(frames, 5, axis=2), np.roll(masks, 5, axis=2)
    assert report.appearance_score(moved, moved_masks, frames, masks) == pytest.approx(1.0)
    recoloured = frames.copy()
    recoloured[masks] = 255 - recoloured[masks]
    assert report.appearance_score(recoloured, masks, frames, masks) < 0.9
    assert report.appearance_score(frames, np.zeros_like(masks), frames, masks) is None


def test_unsharp_keeps_flat_frames_and_raises_contrast():
    import report

    flat = np.full((2, 16, 16, 3), 100, np.uint8)
    assert np.array_equal(report.unsharp(flat), flat)
    edge = flat.copy()
    edge[:, :, 8:] = 150
    sharp = report.unsharp(edge)
    assert sharp[0, 8, 7, 0] < 100 < 150 < sharp[0, 8, 8, 0]  # overshoot on both sides of the edge


def test_row_means_compare_rows_on_the_same_pairs():
    """A metric one row lacks in a pair (nobody detected) leaves that pair out for every row."""
    import report

    pairs = [
        {"pair": 0, "rows": {"a": {"APP": 0.9, "BG-PSNR": 20.0}, "b": {"APP": None, "BG-PSNR": 18.0}}},
        {"pair": 1, "rows": {"a": {"APP": 0.5, "BG-PSNR": 10.0}, "b": {"APP": 0.6, "BG-PSNR": 12.0}}},
    ]
    means = report.mean_rows(pairs)
    # APP only over pair 1, where both rows have it: b beats a there, so b must not look worse
    assert means["a"]["APP"] == pytest.approx(0.5) and means["b"]["APP"] == pytest.approx(0.6)
    # metrics every row has: over all pairs
    assert means["a"]["BG-PSNR"] == pytest.approx(15.0) and means["b"]["BG-PSNR"] == pytest.approx(15.0)
    assert report.common_pairs(pairs, "APP") == [1]
    assert "APP: pairs [1]" in report.table({"pairs": pairs, "mean": means}, {})


def test_diagnose_runs_and_self_edit_equals_reconstruction(trained, tmp_path):
    """diagnose.py on the toy model: every video scored; with the source's own skeletons the
    balanced and source weightings make the editing branch the reconstruction (METHOD.md)."""
    import diagnose

    data, model, _ = trained
    report = diagnose.main(["--pairs", "0", "--frames", "4", "--steps1", "1", "--steps2", "1", "--ddim-steps", "2",
                            "--model", str(model), "--data", str(data), "--out", str(tmp_path), "--device", "cpu"])
    row = report["pairs"][0]
    assert set(row["vs_source"]) == {"vae", "reconstruction", "self_edit", "self_edit_balanced", "edit", "edit_no_injection",
                                     "edit_with_P_s", "edit_source_kv", "edit_source_kv_decoder_after_k"}
    assert row["vs_source"]["self_edit_balanced"]["MAD"] == pytest.approx(row["vs_source"]["reconstruction"]["MAD"], abs=0.5)
    assert (tmp_path / "pair0_diag.png").is_file() and (tmp_path / "diag.json").is_file()


def test_controlnet_after_schedule_trains_only_the_controlnet_in_its_phase(trained, tmp_path):
    """--controlnet-phase after: the UNet and text encoder learn without skeletons, then a ControlNet
    copied from the trained UNet learns alone (the UNet is frozen then); the bundle loads as before."""
    import torch
    import train_mini

    from eym.models import load_components

    cfg = train_mini.MiniConfig(**train_mini.TOY)
    from transformers import CLIPTokenizer

    from eym.models import write_tiny_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp_path / "tok")))
    torch.manual_seed(0)
    vae, unet, _, text_encoder, scheduler = train_mini.build_models(cfg, tokenizer, 64)
    controlnet = train_mini.controlnet_from(unet, cfg)
    assert all(torch.equal(a, b) for a, b in zip(controlnet.down_blocks.state_dict().values(), unet.down_blocks.state_dict().values()))
    N, U = 6, 3
    data = {"mean": torch.randn(N, 4, 8, 8), "std": torch.rand(N, 4, 8, 8) * 0.1, "scale": 1.0,
            "ids": tokenizer([""] * U, padding="max_length", max_length=77, return_tensors="pt").input_ids,
            "clip": torch.zeros(N, dtype=torch.long), "content_idx": torch.tensor([1]), "motion_idx": torch.tensor([[2]]),
            "skeletons": torch.randint(0, 255, (N, 64, 64, 3), dtype=torch.uint8)}
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    cn_before = {k: v.clone() for k, v in controlnet.state_dict().items()}
    import contextlib

    steps = train_mini.train_diffusion(unet, controlnet, text_encoder, scheduler, data, cfg, torch.device("cpu"), [],
                                       contextlib.nullcontext, phase="controlnet", trained=(controlnet,), steps=2, seconds=60)
    assert steps == 2
    assert all(torch.equal(v, unet_before[k]) for k, v in unet.state_dict().items())
    assert all(torch.equal(v, text_before[k]) for k, v in text_encoder.state_dict().items())
    assert any(not torch.equal(v, cn_before[k]) for k, v in controlnet.state_dict().items())

    # end to end through the script: both phases logged, the bundle loads
    data_dir, _, _ = trained
    out = tmp_path / "out"
    train_mini.main(["--toy", "--controlnet-phase", "after", "--data", str(data_dir), "--model-dir", str(tmp_path / "mini"),
                     "--out", str(out), "--device", "cpu"])
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps_run"] == {"vae": 2, "unet": 2, "controlnet": 2}
    assert {r["phase"] for r in log["log"]} == {"vae", "unet", "controlnet"}
    assert load_components(str(tmp_path / "mini"), device="cpu").controlnet is not None

"""Metrics: hand-computed values on synthetic inputs, CLIP and LPIPS through their real loading
code on tiny random-weight models, and motion alignment on real footage."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from eym import metrics as M
from eym.errors import EymError


# ---------------------------------------------------------------------------------------------
# Tiny models on disk, loaded through the same code paths as the real ones
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random-weight CLIPModel + processor in transformers' folder format."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from eym.models import write_tiny_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    # transformers 5's CLIPTokenizer(vocab_file=...) ignores the files: write them, then from_pretrained
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(folder / "tok")))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id),
            vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                               num_hidden_layers=2, num_attention_heads=2),
            projection_dim=16,
        )
        CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> Path:
    """A torch hub cache holding a random AlexNet under the exact name torchvision downloads to.

    The classifier (unused by LPIPS) is stored as zero-stride expanded zeros: the state dict has
    every key and shape of torchvision's architecture, but the file is ~10 MB instead of 240.
    """
    from torchvision.models import AlexNet_Weights, alexnet

    home = tmp_path_factory.mktemp("torch_home")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = alexnet(weights=None).state_dict()
    state = {k: torch.zeros(1).expand(v.shape) if k.startswith("classifier") else v for k, v in state.items()}
    target = home / "hub" / "checkpoints" / Path(AlexNet_Weights.IMAGENET1K_V1.url).name
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    return home


def _video(seed: int, frames: int = 4, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# CLIP metrics: TA, TC
# ---------------------------------------------------------------------------------------------
def test_ta_tc_hand_computed():
    img = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    ta, per = M.text_alignment(img, np.array([5.0, 0.0]))
    np.testing.assert_allclose(per, [1.0, 0.0, 1 / math.sqrt(2)], atol=1e-12)
    assert ta == pytest.approx((1 + 1 / math.sqrt(2)) / 3)
    tc, per = M.temporal_consistency(img)
    np.testing.assert_allclose(per, [0.0, 1 / math.sqrt(2)], atol=1e-12)
    assert M.temporal_consistency(np.ones((5, 7)))[0] == pytest.approx(1.0)


def test_clip_metrics_through_real_loading_path(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    video = _video(0)
    prompt = "a man in a white suit is raising both arms"
    cfg = M.EvalConfig(clip_model=str(tiny_clip), metrics=("clip",), batch_size=3)  # 3: batches of 3 + 1
    report = M.evaluate(video, video, prompt, config=cfg)

    # reference: the transformers model used directly, one frame at a time
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        img = torch.cat([model.get_image_features(**proc(images=[f], return_tensors="pt")).pooler_output for f in video])
        txt = model.get_text_features(**proc(text=[prompt], return_tensors="pt")).pooler_output[0]
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm()
    ta = (img @ txt).mean().item()
    tc = (img[:-1] * img[1:]).sum(-1).mean().item()
    assert report.metrics["TA"].value == pytest.approx(ta, abs=1e-5)
    assert report.metrics["TC"].value == pytest.approx(tc, abs=1e-5)
    assert report.models["clip"]["name"] == str(tiny_clip)

    # identical frames: TC at its best value; TA does not depend on frame order
    still = np.repeat(video[:1], 4, axis=0)
    assert M.evaluate(still, still, prompt, config=cfg).metrics["TC"].value == pytest.approx(1.0, abs=1e-6)
    shuffled = M.evaluate(video[::-1].copy(), video, prompt, config=cfg)
    assert shuffled.metrics["TA"].value == pytest.approx(ta, abs=1e-5)


def test_clip_unavailable_is_a_reason_not_a_number(tmp_path):
    video = _video(1, frames=2, size=32)
    start = time.perf_counter()
    report = M.evaluate(video, video, "x", config=M.EvalConfig(clip_model="nobody/no-such-clip", metrics=("clip",)))
    assert time.perf_counter() - start < 30  # no download attempt hanging
    for name in ("TA", "TC"):
        assert report.metrics[name].value is None
        assert "nobody/no-such-clip" in report.metrics[name].unavailable
    (tmp_path / "empty").mkdir()
    report = M.evaluate(video, video, "x", config=M.EvalConfig(clip_model=str(tmp_path / "empty"), metrics=("clip",)))
    assert report.metrics["TA"].value is None and "config.json" in report.metrics["TA"].unavailable


# ---------------------------------------------------------------------------------------------
# LPIPS metrics: L-N, L-S
# ---------------------------------------------------------------------------------------------
def _lpips_reference(trunk_file: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
    """LPIPS v0.1 written out from its definition (Zhang et al. 2018) with the same weight files."""
    import lpips
    from torchvision.models import alexnet

    net = alexnet(weights=None)
    net.load_state_dict(torch.load(trunk_file, map_location="cpu"))
    net = net.features.double()
    lin = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu")
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(x: np.ndarray) -> list[torch.Tensor]:
        h = (torch.from_numpy(x).permute(2, 0, 1)[None].double() / 255 * 2 - 1 - shift) / scale
        out = []
        for i, layer in enumerate(net):
            h = layer(h)
            if i in (1, 4, 7, 9, 11):  # the ReLU after each conv
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    out = []
    with torch.no_grad():
        for a, b in pairs:
            total = 0.0
            for k, (fa, fb) in enumerate(zip(feats(a), feats(b))):
                w = lin[f"lin{k}.model.1.weight"].double()  # (1, C, 1, 1)
                total += ((fa - fb) ** 2 * w).sum(1).mean().item()
            out.append(total)
    return out


def test_lpips_through_real_loading_path(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    a, b = _video(2, frames=3), _video(3, frames=3)
    cfg = M.EvalConfig(metrics=("lpips",))
    report = M.evaluate(a, b, "x", config=cfg)
    trunk = Path(report.models["lpips"]["trunk_weights"])
    assert trunk.is_relative_to(torch_home)
    want = _lpips_reference(trunk, [*zip(a, b), *zip(a[:-1], a[1:])])
    want_ls, want_ln = np.mean(want[:3]), np.mean(want[3:])
    assert report.metrics["L-S"].value == pytest.approx(want_ls, rel=1e-4)
    assert report.metrics["L-N"].value == pytest.approx(want_ln, rel=1e-4)
    # best values: a video against itself, a still video against its neighbours
    still = np.repeat(a[:1], 3, axis=0)
    same = M.evaluate(still, still, "x", config=cfg)
    assert same.metrics["L-S"].value == pytest.approx(0.0, abs=1e-7)
    assert same.metrics["L-N"].value == pytest.approx(0.0, abs=1e-7)
    # symmetric in its two arguments
    model = M.load_lpips("alex")
    np.testing.assert_allclose(M.lpips_distances(model, a, b), M.lpips_distances(model, b, a), rtol=1e-5)


def test_lpips_unavailable_without_trunk_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    video = _video(4, frames=2, size=32)
    report = M.evaluate(video, video, "x", config=M.EvalConfig(metrics=("lpips", "temporal")))
    for name in ("L-N", "L-S"):
        assert report.metrics[name].value is None
        assert "alexnet-owt-7be5be79.pth" in report.metrics[name].unavailable
    assert report.metrics["MAFD"].value is not None  # other groups still run
    assert not (tmp_path / "hub" / "checkpoints").exists() or not any((tmp_path / "hub" / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------
# Motion alignment (synthetic)
# ---------------------------------------------------------------------------------------------
def _skeleton(frames: int = 3) -> np.ndarray:
    """Reference keypoints whose bounding box is 0.4 wide and 0.5 tall in every frame (s = 0.5)."""
    rng = np.random.default_rng(5)
    kp = np.zeros((frames, 18, 3), np.float32)
    kp[..., 0] = 0.3 + rng.uniform(0, 0.4, (frames, 18))
    kp[..., 1] = 0.2 + rng.uniform(0, 0.5, (frames, 18))
    kp[:, 0, :2] = (0.3, 0.2)  # pin the corners so the box is exactly 0.4 x 0.5
    kp[:, 1, :2] = (0.7, 0.7)
    kp[..., 2] = 1.0
    return kp


def test_pose_alignment_hand_computed():
    ref = _skeleton()
    same = M.pose_alignment(ref, ref)
    assert (same["pck"], same["mkd"], same["detection_rate"]) == (1.0, 0.0, 1.0)

    near = ref.copy()
    near[..., 0] += 0.04  # 0.04 / s = 0.08 of the box: inside PCK@0.1
    r = M.pose_alignment(near, ref, threshold=0.1)
    assert r["pck"] == 1.0 and r["mkd"] == pytest.approx(0.08, abs=1e-6)
    assert M.pose_alignment(near, ref, threshold=0.05)["pck"] == 0.0

    far = ref.copy()
    far[:, :9, 1] += 0.1  # half the points moved 0.2 s, the rest exact
    r = M.pose_alignment(far, ref)
    assert r["pck"] == pytest.approx(9 / 18) and r["mkd"] == pytest.approx(0.1, abs=1e-6)

    # keypoints missing in the edit are left out of PCK but lower the detection rate
    missing = ref.copy()
    missing[:, 9:, 2] = 0.0
    r = M.pose_alignment(missing, ref)
    assert r["pck"] == 1.0 and r["detection_rate"] == pytest.approx(0.5) and r["visible_both"] == 3 * 9
    # nothing detected at all: no PCK (not a perfect one), detection rate 0
    r = M.pose_alignment(np.zeros_like(ref), ref)
    assert r["pck"] is None and r["detection_rate"] == 0.0
    with pytest.raises(EymError, match="same frame sampling"):
        M.pose_alignment(ref[:2], ref)


# ---------------------------------------------------------------------------------------------
# Background preservation
# ---------------------------------------------------------------------------------------------
def test_psnr_of_known_mse_noise():
    rng = np.random.default_rng(6)
    a = np.full((3, 16, 16, 3), 128, np.uint8)
    b = (a + rng.choice([-10, 10], size=a.shape)).astype(np.uint8)  # squared error exactly 100 everywhere
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
    assert M.psnr(a, a) == math.inf
    # noise only inside the region left out: a perfect background
    person = np.zeros((3, 16, 16), bool)
    person[:, 4:12, 4:12] = True
    c = a.copy()
    c[person] = 0
    assert M.psnr(a, c, ~person) == math.inf
    assert M.psnr(a, c, person) == pytest.approx(10 * math.log10(255**2 / 128**2))


def _ssim_map_reference(a: np.ndarray, b: np.ndarray, sigma: float = 1.5, data_range: float = 255.0) -> np.ndarray:
    """Wang et al. 2004 written out with OpenCV's Gaussian blur: an implementation independent of skimage."""
    import cv2

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    radius = int(3.5 * sigma + 0.5)

    def blur(x):
        return cv2.GaussianBlur(x, (2 * radius + 1, 2 * radius + 1), sigmaX=sigma, sigmaY=sigma,
                                borderType=cv2.BORDER_REFLECT)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def test_ssim_matches_reference_and_hand_value():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (40, 48, 3)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255)
    ours = M.ssim_map(x, y)
    assert ours.shape == x.shape
    np.testing.assert_allclose(ours, _ssim_map_reference(x, y), atol=1e-9)  # borders too: both reflect
    # constant images a and a+d: variances vanish, SSIM = (2 a (a+d) + C1) / (a^2 + (a+d)^2 + C1)
    c1 = (0.01 * 255) ** 2
    a, d = 100.0, 30.0
    got = M.ssim_map(np.full((20, 20), a), np.full((20, 20), a + d))
    np.testing.assert_allclose(got, (2 * a * (a + d) + c1) / (a**2 + (a + d) ** 2 + c1), rtol=1e-9)
    video = np.stack([x, y]).astype(np.uint8)
    assert M.ssim(video, video) == pytest.approx(1.0)
    region = np.zeros((2, 40, 48), bool)
    region[:, 10:30, 5:20] = True
    maps = [_ssim_map_reference(video[0], video[1]), _ssim_map_reference(video[1], video[0])]
    expected = np.mean([maps[0][region[0]], maps[1][region[1]]])
    assert M.ssim(video, video[::-1], region) == pytest.approx(expected, abs=1e-6) and expected < 0.99
    # frames smaller than the 11-tap window still get a map (the window is only skimage's size check)
    small = M.ssim_map(x[:6, :6], y[:6, :6])
    np.testing.assert_allclose(small, _ssim_map_reference(x[:6, :6], y[:6, :6]), atol=1e-6)


def test_background_region_dilation():
    masks = np.zeros((1, 41, 41), bool)
    masks[0, 20, 20] = True
    none = np.zeros_like(masks)
    np.testing.assert_array_equal(M.background_region(masks, none, 0.0), ~masks)
    region = M.background_region(none, masks, 0.1)  # radius ceil(0.1 * 41) = 5 px, a disc
    assert not region[0, 20, 25] and region[0, 20, 26] and not region[0, 25, 20] and region[0, 24, 24]
    # the union of both videos' masks is left out
    other = np.zeros_like(masks)
    other[0, 0, 0] = True
    assert not M.background_region(masks, other, 0.0)[0, 0, 0]


# ---------------------------------------------------------------------------------------------
# Temporal stability
# ---------------------------------------------------------------------------------------------
def test_mafd_of_known_ramp_and_ratio():
    base = np.random.default_rng(8).integers(50, 150, (1, 16, 16, 3))
    ramp = lambda step: (base + step * np.arange(5)[:, None, None, None]).astype(np.uint8)  # noqa: E731
    mafd, per = M.mean_abs_frame_difference(ramp(4))
    assert mafd == pytest.approx(4.0) and per == pytest.approx([4.0] * 4)
    report = M.evaluate(ramp(4), ramp(2), "x", config=M.EvalConfig(metrics=("temporal",)))
    assert report.metrics["MAFD"].value == pytest.approx(4.0)
    assert report.metrics["MAFD-ratio"].value == pytest.approx(2.0)
    still = np.repeat(ramp(0)[:1], 5, axis=0)
    report = M.evaluate(ramp(3), still, "x", config=M.EvalConfig(metrics=("temporal",)))
    assert report.metrics["MAFD-ratio"].value is None and "do not change" in report.metrics["MAFD-ratio"].unavailable


# ---------------------------------------------------------------------------------------------
# Settings, report, input checks
# ---------------------------------------------------------------------------------------------
def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(EymError, match="pck_treshold"):
        M.EvalConfig.from_dict({"pck_treshold": 0.2})
    with pytest.raises(EymError, match="fid"):
        M.EvalConfig(metrics=("clip", "fid"))
    with pytest.raises(EymError, match="pck_threshold"):
        M.EvalConfig(pck_threshold=0)
    assert M.EvalConfig.from_dict({"metrics": ["temporal"]}).metrics == ("temporal",)


def test_report_json_round_trip_and_records_settings():
    a = np.zeros((3, 8, 8, 3), np.uint8)
    report = M.evaluate(a, a, "p", config=M.EvalConfig(metrics=("temporal",)), settings={"sampling": {"start": 4}})
    data = json.loads(report.to_json())
    assert data["settings"]["eval"]["metrics"] == ["temporal"] and data["settings"]["sampling"] == {"start": 4}
    assert data["settings"]["target_prompt"] == "p" and data["settings"]["num_frames"] == 3
    back = M.EvalReport.from_dict(data)
    assert back.values() == report.values()
    inf = M.EvalReport({"BG-PSNR": M.Metric("BG-PSNR", math.inf, True)}, {})
    text = inf.to_json()
    json.loads(text)  # valid JSON (no bare Infinity)
    assert M.EvalReport.from_dict(json.loads(text)).metrics["BG-PSNR"].value == math.inf


def test_mismatched_inputs_raise_eym_error():
    with pytest.raises(EymError, match="--frames"):
        M.evaluate(_video(0, frames=4), _video(0, frames=5), "x", config=M.EvalConfig(metrics=("temporal",)))
    with pytest.raises(EymError, match="uint8"):
        M.evaluate(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)), "x")


# ---------------------------------------------------------------------------------------------
# Motion alignment on real footage (the real pose backend)
# ---------------------------------------------------------------------------------------------
@pytest.mark.media
def test_motion_alignment_on_real_footage(media, tmp_path):
    from eym.pose import get_pose_backend
    from eym.video import read_video, write_mp4

    sampling = dict(num_frames=8, size=256)
    own = read_video(media / "taichi_hd" / "taichi_copart00.mp4", **sampling).frames
    other = read_video(media / "taichi_hd" / "taichi_copart06.mp4", **sampling).frames
    backend = get_pose_backend("auto")
    own_kp, other_kp = backend.detect(own), backend.detect(other)
    assert (own_kp[..., 2] >= 0.3).mean() > 0.8  # the person is found, so the check below means something

    # the clip after an H.264 round trip (as an edit's output would be) against its own skeletons
    reencoded = read_video(write_mp4(own, tmp_path / "own.mp4", fps=8), num_frames=None, size=None).frames
    cfg = M.EvalConfig(metrics=("motion",), pose="auto")
    same = M.evaluate(reencoded, own, "x", reference_keypoints=own_kp, config=cfg)
    assert same.metrics["PCK"].value >= 0.95 and same.metrics["MKD"].value < 0.05
    assert same.metrics["DET"].value >= 0.95

    # the same clip against a different tai chi clip's skeletons: clearly worse
    different = M.evaluate(reencoded, own, "x", reference_keypoints=other_kp, config=cfg)
    assert different.metrics["PCK"].value < same.metrics["PCK"].value - 0.3
    assert different.metrics["MKD"].value > 3 * same.metrics["MKD"].value + 0.05


@pytest.mark.media
def test_background_metrics_on_real_footage(media):
    from eym.video import read_video

    frames = read_video(media / "MotionEditor" / "case-1" / "images", num_frames=4, size=128).frames
    frames = np.minimum(frames, 245)  # room for the +10 shift below without clipping
    cfg = M.EvalConfig(metrics=("background", "temporal"), mask="mediapipe")
    same = M.evaluate(frames, frames, "x", config=cfg)
    assert same.metrics["BG-PSNR"].value == math.inf and same.metrics["BG-SSIM"].value == pytest.approx(1.0)
    assert same.metrics["MAFD-ratio"].value == pytest.approx(1.0)
    assert 0.2 < same.models["background"]["background_fraction"] < 0.95  # a person was masked out

    # a uniform +10 shift: squared error 100 at every background pixel, whatever the masks are
    shifted = M.evaluate(frames + 10, frames, "x", config=cfg)
    assert shifted.metrics["BG-PSNR"].value == pytest.approx(10 * math.log10(255**2 / 100))
    assert shifted.metrics["MAFD-ratio"].value == pytest.approx(1.0)
    # the background region excludes both videos' dilated person masks: more dilation, less background
    wide = M.evaluate(frames, frames, "x", config=M.EvalConfig(metrics=("background",), mask_dilation=0.1))
    assert wide.models["background"]["background_fraction"] < same.models["background"]["background_fraction"]


# ---------------------------------------------------------------------------------------------
# `eym eval` end to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.media
def test_eval_cli_writes_json_and_reports_bad_sampling(media, tmp_path, tiny_clip, capsys):
    from eym.cli import main
    from eym.video import read_video, write_mp4

    source = media / "taichi_hd" / "taichi_copart00.mp4"
    sampled = read_video(source, num_frames=6, size=96, start=10, stride=3)
    edited = write_mp4(sampled.frames, tmp_path / "edited.mp4", fps=sampled.fps)  # "edited" = the source itself

    def eval_args(*, frames: int = 6, reference: str = str(source), metrics: str = "clip,motion,background,temporal"):
        return ["eval", str(edited), "--source", str(source), "--reference", reference, "--target-prompt",
                "A man is raising both arms.", "--frames", str(frames), "--size", "96", "--start", "10",
                "--stride", "3", "--clip-model", str(tiny_clip), "--metrics", metrics]

    out = tmp_path / "report.json"
    assert main([*eval_args(), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["sampling"] == {"num_frames": 6, "size": 96, "start": 10, "stride": 3,
                                              "resize_mode": "crop"}
    assert report["settings"]["eval"]["clip_model"] == str(tiny_clip)
    assert report["models"]["clip"]["name"] == str(tiny_clip) and report["models"]["motion"]["pose_backend"]
    values = {k: v["value"] for k, v in report["metrics"].items()}
    assert values["PCK"] >= 0.95 and values["BG-PSNR"] != "inf" and values["BG-PSNR"] > 30
    assert values["MAFD-ratio"] == pytest.approx(1.0, abs=0.05)  # only the H.264 round trip differs
    assert "PCK" in capsys.readouterr().out

    # sampled differently from the edit: one line naming the problem, exit code 2
    assert main(eval_args(frames=8)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # (log lines aside)
    assert len(errors) == 1 and "--frames" in errors[0]

    # a preset motion as the reference: a man doing tai chi matches "raise arms" worse than himself
    preset = tmp_path / "preset.json"
    assert main([*eval_args(reference="raise_arms", metrics="motion"), "--json", str(preset)]) == 0
    got = json.loads(preset.read_text())
    assert got["settings"]["inputs"]["reference"] == "preset:raise_arms"
    assert got["metrics"]["PCK"]["value"] < values["PCK"]
    assert main(eval_args(reference="moonwalk", metrics="motion")) == 2
    assert "moonwalk" in capsys.readouterr().err

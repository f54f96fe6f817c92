"""Cost estimates from the per-step figures, and the time-weighted progress bar."""

from __future__ import annotations

import pytest

from eym.estimate import FIGURES, STAGE_ORDER, Line, WeightedProgress, estimate, figures_for, format_seconds


def test_h200_estimate_reproduces_the_measured_figures():
    h200 = FIGURES["h200"]
    for frames, s1, s2, inv, samp in ((8, 0.18, 0.155, 5.6, 5.8), (24, 0.32, 0.31, 7.4, 13.9)):
        e = estimate(num_frames=frames, size=512, steps1=300, steps2=300, ddim_steps=50, figures=h200)
        assert e.stages["stage1"] == pytest.approx(300 * s1)
        assert e.stages["stage2"] == pytest.approx(300 * s2)
        assert e.stages["inversion"] == pytest.approx(inv)
        assert e.stages["sampling"] == pytest.approx(samp)
        assert list(e.stages) == list(STAGE_ORDER)
        assert e.total == pytest.approx(sum(e.stages.values()))


def test_estimate_scales_with_steps_frames_and_size_and_skips_reused_tuning():
    fig = FIGURES["h100"]
    base = estimate(num_frames=8, size=512, steps1=300, steps2=300, ddim_steps=50, figures=fig)
    double = estimate(num_frames=8, size=512, steps1=600, steps2=600, ddim_steps=100, figures=fig)
    for stage in ("stage1", "stage2", "inversion", "sampling"):
        assert double.stages[stage] == pytest.approx(2 * base.stages[stage])
    more = estimate(num_frames=16, size=512, steps1=300, steps2=300, ddim_steps=50, figures=fig)
    smaller = estimate(num_frames=8, size=256, steps1=300, steps2=300, ddim_steps=50, figures=fig)
    assert more.total > base.total > smaller.total
    # the fixed per-step part does not shrink with the pixels: a quarter of the pixels is not a quarter of the time
    assert smaller.stages["stage1"] > base.stages["stage1"] / 4
    reused = estimate(num_frames=8, size=512, steps1=300, steps2=300, ddim_steps=50, figures=fig, reused_tuning=True)
    assert reused.stages["stage1"] == reused.stages["stage2"] == 0
    assert reused.stages["sampling"] == base.stages["sampling"]
    # tuning dominates a default edit (the reason the bar is weighted)
    assert (base.stages["stage1"] + base.stages["stage2"]) / base.total > 0.8
    a100 = estimate(num_frames=8, size=512, steps1=300, steps2=300, ddim_steps=50, figures=FIGURES["a100"])
    assert a100.stages["stage1"] == pytest.approx(1.6 * base.stages["stage1"]) and "estimated" in a100.describe()


def test_line_through_two_points_and_device_lookup():
    line = Line.through(8, 0.2, 24, 0.36)
    assert line.at(8, 1.0) == pytest.approx(0.2) and line.at(24, 1.0) == pytest.approx(0.36)
    assert figures_for("NVIDIA H200", is_tiny=False, on_gpu=True) is FIGURES["h200"]
    assert figures_for("NVIDIA A100-SXM4-80GB", is_tiny=False, on_gpu=True) is FIGURES["a100"]
    assert figures_for("NVIDIA L4", is_tiny=False, on_gpu=True) is FIGURES["gpu"]
    assert figures_for("CPU", is_tiny=True, on_gpu=False) is FIGURES["cpu-tiny"]
    assert figures_for("CPU", is_tiny=False, on_gpu=False) is None
    assert format_seconds(5) == "5.0 s" and format_seconds(185) == "3 min 05 s" and format_seconds(3720) == "1 h 02 min"


def test_weighted_progress_moves_with_expected_time_and_gives_an_eta():
    now = [100.0]
    expected = {"preprocess": 2.0, "stage1": 60.0, "stage2": 60.0, "inversion": 5.0, "sampling": 6.0, "decode": 1.0}
    plan = WeightedProgress(expected, clock=lambda: now[0])
    total = sum(expected.values())
    seen = []
    for stage in STAGE_ORDER:
        for step in range(1, 5):
            now[0] += expected[stage] / 4  # the run goes exactly at the estimated pace
            fraction, elapsed, left = plan.update(stage, step, 4)
            seen.append(fraction)
            assert left == pytest.approx(total - elapsed, abs=1e-6)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    # after preprocessing the bar shows its share of the time (1.5%), not 1/6 of the bar
    assert seen[3] == pytest.approx(2.0 / total, rel=0.01)
    # after stage 1 it is near half way, not at a third
    assert seen[7] == pytest.approx(62.0 / total, rel=0.01)


def test_weighted_progress_eta_follows_a_slower_run_and_never_goes_back():
    now = [0.0]
    plan = WeightedProgress({"stage1": 10.0, "stage2": 10.0}, clock=lambda: now[0])
    now[0] = 20.0  # twice as slow as planned at the half-way point
    fraction, elapsed, left = plan.update("stage1", 1, 1)
    assert 0.45 < fraction < 0.55 and elapsed == 20.0
    assert 10.0 < left < 20.0  # between the plan's 10 s left and the observed pace's 20 s
    back, _, _ = plan.update("stage1", 0, 1)
    assert back == fraction, "a stage restarting (resume) must not move the bar backwards"

"""bench/step_cost.py --toy: the speed-up bench runs end to end on the CPU (what the lead runs on
the GPU, on the tiny model), every row present and each speed-up matching eym's stage 2 as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_step_cost_toy_runs_every_speedup_row_with_its_check(tmp_path):
    out = tmp_path / "toy.json"
    env = dict(os.environ, EYM_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run([sys.executable, str(REPO / "bench" / "step_cost.py"), "--toy", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["toy"] and result["compile_backend"] == "aot_eager"
    rows = result["rows"]["4"]["speedups"]
    assert list(rows) == ["eym stage 2 (today)", "eym stage 2 lean loop", "+ fused temporal attention", "+ regional compile", "plain"]
    for name, row in rows.items():
        assert row["s_per_step"] > 0 and row["vs_plain"] > 0, name
        if name != "plain":
            assert len(row["losses"]) == 3  # warm-up + timed steps, every one logged
            # fp32 on the CPU: the speed-ups change only rounding (fused AdamW, reordered sums)
            assert row["vs_first_row"]["max_loss_rel_diff"] < 1e-5, name
            assert row["vs_first_row"]["update_rel_diff"] < 1e-3, name
    compiled = rows["+ regional compile"]
    assert compiled["compile_s"] > 0
    probe = compiled["warm_cache_second_process"]
    assert "error" not in probe, probe
    assert probe["first_step_s"] > 0
    assert "| + regional compile |" in done.stdout  # the summary table
    counts = result["rows"]["4"]["op_counts"]
    assert set(counts) == {"eym stage 2 (today)", "eym stage 2 lean + fused", "plain"}
    # the lean loop and the fused temporal attention launch fewer ops than before
    assert counts["eym stage 2 lean + fused"]["all"] < counts["eym stage 2 (today)"]["all"]
    assert counts["eym stage 2 lean + fused"]["aten::copy_"] < counts["eym stage 2 (today)"]["aten::copy_"]


def test_step_cost_toy_graph_rows_run_and_check_themselves(tmp_path):
    # on the CPU the graphed rows run eagerly (no CUDA): the rows and their checks must still be
    # there, equal to the eager ones, so the GPU run has nothing left to debug
    out = tmp_path / "graphs.json"
    env = dict(os.environ, EYM_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "step_cost.py"), "--toy", "--only", "graphs", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(out.read_text())["rows"]["4"]
    assert list(row["graphs"]) == ["stage1 eager", "stage1 graphed", "stage2 eager", "stage2 graphed", "plain"]
    for name in ("stage1 graphed", "stage2 graphed"):
        assert row["graphs"][name]["max_loss_rel_diff"] == 0 and row["graphs"][name]["update_rel_diff"] == 0, name
    inference = row["inference_graphs"]
    assert set(inference) == {"eager", "graphed"}
    assert inference["graphed"]["z_T_rel_diff"] == 0 and inference["graphed"]["sampled_rel_diff"] == 0
    assert inference["eager"]["sampling_s"] > 0
    assert "CUDA graphs: | row |" in done.stdout


def test_step_cost_toy_compiled_block_rows_run_and_check_themselves(tmp_path):
    # the compiled rows (aot_eager on the CPU; the ResNet blocks, which compile in seconds here:
    # every block compiled is tests/test_compile.py's) against the graphed ones, the plain rows
    # at equal settings and the second process on the warm cache: what --only blocks measures on the GPU
    out = tmp_path / "blocks.json"
    env = dict(os.environ, EYM_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run([sys.executable, str(REPO / "bench" / "step_cost.py"), "--toy", "--only", "blocks",
                           "--blocks", "compiled resnets", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(out.read_text())["rows"]["4"]
    names = [f"stage{s} graphed{v}" for s in (1, 2) for v in ("", " compiled resnets")]
    plains = ["plain", "plain graphed", "plain graphed compiled resnets"]  # equal settings
    assert list(row["graphs"]) == [*names, *plains]
    assert all(row["graphs"][name]["s_per_step"] > 0 for name in plains)
    for name in names:
        if "compiled" in name:  # fp32, the same ops traced: rounding at most
            assert row["graphs"][name]["max_loss_rel_diff"] < 1e-5, name
            assert row["graphs"][name]["update_rel_diff"] < 1e-3, name
    probe = row["compiled_second_process"]
    assert "error" not in probe, probe
    assert set(probe) == {"stage1 graphed compiled resnets", "stage2 graphed compiled resnets", "process_wall_s"}
    assert "| stage2 graphed compiled resnets |" in done.stdout


def test_checkpoint_write_bench_runs_both_writes_and_reads_back(tmp_path):
    out = tmp_path / "ckpt.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "checkpoint_write.py"), "--mb", "20", "--repeats", "1",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"in memory (before)", "streamed (eym)"}
    assert all(r["write_s"] > 0 and r["max_stall_ms"] > 0 for r in rows.values())

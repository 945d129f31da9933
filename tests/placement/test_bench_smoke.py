"""The imbalance suite's smoke configuration runs end to end and writes its report, JSON and plots."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_imbalance_suite_smoke(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benches" / "imbalance" / "run.py"), "--smoke",
                          "--sections", "synth,stats", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "synth" in results["sections"] and (tmp_path / "synth.png").stat().st_size > 10_000
    assert "| rotating_hotspot | eplb |" in (tmp_path / "report.md").read_text()
    algos = {r["algorithm"] for r in results["sections"]["synth"]}
    assert {"contiguous", "round_robin", "eplb", "affinity", "affinity+online"} <= algos


def _copy_of_suite(tmp_path):
    """The suite's scripts under tmp_path/benches/imbalance, so its default --out is tmp_path's, not the repo's."""
    import shutil

    dst = tmp_path / "benches" / "imbalance"
    dst.mkdir(parents=True)
    for name in ("run.py", "report.py", "workloads.py"):
        shutil.copy(ROOT / "benches" / "imbalance" / name, dst / name)
    return dst / "run.py", tmp_path / "benches" / "results" / "imbalance"


def test_imbalance_suite_refuses_what_would_clobber_or_run_nothing(tmp_path):
    """`run.py --smoke` (no --out) overwrote the committed full-suite results with smoke numbers, and so did a
    subset of --sections; a misspelt section ran nothing and wrote an empty report; --out naming a file was a
    FileExistsError traceback."""
    script, default_out = _copy_of_suite(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    for argv, message in ((["--smoke", "--sections", "synth"], "--smoke writes its results over the full suite's"),
                          (["--sections", "synth"], "--sections synth writes its results over the full suite's"),
                          (["--sections", "rael", "--out", str(tmp_path / "o")], "--sections: 'rael' is not one of"),
                          (["--out", str(a_file)], f"--out {a_file}: is a file")):
        run = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120,
                             env=env, cwd=ROOT)
        assert run.returncode == 2 and message in run.stderr, (argv, run.returncode, run.stderr[-2000:])
        assert not default_out.exists() and not (tmp_path / "o").exists()


def test_the_suites_eplb_baseline_by_hand():
    """The suite's fit() and scorer on a case worked by hand. Loads 8, 7, 1, 2 on 2 ranks x 2 slots, no
    replicas: EPLB packs descending (8 -> rank 0, 7 -> rank 1, 2 -> rank 1, 1 -> rank 0), ranks {0, 2}
    and {1, 3}, 9 tokens each: max/mean 1.0; contiguous {0, 1} / {2, 3} is 15 / 3: max/mean 15/9.
    With replicas, loads 10, 1, 1, 6 on 2 x 3: spare slots to 0 (10 -> 5 a copy) then 3 (6 -> 3); packing
    the copies 5, 5, 3, 3, 1, 1 apart: rank 0 = [0, 3, 1], rank 1 = [0, 3, 2], 9 and 9."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("imbalance_run", ROOT / "benches" / "imbalance" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    from placement.score import score_plan

    tokens = np.array([0] * 8 + [1] * 7 + [2] + [3] * 2)[:, None, None]  # [18, 1 layer, top-1]
    plan = run.fit("eplb", tokens, 4, 2, 2)
    assert plan.phy2log.tolist() == [[0, 2, 1, 3]]
    assert score_plan(plan, tokens, 18)["imbalance_trace"] == 1.0
    assert abs(score_plan(run.fit("contiguous", tokens, 4, 2, 2), tokens, 18)["imbalance_trace"] - 15 / 9) < 1e-12
    tokens = np.array([0] * 10 + [1] + [2] + [3] * 6)[:, None, None]
    plan = run.fit("eplb", tokens, 4, 2, 3)
    assert plan.phy2log.tolist() == [[0, 3, 1, 0, 3, 2]]
    assert score_plan(plan, tokens, 18)["imbalance_trace"] == 1.0


def test_the_smoke_report_names_the_layers_it_ran(tmp_path, shared_dir):
    """The report said 'Dispatch KB = fan-out x 2048 x 2 B summed over 26 layers' and 'every 3rd layer' for
    the sweep whatever ran: the smoke configuration scores 2 layers, all of them. Each now says what ran."""
    if not (shared_dir / "traces" / "dsv2lite_intent.npz").exists():
        pytest.skip(f"{shared_dir / 'traces'} is absent (the real and sweep sections read its traces)")
    run = subprocess.run([sys.executable, str(ROOT / "benches" / "imbalance" / "run.py"), "--smoke",
                          "--sections", "real,sweep", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    report = (tmp_path / "report.md").read_text()
    assert "summed over 2 MoE layers" in report and "26 layers" not in report, report
    assert "## Sweep over EP size and redundant slots (2 MoE layers: 0, 1)" in report and "3rd" not in report, report
    rows = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert {r["layers"] for r in rows["real"] + rows["sweep"]} == {2}

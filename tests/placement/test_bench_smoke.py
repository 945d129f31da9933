"""The imbalance suite's smoke configuration runs end to end and writes its report, JSON and plots."""
import json
import subprocess
import sys
from pathlib import Path

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

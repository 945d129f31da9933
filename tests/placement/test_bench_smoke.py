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

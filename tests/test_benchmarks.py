from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_bench_script_runs_and_prints_ratios():
    """`make bench` must not rot: the script runs end to end on tiny sizes and prints every case."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_unet.py"), "--quick", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert lines[0].split()[:3] == ["case", "ours", "s"]
    rows = lines[1:]
    assert len(rows) == 3 and all(float(row.split()[-3]) > 0 for row in rows)  # the ratio column


@pytest.mark.slow
def test_inference_bench_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_inference.py"), "--quick", "--repeats", "1",
         "--streaming-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, check=True,
    )
    for heading in ("## sw_batch_size", "## speed", "## memory", "## physical limit", "## strategy", "## layers"):
        assert heading in result.stdout
    assert "speed-up vs MONAI default:" in result.stdout and "achieved fraction" in result.stdout


@pytest.mark.slow
def test_io_bench_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_io.py"), "--size", "32", "32", "8", "--repeats", "1",
         "--data", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=True,
    )
    assert "time ratio ours/SimpleITK:" in result.stdout


@pytest.mark.slow
def test_training_bench_runs():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_training.py"), "--quick"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith(("ours", "monai"))}
    assert set(rows) == {"ours", "monai-spleen"} and all(float(r[1]) > 0 for r in rows.values())
    assert "speed ratio ours/MONAI recipe:" in result.stdout and "data wait ours" in result.stdout


@pytest.mark.slow
def test_batch_bench_runs():
    if not (REPO / "demo_data" / ".written").is_file():
        pytest.skip("demo data not written (make demo-data)")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_batch.py"), "--cases", "2", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    ratio = [line for line in result.stdout.splitlines() if line.startswith("ratio wall / inference")]
    # the job includes the inference, but the two are timed in separate runs of two cases: on a loaded
    # machine the order can flip (the fresh-clone CI saw 0.986), so this checks the figure is sane
    assert len(ratio) == 1 and 0.5 < float(ratio[0].split()[4]) < 100


@pytest.mark.slow
def test_runtimes_bench_runs(tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO not installed (the openvino extra)")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_runtimes.py"), "--quick", "--bundle", "unet3d_tumor"],
        capture_output=True, text=True, timeout=600, check=True, env={**os.environ, "UNET_CACHE": str(tmp_path)},
    )
    found = re.search(r"idle: per 64x64x64 window: torch (\d+) ms \(1.00x\), openvino (\d+) ms \(([\d.]+)x\), "
                      r"openvino-int8 (\d+) ms \(([\d.]+)x\)", result.stdout)
    assert found, result.stdout
    assert float(found.group(3)) == pytest.approx(int(found.group(1)) / int(found.group(2)), rel=0.05)
    assert "one CPU-bound process beside: per 64x64x64 window" in result.stdout


@pytest.mark.slow
def test_brain_bench_runs():
    if not (REPO / "demo_brain" / ".written").is_file():
        pytest.skip("brain demo not written (make demo-brain)")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_brain.py"), "--studies", "1", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if not line.startswith("==")}
    assert {"load", "preprocess", "inference", "write", "wall", "ratio"} <= set(lines)
    assert float(lines["ratio"][5]) > 0 and float(lines["wall"][4]) >= float(lines["inference"][1])


@pytest.mark.slow
def test_follow_up_accuracy_runs_on_the_demo_seed():
    """The script behind the benchmark page's per-seed errors of the change since the prior study: on the
    demo's seed every error is within the 5 % the acceptance asks, and the new lesion is found."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "follow_up_accuracy.py"), "--seeds", "1003"],
                            capture_output=True, text=True, timeout=600, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].split()[0] == "seed" and len(lines) == 2
    seed, growth, new, tumor, found = lines[1].split()
    assert seed == "1003" and found == "True"
    assert all(abs(float(value)) < 5 for value in (growth, new, tumor))


@pytest.mark.slow
def test_batch_scale_bench_runs():
    """The batch job at scale (docs/benchmarks.md) in its quick form: a few synthetic studies through
    the command line, each measure printed (the resume, two more runs, only in the full form)."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "batch_scale.py"), "--quick"],
                            capture_output=True, text=True, timeout=600, check=True)
    out = result.stdout
    assert "6 cases: 6 segmented, 0 already complete, 0 failed" in out
    assert "overhead growth, median last / first:" in out and "RSS growth, case 2 to case 6:" in out
    assert "report.html of 10 rows: written in" in out
    assert "in headless Chromium: loaded" in out or "chromium not installed" in out

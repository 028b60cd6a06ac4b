"""torchrun shards the cases across ranks; rank 0 merges the reports (CPU, gloo, 2 processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.batch.conftest import BUNDLE, DEMO
from tests.batch.test_runner import _manifest
from tests.conftest import REPO


@pytest.mark.slow
@pytest.mark.integration
def test_torchrun_two_ranks_share_the_cases(tmp_path):
    manifest = _manifest(tmp_path, 3)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pipelines", "batch", "--bundle", str(BUNDLE), "--input", str(manifest),
               "--dataset-dir", str(DEMO), "--output", str(out), "--quiet", "--workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = sorted((json.loads(p.read_text()) for p in out.glob("*/record.json")), key=lambda r: r["case_id"])
    assert [r["status"] for r in records] == ["ok"] * 3
    # deterministic shards: sorted case ids, every second one per rank
    assert [(r["settings"]["rank"], r["settings"]["world_size"]) for r in records] == [(0, 2), (1, 2), (0, 2)]
    rows = (out / "report.csv").read_text().splitlines()
    assert len(rows) == 4 and all(r["case_id"] in (out / "report.html").read_text() for r in records)
    # a single-process rerun finds every case complete, whatever rank wrote it
    rerun = subprocess.run(command[:1] + ["-m", "pipelines"] + command[command.index("batch"):], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "0 segmented, 3 already complete" in rerun.stdout

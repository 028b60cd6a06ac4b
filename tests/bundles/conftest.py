"""Helpers to run bundle commands the way users do: ``python -m monai.bundle ...`` from the bundle folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, shared_data_dir

BUNDLES = REPO / "bundles"


def run_bundle(bundle: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle <args>`` in ``bundles/<bundle>``; fail with its output on error."""
    env = dict(os.environ, UNET_SHARED_DATA=str(shared_data_dir()), PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=BUNDLES / bundle,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        pytest.fail(f"monai.bundle {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def read_metrics(path: Path) -> dict[str, float]:
    """``metrics.csv`` written by MONAI's MetricsSaver: one ``name,value`` per line."""
    values = {}
    for line in path.read_text().splitlines():
        name, value = line.split(",")
        values[name] = float(value)
    return values

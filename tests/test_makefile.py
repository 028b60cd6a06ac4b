from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_demo_without_data_explains_where_it_comes_from(tmp_path):
    result = subprocess.run(
        ["make", "-s", "-o", ".venv/.installed", "demo-isbi", f"UNET_SHARED_DATA={tmp_path / 'nowhere'}"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "ISBI 2012" in result.stdout and str(tmp_path / "nowhere") in result.stdout
    assert "UNET_SHARED_DATA" in result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_label_server_without_studies_shows_its_usage():
    result = subprocess.run(
        ["make", "-s", "-o", ".venv-label/.installed", "label-server"], cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "usage: make label-server STUDIES=<folder of NIfTI images | DICOMweb URL> [PORT=8000]" in result.stdout

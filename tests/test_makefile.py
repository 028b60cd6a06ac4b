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


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_demo_runs_the_batch_jobs_with_options_the_cli_takes():
    """`make demo`'s commands (dry run): the tumor, brain tumor and follow-up batch jobs, each command line
    one the CLI accepts (a renamed option would otherwise surface only on a user's fresh machine)."""
    import shlex

    from pipelines.cli import _parser

    result = subprocess.run(["make", "-n", "-o", ".venv/.installed", "-o", "demo-data", "-o", "demo-brain", "demo"],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    batches = [shlex.split(line)[3:] for line in result.stdout.replace("\\\n", " ").splitlines()
               if " -m pipelines batch " in line]
    bundles = [args[args.index("--bundle") + 1] for args in batches]
    assert bundles == ["bundles/unet3d_tumor", "bundles/unet3d_brain_tumor", "bundles/unet3d_tumor"]
    for args in batches:
        parsed = _parser().parse_args(args)
        assert (REPO / parsed.bundle / "configs" / "inference.json").is_file() and parsed.section == "test"
    assert _parser().parse_args(batches[2]).input.endswith("demo_data/follow_up/dicom")  # the patient scanned twice
    assert _parser().parse_args(batches[1]).image_key == "study"  # the brain job reads the DICOM studies

"""The paper's 2D bundle through the batch job: a folder of PNG sections in, the bundle's own
segmentations out (its watershed post-processing, its test-time augmentation), with the measures of
a 2D membrane segmentation and no DICOM SEG."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipelines.batch import pseudonym
from tests.bundles.conftest import run_bundle
from tests.conftest import REPO
from tests.documented import assert_record_documented

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ISBI = REPO / "bundles" / "unet2d_isbi2012"
SECTIONS = ("4.png", "17.png")


def test_masks_equal_the_bundles_own_inference(isbi_dir, tmp_path):
    inbox = tmp_path / "sections"
    inbox.mkdir()
    for name in SECTIONS:
        shutil.copy(isbi_dir / "test" / name, inbox / name)
    run_bundle("unet2d_isbi2012", "run", "--meta_file", "configs/metadata.json", "--config_file",
               "configs/inference.json", "--dataset_dir", str(inbox), "--output_dir", str(tmp_path / "bundle"))
    result = subprocess.run(
        [sys.executable, "-m", "pipelines", "batch", "--bundle", str(ISBI), "--input", str(inbox),
         "--output", str(tmp_path / "batch"), "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in SECTIONS:
        case_dir = tmp_path / "batch" / pseudonym(name)
        record = json.loads((case_dir / "record.json").read_text())
        theirs = np.asarray(Image.open(tmp_path / "bundle" / f"{name[:-4]}_seg.png"))  # cells 255, membrane 0
        ours = np.asarray(Image.open(case_dir / "mask.png"))  # label values: cells 1
        assert ours.shape == theirs.shape == (512, 512)
        differ = int((ours.astype(np.int64) * 255 != theirs).sum())
        assert differ == 0, f"{name}: {differ} pixels differ"
        # what fits a 2D membrane segmentation: pixels, fractions and cells, no mL, no SEG
        assert record["outputs"] == ["mask.png", "qc.png", "qc_thumbnail.png"]
        assert "volumes_ml" not in record and "largest_lesion" not in record
        assert record["areas_px"]["cell"] == int((ours == 1).sum())
        assert record["area_fractions"]["cell"] == pytest.approx((ours == 1).mean(), abs=1e-4)
        assert record["objects"]["cell"] > 20  # a section of the ventral nerve cord holds dozens of cells
        assert_record_documented(record)
    report = (tmp_path / "batch" / "report.csv").read_text().splitlines()
    assert "cell_px" in report[0] and "cell_objects" in report[0] and "_ml" not in report[0]

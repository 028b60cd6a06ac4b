"""``--rtstruct``: the batch job's RT Structure Set of a demo study, read back by plastimatch onto
the source series, gives the mask (Dice >= 0.95 per label, the issue's bound; 1.0 measured on both studies), for the
tumor bundle and for the brain bundle's T1 (its T1c acquired sagittal, the mask on the T1)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pipelines.batch import run_batch
from pipelines.io.writers import resample_labels
from tests.batch.conftest import BUNDLE, case_dirs, copy_study
from tests.conftest import REPO
from tests.dicom_checks import dciodvfy_errors
from tests.io.test_rtstruct import dice, plastimatch_masks

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BRAIN = REPO / "bundles" / "unet3d_brain_tumor"
BRAIN_DEMO = REPO / "demo_brain"


def _check(case_dir, series, names: dict[int, str], tmp_path) -> None:
    record = json.loads((case_dir / "record.json").read_text())
    assert record["status"] == "ok" and "rtstruct.dcm" in record["outputs"] and record["settings"]["rtstruct"]
    mask_image = nib.load(case_dir / "mask.nii.gz")
    mask = np.asarray(mask_image.dataobj)
    masks = plastimatch_masks(case_dir / "rtstruct.dcm", series, tmp_path / "pm")
    assert set(masks) == set(names.values())
    for value, name in names.items():
        read = np.asarray(masks[name].dataobj) > 0
        ours = resample_labels(mask, mask_image.affine, read.shape, masks[name].affine) == value
        if ours.sum() < 50:  # a few voxels: a one-voxel shift is most of them
            continue
        assert dice(read, ours) >= 0.95, (name, dice(read, ours))
    assert not dciodvfy_errors(case_dir / "rtstruct.dcm")


def test_tumor_study(tmp_path):
    copy_study("test", 0, tmp_path / "in" / "study")
    summary = run_batch(BUNDLE, tmp_path / "in", tmp_path / "out", workers=0, rtstruct=True)
    assert summary.done == 1
    (case_dir,) = case_dirs(tmp_path / "out")
    _check(case_dir, tmp_path / "in" / "study", {1: "tumor", 2: "edema"}, tmp_path)


def test_brain_study_on_its_t1(tmp_path):
    entries = json.loads((REPO / "data_manifests" / "demo_brain.json").read_text())["validation"]
    if not (BRAIN_DEMO / ".written").is_file():
        pytest.skip("demo_brain/ not generated (make demo-brain)")
    study = BRAIN_DEMO / entries[0]["study"]
    summary = run_batch(BRAIN, study, tmp_path / "out", workers=0, rtstruct=True)
    assert summary.done == 1
    (case_dir,) = case_dirs(tmp_path / "out")
    _check(case_dir, study / "02_t1n", {1: "necrotic core", 2: "edema", 3: "enhancing tumor"}, tmp_path)

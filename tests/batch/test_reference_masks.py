"""The tumor bundle's batch outputs stay what they were before the batch job became bundle-generic.

``reference_masks/`` holds the masks that commit 4ad7fd0 (the batch job before the change, with the
network's earlier CPU kernels) wrote for the 8 test studies of the demo data set with the shipped
weights (`unet-pipelines batch --bundle bundles/unet3d_tumor --input data_manifests/demo_tumor.json
--dataset-dir demo_data --section test`). A mask may differ in a handful of voxels on another CPU:
oneDNN picks kernels by instruction set, and a different summation order can flip the argmax where
two classes tie to float32 rounding; the bound is 0.01% of a case's voxels (on the development
machine none differ).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.batch import run_batch
from tests.batch.conftest import BUNDLE, DEMO, MANIFEST, demo_case
from tests.dicom_checks import assert_report_matches_record, assert_seg_reads_back_as_mask

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REFERENCES = Path(__file__).parent / "reference_masks"
RECORD_FIELDS = {"case_id", "comparison", "dice", "error", "finished", "geometry_corrections", "grid", "input_hash",
                 "largest_lesion", "lesion_count", "lesions", "model", "outputs", "pushed", "run_key", "settings", "software",
                 "rano", "source", "status", "study", "timings", "volumes_ml", "warnings"}


@pytest.fixture(scope="module")
def test_run(tmp_path_factory) -> Path:
    demo_case("test", 0)  # skips without the demo data
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = run_batch(BUNDLE, MANIFEST, out, section="test", dataset_dir=DEMO, workers=1)
    assert (summary.done, summary.failed) == (8, [])
    return out


@pytest.mark.parametrize("case_id", sorted(p.name[: -len(".nii.gz")] for p in REFERENCES.glob("*.nii.gz")))
def test_masks_equal_those_before_the_change(test_run, case_id):
    reference = nib.load(REFERENCES / f"{case_id}.nii.gz")
    mask = nib.load(test_run / case_id / "mask.nii.gz")
    assert mask.shape == reference.shape and np.allclose(mask.affine, reference.affine, atol=1e-5)
    differ = int((np.asarray(mask.dataobj) != np.asarray(reference.dataobj)).sum())
    assert differ <= 1e-4 * np.prod(reference.shape), f"{differ} voxels differ"


def test_records_keep_their_fields_and_segs_validate(test_run):
    for record_path in sorted(test_run.glob("*/record.json")):
        record = json.loads(record_path.read_text())
        assert set(record) == RECORD_FIELDS and record["status"] == "ok"
        assert record["outputs"] == ["mask.nii.gz", "anatomy.nii.gz", "seg.dcm", "sr.dcm", "qc.png", "qc_thumbnail.png",
                                 "index.html"]
        assert record["comparison"] is None  # every demo patient has one study
        assert set(record["volumes_ml"]) == {"tumor", "edema"} and set(record["dice"]) == {"tumor", "edema"}


def test_measurement_reports_state_the_records(test_run, tmp_path):
    """Each case's sr.dcm, read by highdicom and dcmqi's tid1500reader, states its record's volumes,
    lesions and count, each group on its segment; SEG and SR pass dciodvfy."""
    for record_path in sorted(test_run.glob("*/record.json")):
        assert_report_matches_record(record_path.parent, json.loads(record_path.read_text()), tmp_path=tmp_path)


def test_dcmqi_reads_each_seg_back_as_the_mask(test_run, tmp_path):
    """dcmqi's segimage2itkimage, the reference SEG reader, gives each label's voxels of mask.nii.gz."""
    for case_dir in sorted(p.parent for p in test_run.glob("*/seg.dcm")):
        assert_seg_reads_back_as_mask(case_dir, tmp_path=tmp_path)

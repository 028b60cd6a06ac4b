"""The batch job on the OpenVINO runtime: the same segmentation as on torch, the runtime in the
record and the run key, the converted network kept for the next run (the runtime's own checks:
tests/inference/test_runtimes.py)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pipelines.batch import run_batch
from pipelines.cli import main
from tests.batch.conftest import BUNDLE, case_dirs, copy_study

openvino = pytest.importorskip("openvino", reason="OpenVINO not installed (the openvino extra)")


@pytest.mark.integration
def test_a_study_on_openvino_is_segmented_as_on_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("UNET_CACHE", str(tmp_path / "cache"))
    copy_study("test", 1, tmp_path / "in" / "study")
    assert run_batch(BUNDLE, tmp_path / "in", tmp_path / "torch", workers=0, case_pages=False).done == 1
    assert main(["batch", "--bundle", str(BUNDLE), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "ov"),
                 "--runtime", "openvino", "--no-case-pages", "--workers", "0", "--quiet"]) == 0
    (on_torch,), (on_openvino,) = case_dirs(tmp_path / "torch"), case_dirs(tmp_path / "ov")
    a, b = (np.asarray(nib.load(d / "mask.nii.gz").dataobj) for d in (on_torch, on_openvino))
    assert (a != b).mean() < 1e-4 and a.any()  # float rounding may flip a voxel at a boundary, no more
    first, second = (json.loads((d / "record.json").read_text()) for d in (on_torch, on_openvino))
    assert first["settings"]["runtime"] == "torch"
    assert second["settings"]["runtime"] == f"openvino {openvino.__version__.split('-')[0]}"
    assert first["run_key"] != second["run_key"]  # a rerun on the other runtime redoes the case
    cached = sorted((tmp_path / "cache" / "openvino").glob("unet3d_tumor-*.xml"))
    assert cached and all(p.with_suffix(".bin").stat().st_size > 100_000 for p in cached)
    when = [p.stat().st_mtime_ns for p in cached]
    assert run_batch(BUNDLE, tmp_path / "in", tmp_path / "ov2", workers=0, runtime="openvino", case_pages=False).done == 1
    assert [p.stat().st_mtime_ns for p in cached] == when  # read back, not converted again


"""The batch job on the OpenVINO runtime: the same segmentation as on torch, the runtime in the
record and the run key, the converted network kept for the next run (the runtime's own checks:
tests/inference/test_runtimes.py)."""

from __future__ import annotations

import json

import pytest

from pipelines.batch import run_batch
from tests.batch.conftest import BUNDLE, on_torch_and

openvino = pytest.importorskip("openvino", reason="OpenVINO not installed (the openvino extra)")


@pytest.mark.integration
def test_a_study_on_openvino_is_segmented_as_on_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("UNET_CACHE", str(tmp_path / "cache"))
    on_torch, on_openvino, a, b = on_torch_and("openvino", BUNDLE, 1, tmp_path)
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


"""Batch job fixtures: the demo data set written by `make demo-data`, copied where a test changes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.batch import run_batch
from pipelines.batch.viewer import VIEWER_DIR
from pipelines.cli import main
from tests.conftest import REPO

DEMO = REPO / "demo_data"
MANIFEST = REPO / "data_manifests" / "demo_tumor.json"
BUNDLE = REPO / "bundles" / "unet3d_tumor"


def case_dirs(output: Path) -> list[Path]:
    """The case folders of a run's output (not the viewer's copy, not hidden files)."""
    return sorted(p for p in output.iterdir() if p.is_dir() and p.name != VIEWER_DIR and not p.name.startswith("."))


def demo_case(section: str, index: int) -> dict:
    """A demo manifest entry (``case_id``, ``image``, ``label``, ``dicom`` relative to demo_data/)."""
    if not (DEMO / ".written").is_file():
        pytest.skip(f"demo data not written (run `make demo-data`): {DEMO}")
    return json.loads(MANIFEST.read_text())[section][index]


def copy_study(section: str, index: int, target: Path) -> dict:
    """Copy one demo DICOM study to ``target`` (created); returns its manifest entry."""
    entry = demo_case(section, index)
    shutil.copytree(DEMO / entry["dicom"], target)
    return entry


def broken_stranger(source: Path, target: Path, keep: int = 1000) -> Path:
    """``source`` (a DICOM file) under new study, series and instance UIDs, cut short to ``keep``
    bytes: a broken file of a study of its own, which no intact copy can stand in for."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    target.write_bytes(buffer.getvalue()[:keep])
    return target


def on_torch_and(runtime: str, bundle: Path, index: int, tmp_path: Path):
    """Demo test study ``index`` through the batch job on torch (``run_batch``) and on ``runtime`` (the
    command line's ``--runtime``): the two case folders and their masks."""
    copy_study("test", index, tmp_path / "in" / "study")
    assert run_batch(bundle, tmp_path / "in", tmp_path / "torch", workers=0, case_pages=False).done == 1
    assert main(["batch", "--bundle", str(bundle), "--input", str(tmp_path / "in"), "--output", str(tmp_path / runtime),
                 "--runtime", runtime, "--no-case-pages", "--workers", "0", "--quiet"]) == 0
    (on_torch,), (on_runtime,) = case_dirs(tmp_path / "torch"), case_dirs(tmp_path / runtime)
    masks = [np.asarray(nib.load(d / "mask.nii.gz").dataobj) for d in (on_torch, on_runtime)]
    return on_torch, on_runtime, *masks

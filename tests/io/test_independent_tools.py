"""Geometry checked against tools that share no code with ours: SimpleITK's series reader and dcm2niix."""

from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipelines.io import load_volume
from tests.io.dicom_factory import SeriesSpec, write_series

ORIENTATIONS = ["axial", "coronal", "sagittal", "oblique"]


def on_grid_of(volume: np.ndarray, affine: np.ndarray, other: np.ndarray, other_affine: np.ndarray) -> np.ndarray:
    """``other`` read at ``volume``'s voxel centres; the grids must coincide voxel for voxel."""
    mapping = np.linalg.inv(other_affine) @ affine
    index = np.indices(volume.shape).reshape(3, -1).astype(float)
    points = mapping[:3, :3] @ index + mapping[:3, 3:]
    assert np.allclose(points, np.round(points), atol=1e-3), "the two grids are not the same voxels"
    points = np.round(points).astype(int)
    assert (points >= 0).all() and (points.max(axis=1) < np.array(other.shape)).all()
    return other[points[0], points[1], points[2]].reshape(volume.shape)


def itk_affine(image: sitk.Image) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("descending", [False, True])
def test_matches_simpleitk_series_reader(tmp_path, orientation, descending):
    positions = [2.5 * k for k in range(7)]
    write_series(tmp_path, SeriesSpec(orientation=orientation, slice_positions=positions[::-1] if descending else positions),
                 shuffle=True)
    ours = load_volume(tmp_path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    theirs = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    np.testing.assert_allclose(
        on_grid_of(ours[0].numpy(), ours.affine.numpy(), theirs, itk_affine(image)), ours[0].numpy(), atol=1e-3
    )


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed (make system-deps)")
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_matches_dcm2niix(tmp_path, orientation):
    write_series(tmp_path / "dicom", SeriesSpec(orientation=orientation, rows=14, columns=11), shuffle=True)
    ours = load_volume(tmp_path / "dicom")
    (tmp_path / "nifti").mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "converted", "-o", str(tmp_path / "nifti"),
                    str(tmp_path / "dicom")], check=True, capture_output=True)
    image = nib.load(tmp_path / "nifti" / "converted.nii")
    theirs = np.asarray(image.dataobj, dtype=np.float64)
    np.testing.assert_allclose(
        on_grid_of(ours[0].numpy(), ours.affine.numpy(), theirs, image.affine), ours[0].numpy(), atol=2e-3
    )

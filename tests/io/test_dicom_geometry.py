from __future__ import annotations

import math
import pickle
import shutil

import numpy as np
import pydicom
import pytest
import torch
from scipy import ndimage

from pipelines.io import GeometryError, dicom_references, geometry_corrections, load_volume
from tests.io.dicom_factory import QUANTUM, SeriesSpec, pixel_positions, read_slices, write_series

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def sample(volume, points_lps: np.ndarray) -> np.ndarray:
    """Trilinear sample of ``volume`` (C=1) at LPS points ``(N, 3)``."""
    affine = volume.affine.numpy()
    ras = points_lps * LPS_TO_RAS
    voxels = (np.linalg.inv(affine) @ np.c_[ras, np.ones(len(ras))].T)[:3]
    assert voxels.min() > -1e-3 and (voxels.max(axis=1) < np.array(volume.shape[1:]) - 1 + 1e-3).all()
    return ndimage.map_coordinates(volume[0].numpy().astype(np.float64), voxels, order=1, mode="nearest")


def assert_matches_every_source_pixel(volume, paths, tolerance: float, border_rows: int = 0) -> None:
    """Sampling the volume at each source pixel's centre gives that pixel's value.

    ``border_rows`` leaves out rows at each slice edge: in a tilted stack each slice is shifted by a
    fraction of a pixel, so interpolating at its outermost row also reads a voxel beyond that slice's
    footprint (no data there: the fill value).
    """
    for ds in read_slices(paths):
        spec = SeriesSpec(rows=ds.Rows, columns=ds.Columns, pixel_spacing=tuple(ds.PixelSpacing),
                          orientation=(tuple(ds.ImageOrientationPatient[:3]), tuple(ds.ImageOrientationPatient[3:])))
        rows = slice(border_rows, ds.Rows - border_rows)
        points = pixel_positions(spec, np.asarray(ds.ImagePositionPatient, float))[rows].reshape(-1, 3)
        expected = (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))[rows].reshape(-1)
        np.testing.assert_allclose(sample(volume, points), expected, atol=tolerance, err_msg=str(ds.filename))


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal", "oblique"])
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_regular_series_every_pixel_in_place(tmp_path, orientation, descending, shuffle):
    positions = [2.5 * k for k in range(7)]
    spec = SeriesSpec(orientation=orientation, slice_positions=positions[::-1] if descending else positions)
    paths = write_series(tmp_path / "series", spec, shuffle=shuffle)
    volume = load_volume(tmp_path / "series")
    assert volume.shape == (1, 10, 12, 7)  # (columns, rows, slices)
    np.testing.assert_allclose(volume.meta["spacing"], [0.7, 0.8, 2.5], atol=1e-6)  # not SliceThickness (99)
    assert geometry_corrections(volume.meta) == []
    assert_matches_every_source_pixel(volume, paths, tolerance=1e-3)


def test_slices_sorted_by_position_not_instance_number(tmp_path):
    spec = SeriesSpec(slice_positions=[0.0, 5.0, 2.5, 7.5])  # instance numbers 1..4 out of spatial order
    paths = write_series(tmp_path, spec)
    volume = load_volume(tmp_path)
    by_position = sorted(read_slices(paths), key=lambda ds: ds.ImagePositionPatient[2])
    references = dicom_references(volume.meta)
    assert references["sop_instance_uids"] == [ds.SOPInstanceUID for ds in by_position]
    assert references["frame_numbers"] == [None] * 4
    assert_matches_every_source_pixel(volume, paths, tolerance=1e-3)


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_gantry_tilt_is_resampled_to_true_positions(tmp_path, orientation):
    spec = SeriesSpec(orientation=orientation, in_plane_shift=(0.0, 0.3), rows=16, columns=14)
    paths = write_series(tmp_path, spec)
    volume = load_volume(tmp_path)
    (correction,) = geometry_corrections(volume.meta)
    assert correction["type"] == "gantry_tilt"
    assert correction["angle_deg"] == pytest.approx(math.degrees(math.atan(0.3)), abs=1e-6)
    assert volume.shape[2] > 16  # grown in-plane to hold every shifted slice
    assert_matches_every_source_pixel(volume, paths, tolerance=QUANTUM + 1e-3, border_rows=1)
    with pytest.raises(GeometryError, match=r"gantry tilt of 16\.70 degrees"):
        load_volume(tmp_path, strict=True)


def test_uneven_spacing_is_resampled(tmp_path):
    spec = SeriesSpec(slice_positions=[0.0, 2.5, 5.0, 7.5, 9.0, 11.5, 14.0], orientation="oblique")
    paths = write_series(tmp_path, spec)
    volume = load_volume(tmp_path)
    (correction,) = geometry_corrections(volume.meta)
    # the finest zone of two or more steps (2.5 mm), adjusted so 6 steps span the 14 mm from the first to the last slice
    assert correction == {"type": "uneven_spacing", "min_mm": pytest.approx(1.5), "max_mm": pytest.approx(2.5),
                          "resampled_to_mm": pytest.approx(14 / 6),
                          "zones": [{"slices": 4, "spacing_mm": 2.5}, {"slices": 2, "spacing_mm": 1.5},
                                    {"slices": 3, "spacing_mm": 2.5}]}
    assert volume.meta["spacing"][2] == pytest.approx(14 / 6) and volume.shape[-1] == 7
    assert_matches_every_source_pixel(volume, paths, tolerance=QUANTUM + 1e-3)
    with pytest.raises(GeometryError, match=r"uneven slice spacing from 1\.5000 to 2\.5000 mm"):
        load_volume(tmp_path, strict=True)


def test_missing_slices_are_refused(tmp_path):
    paths = write_series(tmp_path, SeriesSpec(slice_positions=[0.0, 2.5, 5.0, 12.5, 15.0]))
    with pytest.raises(GeometryError, match=r"missing slices: a gap of 7\.500 mm .*spacing around it 2\.500 mm") as info:
        load_volume(tmp_path)
    assert paths[2].name in str(info.value) and paths[3].name in str(info.value)


@pytest.mark.parametrize(
    "positions, gap, around",
    [
        ([0.0, 5.0, 10.0, 20.0, 25.0, 30.0], 10.0, 5.0),  # one slice lost inside a regular stack
        ([0.0, 10.0, 15.0, 20.0, 25.0], 10.0, 5.0),  # the second slice lost
        ([0.0, 5.0, 10.0, 15.0, 25.0], 10.0, 5.0),  # the last but one lost
        ([0.0, 2.5, 5.0, 7.5, 12.5, 17.5, 22.5, 27.5, 30.0, 32.5], 5.0, 2.5),  # a 5 mm run between 2.5 mm zones
    ],
)
def test_a_whole_multiple_of_the_spacing_around_is_missing_slices(tmp_path, positions, gap, around):
    write_series(tmp_path, SeriesSpec(slice_positions=positions))
    with pytest.raises(GeometryError, match=rf"missing slices: a gap of {gap:.3f} mm .*spacing around it {around:.3f} mm"):
        load_volume(tmp_path)


@pytest.mark.parametrize(
    "positions, finest",
    [
        ([0.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 25.0], 2.5),  # thin zone then twice as thick: a protocol, not a gap
        ([0.0, 4.0, 8.0, 12.0, 13.1, 20.1, 27.1, 34.1], 4.0),  # GE variable thickness: 4 mm, a 1.1 mm step, 7 mm
        ([0.0, 5.0, 10.0, 17.5, 22.5, 27.5], 5.0),  # 1.5 times the spacing is no whole number of slices
    ],
)
def test_zones_of_different_spacing_are_resampled_not_refused(tmp_path, positions, finest):
    paths = write_series(tmp_path, SeriesSpec(slice_positions=positions, orientation="oblique"))
    volume = load_volume(tmp_path)
    (correction,) = geometry_corrections(volume.meta)
    span = positions[-1] - positions[0]
    assert correction["type"] == "uneven_spacing"
    assert correction["resampled_to_mm"] == pytest.approx(span / round(span / finest))
    assert volume.shape[-1] == round(span / finest) + 1
    assert_matches_every_source_pixel(volume, paths, tolerance=QUANTUM + 1e-3)
    with pytest.raises(GeometryError, match="uneven slice spacing"):
        load_volume(tmp_path, strict=True)


def test_duplicate_files_are_resolved_and_conflicts_refused(tmp_path):
    paths = write_series(tmp_path / "a", SeriesSpec())
    shutil.copy(paths[3], tmp_path / "a" / "copy_of_slice.dcm")
    volume = load_volume(tmp_path / "a")
    assert volume.shape[-1] == 7
    assert geometry_corrections(volume.meta) == [{"type": "duplicate_instances_dropped", "count": 1}]
    other = pydicom.dcmread(paths[3])
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    other.save_as(tmp_path / "a" / "conflict.dcm", enforce_file_format=True)
    with pytest.raises(GeometryError, match="two different slices at position .*conflict.dcm"):
        load_volume(tmp_path / "a")


def test_single_slice_geometry(tmp_path):
    (path,) = write_series(tmp_path, SeriesSpec(slice_positions=[4.0], orientation="oblique"))
    volume = load_volume(path)
    assert volume.shape == (1, 10, 12, 1)
    assert_matches_every_source_pixel(volume, [path], tolerance=1e-3)


def test_per_slice_rescale(tmp_path):
    """Each slice's own RescaleSlope/RescaleIntercept applies (scanners vary them, e.g. PET, some MR)."""
    paths = write_series(tmp_path, SeriesSpec())
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ds.RescaleSlope, ds.RescaleIntercept = 0.05 * (k + 1), -500.0 - 100 * k
        ds.PixelData = np.rint((values - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)).astype(np.int16).tobytes()
        ds.save_as(path, enforce_file_format=True)
    assert_matches_every_source_pixel(load_volume(tmp_path), paths, tolerance=1e-3)


@pytest.mark.parametrize("stored,intercept,expected", [
    (np.array([0, 100, 40000], np.uint16), -32768, "int16"),  # raw values beyond int16, results within
    (np.array([-32768, 0, 32767], np.int16), -1024, "int32"),  # results beyond int16
    (np.array([0, 4095, 12], np.uint16), -1024, "int16"),  # 12-bit CT
])
def test_integer_rescale_keeps_exact_values(tmp_path, stored, intercept, expected):
    paths = write_series(tmp_path, SeriesSpec(slice_positions=[0.0, 2.0]))
    for path in paths:
        ds = pydicom.dcmread(path)
        pixels = np.resize(stored, (ds.Rows, ds.Columns))
        ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
        ds.PixelData = pixels.astype(stored.dtype).tobytes()
        ds.save_as(path, enforce_file_format=True)
    volume = load_volume(tmp_path)
    assert str(volume.numpy().dtype) == expected
    values = np.resize(stored, (12, 10)).astype(np.int64) + intercept
    assert np.array_equal(volume[0, :, :, 0].numpy(), values.T)


def test_large_stack_is_an_ordinary_writable_array(tmp_path):
    """Stacks over 4 MiB are allocated in their own mapping (no huge-page compaction): the values,
    writability and pickling (DataLoader workers) must be those of any array."""
    spec = SeriesSpec(rows=256, columns=256, slice_positions=[1.5 * k for k in range(20)])
    paths = write_series(tmp_path, spec)
    volume = load_volume(tmp_path)
    assert volume.numel() * volume.element_size() > 2**22
    expected = np.stack([ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in read_slices(paths)], -1)
    np.testing.assert_allclose(volume[0].numpy(), expected, rtol=1e-6)
    volume[0, 0, 0, 0] = 7  # writable
    copy = pickle.loads(pickle.dumps(volume))
    assert torch.equal(copy.as_tensor(), volume.as_tensor())

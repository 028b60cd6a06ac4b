"""RT Structure Sets: valid (dciodvfy), every decimal string within 16 characters, and read back by
an independent reader (plastimatch, from Debian) onto the source grid with the label map's voxels,
islands and holes, on axial, tilted, oblique and sagittal series."""

from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipelines.io import dicom_references, load_volume
from pipelines.io.dicom_seg import SegmentCode
from pipelines.io.rtstruct import _ds, contours_of_mask, write_rtstruct
from pipelines.io.writers import labels_on_source_slices, resample_labels
from tests.dicom_checks import dciodvfy_errors
from tests.io.dicom_factory import SeriesSpec, write_series

CATEGORY = ("49755003", "SCT", "Morphologically Altered Structure")
TUMOR = SegmentCode(1, "tumor", CATEGORY, ("108369006", "SCT", "Neoplasm"), (230, 60, 50))
CORE = SegmentCode(2, "necrotic core", CATEGORY, ("6574001", "SCT", "Necrosis"))


def _shell_with_islands(shape) -> np.ndarray:
    """Label 1: a thick spherical shell (a hole in the slices through it) and a separate block;
    label 2: a ball inside the hole (an island within a hole)."""
    index = np.indices(shape).astype(float)
    distance = np.sqrt(sum((index[a] - shape[a] / 2) ** 2 for a in range(3)))
    labels = np.zeros(shape, np.uint8)
    labels[(distance < 12) & (distance > 5)] = 1
    labels[distance <= 3] = 2
    labels[1:4, 1:5, :] = 1
    return labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def plastimatch_masks(rtstruct, series, out) -> dict[str, nib.Nifti1Image]:
    """plastimatch's rasterisation of each ROI on the referenced series' grid (nested contours
    even-odd, as planning systems fill them)."""
    if shutil.which("plastimatch") is None:
        pytest.skip("plastimatch not installed (make system-deps)")
    result = subprocess.run(["plastimatch", "convert", "--input", str(rtstruct), "--referenced-ct", str(series),
                             "--output-prefix", str(out), "--prefix-format", "nii.gz", "--xor-contours"],
                            capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return {path.name[: -len(".nii.gz")]: nib.load(path) for path in out.glob("*.nii.gz")}


SPECS = {
    "axial": SeriesSpec(rows=40, columns=36, pixel_spacing=(0.9, 0.8), slice_positions=[2.0 * k for k in range(10)]),
    "tilted": SeriesSpec(rows=40, columns=36, pixel_spacing=(0.9, 0.8), slice_positions=[2.0 * k for k in range(10)],
                         in_plane_shift=(0.0, 0.3)),
    "oblique": SeriesSpec(rows=40, columns=36, pixel_spacing=(0.9, 0.8), slice_positions=[2.0 * k for k in range(10)],
                          orientation="oblique"),
    "sagittal": SeriesSpec(rows=40, columns=36, pixel_spacing=(0.9, 0.8), slice_positions=[2.0 * k for k in range(10)],
                           orientation="sagittal", modality="MR"),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trip_through_plastimatch_gives_the_label_map_back(tmp_path, name):
    write_series(tmp_path / "series", SPECS[name])
    volume = load_volume(tmp_path / "series")
    labels = _shell_with_islands(volume.shape[1:])
    path = write_rtstruct(labels, volume.meta, [TUMOR, CORE], tmp_path / "rtstruct.dcm", "unet3d_tumor", "0.1.0")
    masks = plastimatch_masks(path, tmp_path / "series", tmp_path / "pm")
    assert set(masks) == {"tumor", "necrotic core"}
    for segment in (TUMOR, CORE):
        image = masks[segment.name]
        read = np.asarray(image.dataobj) > 0
        ours = resample_labels(labels, volume.affine.numpy(), read.shape, image.affine) == segment.label
        assert dice(read, ours) >= 0.99, (name, segment.name, dice(read, ours))
    # the hole stays a hole: the core's voxels are not the tumor's
    core = resample_labels(labels, volume.affine.numpy(), read.shape, image.affine) == 2
    assert not (np.asarray(masks["tumor"].dataobj) > 0)[core].any()
    errors = dciodvfy_errors(path)
    assert not errors, errors


def test_the_structure_set_references_its_series_and_codes_its_rois(tmp_path):
    paths = write_series(tmp_path / "series", SPECS["tilted"])
    volume = load_volume(tmp_path / "series")
    labels = _shell_with_islands(volume.shape[1:])
    ds = pydicom.dcmread(write_rtstruct(labels, volume.meta, [TUMOR, CORE], tmp_path / "rt.dcm", "unet3d_tumor", "0.1.0"))
    source = {str(p.SOPInstanceUID): p for p in (pydicom.dcmread(f) for f in paths)}
    first = next(iter(source.values()))
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == first.StudyInstanceUID
    assert ds.PatientID == first.PatientID and ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == set(source)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["tumor", "necrotic core"]
    assert list(ds.ROIContourSequence[0].ROIDisplayColor) == [230, 60, 50]
    assert ds.RTROIObservationsSequence[1].RTROIIdentificationCodeSequence[0].CodeValue == "6574001"
    # each contour lies in the plane of the slice it references
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            image = source[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            normal = np.cross(*np.asarray(image.ImageOrientationPatient, float).reshape(2, 3))
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            assert np.allclose((points - np.asarray(image.ImagePositionPatient, float)) @ normal, 0, atol=1e-3)
            assert contour.NumberOfContourPoints == len(points) and contour.ContourGeometricType == "CLOSED_PLANAR"
    # the voxels: every contour slice holds that label on the source slices
    frames = labels_on_source_slices(labels, volume.affine.numpy(), dicom_references(volume.meta)["source_geometry"])
    assert len(ds.ROIContourSequence[1].ContourSequence) == int(sum((frame == 2).any() for frame in frames))


def test_decimal_strings_fit_sixteen_characters_far_from_the_origin(tmp_path):
    """Coordinates of a table far out (mm in the thousands, negative, fine sub-millimetre steps):
    every ContourData value within DICOM's 16 characters (planning systems refuse longer)."""
    spec = SeriesSpec(rows=40, columns=36, pixel_spacing=(0.976562, 0.976562), origin=(-1234.56789, 9876.54321, -2345.6789),
                      slice_positions=[1.25 * k for k in range(10)], orientation="oblique")
    write_series(tmp_path / "series", spec)
    volume = load_volume(tmp_path / "series")
    path = write_rtstruct(_shell_with_islands(volume.shape[1:]), volume.meta, [TUMOR], tmp_path / "rt.dcm", "u", "1")
    raw = pydicom.dcmread(path)
    values = [v for roi in raw.ROIContourSequence for c in roi.ContourSequence for v in c["ContourData"].value]
    assert values and max(len(str(v)) for v in values) <= 16
    with pytest.raises(ValueError, match="16-character"):
        _ds(np.array([1.0, 1234567890123456.7]))


def test_contours_trace_islands_and_holes():
    mask = np.zeros((12, 12), bool)
    mask[2:9, 2:9] = True
    mask[4:7, 4:7] = False  # a hole
    mask[10, 10] = True  # a one-pixel island
    contours = contours_of_mask(mask)
    assert len(contours) == 3
    sizes = sorted(len(c) for c in contours)
    assert sizes[0] == 4  # the single pixel: a diamond through its four edges' midpoints
    outer = max(contours, key=lambda c: np.ptp(c[:, 0]))
    assert np.ptp(outer[:, 0]) == pytest.approx(7.0) and outer.min() == pytest.approx(1.5)  # between pixels 1 and 2

"""Broken and hostile files: each is refused with a specific ``InputDataError`` naming the file and
the cause, never an ``OSError``, ``MemoryError``, ``IndexError``, ``StopIteration`` or a signal,
and nothing that may be a slice of the series is skipped silently."""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import RLELossless, generate_uid

from pipelines.io import (
    CorruptFileError,
    GeometryError,
    InvalidValuesError,
    NoImageDataError,
    load_volume,
)
from tests.conftest import shared_data_dir
from tests.io.dicom_factory import SeriesSpec, make_slice, write_series
from tests.unprivileged import load_volume_unprivileged, open_up

SYNTAXES = shared_data_dir() / "dicom_transfer_syntaxes"
needs_syntaxes = pytest.mark.skipif(
    not (SYNTAXES / "9.dcm").is_file(), reason=f"shared DICOM transfer syntax files not found at {SYNTAXES}"
)


def test_an_empty_dcm_file_fails_the_series(tmp_path):
    write_series(tmp_path, SeriesSpec())
    (tmp_path / "IM9999.dcm").write_bytes(b"")
    with pytest.raises(CorruptFileError, match=r"IM9999\.dcm: empty file \(0 bytes\)"):
        load_volume(tmp_path)


def test_other_empty_and_foreign_files_are_still_skipped(tmp_path):
    write_series(tmp_path, SeriesSpec())
    (tmp_path / "LOCKFILE").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("scanned on Monday")
    assert load_volume(tmp_path).shape[-1] == 7


@pytest.mark.parametrize("content", [b"\0" * 128 + b"DICM", b"\0" * 128 + b"DICM" + b"\xff" * 300])
def test_a_file_with_the_dicom_marker_that_cannot_be_read(tmp_path, content):
    write_series(tmp_path, SeriesSpec())
    (tmp_path / "broken").write_bytes(content)
    with pytest.raises(CorruptFileError, match="broken: unreadable DICOM file"):
        load_volume(tmp_path)


@pytest.mark.parametrize("missing", ["ImagePositionPatient", "ImageOrientationPatient"])
def test_a_ct_slice_without_patient_geometry_fails_the_series(tmp_path, missing):
    """Skipping it would segment the study with a slice missing at the top, where no gap shows."""
    paths = write_series(tmp_path, SeriesSpec())
    ds = pydicom.dcmread(paths[-1])
    delattr(ds, missing)
    ds.save_as(paths[-1], enforce_file_format=True)
    with pytest.raises(CorruptFileError, match=rf"{paths[-1].name}: CT Image Storage without {missing} \(its IOD requires"):
        load_volume(tmp_path)


def test_a_series_without_orientation_does_not_vanish(tmp_path):
    paths = write_series(tmp_path, SeriesSpec(modality="MR"))
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.ImageOrientationPatient
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(CorruptFileError, match="MR Image Storage without ImageOrientationPatient"):
        load_volume(tmp_path)


def test_a_secondary_capture_without_geometry_is_skipped(tmp_path):
    write_series(tmp_path / "ct", SeriesSpec())
    ds = make_slice(SeriesSpec(), 0.0, 0, generate_uid(), generate_uid(), generate_uid())
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.save_as(tmp_path / "screenshot.dcm", enforce_file_format=True)
    assert load_volume(tmp_path).shape[-1] == 7


def test_an_unreadable_series_folder_is_an_error_not_nothing(tmp_path):
    write_series(tmp_path / "study" / "series1", SeriesSpec())
    write_series(tmp_path / "study" / "series2", SeriesSpec(series_description="other"))
    open_up(tmp_path / "study" / "series1")
    os.chmod(tmp_path / "study" / "series2", 0o000)
    outcome = load_volume_unprivileged(tmp_path / "study")
    assert outcome.startswith(f"REFUSED {tmp_path / 'study' / 'series2'}: folder not readable"), outcome


def test_a_header_promising_more_pixels_than_the_file_holds(tmp_path):
    """65535 x 65535 pixels in a file of a few hundred bytes: refused before allocating 8 GiB."""
    (path,) = write_series(tmp_path, SeriesSpec(slice_positions=[0.0]))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 65535
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(CorruptFileError, match=r"pixel data holds 240 bytes, but Rows 65535 x Columns 65535 x 1 frame"):
        load_volume(path)


def test_a_compressed_stack_beyond_the_voxel_limit_is_refused_before_decoding(tmp_path):
    paths = write_series(tmp_path, SeriesSpec())
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.Rows = ds.Columns = 65535  # compressed: the data's length says nothing of its size
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(CorruptFileError, match=r"7 slices of 65535x65535 are .* voxels, more than the limit of 1,073,741,824"):
        load_volume(tmp_path)
    with pytest.raises(CorruptFileError, match="more than the limit of 100"):
        load_volume(tmp_path, max_voxels=100)


def test_fewer_frames_than_number_of_frames(tmp_path):
    spec = SeriesSpec(slice_positions=[0.0])
    ds = make_slice(spec, 0.0, 0, generate_uid(), generate_uid(), generate_uid())
    frame = np.frombuffer(ds.PixelData, dtype=np.int16)
    ds.NumberOfFrames, ds.SpacingBetweenSlices = 3, 2.0
    ds.PixelData = np.concatenate([frame] * 3).tobytes()
    ds.compress(RLELossless)
    ds.NumberOfFrames = 4
    ds.save_as(tmp_path / "multi.dcm", enforce_file_format=True)
    with pytest.raises(CorruptFileError, match=r"multi\.dcm: pixel data holds fewer frames than NumberOfFrames \(4\)"):
        load_volume(tmp_path / "multi.dcm")
    ds.decompress()
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(tmp_path / "short.dcm", enforce_file_format=True)
    with pytest.raises(CorruptFileError, match=r"short\.dcm: pixel data holds 360 bytes, but .* x 3 frame\(s\) .* promise 720"):
        load_volume(tmp_path / "short.dcm")


def damaged_codestream(source, tmp_path, name: str, damage) -> "pydicom.Dataset":
    ds = pydicom.dcmread(source)
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([damage(codestream)])
    ds.save_as(tmp_path / name)
    return tmp_path / name


@needs_syntaxes
@pytest.mark.parametrize(
    "source, codec, damage",
    [
        ("9.dcm", "JPEG 2000", lambda c: c[:40] + b"\xff\xff\xff\xff" + c[44:]),  # GDCM aborts on this SIZ
        ("9.dcm", "JPEG 2000", lambda c: c[: len(c) // 2]),  # truncated
        ("7.dcm", "JPEG-LS", lambda c: c[:6] + b"\xff" * 6 + c[12:]),  # GDCM aborts on this header
        ("5.dcm", "JPEG", lambda c: c[:20] + bytes(40) + c[60:]),
    ],
)
def test_a_damaged_codestream_is_an_error_not_an_abort(tmp_path, source, codec, damage):
    """GDCM throws an uncaught C++ exception on some damaged headers, which aborts the whole process:
    were it asked, this test would take pytest down with it."""
    path = damaged_codestream(SYNTAXES / source, tmp_path, "damaged.dcm", damage)
    with pytest.raises(CorruptFileError, match=f"damaged.dcm: corrupt {codec} pixel data"):
        load_volume(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti_header_promising_4096_cubed_voxels_in_a_small_file(tmp_path, suffix):
    image = nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.float32), np.eye(4))
    path = tmp_path / f"huge{suffix}"
    image.to_filename(path)
    raw = gzip.decompress(path.read_bytes()) if suffix.endswith(".gz") else path.read_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    header.set_data_shape((4096, 4096, 4096))
    data = header.binaryblock + raw[348:]
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    assert path.stat().st_size < 2048
    with pytest.raises(CorruptFileError, match=re.escape(path.name) + ": .*promises 68,719,476,736 voxels"):
        load_volume(path)
    with pytest.raises(CorruptFileError, match="file holds"):
        load_volume(path, max_voxels=None)  # without the limit, the file size still refuses it


@pytest.mark.parametrize("affine", [np.zeros((4, 4)), np.diag([1.0, 0.0, 1.0, 1.0]), np.full((4, 4), np.nan)])
def test_a_singular_or_non_finite_affine(tmp_path, affine):
    nib.save(nib.Nifti1Image(np.arange(27, dtype=np.float32).reshape(3, 3, 3), np.eye(4)), tmp_path / "flat.nii")
    raw = bytearray((tmp_path / "flat.nii").read_bytes())  # nibabel refuses to write such an affine itself
    raw[252:256] = np.array([0, 1], dtype="<i2").tobytes()  # qform_code 0, sform_code 1
    raw[280:328] = affine[:3].astype("<f4").tobytes()  # srow_x, srow_y, srow_z
    (tmp_path / "flat.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(GeometryError, match=r"flat\.nii\.gz: the voxel-to-world affine is singular or not finite"):
        load_volume(tmp_path / "flat.nii.gz")


def test_blank_images_are_refused_when_asked(tmp_path):
    nib.save(nib.Nifti1Image(np.full((1, 1, 1), 7, dtype=np.int16), np.eye(4)), tmp_path / "voxel.nii.gz")
    with pytest.raises(InvalidValuesError, match=r"voxel\.nii\.gz: blank image: all 1 voxels hold the value 7"):
        load_volume(tmp_path / "voxel.nii.gz", allow_blank=False)
    paths = write_series(tmp_path / "blank", SeriesSpec())
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PixelData = bytes(len(ds.PixelData))
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InvalidValuesError, match=r"blank: blank image: all 840 voxels hold the value -1000"):
        load_volume(tmp_path / "blank", allow_blank=False)
    assert load_volume(tmp_path / "blank").shape == (1, 10, 12, 7)  # a label may be blank: allowed by default


def test_a_dicom_seg_beside_its_series_is_not_an_image_to_load(tmp_path):
    """A folder holding the series and a SEG made from it (a PACS export of a reviewed study)."""
    from pipelines.io.dicom_seg import SegmentCode, write_dicom_seg

    write_series(tmp_path / "study", SeriesSpec(modality="MR"))
    volume = load_volume(tmp_path / "study")
    labels = np.zeros(volume.shape[1:], dtype=np.uint8)
    labels[2:5, 3:6, 1:4] = 1
    tumor = SegmentCode(1, "tumor", ("49755003", "SCT", "Morphologically Altered Structure"), ("108369006", "SCT", "Neoplasm"))
    write_dicom_seg(labels, volume.meta, [tumor], tmp_path / "study" / "seg.dcm", "test", "1")
    again = load_volume(tmp_path / "study")
    assert np.array_equal(again.numpy(), volume.numpy())


def _cut(path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_copies_cut_short_give_way_to_their_intact_copies(tmp_path):
    """A series exported twice, the second transfer interrupted: files cut in the header, in the
    pixel data and one byte short. Every instance is intact in the first copy: the series loads as
    from it alone, and each broken copy is a warning of the intact one read instead."""
    from pipelines.io.dicom import scan_dicom

    paths = write_series(tmp_path / "first", SeriesSpec())
    shutil.copytree(tmp_path / "first", tmp_path / "again")
    again = sorted((tmp_path / "again").glob("*.dcm"))
    for path, keep in zip(again, (300, again[1].stat().st_size - 100, again[2].stat().st_size - 1)):
        _cut(path, keep)
    reference = load_volume(tmp_path / "first")
    both = load_volume(tmp_path)
    assert np.array_equal(both.numpy(), reference.numpy()) and np.allclose(both.affine, reference.affine)
    errors: list = []
    scan = scan_dicom(tmp_path, errors=errors)
    assert not errors
    for broken, intact in zip(again[:3], paths[:3]):
        (warning,) = scan.warnings[str(intact)]
        assert warning.startswith(f"broken copy left out, this intact one read instead: {broken}: "), warning

    intact_lost = paths[1]
    intact_lost.unlink()  # instance 2 now exists only as the cut copy
    with pytest.raises(CorruptFileError, match=re.escape(f"{again[1]}: file ends after ") + r"\d+ of the 240 bytes"):
        load_volume(tmp_path)


@needs_syntaxes
@pytest.mark.parametrize("name", ["1.dcm", "4.dcm", "9.dcm"])  # explicit little endian, RLE, JPEG 2000
def test_a_real_slice_cut_short_beside_its_intact_copy(tmp_path, name):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(SYNTAXES / name, tmp_path / "a" / name)
    shutil.copy(SYNTAXES / name, tmp_path / "b" / name)
    _cut(tmp_path / "b" / name, (SYNTAXES / name).stat().st_size * 2 // 3)
    with pytest.raises((CorruptFileError, NoImageDataError), match=re.escape(str(tmp_path / "b" / name))):
        load_volume(tmp_path / "b")
    assert np.array_equal(load_volume(tmp_path).numpy(), load_volume(tmp_path / "a").numpy())

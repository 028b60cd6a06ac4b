from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.fileset import FileSet

from pipelines.io import (
    AmbiguousSeriesError,
    CorruptFileError,
    InputDataError,
    InputNotFoundError,
    NoImageDataError,
    dicom_references,
    load_volume,
)
from pipelines.io.dicom import SeriesRules, scan_dicom
from tests.unprivileged import load_volume_unprivileged, open_up
from tests.io.dicom_factory import SeriesSpec, write_series


@pytest.fixture
def mixed_study(tmp_path):
    """One folder: a CT series, a one-slice coronal localizer and an MR series, plus non-DICOM files."""
    study = tmp_path / "study"
    write_series(study / "ct", SeriesSpec(series_description="CT abdomen venous", series_number=2), shuffle=True)
    write_series(
        study / "ct",
        SeriesSpec(series_description="Topogram", series_number=1, slice_positions=[0.0], orientation="coronal",
                   image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
    )
    write_series(study / "mr" / "t1", SeriesSpec(modality="MR", series_description="T1 post", series_number=3,
                                                 slice_positions=[3.0 * k for k in range(5)], orientation="sagittal"))
    (study / "notes.txt").write_text("not DICOM")
    (study / "mr" / "Thumbs.db").write_bytes(b"\x00" * 64)
    return study


def test_several_series_without_rules_lists_them(mixed_study):
    with pytest.raises(AmbiguousSeriesError, match="3 DICOM series qualify; give a selection rule") as info:
        load_volume(mixed_study)
    message = str(info.value)
    for expected in ("'CT abdomen venous' (CT, 7 slices, axial", "'Topogram' (CT, 1 slices, coronal",
                     "LOCALIZER", "'T1 post' (MR, 5 slices, sagittal"):
        assert expected in message


@pytest.mark.parametrize(
    "rules,description,slices",
    [
        ({"modality": "MR"}, "T1 post", 5),
        ({"modality": "CT", "image_type_exclude": ["LOCALIZER"]}, "CT abdomen venous", 7),
        ({"modality": ["CT"], "min_slices": 2}, "CT abdomen venous", 7),
        ({"orientation": "coronal"}, "Topogram", 1),
        ({"description": "(?i)venous"}, "CT abdomen venous", 7),
        ({"image_type_include": ["localizer"]}, "Topogram", 1),
    ],
)
def test_rules_pick_one_series(mixed_study, rules, description, slices):
    volume = load_volume(mixed_study, **rules)
    assert volume.meta["series_description"] == description and volume.shape[-1] == slices
    assert dicom_references(volume.meta)["skipped_files"] == {"non_dicom": 2, "non_image": 0}


def test_no_series_matches_gives_each_reason(mixed_study):
    with pytest.raises(NoImageDataError, match="no DICOM series matches") as info:
        load_volume(mixed_study, modality="PT")
    assert str(info.value).count("modality") == 3
    with pytest.raises(AmbiguousSeriesError, match="2 DICOM series qualify; narrow the rules"):
        load_volume(mixed_study, modality="CT")


def test_multiphase_series_split_by_temporal_position(tmp_path):
    uid = pydicom.uid.generate_uid()
    for phase in (1, 2):
        write_series(tmp_path / f"phase{phase}", SeriesSpec(series_uid=uid, temporal_position=phase))
    with pytest.raises(AmbiguousSeriesError, match="temporal_position 1.*\n.*temporal_position 2"):
        load_volume(tmp_path)


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="`orientation` must be one of"):
        SeriesRules(orientation="transverse")
    with pytest.raises(ValueError, match="`description` must be a regular expression"):
        SeriesRules(description="(unclosed")
    with pytest.raises(ValueError, match="`min_slices` must be a positive integer"):
        SeriesRules(min_slices=0)


def test_nested_folders_and_dicomdir(tmp_path):
    paths = write_series(tmp_path / "flat", SeriesSpec())
    nested = tmp_path / "nested"
    for k, path in enumerate(paths):
        (nested / f"level{k % 3}" / "deeper").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, nested / f"level{k % 3}" / "deeper" / path.name)
    reference = load_volume(tmp_path / "flat")
    assert np.array_equal(load_volume(nested).numpy(), reference.numpy())

    fileset = FileSet()
    for path in paths:
        fileset.add(path)
    fileset.write(tmp_path / "media")
    dicomdir = load_volume(tmp_path / "media" / "DICOMDIR")
    assert np.array_equal(dicomdir.numpy(), reference.numpy())
    assert np.allclose(dicomdir.affine, reference.affine)
    # the folder holding the DICOMDIR loads too: the directory file itself is skipped
    assert np.array_equal(load_volume(tmp_path / "media").numpy(), reference.numpy())


def test_dicomdir_listing_a_missing_file_is_an_error_not_a_lost_slice(tmp_path, recwarn, caplog):
    paths = write_series(tmp_path / "flat", SeriesSpec())
    fileset = FileSet()
    for path in paths:
        fileset.add(path)
    fileset.write(tmp_path / "media")
    stored = sorted(p for p in (tmp_path / "media").rglob("IM*") if p.is_file())
    stored[1].rename(stored[1].with_name(stored[1].name.lower()))  # media copied between file systems
    assert load_volume(tmp_path / "media" / "DICOMDIR").shape[-1] == 7
    stored[0].unlink()
    with caplog.at_level(logging.DEBUG), pytest.raises(InputNotFoundError,
                                                       match=f"{stored[0]}: missing \\(listed by a DICOMDIR"):
        load_volume(tmp_path / "media" / "DICOMDIR")
    # pydicom warns and logs it, with the path: kept, neither printed nor logged
    assert not [w for w in recwarn.list if str(tmp_path) in str(w.message)]
    assert not [r for r in caplog.records if str(tmp_path) in r.getMessage()], caplog.text
    assert "does not exist" in "".join(scan_dicom(tmp_path / "media" / "DICOMDIR", errors=[]).warnings[
        str(tmp_path / "media" / "DICOMDIR")])


def test_identifiers_kept_but_never_logged(tmp_path, caplog):
    write_series(tmp_path / "s", SeriesSpec(slice_positions=[0.0, 2.5, 5.0, 7.0]))  # uneven: logs a correction
    (tmp_path / "s" / "readme.txt").write_text("x")  # logs a skip count
    with caplog.at_level(logging.DEBUG):
        volume = load_volume(tmp_path / "s")
    assert volume.meta["identifiers"]["patient_id"] == "PAT-0001"
    assert volume.meta["identifiers"]["patient_name"] == "Doe^Jane"
    assert caplog.records, "expected the loader to log something for this check to mean anything"
    for record in caplog.records:
        assert "PAT-0001" not in record.getMessage() and "Doe" not in record.getMessage()


# ---- bad input: a specific error naming the file -------------------------------------------


def test_folder_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(NoImageDataError, match=r"no DICOM image found \(2 files; 2 not DICOM"):
        load_volume(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoImageDataError, match=r"empty: no DICOM image found \(0 files"):
        load_volume(empty)


def test_truncated_dicom_file(tmp_path):
    paths = write_series(tmp_path, SeriesSpec())
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 100])  # pixel data cut short
    with pytest.raises(CorruptFileError, match=f"{paths[2].name}: file ends after 140 of the 240 bytes of its pixel"):
        load_volume(tmp_path)
    paths[2].unlink()
    paths[4].write_bytes(paths[4].read_bytes()[:300])  # header cut short: pydicom stops quietly
    with pytest.raises(NoImageDataError, match=f"{paths[4].name}: DICOM image header without pixel data .*truncated"):
        load_volume(tmp_path)


def test_missing_pixel_data(tmp_path):
    paths = write_series(tmp_path, SeriesSpec())
    ds = pydicom.dcmread(paths[1])
    del ds.PixelData
    ds.save_as(paths[1], enforce_file_format=True)
    with pytest.raises(NoImageDataError, match=f"{paths[1].name}: DICOM image header without pixel data"):
        load_volume(tmp_path)


def test_missing_path():
    with pytest.raises(InputNotFoundError, match="no such file or folder"):
        load_volume("/nonexistent/study")
    with pytest.raises(FileNotFoundError):  # also the standard exception
        load_volume("/nonexistent/scan.nii.gz")


def test_unreadable_permissions(tmp_path):
    paths = write_series(tmp_path / "series", SeriesSpec())
    open_up(tmp_path / "series")
    for path in paths[1:]:
        os.chmod(path, 0o644)
    os.chmod(paths[0], 0o000)
    outcome = load_volume_unprivileged(tmp_path / "series")
    assert outcome.startswith(f"REFUSED {paths[0]}: not readable"), outcome


def test_every_input_error_shares_one_base():
    for name in ("CorruptFileError", "NoImageDataError", "AmbiguousSeriesError", "GeometryError",
                 "MissingDecoderError", "InvalidValuesError", "GridMismatchError", "ManifestError",
                 "InputNotFoundError", "InputPermissionError"):
        assert issubclass(getattr(__import__("pipelines.io", fromlist=[name]), name), InputDataError)


@pytest.mark.parametrize("bits,stored,signed", [(16, 12, False), (16, 12, True), (16, 10, True), (8, 7, False),
                                                (16, 16, True)])
def test_pixels_read_straight_from_file_ignore_unused_bits(tmp_path, bits, stored, signed):
    """Uncompressed slices are read at their pixel offset, not parsed twice; the bits above BitsStored
    hold junk here (overlay planes did, in old scanners) and are ignored exactly as pydicom ignores
    them: masked off when unsigned, the sign bit repeated when signed."""
    from pipelines.io.dicom import scan_dicom

    paths = write_series(tmp_path / "s", SeriesSpec(rows=5, columns=6))
    rng = np.random.default_rng(stored)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    expected = []
    for path in paths:
        ds = pydicom.dcmread(path)
        low = -(2 ** (stored - 1)) if signed else 0
        values = rng.integers(low, low + 2**stored, size=(ds.Rows, ds.Columns))
        junk = rng.integers(0, 2 ** (bits - stored), size=values.shape) << stored if stored < bits else 0
        raw = ((values & (2**stored - 1)) | junk).astype(np.uint64).astype(f"u{bits // 8}").view(dtype)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, int(signed)
        ds.PixelData = raw.tobytes()
        ds.save_as(path, enforce_file_format=True)
        np.testing.assert_array_equal(ds.pixel_array, values)  # pydicom's reading, which ours must equal
        expected.append(values.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    records = scan_dicom(tmp_path / "s").records
    assert all(r.pixel_offset is not None and r.pixel_unused_bits == bits - stored for r in records)
    volume = load_volume(tmp_path / "s")
    order = np.argsort([float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in paths])
    np.testing.assert_allclose(volume[0].numpy(), np.stack([expected[k] for k in order], -1), rtol=3e-6)  # float32

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from pipelines.batch import BatchInputError, discover_cases, pseudonym
from pipelines.io import SeriesRules
from tests.batch.conftest import DEMO, MANIFEST, copy_study, demo_case

ONE = {"image": SeriesRules()}  # a bundle of one input, no rules


def _study_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _add_series(study: Path, description: str, slices: int = 5) -> None:
    """A second series in the same study (same folder): a few slices with new UIDs."""
    series = generate_uid()
    for index, file in enumerate(sorted(study.glob("*.dcm"))[:slices]):
        ds = pydicom.dcmread(file)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesDescription = series, generate_uid(), description
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = 7
        ds.save_as(study / f"extra_{index}.dcm")


@pytest.fixture
def tree(tmp_path):
    """site_a/p1: study A; site_b/x/y: study B; extra/scan.nii.gz; a text file."""
    root = tmp_path / "in"
    copy_study("test", 0, root / "site_a" / "p1")
    copy_study("test", 1, root / "site_b" / "x" / "y")
    (root / "extra").mkdir()
    shutil.copy(DEMO / demo_case("test", 2)["image"], root / "extra" / "scan.nii.gz")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_tree_gives_one_case_per_study_and_file(tree):
    cases = discover_cases(tree, ONE)
    kinds = sorted(c.kind for c in cases)
    assert kinds == ["dicom", "dicom", "file"]
    uid_a = _study_uid(tree / "site_a" / "p1")
    by_id = {c.case_id: c for c in cases}
    assert by_id[pseudonym(uid_a)].path == str(tree / "site_a" / "p1")
    assert by_id[pseudonym("extra/scan.nii.gz")].path == str(tree / "extra" / "scan.nii.gz")
    for case in cases:  # pseudonymous and stable: no patient id, no file name
        assert "DEMO" not in case.case_id and "scan" not in case.case_id and case.input_hash
    assert [c.case_id for c in cases] == [c.case_id for c in discover_cases(tree, ONE)] == sorted(by_id)


def test_headers_are_read_by_a_process_pool_with_the_serial_result(tree, tmp_path, monkeypatch):
    import contextlib

    import pipelines.batch.discovery as cases_module
    from pipelines.io.dicom import scan as scan_module

    readers = tmp_path / "readers"
    readers.mkdir()
    read = scan_module._read_records

    def noting_reader(file):  # runs where the header is read; the pool's processes fork with it
        (readers / str(os.getpid())).touch()
        return read(file)

    monkeypatch.setattr(scan_module, "_read_records", noting_reader)
    parallel = discover_cases(tree, ONE)
    assert {int(p.name) for p in readers.iterdir()} - {os.getpid()}, "no header was read by another process"
    monkeypatch.setattr(cases_module, "_header_pool", contextlib.nullcontext)  # yields None: no pool
    serial = discover_cases(tree, ONE)

    def summary(cases):
        return [(c.case_id, c.kind, c.path, c.input_hash, c.sources["image"].series.records if c.kind == "dicom" else None) for c in cases]

    assert summary(parallel) == summary(serial)


def test_mixed_series_need_a_rule(tree):
    _add_series(tree / "site_a" / "p1", "localizer")
    cases = {c.case_id: c for c in discover_cases(tree, ONE)}
    study = cases[pseudonym(_study_uid(tree / "site_a" / "p1"))]
    assert study.kind == "error" and "2 DICOM series qualify" in study.error
    chosen = {c.case_id: c for c in discover_cases(tree, {"image": SeriesRules(description="T1")})}[study.case_id]
    assert chosen.kind == "dicom" and chosen.sources["image"].series.first.series_description == "T1 3D synthetic"
    assert len(chosen.sources["image"].series.records) == len(list((tree / "site_a" / "p1").glob("IM*.dcm")))


def test_unreadable_file_fails_its_study_only(tree):
    study_b = tree / "site_b" / "x" / "y"
    first = sorted(study_b.glob("*.dcm"))[0]
    first.write_bytes(first.read_bytes()[:1200])  # truncated inside the header or pixel data
    lone = tree / "lost" / "broken.dcm"
    lone.parent.mkdir()
    lone.write_bytes(first.read_bytes()[:300])  # no header left that names a study
    cases = {c.case_id: c for c in discover_cases(tree, ONE)}
    healthy = cases[pseudonym(_study_uid(tree / "site_a" / "p1"))]
    assert healthy.kind == "dicom"
    errors = [c for c in cases.values() if c.kind == "error"]
    assert len(errors) == 2
    assert any(str(first) in c.error and c.path == str(study_b) for c in errors)
    assert any(c.path == str(lone.parent) and str(lone) in c.error for c in errors)


def test_a_study_whose_every_file_is_broken_keeps_its_case_id(tree):
    """Its files' headers name the study: the failed case has the id a healthy run would give it."""
    study_b = tree / "site_b" / "x" / "y"
    uid = _study_uid(study_b)
    for file in study_b.glob("*.dcm"):
        ds = pydicom.dcmread(file)
        del ds.ImagePositionPatient
        ds.save_as(file)
    case = {c.case_id: c for c in discover_cases(tree, ONE)}[pseudonym(uid)]
    assert case.kind == "error" and "without ImagePositionPatient" in case.error and case.path == str(study_b)


def test_two_identical_copies_of_a_study_make_one_case(tree):
    """An export that holds a study twice: the copies are dropped, the study is segmented once."""
    shutil.copytree(tree / "site_a" / "p1", tree / "site_c" / "copy")
    cases = {c.case_id: c for c in discover_cases(tree, ONE)}
    study = cases[pseudonym(_study_uid(tree / "site_a" / "p1"))]
    assert len(cases) == 3 and study.kind == "dicom"
    assert len(study.sources["image"].series.records) == len(list((tree / "site_a" / "p1").glob("*.dcm")))
    assert study.sources["image"].series.dropped_duplicates == len(study.sources["image"].series.records)


def test_a_second_copy_cut_short_leaves_the_study_whole(tree):
    """An export that holds a study twice, the second transfer interrupted: the intact instances are
    read, the study goes ahead, its case's warnings name each broken copy; study B is untouched."""
    copy = tree / "site_c" / "copy"
    shutil.copytree(tree / "site_a" / "p1", copy)
    cut = sorted(copy.glob("*.dcm"))[-4:]
    for path in cut:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cases = {c.case_id: c for c in discover_cases(tree, ONE)}
    study = cases[pseudonym(_study_uid(tree / "site_a" / "p1"))]
    assert study.error is None and study.kind == "dicom"
    records = study.sources["image"].series.records
    assert len(records) == len(list((tree / "site_a" / "p1").glob("*.dcm")))
    assert not {r.path for r in records} & set(cut)
    broken = [w for w in study.warnings if w.startswith("broken copy left out")]
    assert sorted(w.split(": ")[1] for w in broken) == sorted(str(p) for p in cut)
    assert sum(c.kind == "dicom" for c in cases.values()) == 2
    assert all(not c.warnings for c in cases.values() if c is not study)


def test_a_copy_with_different_pixels_fails_only_its_study(tree):
    copy = tree / "site_c" / "copy"
    shutil.copytree(tree / "site_a" / "p1", copy)
    altered = sorted(copy.glob("*.dcm"))[3]
    ds = pydicom.dcmread(altered)
    ds.PixelData = bytes(len(ds.PixelData))
    ds.save_as(altered)
    cases = {c.case_id: c for c in discover_cases(tree, ONE)}
    study = cases[pseudonym(_study_uid(copy))]
    assert study.kind == "error" and "with different pixels" in study.error and altered.name in study.error
    assert sum(c.kind == "dicom" for c in cases.values()) == 1  # study B still goes ahead


def test_an_unreadable_folder_fails_the_study_beside_it(tree, tmp_path):
    """The study's second series cannot be read: the study fails (it would lose a series), the other
    study goes ahead; an unreadable folder with no study near it is a failed case of its own."""
    from pipelines.io.dicom import scan as scan_module
    from pipelines.io.errors import InputPermissionError

    study_b = tree / "site_b" / "x" / "y"
    hidden, elsewhere = study_b / "series2", tree / "archive" / "old"
    hidden.mkdir()
    elsewhere.mkdir(parents=True)
    errors = [scan_module._folder_error(folder, PermissionError(13, "Permission denied", str(folder)))
              for folder in (hidden, elsewhere)]
    assert all(isinstance(e, InputPermissionError) for e in errors)
    from pipelines.batch.studies import _study_cases
    from pipelines.io.dicom import scan_dicom

    cases = {c.case_id: c for c in _study_cases(tree, scan_dicom(tree).records, errors, ONE)}
    failed = cases[pseudonym(_study_uid(study_b))]
    assert failed.kind == "error" and f"{hidden}: folder not readable" in failed.error
    assert cases[pseudonym(_study_uid(tree / "site_a" / "p1"))].kind == "dicom"
    (orphan,) = [c for c in cases.values() if c.path == str(tree / "archive")]
    assert orphan.kind == "error" and f"{elsewhere}: folder not readable" in orphan.error


def test_manifest_cases_keep_their_ids_and_labels(tmp_path):
    cases = discover_cases(MANIFEST, ONE, section="test", dataset_dir=DEMO)
    entries = json.loads(MANIFEST.read_text())["test"]
    assert [c.case_id for c in cases] == sorted(e["case_id"] for e in entries)
    assert all(c.kind == "dicom" and c.label and Path(c.label).is_file() for c in cases)
    nifti = discover_cases(MANIFEST, ONE, section="test", dataset_dir=DEMO, image_key="image")
    assert {c.kind for c in nifti} == {"file"}


def test_manifest_problems(tmp_path):
    entries = json.loads(MANIFEST.read_text())["test"][:2]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"test": [dict(entries[0]), dict(entries[1], case_id=entries[0]["case_id"])]}))
    with pytest.raises(BatchInputError, match=f"two inputs map to case id {entries[0]['case_id']}"):
        discover_cases(manifest, ONE, dataset_dir=DEMO)
    manifest.write_text(json.dumps({"test": [dict(entries[0], dicom="dicom/nowhere")]}))
    (case,) = discover_cases(manifest, ONE, dataset_dir=DEMO)
    assert case.kind == "error" and "no such file or folder" in case.error
    with pytest.raises(BatchInputError, match="no entries in section 'validation'"):
        discover_cases(manifest, ONE, section="validation", dataset_dir=DEMO)


def test_nothing_to_do(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(BatchInputError, match="no studies or image files"):
        discover_cases(tmp_path, ONE)
    with pytest.raises(BatchInputError, match="no such file"):
        discover_cases(tmp_path / "missing", ONE)


def test_a_study_with_no_image_volume_gets_a_failed_case(tree):
    """Only screenshots of it were exported: the study is reported, not silently absent."""
    shots = tree / "site_c" / "screenshots"
    shots.mkdir(parents=True)
    uid = generate_uid()
    for index, file in enumerate(sorted((tree / "site_a" / "p1").glob("*.dcm"))[:3]):
        ds = pydicom.dcmread(file)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid(), generate_uid()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        del ds.ImagePositionPatient, ds.ImageOrientationPatient
        ds.save_as(shots / f"shot{index}.dcm")
    case = {c.case_id: c for c in discover_cases(tree, ONE)}[pseudonym(uid)]
    assert case.kind == "error" and case.path == str(shots)
    assert case.error == "study holds no image volume: its 3 DICOM file(s) are Secondary Capture Image Storage without patient geometry"


def test_a_dicomdir_missing_files_of_one_study_fails_that_study_alone(tmp_path, caplog):
    """Media whose DICOMDIR lists files that are gone (an export cut short): pydicom's warnings name
    each missing file; they go to its study's case, the one that fails, never to the log."""
    from pydicom.fileset import FileSet

    from tests.io.dicom_factory import SeriesSpec, write_series

    fileset = FileSet()
    studies = [write_series(tmp_path / "export" / name, SeriesSpec(series_description=name)) for name in "abc"]
    for paths in studies:
        for path in paths:
            fileset.add(path)
    fileset.write(tmp_path / "media")
    bad_uid = _study_uid(tmp_path / "export" / "c")
    gone = [Path(instance.path) for instance in FileSet(tmp_path / "media" / "DICOMDIR")
            if instance.StudyInstanceUID == bad_uid][2:4]
    for path in gone:
        path.unlink()
    with caplog.at_level("DEBUG"):
        cases = {case.case_id: case for case in discover_cases(tmp_path / "media" / "DICOMDIR", ONE)}
    assert not [r for r in caplog.records if str(tmp_path) in r.getMessage()], caplog.text
    bad = cases.pop(pseudonym(bad_uid))
    assert all(f"{path}: missing (listed by a DICOMDIR" in bad.error for path in gone), bad.error
    assert len([w for w in bad.warnings if "does not exist" in w]) == 2, bad.warnings
    assert len(cases) == 2
    for case in cases.values():
        assert case.error is None and set(case.sources) == {"image"}
        assert not [w for w in case.warnings if "does not exist" in w], case.warnings

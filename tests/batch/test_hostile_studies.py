"""A user's bad studies beside two good ones, through the batch job's command line.

Every broken or hostile input below sits in one input folder with two good demo studies. The run
goes on as an unprivileged user (root reads folders whatever their permissions), and: the good
studies come out identical to a run without the bad ones; each bad one has a failed record whose
error names its cause; the exit code is 0 (not every case failed); no log line names an input path;
no process is left behind.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from pipelines.batch import pseudonym
from tests.batch.conftest import BUNDLE, DEMO, demo_case
from tests.conftest import REPO
from tests.unprivileged import open_up, run_unprivileged

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GOOD = {"good_a": ("validation", 3), "good_b": ("validation", 7)}


def new_study(section: str, index: int, target: Path, edit=None) -> str:
    """A copy of a demo study under new study, series and instance UIDs (so copies of one demo case
    are different studies); ``edit(ds, k, count)`` changes slice k of ``count``. Returns the case id."""
    files = sorted((DEMO / demo_case(section, index)["dicom"]).glob("*.dcm"))
    study, series = generate_uid(), generate_uid()
    target.mkdir(parents=True)
    for k, file in enumerate(files):
        ds = pydicom.dcmread(file)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if edit is not None:
            edit(ds, k, len(files))
        ds.save_as(target / file.name)
    return pseudonym(study)


def file_size(path: Path) -> int:
    return path.stat().st_size


def by_position(folder: Path) -> list[Path]:
    """The study's files from the lowest slice to the highest."""
    return sorted(folder.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


def without_ipp_on_top(folder: Path) -> None:
    top = by_position(folder)[-1]
    ds = pydicom.dcmread(top)
    del ds.ImagePositionPatient
    ds.save_as(top)


def damaged_j2k(folder: Path) -> None:
    for file in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(file)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        ds.save_as(file)
    victim = sorted(folder.glob("*.dcm"))[5]
    ds = pydicom.dcmread(victim)
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([codestream[:40] + b"\xff\xff\xff\xff" + codestream[44:]])  # SIZ: GDCM aborts here
    ds.save_as(victim)


def truncated(folder: Path) -> None:
    """A copy cut short inside its header (pydicom warns about it, naming the file)."""
    victim = sorted(folder.glob("*.dcm"))[9]
    victim.write_bytes(victim.read_bytes()[:1200])


def huge_rows(folder: Path) -> None:
    victim = sorted(folder.glob("*.dcm"))[2]
    ds = pydicom.dcmread(victim)
    ds.Rows = ds.Columns = 65535
    ds.save_as(victim)


def one_multiframe_file_short_of_frames(folder: Path) -> None:
    """The study as one multi-frame file (RLE) whose NumberOfFrames claims one frame more than it holds."""
    files = by_position(folder)
    slices = [pydicom.dcmread(f) for f in files]
    ds = slices[0]
    step = float(slices[1].ImagePositionPatient[2]) - float(slices[0].ImagePositionPatient[2])
    ds.NumberOfFrames, ds.SpacingBetweenSlices = len(slices), step
    ds.PixelData = b"".join(s.PixelData for s in slices)
    ds.compress(RLELossless)
    ds.NumberOfFrames = len(slices) + 1
    for file in files:
        file.unlink()
    ds.save_as(folder / "multiframe.dcm")


def conflicting_copy(folder: Path) -> None:
    original = sorted(folder.glob("*.dcm"))[4]
    ds = pydicom.dcmread(original)
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).copy()
    stored[:20] ^= 1
    ds.PixelData = stored.tobytes()
    (folder / "resent").mkdir()
    ds.save_as(folder / "resent" / original.name)


def second_series_unreadable(folder: Path) -> None:
    """The study's images in series1/; a second series of it in series2/, which cannot be read."""
    (folder / "series1").mkdir()
    for file in folder.glob("*.dcm"):
        file.rename(folder / "series1" / file.name)
    series = generate_uid()
    (folder / "series2").mkdir()
    for file in sorted((folder / "series1").glob("*.dcm"))[:5]:
        ds = pydicom.dcmread(file)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series, 9, "DWI"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / "series2" / file.name)


def screenshot(ds, k: int, count: int) -> None:
    """Slice k as a secondary capture: pixels without patient geometry."""
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    del ds.ImagePositionPatient, ds.ImageOrientationPatient


def nifti(path: Path, data: np.ndarray, affine=np.eye(4)) -> str:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path.name


def nifti_header_patch(path: Path, shape=None, affine=None) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    if shape is not None:
        raw[40:56] = np.array([len(shape), *shape, *[1] * (7 - len(shape))], dtype="<i2")[:8].tobytes()
        raw = raw[:352] + bytes(16)  # a 1 KiB file claiming 4096^3 voxels
    if affine is not None:  # nibabel refuses to write a singular affine itself
        raw[252:256] = np.array([0, 1], dtype="<i2").tobytes()
        raw[280:328] = np.asarray(affine[:3], dtype="<f4").tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Runs the batch job twice: on the two good studies alone, then with every bad input beside them."""
    demo_case("validation", 0)  # skips without the demo data
    root = tmp_path_factory.mktemp("hostile")
    clean, inbox = root / "clean", root / "in"
    expected: dict[str, tuple[str, str]] = {}  # name -> (case id, cause)
    for name, (section, index) in GOOD.items():
        shutil.copytree(DEMO / demo_case(section, index)["dicom"], clean / name)
        shutil.copytree(DEMO / demo_case(section, index)["dicom"], inbox / name)
    bad = [
        ("empty_file", lambda f: (f / "IM09999.dcm").write_bytes(b""), r"IM09999\.dcm: empty file \(0 bytes\)"),
        ("no_position", without_ipp_on_top, r"MR Image Storage without ImagePositionPatient"),
        ("no_orientation", None, r"MR Image Storage without ImageOrientationPatient"),
        ("zero_orientation", None,
         r"ImageOrientationPatient \[0\.0, 0\.0, 0\.0, 0\.0, 0\.0, 0\.0\] is not two unit, orthogonal vectors"),
        ("parallel_orientation", None,
         r"ImageOrientationPatient \[1\.0, 0\.0, 0\.0, 1\.0, 0\.0, 0\.0\] is not two unit, orthogonal vectors"),
        ("conflicting_copy", conflicting_copy, r"two files hold instance .* with different pixels"),
        ("damaged_j2k", damaged_j2k, r"IM00006\.dcm: corrupt JPEG 2000 pixel data"),
        ("huge_rows", huge_rows, r"IM00003\.dcm: pixel data holds .* Rows 65535 x Columns 65535"),
        ("blank", None, r"blank image: all .* voxels hold the value 0"),
        ("short_of_frames", one_multiframe_file_short_of_frames, r"multiframe\.dcm: pixel data holds fewer frames"),
        ("unreadable_series", second_series_unreadable, r"series2: folder not readable"),
        ("screenshots_only", None, r"study holds no image volume: its \d+ DICOM file\(s\) are Secondary Capture"),
        ("truncated", truncated, r"IM00010\.dcm: DICOM image header without pixel data .*truncated"),
    ]
    edits = {
        "no_orientation": lambda ds, k, n: delattr(ds, "ImageOrientationPatient"),
        "zero_orientation": lambda ds, k, n: setattr(ds, "ImageOrientationPatient", [0, 0, 0, 0, 0, 0]),
        "parallel_orientation": lambda ds, k, n: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]),
        "blank": lambda ds, k, n: setattr(ds, "PixelData", bytes(len(ds.PixelData))),
        "screenshots_only": screenshot,
    }
    for k, (name, change, cause) in enumerate(bad):
        case_id = new_study("test", k % 8, inbox / "bad" / name, edits.get(name))
        if change is not None:
            change(inbox / "bad" / name)
        expected[name] = (case_id, cause)
    # a good study exported with some of its files twice: read once, the correction recorded (the loader
    # used to log it at INFO with the study's folder, which can name the patient)
    resent = new_study("validation", 5, inbox / "resent")
    (inbox / "resent" / "again").mkdir()
    for file in sorted((inbox / "resent").glob("*.dcm"))[:3]:
        shutil.copy(file, inbox / "resent" / "again" / file.name)
    # a good study exported twice, the second transfer cut short (files end in their header, in their
    # pixel data, one byte short): every instance is intact in the first copy, which is read instead
    cut_short = new_study("validation", 6, inbox / "cut_short")
    shutil.copytree(inbox / "cut_short", inbox / "cut_short_again")
    again = sorted((inbox / "cut_short_again").glob("*.dcm"))
    for file, keep in zip(again[::7], (400, file_size(again[7]) // 2, file_size(again[14]) - 1, 1000)):
        file.write_bytes(file.read_bytes()[:keep])
    files = inbox / "files"
    files.mkdir()
    huge = files / nifti(files / "huge_header.nii.gz", np.zeros((2, 2, 2), np.float32))
    nifti_header_patch(huge, shape=(4096, 4096, 4096))
    flat = files / nifti(files / "zero_affine.nii.gz", np.arange(64, dtype=np.float32).reshape(4, 4, 4))
    nifti_header_patch(flat, affine=np.zeros((4, 4)))
    nifti(files / "one_voxel.nii.gz", np.full((1, 1, 1), 3.0, np.float32))
    expected["huge_header"] = (pseudonym("files/huge_header.nii.gz"), r"promises 68,719,476,736 voxels")
    expected["zero_affine"] = (pseudonym("files/zero_affine.nii.gz"), r"affine is singular or not finite")
    expected["one_voxel"] = (pseudonym("files/one_voxel.nii.gz"), r"blank image: all 1 voxels hold the value 3")

    subprocess.run([sys.executable, "-m", "pipelines", "batch", "--bundle", str(BUNDLE), "--input", str(clean),
                    "--output", str(root / "clean_out"), "--quiet"], check=True, cwd=REPO, timeout=600)
    open_up(inbox)
    for folder in inbox.rglob("*"):
        os.chmod(folder, 0o755 if folder.is_dir() else 0o644)
    os.chmod(inbox / "bad" / "unreadable_series" / "series2", 0o000)
    (root / "out").mkdir()
    os.chmod(root / "out", 0o777)
    code = (
        "import sys\nfrom pipelines.cli import main\n"
        f"sys.exit(main(['batch', '--bundle', {str(BUNDLE)!r}, '--input', {str(inbox)!r}, "
        f"'--output', {str(root / 'out')!r}]))\n"  # not --quiet: INFO lines must not name inputs either
    )
    result = run_unprivileged(code, timeout=900, cwd=REPO)
    os.chmod(inbox / "bad" / "unreadable_series" / "series2", 0o755)
    return {"root": root, "result": result, "expected": expected, "inbox": inbox, "resent": resent,
            "cut_short": cut_short}


def records(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/record.json")}


def test_the_run_goes_on_and_exits_0(hostile):
    result = hostile["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(records(hostile["root"] / "out")) == len(hostile["expected"]) + 4


def test_good_studies_come_out_as_in_a_clean_run(hostile):
    clean, out = records(hostile["root"] / "clean_out"), records(hostile["root"] / "out")
    assert len(clean) == 2
    for case_id, record in clean.items():
        assert record["status"] == "ok" and out[case_id]["status"] == "ok"
        assert out[case_id]["volumes_ml"] == record["volumes_ml"]
        ours = nib.load(hostile["root"] / "out" / case_id / "mask.nii.gz")
        reference = nib.load(hostile["root"] / "clean_out" / case_id / "mask.nii.gz")
        assert np.array_equal(np.asarray(ours.dataobj), np.asarray(reference.dataobj))
        assert np.allclose(ours.affine, reference.affine)


BAD = ["empty_file", "no_position", "no_orientation", "zero_orientation", "parallel_orientation", "conflicting_copy",
       "damaged_j2k", "huge_rows", "blank",
       "short_of_frames", "unreadable_series", "screenshots_only", "truncated", "huge_header", "zero_affine",
       "one_voxel"]


@pytest.mark.parametrize("name", BAD)
def test_each_bad_input_fails_with_its_cause(hostile, name):
    case_id, cause = hostile["expected"][name]
    record = records(hostile["root"] / "out")[case_id]
    assert record["status"] == "failed"
    assert re.search(cause, record["error"]), record["error"]


def test_the_list_of_bad_inputs_is_whole(hostile):
    assert sorted(hostile["expected"]) == sorted(BAD)


def test_a_study_exported_twice_in_part_is_read_once(hostile):
    record = records(hostile["root"] / "out")[hostile["resent"]]
    assert record["status"] == "ok"
    assert {"type": "duplicate_instances_dropped", "count": 3} in record["geometry_corrections"]


def test_a_study_whose_second_copy_was_cut_short_is_segmented_whole(hostile):
    record = records(hostile["root"] / "out")[hostile["cut_short"]]
    assert record["status"] == "ok", record.get("error")
    broken = [w for w in record["warnings"] if w.startswith("broken copy left out")]
    assert len(broken) == 4 and all("cut_short_again" in w for w in broken), record["warnings"]


def test_no_log_line_names_an_input_path(hostile):
    output = hostile["result"].stdout + hostile["result"].stderr
    inbox = str(hostile["inbox"])
    assert inbox not in output and "IM0" not in output and ".nii.gz" not in output, output[-3000:]

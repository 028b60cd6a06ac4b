"""Checks of written DICOM objects by independent tools: dicom3tools' ``dciodvfy`` (the IOD and its
templates), dcmqi's ``tid1500reader`` (the reference reader of TID 1500 measurement reports) and
highdicom's SR parser."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def dciodvfy_errors(path) -> list[str]:
    """The ``Error`` lines ``dciodvfy`` prints for ``path`` (skips the test without dicom3tools)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (make system-deps)")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def tid1500reader(path, tmp_path) -> dict:
    """dcmqi's reading of a measurement report: tracking identifier -> ``{"segment": number or None,
    "tracking_uid", <quantity meaning>: (value, unit code)}``."""
    reader = Path(sys.executable).parent / "tid1500reader"
    if not reader.exists():
        pytest.skip("dcmqi not installed in this environment (make test installs it)")
    out = Path(tmp_path) / f"{Path(path).stem}-tid1500.json"
    result = subprocess.run([str(reader), "--inputDICOM", str(path), "--outputMetadata", str(out)],
                            capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    read = {}
    for group in json.loads(out.read_text())["Measurements"]:
        items = {i["quantity"]["CodeMeaning"]: (float(i["value"]), i["units"]["CodeValue"]) for i in group["measurementItems"]}
        read[group["TrackingIdentifier"]] = {"segment": group.get("ReferencedSegment"),
                                             "tracking_uid": group["TrackingUniqueIdentifier"], **items}
    return read


def highdicom_groups(path) -> dict:
    """highdicom's reading: tracking identifier -> ``{"segment": number or None, "seg_uid",
    "tracking_uid", <measurement meaning>: value}`` for every measurement group."""
    import highdicom as hd

    report = hd.sr.srread(path).content
    read = {}
    for group in report.get_volumetric_roi_measurement_groups():
        segment = group.referenced_segment
        read[group.tracking_identifier] = {
            "segment": segment.referenced_segment_numbers[0], "seg_uid": segment.referenced_sop_instance_uid,
            "tracking_uid": group.tracking_uid, **{m.name.meaning: m.value for m in group.get_measurements()}}
    for group in report.get_image_measurement_groups():
        read[group.tracking_identifier] = {"segment": None, "seg_uid": None, "tracking_uid": group.tracking_uid,
                                           **{m.name.meaning: m.value for m in group.get_measurements()}}
        read[group.tracking_identifier] |= {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}
    for group in report.get_planar_roi_measurement_groups():  # RANO's diameters, on a polyline in patient space
        read[group.tracking_identifier] = {"segment": None, "seg_uid": None, "tracking_uid": group.tracking_uid,
                                           **{m.name.meaning: m.value for m in group.get_measurements()},
                                           **{e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()},
                                           "region": group.roi.value if group.roi is not None else None,
                                           "source": _region_source(group.roi)}
    return read


def _region_source(region) -> str | None:
    """The SOP instance UID of the image a 2D region (SCOORD) is drawn on; None for a 3D one."""
    if region is None or "ContentSequence" not in region:
        return None
    return str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def assert_report_matches_record(case_dir, record: dict, regions: dict | None = None, tmp_path=None) -> None:
    """``sr.dcm`` of a batch case states what ``record.json`` says, read by highdicom and by dcmqi,
    each group referencing the segment of ``seg.dcm`` it names; both files pass ``dciodvfy``."""
    import pydicom

    case_dir = Path(case_dir)
    seg = pydicom.dcmread(case_dir / "seg.dcm")
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    expected = {name: {"Volume": volume} for name, volume in record["volumes_ml"].items()}
    expected |= {name: {"Volume": volume} for name, volume in (record.get("regions_ml") or {}).items()}
    for number, lesion in enumerate(record["lesions"], start=1):
        expected[f"lesion {number}"] = {"Volume": lesion["volume_ml"], "Diameter": lesion["diameter_mm"]}
    expected["lesions"] = {"Number of lesions (observable entity)": record["lesion_count"]}
    comparison = record.get("comparison")
    if comparison:  # the change since the prior study, in the same groups

        def change(entry: dict) -> dict:
            out = {"Volume change since prior study": entry["change_ml"]}
            if entry["change_pct"] is not None:
                out["Volume change since prior study in percent"] = entry["change_pct"]
            return out

        for field in ("volumes_ml", "regions_ml"):
            for name, entry in (comparison.get(field) or {}).items():
                expected[name] |= change(entry)
        for lesion in comparison["lesions"]:
            if lesion["status"] != "new":
                expected[f"lesion {lesion['lesion']}"] |= change(lesion)
        expected["lesions"] |= {"Interval since prior study": comparison["interval_days"],
                                "Number of new lesions since prior study": comparison["lesion_count"]["new"],
                                "Number of lesions gone since prior study": comparison["lesion_count"]["gone"]}
    rano = record.get("rano")
    if rano:  # RANO's lesions (two diameters each) and its sum, the category against earlier studies
        for lesion in rano["lesions"]:
            expected[f"RANO lesion {lesion['lesion']}"] = {"Long Axis": (lesion["longest_mm"], 0.005),
                                                           "Short Axis": (lesion["perpendicular_mm"], 0.005)}
        expected["RANO"] = {"Sum of products of perpendicular diameters (RANO)": (rano["sum_mm2"], 0.05)}
    read = highdicom_groups(case_dir / "sr.dcm")
    assert set(read) == set(expected)
    by_dcmqi = tid1500reader(case_dir / "sr.dcm", tmp_path or case_dir.parent)
    assert set(by_dcmqi) == set(expected)
    for name, values in expected.items():
        for quantity, value in values.items():
            value, within = value if isinstance(value, tuple) else (value, 1e-6)  # the record rounds RANO's figures
            assert read[name][quantity] == pytest.approx(value, abs=within), (name, quantity)
            assert by_dcmqi[name][quantity][0] == pytest.approx(value, abs=within), (name, quantity)
        assert by_dcmqi[name]["tracking_uid"] == read[name]["tracking_uid"]
        if name.startswith("RANO"):
            _assert_rano_group(name, read[name], rano, seg, case_dir / "mask.nii.gz")
            continue
        if name == "lesions":
            continue
        segment = segments[read[name]["segment"]]
        assert read[name]["seg_uid"] == seg.SOPInstanceUID and by_dcmqi[name]["segment"] == read[name]["segment"]
        label_of_region = (regions or {}).get(name)
        if label_of_region is not None and len(label_of_region) == 1:  # a region of one label: that label's segment
            assert segment.TrackingUID != read[name]["tracking_uid"]
        else:  # the segment of that name, the same finding
            assert segment.SegmentLabel == name and segment.TrackingUID == read[name]["tracking_uid"]
    for path in (case_dir / "seg.dcm", case_dir / "sr.dcm"):
        errors = dciodvfy_errors(path)
        assert not errors, f"{path}: {errors}"


def _assert_rano_group(name: str, group: dict, rano: dict, seg, mask) -> None:
    """A RANO lesion's role and the diameter it draws: on a source image of the SEG (DICOM input), in
    that image's pixel coordinates, its ends where the record's are in patient space (within half a
    voxel) and as long as stated; else in patient coordinates, as long as stated. The sum's group and
    the category against earlier studies."""
    import nibabel as nib

    if name == "RANO":
        category = (rano.get("response") or {}).get("category")
        meanings = {"CR": "Complete response", "PR": "Partial response", "SD": "Stable disease", "PD": "Progressive disease"}
        assert group.get("Response assessment (RANO), automated and unconfirmed") == meanings.get(category)
        return
    lesion = next(x for x in rano["lesions"] if f"RANO lesion {x['lesion']}" == name)
    assert group["RANO lesion role"] == ("Target lesion" if lesion["lesion"] in rano["targets"] else "Non-target lesion")
    ends = np.asarray(group["region"], dtype=float)
    if group["source"] is None:
        assert ends.shape == (2, 3) and np.linalg.norm(ends[1] - ends[0]) == pytest.approx(lesion["longest_mm"], abs=0.01)
        return
    frames = {str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID):
              np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float) for f in seg.PerFrameFunctionalGroupsSequence}
    assert ends.shape == (2, 2) and group["source"] in frames  # drawn on a source image of the SEG
    shared = seg.SharedFunctionalGroupsSequence[0]
    along_row, along_column = np.split(np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float), 2)
    row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    lps = frames[group["source"]] + np.outer(ends[:, 0] - 0.5, along_row * column_spacing) \
        + np.outer(ends[:, 1] - 0.5, along_column * row_spacing)
    assert np.linalg.norm(lps[1] - lps[0]) == pytest.approx(lesion["longest_mm"], abs=0.01)
    affine = nib.load(mask).affine
    axis = lesion.get("axis", int(np.argmax(np.abs(affine[2, :3]) / np.linalg.norm(affine[:3, :3], axis=0))))
    voxels = np.zeros((2, 3))
    voxels[:, axis] = lesion["slice"]
    voxels[:, [a for a in range(3) if a != axis]] = np.asarray(lesion["ends_voxel"][0], float)
    ras = voxels @ affine[:3, :3].T + affine[:3, 3]
    half_voxel = np.linalg.norm(affine[:3, :3], axis=0).max() / 2
    assert np.abs(ras * [-1, -1, 1] - lps).max() <= half_voxel, (ras, lps)


def assert_seg_reads_back_as_mask(case_dir, regions: dict | None = None, tmp_path=None) -> None:
    """dcmqi's ``segimage2itkimage`` (the reference SEG reader) reads ``seg.dcm`` of a batch case
    back, onto the source slices, as ``mask.nii.gz``: each label's segment holds exactly that label's
    voxels, each region's segment the union of its labels, each lesion's lies within the lesion labels."""
    import nibabel as nib
    import numpy as np

    from pipelines.io.writers import resample_labels

    reader = Path(sys.executable).parent / "segimage2itkimage"
    if not reader.exists():
        pytest.skip("dcmqi not installed in this environment (make test installs it)")
    case_dir = Path(case_dir)
    out = Path(tmp_path or case_dir.parent) / f"{case_dir.name}-dcmqi"
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([str(reader), "--inputDICOM", str(case_dir / "seg.dcm"), "--outputDirectory", str(out),
                             "--outputType", "nifti"], capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    mask_image = nib.load(case_dir / "mask.nii.gz")
    mask = np.asarray(mask_image.dataobj)
    attributes = json.loads((out / "meta.json").read_text())["segmentAttributes"]
    names = {a["labelID"]: a["SegmentLabel"] for group in attributes for a in group}
    record = json.loads((case_dir / "record.json").read_text())
    labels = {name: value for value, name in enumerate(record["volumes_ml"], start=1)}  # values 1..n, as the bundles number them
    for number, name in names.items():
        image = nib.load(out / f"{number}.nii.gz")
        read = np.asarray(image.dataobj) > 0
        ours = resample_labels(mask, mask_image.affine, read.shape, image.affine)
        if name in labels:
            expected = ours == labels[name]
        elif name in (regions or {}):
            expected = np.isin(ours, regions[name])
        else:  # a lesion
            assert name.startswith("lesion ") and read.any(), name
            continue
        assert np.array_equal(read, expected), (name, int(read.sum()), int(expected.sum()))
        assert int(read.sum()) == int(np.isin(mask, [labels[name]] if name in labels else regions[name]).sum()), name

"""The TID 1500 measurement report and the SEG segments it references: checked by dciodvfy, read
back by dcmqi's tid1500reader and by highdicom; stable tracking UIDs; segments that overlap."""

from __future__ import annotations

from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pipelines.batch.measures import lesion_map, lesion_measurements, region_volumes
from pipelines.io import dicom_references, load_volume
from pipelines.io.dicom_seg import RegionSegment, SegmentCode, tracking_uid, write_dicom_seg
from pipelines.io.dicom_sr import Lesion, Measures, write_measurement_report
from pipelines.io.writers import labels_on_source_slices
from tests.dicom_checks import assert_report_matches_record, dciodvfy_errors, highdicom_groups, tid1500reader
from tests.io.dicom_factory import SeriesSpec, write_series

CATEGORY = ("49755003", "SCT", "Morphologically Altered Structure")
SEGMENTS = [SegmentCode(1, "necrotic core", CATEGORY, ("6574001", "SCT", "Necrosis")),
            SegmentCode(2, "edema", CATEGORY, ("79654002", "SCT", "Edema")),
            SegmentCode(3, "enhancing tumor", CATEGORY, ("108369006", "SCT", "Neoplasm"))]
NAMES = {s.label: s.name for s in SEGMENTS}
REGIONS = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}


def _two_tumors(shape) -> np.ndarray:
    """Two tumor cores (rim 3 around core 1, the second rim only) in one edema (2)."""
    index = np.indices(shape).astype(float)
    labels = np.zeros(shape, np.uint8)
    for centre, radius, core in (((6, 7, 5), 4.0, True), ((18, 9, 6), 3.0, False)):
        distance = np.sqrt(sum((index[a] - centre[a]) ** 2 for a in range(3)))
        labels[(distance <= radius + 2.5) & (labels == 0)] = 2
        labels[distance <= radius] = 3
        if core:
            labels[distance <= radius - 2] = 1
    return labels


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A case as the batch job writes it: SEG with region and lesion segments, SR, and the record."""
    root = tmp_path_factory.mktemp("sr")
    write_series(root / "mr", SeriesSpec(rows=20, columns=26, pixel_spacing=(1.0, 1.0),
                                          slice_positions=[1.5 * k for k in range(12)], modality="MR"))
    volume = load_volume(root / "mr")
    labels = _two_tumors(volume.shape[1:])
    affine = volume.affine.numpy()
    lesions = lesion_map(labels, [1, 3])
    record = lesion_measurements(labels, affine, NAMES, [1, 3], lesions)
    record["regions_ml"] = region_volumes(labels, affine, REGIONS)
    case_dir = root / "case"
    case_dir.mkdir()
    key = "a" * 64
    write_dicom_seg(labels, volume.meta, SEGMENTS, case_dir / "seg.dcm", "brain", "0.1.0", omit_empty_frames=True,
                    regions=[RegionSegment("WT", (1, 2, 3)), RegionSegment("TC", (1, 3))],
                    lesions=(lesions[0], len(record["lesions"])), tracking_key=key)
    measures = Measures({v: record["volumes_ml"][n] for v, n in NAMES.items()}, record["regions_ml"], REGIONS,
                        [Lesion(x["volume_ml"], x["diameter_mm"]) for x in record["lesions"]], record["lesion_count"])
    write_measurement_report(case_dir / "sr.dcm", case_dir / "seg.dcm", measures, "brain", "0.1.0", "f" * 64, key)
    return SimpleNamespace(volume=volume, labels=labels, lesions=lesions, record=record, case_dir=case_dir,
                           measures=measures, key=key)


def test_the_report_states_the_record_for_every_reader(case, tmp_path):
    assert case.record["lesion_count"] == 2 and len(case.record["lesions"]) == 2  # one edema, two tumor cores
    assert_report_matches_record(case.case_dir, case.record, REGIONS, tmp_path)


def test_segments_overlap_as_regions_and_lesions_do(case):
    """Each segment's frames hold exactly its voxels on the source slices: the labels, the regions
    (unions of labels) and each lesion (a connected tumor core, the largest first)."""
    seg = hd.seg.segread(case.case_dir / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        "necrotic core", "edema", "enhancing tumor", "WT", "TC", "lesion 1", "lesion 2"]
    geometry = dicom_references(case.volume.meta)["source_geometry"]
    frames = labels_on_source_slices(case.labels, case.volume.affine.numpy(), geometry)
    lesion_frames = labels_on_source_slices(case.lesions[0], case.volume.affine.numpy(), geometry)
    expected = [frames == 1, frames == 2, frames == 3, np.isin(frames, [1, 2, 3]), np.isin(frames, [1, 3]),
                lesion_frames == 1, lesion_frames == 2]
    uids = [dicom_references(case.volume.meta)["sop_instance_uids"][k] for k in range(len(frames))]
    for number, mask in enumerate(expected, start=1):
        read = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[number],
                                                 ignore_spatial_locations=True)[..., 0]
        assert np.array_equal(read.astype(bool), mask), seg.SegmentSequence[number - 1].SegmentLabel
    assert (lesion_frames == 1).sum() > (lesion_frames == 2).sum() > 0
    assert seg.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99UNETP"


def test_tracking_uids_are_the_same_on_a_rerun(case, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    write_dicom_seg(case.labels, case.volume.meta, SEGMENTS, again / "seg.dcm", "brain", "0.1.0", omit_empty_frames=True,
                    regions=[RegionSegment("WT", (1, 2, 3)), RegionSegment("TC", (1, 3))],
                    lesions=(case.lesions[0], 2), tracking_key=case.key)
    write_measurement_report(again / "sr.dcm", again / "seg.dcm", case.measures, "brain", "0.1.0", "f" * 64, case.key)
    first, second = highdicom_groups(case.case_dir / "sr.dcm"), highdicom_groups(again / "sr.dcm")
    assert {k: v["tracking_uid"] for k, v in first.items()} == {k: v["tracking_uid"] for k, v in second.items()}
    assert first["lesion 1"]["tracking_uid"] == tracking_uid(case.key, "lesion", 1)
    assert first["lesion 1"]["seg_uid"] != second["lesion 1"]["seg_uid"]  # new instances, the same findings
    assert len({v["tracking_uid"] for v in first.values()}) == len(first)


def test_the_report_identifies_the_algorithm_and_the_source(case):
    sr = hd.sr.srread(case.case_dir / "sr.dcm")
    seg = hd.seg.segread(case.case_dir / "seg.dcm")
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.PatientID == seg.PatientID
    assert sr.CompletionFlag == "COMPLETE" and sr.Modality == "SR"
    group = sr.content.get_volumetric_roi_measurement_groups(tracking_uid=tracking_uid(case.key, "label", 2))[0]
    series = group.referenced_segment.source_series_for_segmentation.value
    source = pydicom.dcmread(dicom_references(case.volume.meta)["source_files"][0], stop_before_pixels=True)
    assert series == seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    texts = []

    def walk(dataset) -> None:
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value:
                    walk(item)
            elif element.keyword == "TextValue":
                texts.append(element.value)

    walk(sr)
    assert "weights sha256 " + "f" * 64 in texts and "brain" in texts and "0.1.0" in texts


def test_a_seg_of_another_input_is_refused(case, tmp_path):
    with pytest.raises(ValueError, match=r"seg\.dcm: no segment for label 1 .* same tracking key"):
        write_measurement_report(tmp_path / "sr.dcm", case.case_dir / "seg.dcm", case.measures, "brain", "0.1.0", "f" * 64, "b" * 64)
    assert not (tmp_path / "sr.dcm").exists()


def test_checks_catch_a_report_that_disagrees(case, tmp_path):
    """The read-back compares values: a report written from other numbers fails it."""
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "seg.dcm").write_bytes((case.case_dir / "seg.dcm").read_bytes())
    changed = Measures({**case.measures.volumes_ml, 2: case.measures.volumes_ml[2] + 0.5}, case.measures.regions_ml,
                       case.measures.region_labels, case.measures.lesions, case.measures.lesion_count)
    write_measurement_report(wrong / "sr.dcm", wrong / "seg.dcm", changed, "brain", "0.1.0", "f" * 64, case.key)
    with pytest.raises(AssertionError):
        assert_report_matches_record(wrong, case.record, REGIONS, tmp_path)
    assert not dciodvfy_errors(wrong / "sr.dcm")
    assert tid1500reader(wrong / "sr.dcm", tmp_path)["edema"]["Volume"][0] == pytest.approx(case.record["volumes_ml"]["edema"] + 0.5)


def test_a_comparison_with_the_prior_study_joins_the_groups(case, tmp_path):
    """With the change since the prior study: each label and region group states its change (mL,
    and percent unless the prior volume was 0), the matched lesion its change and status, the new
    one only its status; the count group the interval and the new and gone counts. Read back equal
    by highdicom and dcmqi; dciodvfy finds no error."""
    import shutil

    from pipelines.io.dicom_sr import Change, Comparison

    def entry(now: float, before: float) -> dict:
        return {"prior_ml": before, "now_ml": now, "change_ml": round(now - before, 3),
                "change_pct": round(100 * (now - before) / before, 1) if before else None}

    record = case.record
    volumes = {name: entry(v, v / 2) for name, v in record["volumes_ml"].items()}
    volumes["edema"] = entry(record["volumes_ml"]["edema"], 0.0)  # none before: no percent
    regions = {name: entry(v, v - 1.0) for name, v in record["regions_ml"].items()}
    lesions = [{"lesion": 1, "status": "matched", **entry(record["lesions"][0]["volume_ml"], 0.5)},
               {"lesion": 2, "status": "new", **entry(record["lesions"][1]["volume_ml"], 0.0)}]
    compared = {**record, "comparison": {"interval_days": 182, "volumes_ml": volumes, "regions_ml": regions,
                                         "lesion_count": {"prior": 2, "now": 2, "new": 1, "gone": 1},
                                         "lesions": lesions}}
    case_dir = tmp_path / "case"
    shutil.copytree(case.case_dir, case_dir)
    comparison = Comparison(
        182, {v: Change(volumes[n]["change_ml"], volumes[n]["change_pct"]) for v, n in NAMES.items()},
        {n: Change(e["change_ml"], e["change_pct"]) for n, e in regions.items()},
        [(e["status"], Change(e["change_ml"], e["change_pct"])) for e in lesions], new=1, gone=1)
    measures = Measures(case.measures.volumes_ml, case.measures.regions_ml, REGIONS, case.measures.lesions,
                        case.measures.lesion_count, comparison)
    write_measurement_report(case_dir / "sr.dcm", case_dir / "seg.dcm", measures, "brain", "0.1.0", "f" * 64, case.key)
    assert_report_matches_record(case_dir, compared, REGIONS, tmp_path)
    read = highdicom_groups(case_dir / "sr.dcm")
    assert "Volume change since prior study in percent" not in read["edema"]
    assert "Volume change since prior study" not in read["lesion 2"]  # new: nothing to change from
    status = {g.tracking_identifier: [e.value.meaning for e in g.get_qualitative_evaluations()
                                      if e.name.value == "LESSTATUS"]
              for g in hd.sr.srread(case_dir / "sr.dcm").content.get_volumetric_roi_measurement_groups()}
    assert status["lesion 1"] == ["Present in prior study"] and status["lesion 2"] == ["New since prior study"]
    assert status["WT"] == []
    scheme = pydicom.dcmread(case_dir / "sr.dcm").CodingSchemeIdentificationSequence[0]
    assert scheme.CodingSchemeDesignator == "99UNETP"


def test_rano_diameters_are_drawn_on_the_source_slice_they_lie_on(case, tmp_path):
    """A RANO lesion whose diameter lies on a source image is drawn there (SCOORD in that image's
    pixel coordinates, the image referenced and in the evidence); one between the images in patient
    coordinates (SCOORD3D). dciodvfy finds no error; dcmqi reads both."""
    import shutil

    from pipelines.io.dicom_sr import Bidimensional, Rano

    affine = case.volume.affine.numpy()

    def ras(*voxels):
        return [list(affine[:3, :3] @ np.asarray(v, float) + affine[:3, 3]) for v in voxels]

    rano = Rano([Bidimensional(1, 6.0, 4.0, ras((3, 7, 5), (9, 7, 5)), True),  # on slice 5
                 Bidimensional(2, 6.0, 3.0, ras((15, 9, 5.5), (21, 9, 5.5)), False)],  # between slices 5 and 6
                24.0, "PD")
    case_dir = tmp_path / "case"
    shutil.copytree(case.case_dir, case_dir)
    measures = Measures(case.measures.volumes_ml, case.measures.regions_ml, REGIONS, case.measures.lesions,
                        case.measures.lesion_count, rano=rano)
    write_measurement_report(case_dir / "sr.dcm", case_dir / "seg.dcm", measures, "brain", "0.1.0", "f" * 64, case.key)
    groups = {g.tracking_identifier: g.roi for g in hd.sr.srread(case_dir / "sr.dcm").content.get_planar_roi_measurement_groups()}
    on_slice, between = groups["RANO lesion 1"], groups["RANO lesion 2"]
    source = on_slice.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    slice_5 = sorted((case.case_dir.parent / "mr").glob("*.dcm"))[5]  # written in slice order
    assert source == pydicom.dcmread(slice_5).SOPInstanceUID
    assert np.allclose(on_slice.value, [[3.5, 7.5], [9.5, 7.5]])  # (column, row): x runs along the rows here
    assert np.asarray(between.value).shape == (2, 3) and "ContentSequence" not in between
    sr = pydicom.dcmread(case_dir / "sr.dcm")
    evidence = [i.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for i in series.ReferencedSOPSequence]
    assert source in evidence
    assert not dciodvfy_errors(case_dir / "sr.dcm")
    read = tid1500reader(case_dir / "sr.dcm", tmp_path)
    assert read["RANO lesion 1"]["Long Axis"][0] == 6.0 and read["RANO lesion 2"]["Short Axis"][0] == 3.0

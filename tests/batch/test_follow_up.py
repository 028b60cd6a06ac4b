"""The demo patient scanned twice (`make demo-data`: a lesion grown, a new one): the batch job
compares the follow-up with the baseline, in one run or with --prior, in the record, the SR and
the report (issue 21's acceptance: true changes within 5 %, the new lesion marked new)."""

from __future__ import annotations

import csv
import json
import logging
import re

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipelines.batch import run_batch
from pipelines.cli import main
from tests.batch.conftest import BUNDLE, DEMO, MANIFEST
from tests.dicom_checks import assert_report_matches_record
from tests.documented import assert_record_documented

pytestmark = pytest.mark.integration


def _entries() -> dict[str, dict]:
    if not (DEMO / "follow_up").is_dir():
        pytest.skip(f"demo data not written (run `make demo-data`): {DEMO}")
    return {e["case_id"]: e for e in json.loads(MANIFEST.read_text())["follow_up"]}


def _true_lesions_ml(entry: dict) -> list[float]:
    image = nib.load(DEMO / entry["lesions"])
    numbered = np.asarray(image.dataobj)
    voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
    return [float((numbered == i).sum() * voxel_ml) for i in range(1, int(numbered.max()) + 1)]


def _true_tumor_ml(entry: dict) -> float:
    image = nib.load(DEMO / entry["label"])
    return float((np.asarray(image.dataobj) == 1).sum() * abs(np.linalg.det(image.affine[:3, :3])) / 1000)


def _records(out) -> dict[str, dict]:
    """The run's records by the demo's study (told apart by their interval: the baseline has no prior)."""
    records = [json.loads(p.read_text()) for p in out.glob("*/record.json")]
    return {("fu_follow_up" if r.get("comparison") else "fu_baseline"): r for r in records}


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """Both studies in one folder tree, one run."""
    entries = _entries()
    out = tmp_path_factory.mktemp("follow_up") / "out"
    summary = run_batch(BUNDLE, DEMO / "follow_up" / "dicom", out, workers=0)
    assert summary.done == 2, summary
    return out, entries, _records(out)


def test_the_changes_are_the_true_ones_and_the_new_lesion_is_new(one_run):
    _, entries, records = one_run
    baseline, follow_up = records["fu_baseline"], records["fu_follow_up"]
    assert baseline["comparison"] is None and baseline["study"]["patient"] == follow_up["study"]["patient"]
    assert_record_documented(baseline)
    assert_record_documented(follow_up)
    comparison = follow_up["comparison"]
    assert comparison["prior_case"] == baseline["case_id"] and comparison["interval_days"] == 91
    assert comparison["registration"]["kept"] and 5 < comparison["registration"]["translation_mm"] < 12
    before, after = _true_lesions_ml(entries["fu_baseline"]), _true_lesions_ml(entries["fu_follow_up"])
    grown = next(lesion for lesion in comparison["lesions"] if lesion["status"] == "matched")
    new = [lesion for lesion in comparison["lesions"] if lesion["status"] == "new"]
    assert len(new) == 1 and comparison["lesion_count"] == {"prior": 1, "now": 2, "new": 1, "gone": 0}
    true_growth = after[0] - before[0]
    assert grown["change_ml"] == pytest.approx(true_growth, rel=0.05)
    assert grown["change_pct"] == pytest.approx(100 * true_growth / before[0], rel=0.05)
    assert new[0]["now_ml"] == pytest.approx(after[1], rel=0.05)
    tumor = comparison["volumes_ml"]["tumor"]
    true_tumor = _true_tumor_ml(entries["fu_follow_up"]) - _true_tumor_ml(entries["fu_baseline"])
    assert tumor["change_ml"] == pytest.approx(true_tumor, rel=0.05)
    assert tumor["prior_ml"] == baseline["volumes_ml"]["tumor"] and tumor["now_ml"] == follow_up["volumes_ml"]["tumor"]


def test_rano_reads_progression_with_its_reasons(one_run):
    """RANO on the demo patient: the baseline has one measurable enhancing lesion; at follow-up it has
    grown and a new measurable one appeared: progression, with both reasons, against the baseline
    (also the nadir). The sums are those of the true label maps within 15 %."""
    from pipelines.metrics.rano import measure_lesions, target_sum

    _, entries, records = one_run
    baseline, follow_up = records["fu_baseline"], records["fu_follow_up"]
    assert baseline["rano"]["targets"] == [1] and "response" not in baseline["rano"]
    response = follow_up["rano"]["response"]
    assert response["category"] == "PD" and response["new_measurable_lesions"] == 1
    assert response["rule"].startswith("1 new measurable enhancing lesion(s); sum of products")
    assert response["baseline_case"] == baseline["case_id"]
    assert response["baseline_sum_mm2"] == response["nadir_sum_mm2"] == baseline["rano"]["sum_mm2"]
    assert "not confirmed" in response["note"]
    for name, record in (("fu_baseline", baseline), ("fu_follow_up", follow_up)):
        truth = nib.load(DEMO / entries[name]["label"])
        _, true_sum = target_sum(measure_lesions(np.asarray(truth.dataobj) == 1, truth.affine))
        assert record["rano"]["sum_mm2"] == pytest.approx(true_sum, rel=0.15), name
    volumetric = response["volumetric"]  # RANO 2.0's volumes: the enhancing label, tumor
    assert volumetric["category"] == "PD" and "over the smallest earlier volume" in volumetric["rule"]
    assert (volumetric["baseline_ml"], volumetric["now_ml"]) == (baseline["volumes_ml"]["tumor"],
                                                                  follow_up["volumes_ml"]["tumor"])
    assert volumetric["change_from_baseline_pct"] == follow_up["comparison"]["volumes_ml"]["tumor"]["change_pct"]


def test_the_non_enhancing_disease_is_measured_as_rano_lgg_reads_it(one_run):
    """The edema (the FLAIR hyperintensity), measured as the enhancing tumor is, within 15 % of the
    true label maps' sums; grown 86 % in volume by follow-up: progression against the baseline."""
    from pipelines.metrics.rano import measure_lesions, target_sum

    _, entries, records = one_run
    baseline, follow_up = records["fu_baseline"]["rano"], records["fu_follow_up"]["rano"]
    assert "response" not in baseline["non_enhancing"]
    now = follow_up["non_enhancing"]
    assert now["response"]["category"] == "PD" and now["response"]["nadir_sum_mm2"] == baseline["non_enhancing"]["sum_mm2"]
    assert now["response"]["rule"].startswith("sum of products") and "over the nadir" in now["response"]["rule"]
    for name, measured in (("fu_baseline", baseline), ("fu_follow_up", follow_up)):
        truth = nib.load(DEMO / entries[name]["label"])
        _, true_sum = target_sum(measure_lesions(np.asarray(truth.dataobj) == 2, truth.affine))
        assert measured["non_enhancing"]["sum_mm2"] == pytest.approx(true_sum, rel=0.15), name
        assert measured["non_enhancing"]["sum_mm2"] > measured["sum_mm2"]  # the edema surrounds the tumor


def test_the_outputs_keep_the_patient_and_dates_only_as_hashes(one_run):
    out, _, records = one_run
    texts = [p.read_text() for p in (*out.glob("*/record.json"), out / "report.csv", out / "report.html")]
    for secret in ("DEMO-FU-001", "20260105", "20260406", "2026-01-05", "2026-04-06"):
        assert not any(secret in text for text in texts), secret
    assert all("anatomy.nii.gz" in r["outputs"] for r in records.values())


def test_the_sr_carries_the_comparison(one_run, tmp_path):
    import highdicom as hd

    out, _, records = one_run
    follow_up = records["fu_follow_up"]
    assert_report_matches_record(out / follow_up["case_id"], follow_up, tmp_path=tmp_path)
    report = hd.sr.srread(out / follow_up["case_id"] / "sr.dcm").content
    status = {}
    for group in report.get_volumetric_roi_measurement_groups():
        for evaluation in group.get_qualitative_evaluations():
            if evaluation.name.meaning == "Lesion status since prior study":
                status[group.tracking_identifier] = evaluation.value.meaning
    expected = {f"lesion {lesion['lesion']}": "New since prior study" if lesion["status"] == "new"
                else "Present in prior study" for lesion in follow_up["comparison"]["lesions"]}
    assert status == expected and "New since prior study" in status.values()


def test_the_report_has_the_change_columns_and_the_patients_plot(one_run):
    out, _, records = one_run
    follow_up = records["fu_follow_up"]
    rows = {row["case_id"]: row for row in csv.DictReader((out / "report.csv").open())}
    row = rows[follow_up["case_id"]]
    assert float(row["tumor_change_ml"]) == follow_up["comparison"]["volumes_ml"]["tumor"]["change_ml"]
    assert row["new_lesions"] == "1" and row["interval_days"] == "91"
    assert rows[records["fu_baseline"]["case_id"]]["tumor_change_ml"] == ""
    assert (row["rano_category"], row["rano_rule"]) == ("PD", follow_up["rano"]["response"]["rule"])
    assert float(row["rano_sum_mm2"]) == follow_up["rano"]["sum_mm2"]
    assert rows[records["fu_baseline"]["case_id"]]["rano_category"] == ""  # nothing earlier to compare with
    page = (out / "report.html").read_text()
    assert page.count('<svg class="timeline"') == 1  # the follow-up's row: two studies
    plot = page[page.index('<svg class="timeline"'):page.index("</svg>")]
    assert f"day 91 ({follow_up['case_id']})" in plot and f"day 0 ({records['fu_baseline']['case_id']})" in plot
    assert plot.count("<polyline") == 2  # tumor and edema


@pytest.fixture
def cli_logging():
    """The command line sets up logging for its process: put back what the other tests expect."""
    package, root = logging.getLogger("pipelines"), logging.getLogger()
    saved = package.level, root.level, list(root.handlers)
    yield
    package.setLevel(saved[0])
    root.setLevel(saved[1])
    root.handlers[:] = saved[2]


@pytest.mark.usefixtures("cli_logging")
def test_prior_studies_from_an_earlier_run(one_run, tmp_path, capsys):
    """The baseline segmented last month into one folder, the follow-up tonight into another with
    --prior: the same comparison as in one run; without --prior, none."""
    _, _, records = one_run
    studies = DEMO / "follow_up" / "dicom"
    common = ["batch", "--bundle", str(BUNDLE), "--workers", "0", "--quiet"]
    assert main([*common, "--input", str(studies / "fu_baseline"), "--output", str(tmp_path / "january")]) == 0
    assert main([*common, "--input", str(studies / "fu_follow_up"), "--output", str(tmp_path / "april"),
                 "--prior", str(tmp_path / "january")]) == 0
    (april,) = [json.loads(p.read_text()) for p in (tmp_path / "april").glob("*/record.json")]
    comparison, same_run = april["comparison"], records["fu_follow_up"]["comparison"]
    assert comparison["prior_case"] == records["fu_baseline"]["case_id"]
    assert comparison["prior_output"] == str(tmp_path / "january" / comparison["prior_case"])
    for field in ("volumes_ml", "lesion_count", "lesions", "gone", "interval_days"):
        assert comparison[field] == same_run[field], field
    assert main([*common, "--input", str(studies / "fu_follow_up"), "--output", str(tmp_path / "alone")]) == 0
    (alone,) = [json.loads(p.read_text()) for p in (tmp_path / "alone").glob("*/record.json")]
    assert alone["comparison"] is None
    capsys.readouterr()
    assert main([*common, "--input", str(studies), "--output", str(tmp_path / "x"), "--prior", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err
    assert f"--prior {tmp_path / 'none'}: not a folder" in error


def test_the_report_with_changes_renders_in_chromium(one_run):
    from tests.batch.test_report import _chromium, _order

    out, _, records = one_run
    dom, console = _chromium(out / "report.html", "#sort=tumor_change_ml:desc")
    assert console == []
    assert 'data-loaded="no"' not in dom and dom.count("<circle") == 4  # two studies, two labels
    assert _order(dom)[0] == records["fu_follow_up"]["case_id"]  # the one with a change, empty cells last


def test_the_follow_up_case_page_shows_the_prior_beside_it_scrolling_together(one_run):
    """The follow-up's report at 1400 px without horizontal scrolling, its RANO category in the row; its
    case page in Chromium, offline: the prior study registered onto it in a second viewer whose slice
    follows the first's; the RANO category with its reason; a RANO lesion's link goes
    to the slice its diameters were measured on, drawn there; no console error, nothing fetched."""
    from tests.browser import browse, no_horizontal_scrolling, settled, viewer_ready

    out, _, records = one_run
    follow_up = records["fu_follow_up"]
    assert "index.html" in follow_up["outputs"]
    with browse(out / "report.html") as browsed:  # the report, on a laptop's screen
        assert no_horizontal_scrolling(browsed) and browsed.errors == [] and browsed.remote == []
        assert browsed.page.locator(f"tr#{follow_up['case_id']} td[data-column=rano_category]").inner_text() == "PD"
    with browse(out / follow_up["case_id"] / "index.html") as browsed:
        viewer_ready(browsed)
        page = browsed.page
        assert page.locator("#viewer-prior").is_visible()
        assert f"Prior study {follow_up['comparison']['prior_case']}, 91 days earlier" in page.inner_text("#prior-note")
        assert page.inner_text("#rano-response").startswith("PD: ")
        assert follow_up["rano"]["response"]["rule"] in page.inner_text("#rano-response")
        assert page.inner_text("#rano-volumetric").startswith("RANO 2.0 volumetric: PD: enhancing volume")
        assert page.inner_text("#rano-non-enhancing-response").startswith("PD: sum of products")
        assert re.fullmatch(r"voxel \d+, \d+, \d+ \((-?\d+\.\d, ){2}-?\d+\.\d mm RAS\)", page.inner_text("#viewer-status"))
        positions = "window.viewers.map(v => Array.from(v.nv.scene.crosshairPos))"
        now, prior = page.evaluate(positions)
        assert np.allclose(now, prior)  # the same point of both studies
        box = page.locator("#viewer-now").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.wheel(0, 300)
        settled(browsed)
        moved_now, moved_prior = page.evaluate(positions)
        assert not np.allclose(moved_now, now) and np.allclose(moved_now, moved_prior, atol=1e-3)  # linked
        page.locator("#rano a[data-goto]").first.click()
        drawn = settled(browsed)
        lesion = follow_up["rano"]["lesions"][0]
        assert page.evaluate("document.body.getAttribute('data-voxel')") is not None
        page.locator("#diameters").uncheck()
        assert np.any(settled(browsed) != drawn)  # the diameters were drawn on the slice gone to
        assert lesion["longest_mm"] >= 10 and browsed.errors == [] and browsed.remote == []


def test_nifti_studies_compared_by_their_manifest_entries(one_run, tmp_path):
    """Image files carry no patient: a manifest entry's ``patient`` and ``study_date`` stand in, so
    a research data set of NIfTI files gets the same comparison as the DICOM studies (and the Dice)."""
    _, _, records = one_run
    summary = run_batch(BUNDLE, MANIFEST, tmp_path / "out", section="follow_up", dataset_dir=DEMO,
                        image_key="image", workers=0)
    assert summary.done == 2
    by_id = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*/record.json")}
    assert set(by_id) == {"fu_baseline", "fu_follow_up"} and by_id["fu_baseline"]["comparison"] is None
    comparison, from_dicom = by_id["fu_follow_up"]["comparison"], records["fu_follow_up"]["comparison"]
    assert comparison["prior_case"] == "fu_baseline" and comparison["interval_days"] == 91
    assert [lesion["status"] for lesion in comparison["lesions"]] == [l["status"] for l in from_dicom["lesions"]]
    for lesion, dicom in zip(comparison["lesions"], from_dicom["lesions"]):
        assert lesion["change_ml"] == pytest.approx(dicom["change_ml"], rel=0.02)  # the same images, other files
    assert by_id["fu_follow_up"]["dice"]["tumor"] > 0.9
    texts = [p.read_text() for p in (tmp_path / "out").glob("*/record.json")]
    assert not any("DEMO-FU-001" in text or "20260406" in text for text in texts)


def test_a_damaged_prior_leaves_the_study_segmented_and_says_why(one_run, tmp_path):
    """The prior's anatomy was damaged on disk: the follow-up is segmented and reported as usual,
    its comparison names the file and what is wrong, and its SR has no comparison."""
    import shutil

    import highdicom as hd

    out, _, records = one_run
    prior = tmp_path / "prior"
    baseline = records["fu_baseline"]["case_id"]
    shutil.copytree(out / baseline, prior / baseline)
    (prior / baseline / "anatomy.nii.gz").write_bytes(b"\x1f\x8b not a NIfTI any more")
    summary = run_batch(BUNDLE, DEMO / "follow_up" / "dicom" / "fu_follow_up", tmp_path / "out", workers=0,
                        prior=[prior])
    assert summary.done == 1 and summary.failed == []
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*/record.json")]
    assert record["status"] == "ok" and record["comparison"]["prior_case"] == baseline
    assert "anatomy.nii.gz" in record["comparison"]["error"] and "lesions" not in record["comparison"]
    report = hd.sr.srread(tmp_path / "out" / record["case_id"] / "sr.dcm").content
    names = {m.name.meaning for g in report.get_volumetric_roi_measurement_groups() for m in g.get_measurements()}
    assert "Volume" in names and "Volume change since prior study" not in names
    row = next(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert row["prior_case"] == baseline and "anatomy.nii.gz" in row["comparison_error"]


def test_the_grown_lesion_keeps_its_tracking_uid_across_studies(one_run):
    """TID 1500's tracking UID follows a finding over time: the follow-up's lesion matched to the
    baseline's keeps that lesion's UID in its SEG segment and SR group; the new lesion has its own."""
    import highdicom as hd

    out, _, records = one_run

    def sr_uids(record: dict) -> dict[str, str]:
        report = hd.sr.srread(out / record["case_id"] / "sr.dcm").content
        return {g.tracking_identifier: str(g.tracking_uid) for g in report.get_volumetric_roi_measurement_groups()}

    baseline, follow_up = sr_uids(records["fu_baseline"]), sr_uids(records["fu_follow_up"])
    lesions = records["fu_follow_up"]["comparison"]["lesions"]
    grown = next(lesion for lesion in lesions if lesion["status"] == "matched")
    new = next(lesion for lesion in lesions if lesion["status"] == "new")
    assert grown["tracking_uid"] == baseline["lesion 1"] == follow_up[f"lesion {grown['lesion']}"]
    assert "tracking_uid" not in new and follow_up[f"lesion {new['lesion']}"] not in baseline.values()
    seg = pydicom.dcmread(out / records["fu_follow_up"]["case_id"] / "seg.dcm")
    by_label = {s.SegmentLabel: str(s.TrackingUID) for s in seg.SegmentSequence}
    assert by_label[f"lesion {grown['lesion']}"] == baseline["lesion 1"]


def test_a_study_compared_with_a_prior_is_another_instance(one_run, tmp_path):
    """The same follow-up written without a prior and with one holds other content: its SEG and SR
    get other SOP instance UIDs (an archive must not take them for the same instance); written
    again with the same prior, the same UIDs (one copy in the archive)."""
    out, _, records = one_run
    alone = tmp_path / "alone"
    assert run_batch(BUNDLE, DEMO / "follow_up" / "dicom" / "fu_follow_up", alone, workers=0).done == 1
    case = records["fu_follow_up"]["case_id"]
    again = tmp_path / "again"
    assert run_batch(BUNDLE, DEMO / "follow_up" / "dicom" / "fu_follow_up", again, workers=0, prior=[out]).done == 1
    for name in ("seg.dcm", "sr.dcm"):
        uids = [str(pydicom.dcmread(folder / case / name, stop_before_pixels=True).SOPInstanceUID)
                for folder in (out, alone, again)]
        assert uids[0] != uids[1] and uids[0] == uids[2], name

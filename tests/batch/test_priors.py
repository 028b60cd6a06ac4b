"""The change since the prior study: identities as keyed hashes, the anatomy kept for later studies,
registration between studies and lesion matching (pipelines.batch.priors)."""

from __future__ import annotations

import json
import stat

import nibabel as nib
import numpy as np
import pytest

from pipelines.batch.comparison import compare_with_prior
from pipelines.batch.measures import lesion_map, lesion_measurements, measure_volume
from pipelines.batch.priors import ANATOMY_FILE, SALT_ENV, PriorIndex, site_salt, study_identity, write_anatomy
from pipelines.demo.synthetic import load_template, make_follow_up
from pipelines.io import load_volume
from pipelines.io.writers import save_nifti

NAMES = {1: "tumor", 2: "edema"}


def test_identity_is_keyed_hashes_and_a_shifted_day():
    ids = {"patient_id": "PAT-0042", "study_date": "20260105"}
    a = study_identity(ids, "1.2.3", b"site A")
    later = study_identity({**ids, "study_date": "20260406"}, "1.2.4", b"site A")
    assert later["day"] - a["day"] == 91  # the interval survives the shift
    assert later["patient"] == a["patient"] and later["study"] != a["study"]
    other_site = study_identity(ids, "1.2.3", b"site B")
    assert other_site["patient"] != a["patient"] and other_site["day"] != a["day"]
    from datetime import date

    assert a["day"] != date(2026, 1, 5).toordinal()  # not the date itself
    assert "PAT-0042" not in str(a) and "20260105" not in str(a)
    assert study_identity({**ids, "patient_id": " "}, "1.2.3", b"s") is None
    assert study_identity({**ids, "study_date": "2026010"}, "1.2.3", b"s") is None
    assert study_identity({**ids, "study_date": "20261399"}, "1.2.3", b"s") is None


def test_site_salt_from_the_environment_or_a_private_file(tmp_path, monkeypatch):
    monkeypatch.setenv(SALT_ENV, "from the environment")
    assert site_salt() == b"from the environment"
    monkeypatch.delenv(SALT_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    first = site_salt()
    path = tmp_path / "unet-pipelines" / "salt"
    assert len(first) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert site_salt() == first  # kept: later runs' hashes match


@pytest.mark.parametrize(("spacing", "values", "dtype"), [((0.7, 0.7, 1.0), "whole", np.int16),
                                                          ((2.4, 2.4, 3.0), "fraction", np.float32)])
def test_anatomy_is_the_image_at_about_2_mm(tmp_path, spacing, values, dtype):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (60, 50, 40)).astype(np.float32)
    if values == "fraction":
        image += 0.25
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-20, 10, 5)
    returned = write_anatomy(tmp_path / "a.nii.gz", image, affine)
    written = nib.load(tmp_path / "a.nii.gz")
    read_back = load_volume(tmp_path / "a.nii.gz")  # what a later study compares with: the same as returned
    np.testing.assert_array_equal(returned.numpy(), read_back.numpy())
    np.testing.assert_array_equal(np.asarray(returned.affine), np.asarray(read_back.affine))
    assert returned.dtype == read_back.dtype
    assert written.get_data_dtype() == dtype
    step = [max(1, int(np.floor(2.0 / s + 0.25))) for s in spacing]
    assert np.allclose(written.header.get_zooms(), np.asarray(spacing) * step)
    np.testing.assert_array_equal(np.asarray(written.dataobj), image[:: step[0], :: step[1], :: step[2]])
    np.testing.assert_allclose(written.affine[:3, 3], affine[:3, 3])  # voxel 0 stays where it was


@pytest.fixture(scope="module")
def patient():
    return make_follow_up(load_template(), 1003)


def _study(folder, case, day: int, case_id: str) -> dict:
    """An output folder of one study as the batch job leaves it (mask, anatomy, record)."""
    folder.mkdir(parents=True)
    save_nifti(case.label, case.affine, folder / "mask.nii.gz")
    write_anatomy(folder / ANATOMY_FILE, np.rint(case.image), case.affine)
    lesions = lesion_map(case.label, [1])
    record = {"case_id": case_id, "status": "ok", "study": {"patient": "p", "study": case_id, "day": day},
              "outputs": ["mask.nii.gz", ANATOMY_FILE], **lesion_measurements(case.label, case.affine, NAMES, [1], lesions)}
    return record


def _compare(tmp_path, now, before, now_day=100, before_day=9, prior_extra=None):
    record = _study(tmp_path / "now", now, now_day, "now")
    prior = _study(tmp_path / "before", before, before_day, "before")
    comparison = compare_with_prior(now.label, now.affine, measure_volume(now.label, now.affine, NAMES, [1]),
                                    record["study"], load_volume(tmp_path / "now" / ANATOMY_FILE), tmp_path / "before",
                                    {**prior, **(prior_extra or {})}, [1])
    return comparison.as_record(), record, prior


def _truth(case, numbered) -> list[float]:
    voxel_ml = abs(np.linalg.det(case.affine[:3, :3])) / 1000
    return [float((numbered == i).sum() * voxel_ml) for i in (1, 2)]


def test_a_grown_lesion_is_matched_and_a_new_one_is_new(tmp_path, patient):
    """The true label maps of the demo patient's two studies (the patient lies 7 mm and 4 degrees
    otherwise at follow-up): registration finds the movement, lesion 1 is matched with its growth,
    lesion 2 is new; the changes are the true ones."""
    comparison, record, prior = _compare(tmp_path, patient.follow_up, patient.baseline)
    # the registration maps a follow-up point to the baseline's: the inverse of the patient's movement
    expected = np.linalg.inv(patient.pose)
    matrix = np.asarray(comparison["registration"]["matrix"])
    centre = np.argwhere(patient.lesion_labels[1] == 1).mean(0)
    point = patient.follow_up.affine @ np.append(centre, 1.0)
    assert np.linalg.norm((matrix @ point - expected @ point)[:3]) < 1.5
    assert comparison["registration"]["kept"] and comparison["interval_days"] == 91
    before, after = _truth(patient.baseline, patient.lesion_labels[0]), _truth(patient.follow_up, patient.lesion_labels[1])
    grown, new = sorted(comparison["lesions"], key=lambda lesion: lesion["status"])
    assert grown["status"] == "matched" and grown["prior_lesions"] == [1]
    assert grown["change_ml"] == pytest.approx(after[0] - before[0], abs=0.01)
    assert grown["change_pct"] == pytest.approx(100 * (after[0] / before[0] - 1), abs=0.1)
    assert new["status"] == "new" and new["prior_lesions"] == [] and new["change_pct"] is None
    assert new["now_ml"] == pytest.approx(after[1], abs=0.01)
    assert comparison["lesion_count"] == {"prior": 1, "now": 2, "new": 1, "gone": 0} and comparison["gone"] == []
    tumor = comparison["volumes_ml"]["tumor"]
    assert tumor["prior_ml"] == prior["volumes_ml"]["tumor"] and tumor["now_ml"] == record["volumes_ml"]["tumor"]
    assert tumor["change_ml"] == pytest.approx(sum(after) - before[0], abs=0.01)


def test_a_lesion_no_longer_there_is_gone(tmp_path, patient):
    """Read backwards in time, the new lesion is gone and the grown one has shrunk."""
    comparison, _, _ = _compare(tmp_path, patient.baseline, patient.follow_up)
    before = _truth(patient.follow_up, patient.lesion_labels[1])
    (shrunk,) = comparison["lesions"]
    assert shrunk["status"] == "matched" and shrunk["change_ml"] < 0
    assert comparison["lesion_count"]["gone"] == 1
    (gone,) = comparison["gone"]
    assert gone["prior_ml"] == pytest.approx(before[1], abs=0.01)


def test_without_registration_the_lesions_would_be_misplaced(tmp_path, patient):
    """The comparison depends on the registration: the baseline's lesion carried by patient
    coordinates alone (the identity) lands several mm off the follow-up's (grown about its centre),
    the registered one on it."""
    from pipelines.batch.comparison import carry

    now, before = patient.follow_up, patient.baseline
    numbered = patient.lesion_labels[0]
    centre = np.argwhere(patient.lesion_labels[1] == 1).mean(0)
    off = {}
    for name, matrix in (("identity", np.eye(4)), ("registered", np.linalg.inv(patient.pose))):
        carried = carry(numbered, before.affine, now.label.shape, now.affine, matrix)
        off[name] = np.linalg.norm(now.affine[:3, :3] @ (np.argwhere(carried == 1).mean(0) - centre))
    assert off["registered"] < 1.0 and off["identity"] > 5.0


def test_the_index_finds_the_latest_earlier_study_of_the_patient(tmp_path, patient):
    prior_run, run = tmp_path / "prior_run", tmp_path / "run"
    records = {}
    for folder, case_id, day in ((prior_run, "old", 10), (prior_run, "older", 5), (run, "same_day", 50)):
        records[case_id] = _study(folder / case_id, patient.baseline, day, case_id)
        (folder / case_id / "record.json").write_text(json.dumps(records[case_id]))
    (run / "broken").mkdir()
    (run / "broken" / "record.json").write_text("{not json")
    index = PriorIndex(run, [prior_run])
    assert index.prior({"patient": "p", "day": 50}, run / "same_day")[1]["case_id"] == "old"
    assert index.prior({"patient": "p", "day": 5}, run / "x") is None
    assert index.prior({"patient": "q", "day": 99}, run / "x") is None
    # a case finished later in this run (e.g. by another rank) is found on the next look
    records["new"] = _study(run / "new", patient.baseline, 60, "new")
    (run / "new" / "record.json").write_text(json.dumps(records["new"]))
    assert index.prior({"patient": "p", "day": 70}, run / "y")[1]["case_id"] == "new"
    # a case folder made before its record is written (another rank at work): read when it is
    (run / "late").mkdir()
    assert index.prior({"patient": "p", "day": 70}, run / "y")[1]["case_id"] == "new"
    late = _study(tmp_path / "elsewhere", patient.baseline, 65, "late")  # the run's folder is not touched
    for name in ("mask.nii.gz", ANATOMY_FILE):
        (tmp_path / "elsewhere" / name).rename(run / "late" / name)
    (run / "late" / "record.json").write_text(json.dumps(late))
    assert index.prior({"patient": "p", "day": 70}, run / "y")[1]["case_id"] == "late"
    index.add(run / "late", {**late, "status": "failed"})
    # a failed study or one without its anatomy is not a prior
    index.add(run / "new", {**records["new"], "status": "failed"})
    assert index.prior({"patient": "p", "day": 70}, run / "y")[1]["case_id"] == "same_day"
    (run / "same_day" / ANATOMY_FILE).unlink()
    assert index.prior({"patient": "p", "day": 70}, run / "y")[1]["case_id"] == "old"
    # studies segmented by another bundle measure other labels: not priors for this one
    for name, bundle in (("old", "unet3d_brain_tumor"), ("older", "unet3d_tumor")):
        record = {**records[name], "model": {"name": bundle}}
        (prior_run / name / "record.json").write_text(json.dumps(record))
    tumor = PriorIndex(run, [prior_run], bundle="unet3d_tumor")
    assert tumor.prior({"patient": "p", "day": 50}, run / "same_day")[1]["case_id"] == "older"
    assert load_volume(prior_run / "old" / ANATOMY_FILE).shape[0] == 1


def test_a_matched_lesion_takes_the_tracking_uid_its_prior_carried(tmp_path, patient):
    """Tracking UIDs chain over studies: a lesion takes its prior's own UID (from the prior's input
    hash), or the one the prior kept from its own prior; a record without input hash gives none."""
    from pipelines.batch.comparison import _lesion_uid
    from pipelines.io.dicom_seg import tracking_uid

    assert _lesion_uid({"input_hash": "h1"}, 2) == tracking_uid("h1", "lesion", 2)
    assert _lesion_uid({"input_hash": "h1", "lesion_uids": {2: "1.2.3"}}, 2) == "1.2.3"
    assert _lesion_uid({}, 1) is None
    comparison, _, _ = _compare(tmp_path, patient.follow_up, patient.baseline,
                                prior_extra={"input_hash": "b", "lesion_uids": {1: "9.8.7"}})
    uids = {lesion["status"]: lesion.get("tracking_uid") for lesion in comparison["lesions"]}
    assert uids == {"matched": "9.8.7", "new": None}

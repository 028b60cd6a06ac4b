"""DICOMweb in and out, against a real Orthanc with its DICOMweb plugin on 127.0.0.1."""

from __future__ import annotations

import json
import urllib.request

import highdicom as hd
import pytest

from pipelines.batch import BatchInputError, discover_cases, pseudonym, run_batch
from pipelines.batch.remote.retry import RetryPolicy
from pipelines.io import SeriesRules
from tests import servers
from tests.batch.conftest import BUNDLE, DEMO, case_dirs, demo_case

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc with DICOMweb on 127.0.0.1, two demo studies uploaded; yields (DICOMweb URL, their entries)."""
    entries = [demo_case("test", 0), demo_case("test", 1)]
    with servers.orthanc(tmp_path_factory.mktemp("orthanc"), [DEMO / e["dicom"] for e in entries]) as url:
        yield url, entries


def _qido(url: str, path: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/{path}", timeout=30) as response:
        return json.loads(response.read() or b"[]")


def test_studies_from_dicomweb_segmented_and_pushed_back(orthanc, tmp_path):
    url, _ = orthanc
    cases = discover_cases(url, {"image": SeriesRules()})
    assert [c.kind for c in cases] == ["dicomweb", "dicomweb"]
    out = tmp_path / "out"
    summary = run_batch(BUNDLE, url, out, workers=1, push=True, rtstruct=True)
    assert (summary.done, summary.failed, summary.exit_code) == (2, [], 0)
    for case in cases:
        record = json.loads((out / case.case_id / "record.json").read_text())
        assert record["status"] == "ok" and record["source"]["kind"] == "dicomweb"
        assert record["retries"] == {"fetch": 0, "push": 0}
        assert record["pushed"]["url"] == url and set(record["pushed"]) == {"url", "seg.dcm", "sr.dcm", "rtstruct.dcm"}
        seg_uid, sr_uid, rt_uid = (record["pushed"][name]["series_instance_uid"]
                                   for name in ("seg.dcm", "sr.dcm", "rtstruct.dcm"))
        series = _qido(url, f"studies/{case.study_uid}/series")
        modalities = {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in series}
        assert (modalities[seg_uid], modalities[sr_uid], modalities[rt_uid]) == ("SEG", "SR", "RTSTRUCT")
        assert len(modalities) == 4  # beside their source
        stored = _qido(url, f"studies/{case.study_uid}/series/{sr_uid}/instances")
        assert [i["00080018"]["Value"][0] for i in stored] == [record["pushed"]["sr.dcm"]["sop_instance_uid"]]
        seg = hd.seg.segread(out / case.case_id / "seg.dcm")
        source_uid = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        assert modalities[source_uid] == "MR" and seg.StudyInstanceUID == case.study_uid
        assert case.case_id == pseudonym(case.study_uid)
    assert not (out / ".cache").exists()  # downloaded studies are not kept
    # the pushed SEGs are not new input: a rerun finds both studies complete
    again = run_batch(BUNDLE, url, out, workers=0, push=True, rtstruct=True)
    assert (again.skipped, again.done) == (2, 0)


def test_same_result_as_the_folder_input(orthanc, tmp_path):
    url, entries = orthanc
    folder = run_batch(BUNDLE, DEMO / entries[0]["dicom"], tmp_path / "folder", workers=0)
    web = run_batch(BUNDLE, url, tmp_path / "web", workers=0)
    assert folder.done == 1 and web.done == 2
    (case_dir,) = case_dirs(tmp_path / "folder")
    a = json.loads((case_dir / "record.json").read_text())
    b = json.loads((tmp_path / "web" / case_dir.name / "record.json").read_text())
    assert a["volumes_ml"] == b["volumes_ml"] and a["largest_lesion"] == b["largest_lesion"]


def test_unreachable_server_is_a_clear_error(tmp_path):
    url = f"http://127.0.0.1:{servers.free_port()}/dicom-web"
    with pytest.raises(BatchInputError, match=r"DICOMweb query .QIDO-RS. failed: .*\(gave up after 1 retry\)$"):
        run_batch(BUNDLE, url, tmp_path / "out", retry=RetryPolicy(retries=1, wait=0.01))
    with pytest.raises(BatchInputError, match=r"--push alone stores DICOM SEGs \(and SRs, RTSTRUCTs\) back to a DICOMweb or DICOM input"):
        run_batch(BUNDLE, DEMO, tmp_path / "out", push=True)

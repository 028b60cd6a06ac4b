"""DICOMweb in and out, against a real Orthanc with its DICOMweb plugin on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import highdicom as hd
import pytest

from pipelines.batch import BatchInputError, discover_cases, pseudonym, run_batch
from tests.batch.conftest import BUNDLE, DEMO, demo_case

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc with DICOMweb, HTTP only, refusing remote clients; two demo studies uploaded."""
    if not Path(_ORTHANC).exists() or not _PLUGIN.exists():
        pytest.skip("Orthanc and its DICOMweb plugin are not installed (Debian orthanc, orthanc-dicomweb: make system-deps)")
    root = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {
        "Name": "unet-pipelines-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "Plugins": [str(_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    process = subprocess.Popen([_ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/system", timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not start:\n{(root / 'orthanc.log').read_text()[-3000:]}")
                time.sleep(0.2)
        entries = [demo_case("test", 0), demo_case("test", 1)]
        for entry in entries:
            for file in sorted((DEMO / entry["dicom"]).glob("*.dcm")):
                request = urllib.request.Request(f"{base}/instances", data=file.read_bytes(), method="POST")
                urllib.request.urlopen(request, timeout=30).read()
        yield f"{base}/dicom-web", entries
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _qido(url: str, path: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/{path}", timeout=30) as response:
        return json.loads(response.read() or b"[]")


def test_studies_from_dicomweb_segmented_and_pushed_back(orthanc, tmp_path):
    url, entries = orthanc
    cases = discover_cases(url)
    assert [c.kind for c in cases] == ["dicomweb", "dicomweb"]
    out = tmp_path / "out"
    summary = run_batch(BUNDLE, url, out, workers=1, push=True)
    assert (summary.done, summary.failed, summary.exit_code) == (2, [], 0)
    for case in cases:
        record = json.loads((out / case.case_id / "record.json").read_text())
        assert record["status"] == "ok" and record["source"]["kind"] == "dicomweb"
        assert record["pushed"]["url"] == url
        seg_uid = record["pushed"]["series_instance_uid"]
        series = _qido(url, f"studies/{case.study_uid}/series")
        modalities = {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in series}
        assert modalities[seg_uid] == "SEG" and len(modalities) == 2  # the SEG sits beside its source
        seg = hd.seg.segread(out / case.case_id / "seg.dcm")
        source_uid = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        assert modalities[source_uid] == "MR" and seg.StudyInstanceUID == case.study_uid
        assert case.case_id == pseudonym(case.study_uid)
    assert not (out / ".cache").exists()  # downloaded studies are not kept
    # the pushed SEGs are not new input: a rerun finds both studies complete
    again = run_batch(BUNDLE, url, out, workers=0, push=True)
    assert (again.skipped, again.done) == (2, 0)


def test_same_result_as_the_folder_input(orthanc, tmp_path):
    url, entries = orthanc
    folder = run_batch(BUNDLE, DEMO / entries[0]["dicom"], tmp_path / "folder", workers=0)
    web = run_batch(BUNDLE, url, tmp_path / "web", workers=0)
    assert folder.done == 1 and web.done == 2
    (case_dir,) = [p for p in (tmp_path / "folder").iterdir() if p.is_dir()]
    a = json.loads((case_dir / "record.json").read_text())
    b = json.loads((tmp_path / "web" / case_dir.name / "record.json").read_text())
    assert a["volumes_ml"] == b["volumes_ml"] and a["largest_lesion"] == b["largest_lesion"]


def test_unreachable_server_is_a_clear_error(tmp_path):
    with pytest.raises(BatchInputError, match="DICOMweb query .QIDO-RS. failed"):
        run_batch(BUNDLE, f"http://127.0.0.1:{_free_port()}/dicom-web", tmp_path / "out")
    with pytest.raises(BatchInputError, match="--push stores DICOM SEGs back to a DICOMweb input"):
        run_batch(BUNDLE, DEMO, tmp_path / "out", push=True)

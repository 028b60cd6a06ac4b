"""DIMSE in and out: C-FIND and C-GET from a real Orthanc's DICOM port, C-STORE of SEG, SR and
RTSTRUCT back to it; a peer that refuses the association and one that drops mid-transfer."""

from __future__ import annotations

import json
import shutil
import sys
import threading

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipelines.batch import BatchInputError, RemoteQuery, pseudonym, run_batch
from pipelines.batch.remote.dimse import DimsePeer, find_studies
from pipelines.batch.remote.retry import RetryPolicy
from tests import servers
from tests.batch.conftest import BUNDLE, DEMO, case_dirs, copy_study, demo_case

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLI = [sys.executable, "-m", "pipelines", "batch", "--bundle", str(BUNDLE), "--workers", "0", "--quiet"]

# series of a study as a DICOM peer lists them (C-FIND, series level), run in Orthanc's namespace
_SERIES = """
import json, sys
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
ae = AE(ae_title="CHECKER")
ae.add_requested_context(FIND)
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title=sys.argv[2])
query = Dataset()
query.QueryRetrieveLevel, query.StudyInstanceUID = "SERIES", sys.argv[3]
query.SeriesInstanceUID, query.Modality, query.NumberOfSeriesRelatedInstances = "", "", ""
found = {str(a.SeriesInstanceUID): [str(a.Modality), int(a.NumberOfSeriesRelatedInstances)]
         for s, a in assoc.send_c_find(query, FIND) if s and s.Status in (0xFF00, 0xFF01)}
assoc.release()
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc (DIMSE and DICOMweb) holding two demo studies, in a network namespace of its own."""
    entries = [demo_case("test", 0), demo_case("test", 1)]
    with servers.orthanc_dimse(tmp_path_factory.mktemp("pacs"), [DEMO / e["dicom"] for e in entries]) as (dicom, _, ns):
        yield dicom, ns, entries


def _study_uid(entry: dict) -> str:
    return str(pydicom.dcmread(next((DEMO / entry["dicom"]).glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _series(ns, dicom: str, study_uid: str) -> dict:
    peer = DimsePeer.parse(dicom)
    return json.loads(ns.python(_SERIES, str(peer.port), peer.aet, study_uid))


def test_studies_found_fetched_segmented_and_stored_back(pacs, tmp_path):
    """The CLI as a radiology team runs it overnight against the PACS: the day's studies by C-FIND,
    each fetched by C-GET, segmented, and SEG, SR and RTSTRUCT stored back by C-STORE, where a C-FIND
    finds them under the source study; the same masks as from the studies' folders."""
    dicom, ns, entries = pacs
    out = tmp_path / "out"
    result = ns.run(*CLI, "--input", dicom, "--study-date", "20251231-20260102", "--push", "--rtstruct",
                    "--calling-aet", "OVERNIGHT", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 cases: 2 segmented" in result.stdout
    for entry in entries:
        uid = _study_uid(entry)
        case_dir = out / pseudonym(uid)
        record = json.loads((case_dir / "record.json").read_text())
        assert record["status"] == "ok" and record["source"]["kind"] == "dimse"
        assert record["source"]["path"] == f"{dicom}/studies/{uid}" and record["settings"]["push"] == dicom
        assert set(record["pushed"]) == {"url", "seg.dcm", "sr.dcm", "rtstruct.dcm"}
        series = _series(ns, dicom, uid)
        modalities = sorted(modality for modality, _ in series.values())
        assert modalities == ["MR", "RTSTRUCT", "SEG", "SR"]  # beside their source
        for name, modality in (("seg.dcm", "SEG"), ("sr.dcm", "SR"), ("rtstruct.dcm", "RTSTRUCT")):
            assert series[record["pushed"][name]["series_instance_uid"]] == [modality, 1]
        source = next(uid for uid, (modality, _) in series.items() if modality == "MR")
        assert pydicom.dcmread(case_dir / "seg.dcm").ReferencedSeriesSequence[0].SeriesInstanceUID == source
        folder = run_batch(BUNDLE, DEMO / entry["dicom"], tmp_path / "folder" / entry["case_id"], workers=0)
        assert folder.done == 1
        (folder_case,) = case_dirs(tmp_path / "folder" / entry["case_id"])
        assert np.array_equal(np.asarray(nib.load(folder_case / "mask.nii.gz").dataobj),
                              np.asarray(nib.load(case_dir / "mask.nii.gz").dataobj))
    assert not (out / ".cache").exists()  # fetched studies are not kept
    # a rerun: both complete; the stored results are not taken for new studies
    again = ns.run(*CLI, "--input", dicom, "--study-date", "20260101", "--push", "--rtstruct",
                   "--calling-aet", "OVERNIGHT", "--output", str(out))
    assert again.returncode == 0 and "2 already complete" in again.stdout, again.stdout + again.stderr[-2000:]


def test_one_study_by_its_uid(pacs, tmp_path):
    dicom, ns, entries = pacs
    uid = _study_uid(entries[1])
    result = ns.run(*CLI, "--input", dicom, "--study-uid", uid, "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in case_dirs(tmp_path / "out")] == [pseudonym(uid)]


def test_a_wrong_called_ae_title_is_refused_by_the_peer(pacs, tmp_path):
    dicom, ns, _ = pacs
    wrong = dicom.replace("ORTHANC@", "NOTORTHANC@")
    result = ns.run(*CLI, "--input", wrong, "--study-date", "20260101", "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert f"{wrong}: C-FIND: association rejected by the peer" in result.stderr
    assert "check the called AE title 'NOTORTHANC'" in result.stderr


def test_a_peer_needs_studies_named_and_valid_options():
    peer = DimsePeer.parse("dicom://PACS@127.0.0.1:104")
    assert (peer.aet, peer.host, peer.port, str(peer)) == ("PACS", "127.0.0.1", 104, "dicom://PACS@127.0.0.1:104")
    with pytest.raises(ValueError, match="a PACS-wide query is refused"):
        find_studies(peer, "ME")
    for bad in ("dicom://127.0.0.1:104", "dicom://PACS@host", "dicom://A_TITLE_OF_17_CHARS@h:104", "dicom://P@h:0"):
        with pytest.raises(ValueError):
            DimsePeer.parse(bad)
    with pytest.raises(BatchInputError, match="--study-date must be YYYYMMDD"):
        RemoteQuery(dates="2026-01-01")
    with pytest.raises(BatchInputError, match="--study-uid must be DICOM UIDs"):
        RemoteQuery(study_uids=("1.2.x",))
    with pytest.raises(BatchInputError, match="--calling-aet must be an AE title"):
        RemoteQuery(calling_aet="A\\B")


class FlakyStore:
    """A DICOM storage peer on 127.0.0.1 (pynetdicom): with ``drop`` set it stores the first
    instance of an association and aborts the association on the second; ``refuse`` rejects every
    association. Keeps what it stored (SOP instance UID -> modality)."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        self.drop, self.stored, self.calls = True, {}, 0
        self.lock = threading.Lock()
        ae = AE(ae_title="FLAKY")
        ae.supported_contexts = AllStoragePresentationContexts
        self.port = servers.free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_CONN_OPEN, self._open)])
        self.seen_in_association = 0

    def _open(self, event) -> None:
        self.seen_in_association = 0

    def _store(self, event) -> int:
        with self.lock:
            self.seen_in_association += 1
            if self.drop and self.seen_in_association == 2:
                event.assoc.abort()
                return 0xA700
            self.stored.setdefault(str(event.request.AffectedSOPInstanceUID), []).append(event.dataset.Modality)
            return 0x0000

    @property
    def url(self) -> str:
        return f"dicom://FLAKY@127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def flaky():
    peer = FlakyStore()
    yield peer
    peer.close()


def test_a_drop_mid_transfer_fails_the_case_and_a_rerun_stores_what_is_missing(flaky, tmp_path):
    """Every association dropped at its second file: the push is retried on a new one (the SEG stored
    again), then the case fails; once the peer holds, a rerun stores all three."""
    copy_study("test", 2, tmp_path / "in" / "study")
    out = tmp_path / "out"
    retry = RetryPolicy(retries=1, wait=0.01)
    first = run_batch(BUNDLE, tmp_path / "in", out, workers=0, push=flaky.url, rtstruct=True, retry=retry)
    assert first.failed and first.done == 0
    (case_dir,) = case_dirs(out)
    record = json.loads((case_dir / "record.json").read_text())
    assert record["status"] == "failed" and "pushed" not in record and record["retries"] == {"push": 1}
    assert record["error"] == (f"{flaky.url}: C-STORE of sr.dcm failed: the association was aborted (stored before "
                               f"it: seg.dcm) (gave up after 1 retry)")
    assert sorted(m for ms in flaky.stored.values() for m in ms) == ["SEG", "SEG"]  # only what really arrived
    flaky.drop = False
    second = run_batch(BUNDLE, tmp_path / "in", out, workers=0, push=flaky.url, rtstruct=True, retry=retry)
    assert second.done == 1 and not second.failed
    record = json.loads((case_dir / "record.json").read_text())
    pushed = {record["pushed"][name]["sop_instance_uid"] for name in ("seg.dcm", "sr.dcm", "rtstruct.dcm")}
    assert set(flaky.stored) == pushed  # the SEG stored again under its own UID: one copy, not two
    assert sorted(len(v) for v in flaky.stored.values()) == [1, 1, 3]


def test_a_peer_refusing_the_association_fails_each_case_and_the_run_goes_on(tmp_path):
    from pynetdicom import AE
    from pynetdicom.presentation import AllStoragePresentationContexts

    ae = AE(ae_title="PICKY")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.require_calling_aet = ["SOMEONEELSE"]
    port = servers.free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        for index in (0, 1):
            copy_study("test", index, tmp_path / "in" / f"study{index}")
        summary = run_batch(BUNDLE, tmp_path / "in", tmp_path / "out", workers=0, push=f"dicom://PICKY@127.0.0.1:{port}")
        assert len(summary.failed) == 2 and summary.exit_code == 1
        for record_path in (tmp_path / "out").glob("*/record.json"):
            error = json.loads(record_path.read_text())["error"]
            assert "C-STORE: association rejected by the peer" in error and "calling AE title 'UNETPIPELINES'" in error
    finally:
        server.shutdown()
    with pytest.raises(BatchInputError, match="a destination is a DICOMweb URL or dicom://AET@host:port"):
        run_batch(BUNDLE, tmp_path / "in", tmp_path / "out2", push="/some/folder")
    with pytest.raises(BatchInputError, match="--push alone stores"):
        run_batch(BUNDLE, tmp_path / "in", tmp_path / "out2", push=True)
    shutil.rmtree(tmp_path / "out2", ignore_errors=True)


# one study's series fetched by retrieve_study, run in Orthanc's namespace
_RETRIEVE = """
import sys
from pipelines.batch.remote.dimse import DimsePeer
from pipelines.batch.remote.dimse_get import retrieve_study
retrieve_study(DimsePeer.parse(sys.argv[1]), "CHECKER", sys.argv[2], [sys.argv[3]], sys.argv[4])
"""


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Orthanc holding the shared data's real MR slice in eight transfer syntaxes (one series)."""
    from tests.conftest import shared_data_dir

    folder = shared_data_dir() / "dicom_transfer_syntaxes"
    if not folder.is_dir():
        pytest.skip(f"shared data absent: {folder}")
    with servers.orthanc_dimse(tmp_path_factory.mktemp("archive"), [folder]) as (dicom, _, ns):
        yield dicom, ns, folder


def test_instances_come_as_the_archive_stores_them(archive, tmp_path):
    """An archive of compressed images (JPEG 2000, JPEG lossless, JPEG-LS, RLE, big endian): each
    instance arrives in its own transfer syntax, not decompressed by the archive, and decodes to
    the pixels of the original file."""
    dicom, ns, folder = archive
    originals = {}
    for path in sorted(folder.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        originals[str(dataset.SOPInstanceUID)] = dataset
    first = next(iter(originals.values()))
    ns.python(_RETRIEVE, dicom, str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(tmp_path / "got"),
              timeout=120)
    received = {str(d.SOPInstanceUID): d for d in map(pydicom.dcmread, sorted((tmp_path / "got").glob("*.dcm")))}
    assert set(received) == set(originals)
    syntaxes = {str(d.file_meta.TransferSyntaxUID) for d in originals.values()}
    assert len(syntaxes) >= 7  # what the check covers: uncompressed, big endian and five compressions
    little_endian = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # one context: either way uncompressed
    for uid, original in originals.items():
        stored, got = str(original.file_meta.TransferSyntaxUID), received[uid]
        if stored in little_endian:
            assert str(got.file_meta.TransferSyntaxUID) in little_endian
        else:
            assert got.file_meta.TransferSyntaxUID == stored, original.file_meta.TransferSyntaxUID.name
        assert np.array_equal(got.pixel_array, original.pixel_array)

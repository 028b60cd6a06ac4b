"""Retries of a server's transient failures (pipelines.batch.remote.retry): the backoff, Retry-After, and the
classification of real errors, from ``requests`` against real sockets and HTTP servers on 127.0.0.1
and from the DIMSE functions against real pynetdicom peers (busy, refusing, out of resources, one
that sends a series short of an instance)."""

from __future__ import annotations

import email.utils
import errno
import http.server
import logging
import random
import socket
import struct
import threading
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pydicom
import pytest
import requests

from pipelines.batch.remote.dicomweb import discover_studies
from pipelines.batch.remote.dimse import DimsePeer, find_studies, store_files
from pipelines.batch.remote.dimse_get import retrieve_study
from pipelines.batch.remote.retry import (
    RetriesExhaustedError,
    RetryPolicy,
    TransientError,
    is_transient,
    parse_retry_after,
    retry_after,
)
from tests import servers
from tests.batch.conftest import DEMO, demo_case

FAST = RetryPolicy(retries=2, wait=0.01, rng=random.Random(0))


def _raised(call) -> BaseException:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - what it raises is the subject
        return exc
    pytest.fail("no error raised")


# --- the policy ---------------------------------------------------------------------------------


def test_backoff_is_full_jitter_below_a_doubling_ceiling():
    policy = RetryPolicy(retries=7, wait=2.0, max_wait=60.0, rng=random.Random(1))
    for retry, ceiling in enumerate((2, 4, 8, 16, 32, 60, 60), start=1):
        draws = [policy.backoff(retry) for _ in range(4000)]
        assert 0 <= min(draws) < 0.01 * ceiling and 0.99 * ceiling < max(draws) <= ceiling
        assert abs(sum(draws) / len(draws) - ceiling / 2) < 0.05 * ceiling  # uniform: the mean is half the ceiling
    again = [RetryPolicy(rng=random.Random(7)).backoff(n) for n in range(1, 8)]
    assert again == [RetryPolicy(rng=random.Random(7)).backoff(n) for n in range(1, 8)]  # a seed reproduces them
    assert RetryPolicy(wait=0.0).backoff(3) == 0.0
    with pytest.raises(ValueError, match="`retry` must be >= 1, got 0"):
        policy.backoff(0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"retries": -1}, "`retries` must be an integer >= 0, got -1"),
    ({"retries": 2.5}, "`retries` must be an integer >= 0, got 2.5"),
    ({"wait": -1.0}, "`wait` must be a number of seconds >= 0, got -1.0"),
    ({"max_wait": float("inf")}, "`max_wait` must be a number of seconds >= 0, got inf"),
    ({"wait": float("nan")}, "`wait` must be a number of seconds >= 0, got nan"),
])
def test_a_policy_refuses_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        RetryPolicy(**kwargs)


def test_retry_after_in_seconds_or_as_an_http_date():
    now = datetime(2026, 10, 21, 7, 27, 30, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0 and parse_retry_after(" 7 ") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT", now) == 30.0
    assert parse_retry_after(email.utils.format_datetime(now - timedelta(minutes=5), usegmt=True), now) == 0.0
    for unreadable in (None, "", "soon", "-5", "Wed, 99 Oct 2026"):
        assert parse_retry_after(unreadable, now) is None


def test_the_command_line_defaults_are_the_policy_s():
    from pipelines.cli import _parser

    args = _parser().parse_args(["batch", "--bundle", "b", "--input", "i", "--output", "o"])
    assert (args.retries, args.retry_wait) == (RetryPolicy().retries, RetryPolicy().wait)


# --- HTTP: real sockets, a real HTTP server -------------------------------------------------------


class ScriptedHttp:
    """An HTTP server on 127.0.0.1 answering each request with the next ``(status, headers)`` of
    ``script``, then 200 with an empty QIDO-RS answer; keeps the times the requests came."""

    def __init__(self, script=()) -> None:
        self.script, self.times = list(script), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.times.append(time.monotonic())
                status, headers = outer.script.pop(0) if outer.script else (200, {})
                body = b"[]" if status == 200 else b""
                self.send_response(status)
                for name, value in {"Content-Type": "application/dicom+json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_server():
    made = []

    def make(script=()) -> ScriptedHttp:
        made.append(ScriptedHttp(script))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.mark.parametrize(("status", "transient"), [
    (429, True), (502, True), (503, True), (504, True), (408, True),
    (400, False), (401, False), (403, False), (404, False), (500, False),
])
def test_http_statuses(status, transient, http_server):
    server = http_server([(status, {})])
    exc = _raised(lambda: discover_studies(server.url))  # dicomweb-client over requests, as the batch job calls it
    assert isinstance(exc, ValueError) and f"{server.url}: DICOMweb query (QIDO-RS) failed: HTTPError: {status}" in str(exc)
    assert isinstance(exc.__cause__, requests.HTTPError)
    assert is_transient(exc) is transient
    assert len(server.times) == 1  # dicomweb-client's own retries are off: one policy, ours


def test_connection_refused_reset_and_timeouts_are_transient():
    closed = servers.free_port()
    refused = _raised(lambda: requests.get(f"http://127.0.0.1:{closed}/", timeout=5))
    assert isinstance(refused, requests.ConnectionError) and is_transient(refused)
    assert is_transient(_raised(lambda: socket.create_connection(("127.0.0.1", closed), timeout=5)))  # ConnectionRefusedError
    with socket.create_server(("127.0.0.1", 0)) as listening:  # answers every connection with a reset
        def reset() -> None:
            connection, _ = listening.accept()
            connection.recv(1024)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()

        threading.Thread(target=reset, daemon=True).start()
        was_reset = _raised(lambda: requests.get(f"http://127.0.0.1:{listening.getsockname()[1]}/", timeout=5))
    assert isinstance(was_reset, requests.ConnectionError) and is_transient(was_reset)
    assert "Connection reset" in str(was_reset)
    with socket.create_server(("127.0.0.1", 0), backlog=4) as silent:  # connects (the backlog), never answers
        timed_out = _raised(lambda: requests.get(f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=(5, 0.3)))
    assert isinstance(timed_out, requests.ReadTimeout) and is_transient(timed_out)


def test_a_full_disk_and_a_bug_are_permanent():
    with open("/dev/full", "wb", buffering=0) as full:
        disk = _raised(lambda: full.write(b"x"))
    assert isinstance(disk, OSError) and disk.errno == errno.ENOSPC and not is_transient(disk)
    assert not is_transient(_raised(lambda: {}["key"]))
    wrapped = _raised(lambda: discover_studies("http://127.0.0.1:1/dicom-web"))  # refused, then wrapped
    assert isinstance(wrapped, ValueError) and is_transient(wrapped)
    exhausted = RetriesExhaustedError("gave up")
    exhausted.__cause__ = wrapped
    assert not is_transient(exhausted)  # an outer policy does not start over


def test_retry_after_is_honoured_up_to_the_longest_wait(http_server):
    server = http_server([(503, {"Retry-After": "1"})])
    start = time.monotonic()
    assert RetryPolicy(retries=3, wait=0.01).call(partial(discover_studies, server.url), "discovery") == []
    assert len(server.times) == 2 and 1.0 <= server.times[1] - server.times[0] < 2.5
    assert time.monotonic() - start < 3
    later = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    server = http_server([(429, {"Retry-After": later})] * 2)
    exc = _raised(lambda: discover_studies(server.url))
    assert 28 <= retry_after(exc) <= 30
    assert RetryPolicy(max_wait=0.2).delay(1, exc) == 0.2
    start = time.monotonic()
    assert RetryPolicy(retries=1, wait=0.01, max_wait=0.2).call(partial(discover_studies, server.url), "discovery") == []
    assert time.monotonic() - start < 2


def test_a_retry_is_logged_with_the_case_id_only_and_counted(http_server, caplog):
    server = http_server([(503, {}), (502, {})])
    counts: dict[str, int] = {}
    with caplog.at_level(logging.INFO, logger="pipelines.batch.remote.retry"):
        assert FAST.call(partial(discover_studies, server.url, study_uids=["1.2.3.4"]), "fetch", "case-0123456789ab",
                         counts) == []
    assert counts == {"fetch": 2}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("case-0123456789ab: fetch failed (HTTP 503); retry 1 of 2 in ")
    assert lines[1].startswith("case-0123456789ab: fetch failed (HTTP 502); retry 2 of 2 in ")
    assert not [line for line in lines if "1.2.3.4" in line or "127.0.0.1" in line or "dicom-web" in line]


def test_permanent_failures_are_not_retried_and_transient_ones_give_up(http_server, caplog):
    server = http_server([(404, {})])
    counts: dict[str, int] = {}
    with pytest.raises(ValueError, match="failed: HTTPError: 404") as raised:
        FAST.call(partial(discover_studies, server.url), "fetch", "case-0123456789ab", counts)
    assert not isinstance(raised.value, RetriesExhaustedError) and counts == {} and len(server.times) == 1
    server = http_server([(503, {})] * 3)
    with caplog.at_level(logging.INFO, logger="pipelines.batch.remote.retry"), pytest.raises(RetriesExhaustedError) as raised:
        FAST.call(partial(discover_studies, server.url), "fetch", "case-0123456789ab", counts)
    assert str(raised.value).endswith("failed: HTTPError: 503 Server Error: Service Unavailable for url: "
                                      f"{server.url}/series?includefield=NumberOfSeriesRelatedInstances "
                                      "(gave up after 2 retries)")
    assert isinstance(raised.value.__cause__, ValueError) and counts == {"fetch": 2} and len(server.times) == 3
    assert caplog.records[-1].getMessage() == "case-0123456789ab: fetch failed (HTTP 503); gave up after 2 retries"
    with pytest.raises(ValueError, match="HTTPError: 503") as raised:  # no retries: the error as it came
        RetryPolicy(retries=0).call(partial(discover_studies, http_server([(503, {})]).url), "fetch")
    assert not isinstance(raised.value, RetriesExhaustedError)


# --- DIMSE: real pynetdicom peers -----------------------------------------------------------------


class Archive:
    """A query/retrieve peer on 127.0.0.1 (pynetdicom) holding the first 12 DICOM files of ``folder``: C-FIND
    at study, series and image level, C-GET of a series, C-STORE. ``busy``: statuses the next
    C-FINDs, C-GETs or C-STOREs answer with instead of doing their work (``{"C-GET": [0xA702]}``);
    ``withhold``: instances each C-GET leaves out, though C-FIND lists them; ``max_associations``."""

    def __init__(self, folder: Path | None = None, max_associations: int = 10, calling: list[str] | None = None) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.presentation import AllStoragePresentationContexts, QueryRetrievePresentationContexts

        self.datasets = [pydicom.dcmread(p) for p in sorted(Path(folder).glob("*.dcm"))[:12]] if folder else []
        self.busy: dict[str, list[int | None]] = {}  # None: do the work
        self.withhold, self.stored = 0, []
        ae = AE(ae_title="ARCHIVE")
        ae.maximum_associations = max_associations
        for context in QueryRetrievePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        for context in AllStoragePresentationContexts:  # C-STORE to it, and from it within a C-GET
            ae.add_supported_context(context.abstract_syntax, scu_role=False, scp_role=True)
        if calling:
            ae.require_calling_aet = calling
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_C_FIND, self._find), (evt.EVT_C_GET, self._get), (evt.EVT_C_STORE, self._store)])
        self.url = f"dicom://ARCHIVE@127.0.0.1:{self.server.server_address[1]}"

    def _next_busy(self, service: str) -> int | None:
        statuses = self.busy.get(service) or []
        return statuses.pop(0) if statuses else None

    def _find(self, event):
        if (status := self._next_busy("C-FIND")) is not None:
            yield status, None
            return
        query, seen = event.identifier, set()
        for ds in self.datasets:
            if query.get("StudyInstanceUID") and ds.StudyInstanceUID != query.StudyInstanceUID:
                continue
            if query.get("SeriesInstanceUID") and ds.SeriesInstanceUID != query.SeriesInstanceUID:
                continue
            level = query.QueryRetrieveLevel
            key = {"STUDY": ds.StudyInstanceUID, "SERIES": ds.SeriesInstanceUID}.get(level, ds.SOPInstanceUID)
            if key in seen:
                continue
            seen.add(key)
            answer = pydicom.Dataset()
            answer.QueryRetrieveLevel = level
            for keyword in query.dir():
                if keyword == "NumberOfSeriesRelatedInstances":
                    answer.NumberOfSeriesRelatedInstances = sum(d.SeriesInstanceUID == ds.SeriesInstanceUID
                                                                for d in self.datasets)
                elif keyword != "QueryRetrieveLevel" and keyword in ds:
                    setattr(answer, keyword, ds.data_element(keyword).value)
            yield 0xFF00, answer

    def _get(self, event):
        wanted = [ds for ds in self.datasets if ds.SeriesInstanceUID == event.identifier.SeriesInstanceUID]
        wanted = wanted[:len(wanted) - self.withhold]
        yield len(wanted)
        if (status := self._next_busy("C-GET")) is not None:
            yield status, None
            return
        for ds in wanted:
            yield 0xFF00, ds

    def _store(self, event) -> int:
        if (status := self._next_busy("C-STORE")) is not None:
            return status
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def study() -> tuple[Path, str, str]:
    """A demo DICOM study (one MR series): its folder, StudyInstanceUID and SeriesInstanceUID."""
    folder = DEMO / demo_case("test", 0)["dicom"]
    first = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    return folder, str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


@pytest.fixture
def archive(study):
    peer = Archive(study[0])
    yield peer
    peer.close()


def test_dimse_associations_refused_busy_and_rejected(study):
    folder, study_uid, _ = study
    closed = DimsePeer("NOBODY", "127.0.0.1", servers.free_port())
    exc = _raised(lambda: find_studies(closed, "ME", [study_uid]))
    assert isinstance(exc, TransientError) and is_transient(exc)
    assert str(exc).startswith(f"{closed}: C-FIND: no association: the connection failed")
    picky = Archive(folder, calling=["SOMEONEELSE"])  # rejected-permanent: calling AE title not recognised
    busy = Archive(folder, max_associations=1)  # rejected-transient: local limit exceeded, while one is open
    try:
        rejected = _raised(lambda: find_studies(DimsePeer.parse(picky.url), "ME", [study_uid]))
        assert not is_transient(rejected) and "association rejected by the peer (result Rejected Permanent" in str(rejected)
        from pynetdicom import AE
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        held = holder.associate("127.0.0.1", DimsePeer.parse(busy.url).port, ae_title="ARCHIVE")
        assert held.is_established
        try:
            limited = _raised(lambda: find_studies(DimsePeer.parse(busy.url), "ME", [study_uid]))
        finally:
            held.release()
        assert isinstance(limited, TransientError) and "rejected by the peer for now (result Rejected Transient" in str(limited)
        time.sleep(0.2)  # the peer counts the released association out
        assert [uid for uid, _, _ in FAST.call(partial(find_studies, DimsePeer.parse(busy.url), "ME", [study_uid]),
                                               "discovery")] == [study_uid]
    finally:
        picky.close()
        busy.close()


@pytest.mark.parametrize(("service", "status", "transient"), [
    ("C-FIND", 0xA700, True), ("C-FIND", 0xC001, False),
    ("C-GET", 0xA701, True), ("C-GET", 0xA702, True), ("C-GET", 0xA900, False), ("C-GET", 0xC000, False),
    ("C-STORE", 0xA700, True), ("C-STORE", 0xA7FF, True), ("C-STORE", 0xC000, False), ("C-STORE", 0xA900, False),
])
def test_dimse_statuses(service, status, transient, archive, study, tmp_path):
    folder, study_uid, series_uid = study
    peer = DimsePeer.parse(archive.url)
    archive.busy[service] = [status]
    calls = {
        "C-FIND": lambda: find_studies(peer, "ME", [study_uid]),
        "C-GET": lambda: retrieve_study(peer, "ME", study_uid, [series_uid], tmp_path / "got"),
        "C-STORE": lambda: store_files(peer, "ME", sorted(folder.glob("*.dcm"))[:2]),
    }
    exc = _raised(calls[service])
    assert f"status 0x{status:04X}" in str(exc) and str(exc).startswith(f"{peer}: {service}")
    assert is_transient(exc) is transient
    assert not (tmp_path / "got").exists()  # a failed fetch leaves nothing


def test_a_busy_archive_is_retried_and_the_series_arrives_whole(archive, study, tmp_path, caplog):
    _, study_uid, series_uid = study
    archive.busy["C-GET"] = [0xA702]
    counts: dict[str, int] = {}
    with caplog.at_level(logging.INFO, logger="pipelines.batch.remote.retry"):
        got = FAST.call(partial(retrieve_study, DimsePeer.parse(archive.url), "ME", study_uid, [series_uid],
                                tmp_path / "got"), "fetch", "case-0123456789ab", counts)
    received = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in got.glob("*.dcm"))
    assert received == sorted(str(ds.SOPInstanceUID) for ds in archive.datasets) and counts == {"fetch": 1}
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("case-0123456789ab: fetch failed (C-GET: status 0xA702); retry 1 of 2 in ")


def test_an_incomplete_series_fails_naming_it_and_leaves_no_file(archive, study, tmp_path):
    _, study_uid, series_uid = study
    archive.withhold = 1  # listed by C-FIND, never sent: an archive whose index and storage disagree
    total = len(archive.datasets)
    counts: dict[str, int] = {}
    with pytest.raises(RetriesExhaustedError) as raised:
        FAST.call(partial(retrieve_study, DimsePeer.parse(archive.url), "ME", study_uid, [series_uid], tmp_path / "got"),
                  "fetch", "case-0123456789ab", counts)
    assert str(raised.value) == (
        f"{archive.url}: C-GET of series {series_uid} of study {study_uid}: the series arrived incomplete: "
        f"{total - 1} of the {total} instances C-FIND lists (status 0x0000; sub-operations: {total - 1} completed, "
        f"0 failed, 0 warning) (gave up after 2 retries)")
    assert counts == {"fetch": 2} and not (tmp_path / "got").exists()


def test_a_store_is_retried_on_a_new_association(archive, study):
    folder, _, _ = study
    files = sorted(folder.glob("*.dcm"))[:3]
    archive.busy["C-STORE"] = [None, 0xA700]  # the first file stored, the second refused for now
    counts: dict[str, int] = {}
    stored = FAST.call(partial(store_files, DimsePeer.parse(archive.url), "ME", files), "push", "case-0123456789ab", counts)
    assert list(stored) == [f.name for f in files] and counts == {"push": 1}
    assert len(archive.stored) == 4 and set(archive.stored) == {s["sop_instance_uid"] for s in stored.values()}

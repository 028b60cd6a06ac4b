"""The batch job under faults: permission lost mid-run, SIGTERM/SIGINT, a loader process that dies,
warnings that name files, a PACS restarted or gone mid-run. Real ones: a command run without root's
permission override, signals sent to a running job, a preprocessing step that calls ``abort()``, a
real Orthanc stopped and started again under a running job."""

from __future__ import annotations

import faulthandler
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pydicom
import pytest

from pipelines.batch import Case, run_batch
from pipelines.batch import runner as runner_module
from pipelines.io import load_volume
from tests import servers
from tests.batch.conftest import BUNDLE, DEMO, MANIFEST, case_dirs, copy_study, demo_case
from tests.conftest import REPO


class Fault:
    """A preprocessing step that misbehaves on a study whose folder is named ``fault-<what>``:
    ``abort`` (``os.abort()``, as a C++ decoder's failed check does), ``segv`` (a segmentation fault),
    ``warn`` (a warning naming the file, as pydicom's do). Other studies pass unchanged."""

    def __call__(self, data: dict) -> dict:
        path = str(data["image"].meta.get("filename_or_obj", ""))
        what = Path(path).name.removeprefix("fault-") if Path(path).name.startswith("fault-") else None
        if what in ("abort", "segv"):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
            faulthandler.disable()  # pytest's, inherited: it would print every thread's stack
            if what == "abort":
                os.abort()
            os.kill(os.getpid(), signal.SIGSEGV)
        if what == "warn":
            warnings.warn(f"odd header in {path}/IM00001.dcm", UserWarning, stacklevel=1)
        return data


@pytest.fixture(scope="module")
def fault_bundle(tmp_path_factory) -> Path:
    """The tumor bundle with :class:`Fault` first in its preprocessing."""
    bundle = tmp_path_factory.mktemp("bundle") / "unet3d_faults"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    shutil.copy(BUNDLE / "models" / "model.pt", bundle / "models" / "model.pt")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["preprocessing"]["transforms"].insert(1, {"_target_": f"{__name__}.Fault"})
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    return bundle


def _command(*args: str, bundle: Path = BUNDLE) -> list[str]:
    return [sys.executable, "-m", "pipelines", "batch", "--bundle", str(bundle), *args]


def _signals_as_from_a_terminal() -> None:
    """SIGINT and SIGTERM at their defaults in the job, as a command typed in a terminal has them. A
    test run started in the background (``make test &``, CI runners) ignores SIGINT, its processes
    inherit that, and the job rightly leaves a signal its caller ignores alone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def _started(command: list[str]):
    """The command running, its output piped; it and its processes (those in ``seen`` and its process
    group) are killed if still there at the end."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=_signals_as_from_a_terminal)
    seen: list[psutil.Process] = []
    try:
        yield process, seen
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if process.returncode is None:
            process.communicate()
        for child in seen:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def _wait_for_records(out: Path, process: subprocess.Popen, count: int = 1) -> None:
    deadline = time.monotonic() + 300
    while len(list(out.glob("*/record.json"))) < count:
        if process.poll() is not None:
            pytest.fail(f"the run ended before {count} case(s) finished: {process.communicate()[1]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {count} case(s) finished in 300 s")
        time.sleep(0.02)


class _Overdue(BaseException):
    """Not an Exception: no ``except Exception`` on the way (torch's among them) can swallow it."""


@contextmanager
def _deadline(seconds: float):
    """The body fails, rather than hangs, when it runs longer than ``seconds`` (main thread only)."""

    def expire(signum, frame):
        raise _Overdue(f"still running after {seconds} s")

    before = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".part" in p.name]


def _finished(out: Path) -> list[dict]:
    """Every record under ``out``, each checked complete: status ok, every output there and readable."""
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/record.json"))]
    for record in records:
        case_dir = out / record["case_id"]
        assert record["status"] == "ok"
        assert sorted(p.name for p in case_dir.iterdir()) == sorted(["record.json", *record["outputs"]])
        load_volume(case_dir / "mask.nii.gz")
    return records


def _without_dac_override(tmp_path: Path) -> list[str]:
    """A command prefix under which writes obey file permissions; root's bypass them (the tests run as root)."""
    if os.geteuid() != 0:
        return []
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    tried = []
    try:
        for prefix in (["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", 'exec "$0" "$@"'],
                       ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                        "--bounding-set=-dac_override,-dac_read_search", "--"]):
            if shutil.which(prefix[0]) is None:
                tried.append(f"{prefix[0]}: not installed")
                continue
            result = subprocess.run([*prefix, "touch", str(probe / "x")], capture_output=True, text=True)
            if result.returncode != 0 and not (probe / "x").exists():
                return prefix
            tried.append(f"{prefix[0]}: {result.stderr.strip() or 'the write went through'}")
    finally:
        probe.chmod(0o755)
    pytest.skip(f"cannot take root's permission override away here ({'; '.join(tried)})")


@pytest.mark.integration
@pytest.mark.slow
def test_permission_denied_mid_run_stops_the_run_like_a_full_disk(tmp_path):
    prefix = _without_dac_override(tmp_path)
    for index in range(3):
        copy_study("test", index, tmp_path / "in" / f"s{index}")
    out = tmp_path / "out"
    command = _command("--input", str(tmp_path / "in"), "--output", str(out), "--workers", "1", "--quiet")
    try:
        with _started([*prefix, *command]) as (process, _):
            _wait_for_records(out, process)
            out.chmod(0o555)  # the next case's folder cannot be made
            _, stderr = process.communicate(timeout=120)
    finally:
        out.chmod(0o755)
    assert process.returncode == 3, stderr
    assert "stopped: cannot write case" in stderr and "Permission denied" in stderr and "rerun to resume" in stderr
    finished = len(_finished(out))
    assert 1 <= finished < 3 and _partials(out) == []
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{3 - finished} segmented, {finished} already complete, 0 failed" in result.stdout


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_cleanly_and_a_rerun_resumes(signum, tmp_path):
    demo_case("test", 0)  # skips without the demo data
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"test": json.loads(MANIFEST.read_text())["test"][:4]}))
    out = tmp_path / "out"
    command = _command("--input", str(manifest), "--dataset-dir", str(DEMO), "--output", str(out), "--workers", "1")
    with _started(command) as (process, children):
        _wait_for_records(out, process)
        children += psutil.Process(process.pid).children(recursive=True)
        assert children  # the loader process, at least
        process.send_signal(signum)  # to the job alone: it must end its loader itself
        _, stderr = process.communicate(timeout=60)  # no process left holding the pipes
        _, alive = psutil.wait_procs(children, timeout=5)  # before _started kills what is left
    assert process.returncode == 128 + signum, stderr
    assert f"stopped by {signum.name}" in stderr and "rerun to resume" in stderr
    assert alive == []
    assert _partials(out) == [] and not (out / ".cache").exists()
    records = _finished(out)
    assert 1 <= len(records) < 4
    assert len((out / "report.csv").read_text().splitlines()) == 1 + len(records)
    result = subprocess.run([*command, "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{4 - len(records)} segmented, {len(records)} already complete, 0 failed" in result.stdout
    assert len(_finished(out)) == 4


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """Two demo studies segmented by the shipped bundle: ``<root>/in/{a,c}``, ``<root>/out``."""
    root = tmp_path_factory.mktemp("clean")
    copy_study("test", 0, root / "in" / "a")
    copy_study("test", 1, root / "in" / "c")
    summary = run_batch(BUNDLE, root / "in", root / "out", workers=1)
    assert summary.done == 2
    return root


class _CountedCores(runner_module.CoreShare):
    made: list[runner_module.CoreShare] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.made.append(self)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(("what", "name"), [("abort", "SIGABRT"), ("segv", "SIGSEGV")])
def test_a_loader_process_that_dies_fails_its_study_only(what, name, fault_bundle, clean_run, tmp_path, monkeypatch):
    shutil.copytree(clean_run / "in", tmp_path / "in")
    copy_study("test", 2, tmp_path / "in" / f"fault-{what}")
    monkeypatch.setattr(runner_module, "CoreShare", _CountedCores)
    _CountedCores.made.clear()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with _deadline(180):  # a loader death handled in the wrong place can leave the run blocked on a pipe
        summary = run_batch(fault_bundle, tmp_path / "in", tmp_path / "out", workers=1)
    assert (summary.cases, summary.done, len(summary.failed), summary.exit_code) == (3, 2, 1, 0)
    record = json.loads((tmp_path / "out" / summary.failed[0] / "record.json").read_text())
    assert record["status"] == "failed"
    assert record["error"] == f"the loader process died (signal {name}) while reading this study"
    for case_dir in case_dirs(clean_run / "out"):  # the two good studies
        expected = json.loads((case_dir / "record.json").read_text())
        got = json.loads((tmp_path / "out" / case_dir.name / "record.json").read_text())
        assert got["status"] == "ok"
        assert (got["volumes_ml"], got["lesion_count"], got["largest_lesion"]) == (
            expected["volumes_ml"], expected["lesion_count"], expected["largest_lesion"])
        masks = [np.asarray(nib.load(folder / case_dir.name / "mask.nii.gz").dataobj)
                 for folder in (clean_run / "out", tmp_path / "out")]
        assert np.array_equal(*masks)
    assert [cores.busy for cores in _CountedCores.made] == [0]  # the dead loader's core is the network's again
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert left == []


@pytest.mark.integration
@pytest.mark.slow
def test_a_loader_process_ends_with_a_job_killed_by_sigkill(tmp_path):
    """``kill -9`` of the job alone (the out-of-memory killer's way), its loader process busy
    prefetching the next studies into a pipe no one reads any more: the loader ends too, instead of
    living on with its memory and the job's stdout and stderr."""
    for index in range(5):
        copy_study("test", index, tmp_path / "in" / f"s{index}")
    with _started(_command("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--workers", "1",
                           "--quiet")) as (process, seen):
        _wait_for_records(tmp_path / "out", process)
        job = psutil.Process(process.pid)
        seen.extend(job.children(recursive=True))
        assert seen, "the job should have a loader process while studies are left"
        os.kill(process.pid, signal.SIGKILL)  # the job alone, not its process group
        process.wait(timeout=30)
        _, alive = psutil.wait_procs(seen, timeout=20)
        assert alive == [], [p.pid for p in alive]


@pytest.mark.integration
@pytest.mark.slow
def test_warnings_naming_files_go_to_the_record_not_the_log(fault_bundle, tmp_path):
    study = tmp_path / "in" / "fault-warn"
    copy_study("test", 0, study)
    out = tmp_path / "out"
    result = subprocess.run(_command("--input", str(tmp_path / "in"), "--output", str(out), "--workers", "1",
                                     bundle=fault_bundle), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert " ok (" in result.stderr  # the INFO log lines are there
    for text in (result.stdout, result.stderr):
        assert str(study) not in text and "fault-warn" not in text and "odd header" not in text
    (record,) = [json.loads(p.read_text()) for p in out.glob("*/record.json")]
    assert f"UserWarning: odd header in {study}/IM00001.dcm" in record["warnings"]


@pytest.mark.integration
def test_warnings_while_writing_go_to_the_record(tmp_path, monkeypatch, caplog):
    image = tmp_path / "in" / "scan.nii.gz"
    image.parent.mkdir()
    shutil.copy(DEMO / demo_case("test", 0)["image"], image)
    from pipelines.batch.outputs import qc as qc_module

    save = qc_module.save_qc_picture

    def warning_save(path, *args, **kwargs):
        warnings.warn(f"odd pixels for {image}", RuntimeWarning, stacklevel=1)
        return save(path, *args, **kwargs)

    monkeypatch.setattr(qc_module, "save_qc_picture", warning_save)  # the QC output imports it when it writes
    with caplog.at_level("INFO"), warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        summary = run_batch(BUNDLE, tmp_path / "in", tmp_path / "out", workers=0)
    assert summary.done == 1
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*/record.json")]
    assert f"RuntimeWarning: odd pixels for {image}" in record["warnings"]
    assert str(image) not in caplog.text and not [w for w in shown if str(image) in str(w.message)]


def test_record_warnings_are_distinct_capped_and_include_the_scan_s():
    case = Case(case_id="case-000000000000")
    case.warnings = ["UserWarning: from the scan"]  # pipelines.batch.cases fills it while reading headers
    caught = [*(f"UserWarning: {i}" for i in range(60)), "UserWarning: 0", "UserWarning: from the scan"]
    from pipelines.batch.notices import case_warnings

    texts = case_warnings(case, caught)
    assert texts[:3] == ["UserWarning: from the scan", "UserWarning: 0", "UserWarning: 1"]
    assert len(texts) == 51 and texts[-1] == "... and 11 more warnings"


# --- a PACS restarted, or gone, in the middle of a run: a real Orthanc (DICOMweb) ------------------

_RETRY = re.compile(r"(case-[0-9a-f]{12}): (fetch|push) failed \((.+?)\); retry 1 of \d+ in [0-9.]+ s")


class _Stderr:
    """A running command's stderr, read line by line in a thread (the INFO log lines among them)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(process.stderr), daemon=True)
        self.thread.start()

    def wait_for(self, pattern: re.Pattern, process: subprocess.Popen, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for line in list(self.lines) if (m := pattern.search(line))]
            if found:
                return found[0]
            if process.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"no line matching {pattern.pattern!r}: {self.text[-3000:]}")

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _study_uid(entry: dict) -> str:
    return str(pydicom.dcmread(next((DEMO / entry["dicom"]).glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _modalities(url: str, study_uid: str) -> list[str]:
    """The modalities of the study's series on the DICOMweb server (QIDO-RS)."""
    with urllib.request.urlopen(f"{url}/studies/{study_uid}/series", timeout=30) as response:
        return sorted(s["00080060"]["Value"][0] for s in json.loads(response.read() or b"[]"))


@pytest.fixture
def pacs(tmp_path):
    """A real Orthanc (DICOMweb) holding three demo studies, which the test may stop and start again."""
    entries = [demo_case("test", index) for index in range(3)]
    (tmp_path / "pacs").mkdir()
    with servers.orthanc_server(tmp_path / "pacs", [DEMO / e["dicom"] for e in entries]) as server:
        yield server, [_study_uid(e) for e in entries]


def _restarted_under(process: subprocess.Popen, server, out: Path) -> tuple[dict[str, dict], list[str]]:
    """Stops ``server`` once the job has written a record and starts it again (same port and storage)
    once a case in flight has logged a retry; checks the job then segments all 3 cases, that case's
    record counting the retry. Returns the records by case id and the job's stderr lines."""
    stderr = _Stderr(process)
    _wait_for_records(out, process)
    server.stop()
    case_id, step, _ = stderr.wait_for(_RETRY, process).groups()  # a case in flight met the PACS down
    server.start()
    process.wait(timeout=300)
    stdout = process.stdout.read()
    stderr.thread.join(timeout=10)
    assert process.returncode == 0, stderr.text[-3000:]
    assert "3 cases: 3 segmented, 0 already complete, 0 failed" in stdout
    records = {record["case_id"]: record for record in _finished(out)}
    assert len(records) == 3 and records[case_id]["retries"][step] >= 1
    return records, stderr.lines


@pytest.mark.integration
@pytest.mark.slow
def test_a_pacs_restarted_mid_run_costs_retries_not_cases(pacs, tmp_path):
    """Orthanc stopped once the first case is done, and started again (same port and storage) once a
    case in flight has met it down: that case retries and succeeds, every case is segmented and its
    results stored on the PACS, none twice, nothing partial; the retry's log line names the case only."""
    server, study_uids = pacs
    out = tmp_path / "out"
    command = _command("--input", server.url, "--output", str(out), "--push", "--workers", "1",
                       "--retries", "8", "--retry-wait", "0.25")
    with _started(command) as (process, _):
        _, lines = _restarted_under(process, server, out)
    for uid in study_uids:
        assert _modalities(server.url, uid) == ["MR", "SEG", "SR"]  # stored once each: the same UIDs again
    assert _partials(out) == [] and not (out / ".cache").exists()
    retried = [line for line in lines if " failed (" in line and "; retry " in line]
    assert retried and not [line for line in retried if "127.0.0.1" in line or any(u in line for u in study_uids)]


@pytest.mark.integration
@pytest.mark.slow
def test_a_pacs_gone_for_good_fails_the_cases_left_and_a_rerun_finishes_them(pacs, tmp_path):
    """Orthanc stopped for good once the first case is done: the cases left fail after their retries,
    naming the PACS (exit code 1 with --fail-on-error; 0 without, as one case was segmented). A rerun
    started while it is still down retries its study query until it is back, then finishes them and
    leaves the finished one alone."""
    server, study_uids = pacs
    out = tmp_path / "out"
    command = _command("--input", server.url, "--output", str(out), "--push", "--workers", "1", "--retries", "2",
                       "--retry-wait", "0.1", "--fail-on-error", "--quiet")
    with _started(command) as (process, _):
        _wait_for_records(out, process)
        server.stop()
        stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/record.json"))]
    failed = [record for record in records if record["status"] == "failed"]
    assert len(records) == 3 and 1 <= len(failed) < 3, [r.get("error") for r in records]
    assert f"3 cases: {3 - len(failed)} segmented, 0 already complete, {len(failed)} failed" in stdout
    for record in failed:  # refused, or reset while it was shutting down
        assert server.url in record["error"] and "(gave up after 2 retries)" in record["error"], record["error"]
        assert sum(record["retries"].values()) == 2
        assert [p.name for p in (out / record["case_id"]).iterdir()] == ["record.json"]  # nothing partial
    rerun = [*command[:command.index("--retries")], "--retries", "8", "--retry-wait", "0.25"]
    with _started(rerun) as (process, _):
        stderr = _Stderr(process)
        stderr.wait_for(re.compile(r"INFO discovery failed \(ConnectionError\); retry 1 of 8 in "), process)
        server.start()
        process.wait(timeout=300)
        stdout = process.stdout.read()
        stderr.thread.join(timeout=10)
    assert process.returncode == 0, stderr.text[-3000:]
    assert f"3 cases: {len(failed)} segmented, {3 - len(failed)} already complete, 0 failed" in stdout
    assert len(_finished(out)) == 3
    for uid in study_uids:
        assert _modalities(server.url, uid) == ["MR", "SEG", "SR"]


# Orthanc deletes one instance of a series as its WADO-RS request comes in: the series it sends is one
# short of what its QIDO-RS listed a moment before, as an archive's can be while a study changes
_LOSE_ONE = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if method == 'GET' and string.find(uri, '/series/[0-9.]+$') then
    local series = string.match(uri, '/series/([0-9.]+)$')
    local found = ParseJson(RestApiPost('/tools/find', DumpJson({Level='Instance', Query={SeriesInstanceUID=series}})))
    if found[1] ~= nil then
      RestApiDelete('/instances/' .. found[1])
    end
  end
  return true
end
"""


@pytest.mark.integration
@pytest.mark.slow
def test_a_series_that_arrives_incomplete_fails_its_case_naming_it(tmp_path):
    """The study fetched in a loader process, twice (one retry): its case fails naming the series and
    the counts; nothing of it is segmented; the retry's log line, from the loader, names the case only."""
    entry = demo_case("test", 0)
    study = DEMO / entry["dicom"]
    first = pydicom.dcmread(next(study.glob("*.dcm")), stop_before_pixels=True)
    count = len(list(study.glob("*.dcm")))
    (tmp_path / "pacs").mkdir()
    (tmp_path / "lose_one.lua").write_text(_LOSE_ONE)
    out = tmp_path / "out"
    with servers.orthanc_server(tmp_path / "pacs", [study], LuaScripts=[str(tmp_path / "lose_one.lua")]) as server:
        result = subprocess.run(_command("--input", server.url, "--output", str(out), "--workers", "1", "--retries", "1",
                                         "--retry-wait", "0.01"), check=False, cwd=REPO, capture_output=True, text=True,
                                timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]  # its one case failed
    (case_dir,) = case_dirs(out)
    record = json.loads((case_dir / "record.json").read_text())
    assert record["error"] == (  # each attempt fetches afresh: the second found one more missing
        f"{server.url}: WADO-RS of series {first.SeriesInstanceUID} of study {first.StudyInstanceUID}: the series "
        f"arrived incomplete: {count - 2} of the {count - 1} instances QIDO-RS lists (gave up after 1 retry)")
    assert record["retries"] == {"fetch": 1} and record["outputs"] == []
    assert [p.name for p in case_dir.iterdir()] == ["record.json"]  # no partial series was segmented
    assert not (out / ".cache").exists()
    assert f"{case_dir.name}: fetch failed (WADO-RS: series incomplete); retry 1 of 1 in " in result.stderr
    assert str(first.StudyInstanceUID) not in result.stderr and str(first.SeriesInstanceUID) not in result.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_a_dicom_peer_restarted_mid_run_costs_retries_not_cases(tmp_path):
    """The same over DIMSE: Orthanc's DICOM port (in a network namespace, where the job runs too)
    stopped under a running job and started again; the case in flight retries (C-GET or C-STORE on a
    new association) and every case is segmented and stored back."""
    entries = [demo_case("test", index) for index in range(3)]
    (tmp_path / "pacs").mkdir()
    with servers.orthanc_dimse_server(tmp_path / "pacs", [DEMO / e["dicom"] for e in entries]) as server:
        out = tmp_path / "out"
        uids = [arg for entry in entries for arg in ("--study-uid", _study_uid(entry))]
        command = _command("--input", server.dicom, *uids, "--output", str(out), "--push", "--workers", "1",
                           "--retries", "8", "--retry-wait", "0.25")
        with _started(server.namespace.command(*command)) as (process, _):
            records, _ = _restarted_under(process, server, out)
    assert all(set(record["pushed"]) == {"url", "seg.dcm", "sr.dcm"} for record in records.values())
    assert _partials(out) == [] and not (out / ".cache").exists()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("qdisc", ["netem delay 50ms loss 5%",
                                   "tbf rate 4mbit burst 256kb latency 400ms"],  # a burst above loopback's 64 KiB
                         ids=["lossy", "slow"])
def test_a_slow_or_lossy_link_still_brings_every_study_whole(qdisc, tmp_path):
    """The DICOM peer behind a link that delays and loses packets (netem), or one of 4 Mbit/s (tbf),
    shaped on the loopback interface of the namespace the peer and the job share: the study comes
    whole and its results go back."""
    entry = demo_case("test", 1)
    (tmp_path / "pacs").mkdir()
    with servers.orthanc_dimse_server(tmp_path / "pacs", [DEMO / entry["dicom"]]) as server:
        shaped = server.namespace.run("tc", "qdisc", "add", "dev", "lo", "root", *qdisc.split(), timeout=30)
        if shaped.returncode != 0:
            pytest.skip(f"cannot shape the link with tc {qdisc.split()[0]} here: {shaped.stderr.strip()} "
                        f"(netem needs the kernel's sch_netem)")
        command = _command("--input", server.dicom, "--study-uid", _study_uid(entry), "--output", str(tmp_path / "out"),
                           "--push", "--workers", "0", "--retry-wait", "0.5", "--quiet")
        result = server.namespace.run(*command, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 cases: 1 segmented" in result.stdout
    (record,) = _finished(tmp_path / "out")
    assert set(record["pushed"]) == {"url", "seg.dcm", "sr.dcm"}

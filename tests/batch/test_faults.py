"""The batch job under faults: permission lost mid-run, SIGTERM/SIGINT, a loader process that dies,
warnings that name files. Real ones: a command run without root's permission override, signals sent
to a running job, a preprocessing step that calls ``abort()``."""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest

from pipelines.batch import Case, run_batch
from pipelines.batch import runner as runner_module
from pipelines.io import load_volume
from tests.batch.conftest import BUNDLE, DEMO, MANIFEST, copy_study, demo_case
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
    for case_dir in sorted(p for p in (clean_run / "out").iterdir() if p.is_dir()):  # the two good studies
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
    from pipelines.batch import qc as qc_module

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

"""One batch run per output folder: a second run is refused or waits; the lock ends with its holder."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.batch import BundleModel, OutputLockedError, output_lock, pseudonym, run_batch
from pipelines.cli import main
from tests.batch.conftest import BUNDLE, DEMO, demo_case
from tests.batch.test_runner import _cli
from tests.conftest import REPO

pytestmark = pytest.mark.integration

# Takes the lock through the module, says so, and holds it until its stdin closes; with "fork", a
# forked child (as the batch job's loader processes are) sleeps on after it.
_HOLDER = """
import os, sys, time
from pathlib import Path
from pipelines.batch.lock import output_lock

with output_lock(sys.argv[1]):
    if sys.argv[2:] == ["fork"]:
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
    print("locked", flush=True)
    sys.stdin.read()
    Path(sys.argv[1], "released").touch()
"""


def _hold(folder: Path, *args: str) -> tuple[subprocess.Popen, list[str]]:
    """A process holding ``folder``'s lock; and what it printed before it held it."""
    process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), *args], cwd=REPO, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    said = []
    for line in process.stdout:
        if line.strip() == "locked":
            return process, said
        said.append(line.strip())
    process.wait()
    raise AssertionError(f"the holder exited with {process.returncode} before taking the lock")


def _end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def _one_case(tmp_path: Path) -> tuple[Path, str]:
    """An input folder of one demo NIfTI image; and its case id."""
    entry = demo_case("test", 0)
    (tmp_path / "in").mkdir()
    shutil.copy(DEMO / entry["image"], tmp_path / "in" / "scan.nii.gz")
    return tmp_path / "in", pseudonym("scan.nii.gz")


def _watch_cases(monkeypatch, out: Path) -> list[dict]:
    """Per case, ``out``'s lock file and whether the holder's ``released`` mark was there, as the
    network saw them."""
    seen = []
    predict = BundleModel.predict

    def noting(model, *args, **kwargs):
        seen.append({"lock": (out / ".lock").read_text(), "released": (out / "released").exists()})
        return predict(model, *args, **kwargs)

    monkeypatch.setattr(BundleModel, "predict", noting)
    return seen


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    source, case_id = _one_case(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    partial = out / case_id / f".mask.nii.gz.{'0' * 32}.part"  # the holder's case being written
    partial.parent.mkdir()
    partial.write_bytes(b"half")
    holder, _ = _hold(out)
    try:
        result = _cli("--input", str(source), "--output", str(out), "--quiet", "--workers", "0", timeout=120)
    finally:
        _end(holder)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"in use by another batch run: pid {holder.pid} on {socket.gethostname()} since " \
        in errors[0] and "--wait" in errors[0], result.stderr
    # it touched nothing: the holder's temporary file stays, no case, no report
    assert sorted(p.name for p in out.rglob("*")) == [".lock", partial.name, case_id]


def test_a_holder_killed_with_sigkill_frees_the_folder_at_once(tmp_path, monkeypatch):
    source, case_id = _one_case(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    holder, said = _hold(out, "fork")
    child = int(said[0])  # forked while the lock was held; it lives on
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # still there
        seen = _watch_cases(monkeypatch, out)
        summary = run_batch(BUNDLE, source, out, workers=0)  # refused (OutputLockedError) if still held
    finally:
        _end(holder)
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert summary.done == 1 and (out / case_id / "record.json").is_file()
    # while it ran, the lock file named this run; on release it was emptied
    assert f'"pid": {os.getpid()}, "host": "{socket.gethostname()}"' in seen[0]["lock"]
    assert (out / ".lock").read_text() == ""


class _OnWaiting(logging.Handler):
    """Calls ``then`` when the run logs that it waits."""

    def __init__(self, then) -> None:
        super().__init__(logging.INFO)
        self.then = then
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting" in record.getMessage():
            self.messages.append(record.getMessage())
            self.then()


def test_wait_runs_once_the_holder_ends(tmp_path, monkeypatch):
    source, case_id = _one_case(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    holder, _ = _hold(out)
    waiting = _OnWaiting(holder.stdin.close)  # the holder ends once the run waits for it
    lock_logger = logging.getLogger("pipelines.batch.lock")
    lock_logger.addHandler(waiting)
    try:
        seen = _watch_cases(monkeypatch, out)
        code = main(["batch", "--bundle", str(BUNDLE), "--input", str(source), "--output", str(out),
                     "--workers", "0", "--wait"])
    finally:
        lock_logger.removeHandler(waiting)
        _end(holder)
    assert code == 0 and (out / case_id / "record.json").is_file()
    assert len(waiting.messages) == 1
    assert f"pid {holder.pid} on {socket.gethostname()} since " in waiting.messages[0]
    assert seen == [{"lock": seen[0]["lock"], "released": True}]  # the case ran after the holder ended


def test_a_run_that_raises_releases_the_lock(tmp_path, monkeypatch):
    source, _ = _one_case(tmp_path)
    out = tmp_path / "out"
    held = []

    def failing(plan, *args, **kwargs):
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()} on "), output_lock(out):
            pass
        held.append(True)
        raise RuntimeError("boom")

    monkeypatch.setattr("pipelines.batch.runner._segment_cases", failing)
    with pytest.raises(RuntimeError, match="boom"):
        run_batch(BUNDLE, source, out, workers=0)
    assert held == [True]  # the lock was held while the run ran
    with output_lock(out):  # and free after it raised
        pass
    with pytest.raises(FileNotFoundError, match="not a bundle"):  # refused after it took the lock
        run_batch(tmp_path / "no-bundle", source, out, workers=0)
    with output_lock(out):
        pass


@pytest.mark.slow
def test_under_torchrun_rank_0_locks_for_all_and_every_rank_stops_with_its_refusal(tmp_path):
    source, _ = _one_case(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    holder, _ = _hold(out)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pipelines", "batch", "--bundle", str(BUNDLE), "--input", str(source), "--output", str(out),
               "--quiet", "--workers", "0"]
    try:
        result = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        _end(holder)
    assert result.returncode != 0
    assert result.stderr.count(f"in use by another batch run: pid {holder.pid} on ") == 2, result.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # neither rank went on

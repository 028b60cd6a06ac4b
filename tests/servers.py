"""Real servers for integration tests, on 127.0.0.1: ports, waiting, stopping, and Orthanc with DICOMweb."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``condition`` until it returns a true value; fail the test on timeout or if ``process`` ends."""
    deadline = time.monotonic() + timeout
    tail = lambda: f":\n{log.read_text()[-4000:]}" if log is not None and log.exists() else ""  # noqa: E731
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process ended ({process.returncode}) before {what}{tail()}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}{tail()}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM the process group (started with ``start_new_session=True``), SIGKILL after 20 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _orthanc_config(root: Path, name: str, http_port: int, **dicom) -> None:
    """Write ``root/orthanc.json``: storage in ``root``, HTTP on ``http_port`` refusing remote
    clients, DICOMweb on, and the ``dicom`` settings. Skips the test without the Debian packages
    ``orthanc`` and ``orthanc-dicomweb`` (``make system-deps``)."""
    if not Path(ORTHANC).exists() or not ORTHANC_DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc and its DICOMweb plugin are not installed (Debian orthanc, orthanc-dicomweb: make system-deps)")
    config = {
        "Name": name,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        **dicom,
        "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))


@contextlib.contextmanager
def orthanc(root: Path, studies: Iterable[Path] = ()) -> Iterator[str]:
    """Orthanc with its DICOMweb plugin, HTTP only, refusing remote clients; yields the DICOMweb root URL.

    Every ``*.dcm`` file of each folder in ``studies`` is uploaded first. Skips the test when the
    Debian packages ``orthanc`` and ``orthanc-dicomweb`` are missing (``make system-deps``).
    """
    port = free_port()
    _orthanc_config(root, "unet-pipelines-test", port, DicomServerEnabled=False)
    log_path = root / "orthanc.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: http_ok(f"{base}/system"), 60, "Orthanc", process, log_path)
            for study in studies:
                for file in sorted(Path(study).glob("*.dcm")):
                    request = urllib.request.Request(f"{base}/instances", data=file.read_bytes(), method="POST")
                    urllib.request.urlopen(request, timeout=30).read()
            yield f"{base}/dicom-web"
        finally:
            stop_server(process)


class NetworkNamespace:
    """Commands run in the network namespace of a process started by ``unshare --net`` (only a
    loopback interface: what listens there, on any address, is reachable from nowhere else)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def command(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", "--", *argv]

    def run(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*argv), capture_output=True, text=True, timeout=timeout, check=False)

    def python(self, code: str, *args: str, timeout: float = 120) -> str:
        """Run ``code`` with this interpreter in the namespace; returns its stdout (fails the test on error)."""
        import sys

        result = self.run(sys.executable, "-c", code, *args, timeout=timeout)
        if result.returncode != 0:
            pytest.fail(f"in the namespace: {result.stderr[-3000:]}")
        return result.stdout


def _namespaces_usable() -> bool:
    if not all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip")):
        return False
    result = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True, timeout=30, check=False)
    return result.returncode == 0


_UPLOAD = """
import sys, urllib.request
from pathlib import Path
base = sys.argv[1]
for folder in sys.argv[2:]:
    for file in sorted(Path(folder).glob("*.dcm")):
        request = urllib.request.Request(f"{base}/instances", data=file.read_bytes(), method="POST")
        urllib.request.urlopen(request, timeout=30).read()
"""

_READY = """
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
        print(response.status)
except OSError:
    print(0)
"""


@contextlib.contextmanager
def orthanc_dimse(root: Path, studies: Iterable[Path] = (), aet: str = "ORTHANC") -> Iterator[tuple[str, str, NetworkNamespace]]:
    """Orthanc with its DICOM port (C-FIND, C-GET, C-STORE for any calling AE title; the called AE
    title checked) and DICOMweb, in a network namespace of its own: Orthanc cannot bind its DICOM
    port to one address, so it runs where only a loopback interface exists. Yields
    ``("dicom://ORTHANC@127.0.0.1:<port>", DICOMweb URL, the namespace)``; clients run in it.
    Skips without Orthanc or without the right to make namespaces (root, ``unshare``)."""
    if Path(ORTHANC).exists() and ORTHANC_DICOMWEB_PLUGIN.exists() and not _namespaces_usable():
        pytest.skip("cannot make a network namespace here (needs root, util-linux unshare and nsenter, iproute2 ip)")
    http_port, dicom_port = 8042, 4242  # the namespace's own ports: nothing else listens there
    _orthanc_config(root, "unet-pipelines-test-dimse", http_port, DicomServerEnabled=True, DicomAet=aet,
                    DicomPort=dicom_port, DicomCheckCalledAet=True, DicomAlwaysAllowEcho=True, DicomAlwaysAllowFind=True,
                    DicomAlwaysAllowGet=True, DicomAlwaysAllowStore=True)
    log_path = root / "orthanc.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", f'ip link set lo up && exec "{ORTHANC}" "{root / "orthanc.json"}"'],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        namespace = NetworkNamespace(process.pid)
        base = f"http://127.0.0.1:{http_port}"
        try:
            wait_for(lambda: namespace.python(_READY, f"{base}/system").strip() == "200", 60, "Orthanc", process, log_path)
            folders = [str(Path(study)) for study in studies]
            if folders:
                namespace.python(_UPLOAD, base, *folders, timeout=300)
            yield f"dicom://{aet}@127.0.0.1:{dicom_port}", f"{base}/dicom-web", namespace
        finally:
            stop_server(process)

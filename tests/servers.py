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
    tail = lambda: f":\n{log.read_text()[-4000:]}" if log is not None and log.exists() else ""
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
    clients, DICOMweb on, and the ``dicom`` settings (or any others). Skips the test without the Debian packages
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


def _net_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


@contextlib.contextmanager
def network_namespace() -> Iterator[NetworkNamespace]:
    """A network namespace of its own with its loopback interface up, held by a process that sleeps
    in it until the end: what runs there may stop and start again in the same namespace. Skips
    where namespaces cannot be made (needs root, util-linux ``unshare`` and ``nsenter``, iproute2 ``ip``)."""
    if not _namespaces_usable():
        pytest.skip("cannot make a network namespace here (needs root, util-linux unshare and nsenter, iproute2 ip)")
    holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        own = _net_namespace(os.getpid())
        wait_for(lambda: _net_namespace(holder.pid) not in (None, own), 30, "the network namespace", holder)
        namespace = NetworkNamespace(holder.pid)
        result = namespace.run("ip", "link", "set", "lo", "up", timeout=30)
        if result.returncode != 0:
            pytest.fail(f"ip link set lo up in the namespace: {result.stderr}")
        yield namespace
    finally:
        stop_server(holder)


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


class Orthanc:
    """A real Orthanc configured in ``root`` (``orthanc.json``, storage in ``root/storage``) that a test
    stops and starts again as it likes, on the same ports and storage: a PACS restarted, or gone, in
    the middle of a run. Its log, across starts, is ``root/orthanc.log``.

    Attributes:
        url: its DICOMweb root, ``http://127.0.0.1:<port>/dicom-web``.
        dicom: ``dicom://AET@127.0.0.1:<port>`` when its DICOM port is on, else None.
        namespace: the network namespace it runs in (with its DICOM port: clients of that port run
            there too), else None.
    """

    def __init__(self, root: Path, http_port: int, dicom: str | None = None,
                 namespace: NetworkNamespace | None = None) -> None:
        self.root, self.base, self.dicom, self.namespace = root, f"http://127.0.0.1:{http_port}", dicom, namespace
        self.url = f"{self.base}/dicom-web"
        self.log_path = root / "orthanc.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Starts it and waits until it answers (fails the test after 60 s or if it ends)."""
        command = [ORTHANC, str(self.root / "orthanc.json")]
        if self.namespace is not None:
            command = self.namespace.command(*command)
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.is_up, 60, "Orthanc", self.process, self.log_path)

    def is_up(self) -> bool:
        if self.namespace is None:
            return http_ok(f"{self.base}/system")
        return self.namespace.python(_READY, f"{self.base}/system").strip() == "200"

    def stop(self) -> None:
        """Stops it (SIGTERM, as a PACS is shut down for maintenance); its storage stays."""
        if self.process is not None:
            stop_server(self.process)

    @contextlib.contextmanager
    def running(self, studies: Iterable[Path] = ()) -> Iterator[Orthanc]:
        """Started, ``studies`` uploaded (:meth:`upload`), stopped at the end however the block ends."""
        try:
            self.start()
            self.upload(studies)
            yield self
        finally:
            self.stop()

    def upload(self, studies: Iterable[Path]) -> None:
        """Stores every ``*.dcm`` file of each folder in ``studies``."""
        folders = [str(Path(study)) for study in studies]
        if folders and self.namespace is not None:
            self.namespace.python(_UPLOAD, self.base, *folders, timeout=300)
        elif folders:
            for file in (file for folder in folders for file in sorted(Path(folder).glob("*.dcm"))):
                request = urllib.request.Request(f"{self.base}/instances", data=file.read_bytes(), method="POST")
                urllib.request.urlopen(request, timeout=30).read()


@contextlib.contextmanager
def orthanc_server(root: Path, studies: Iterable[Path] = (), **settings) -> Iterator[Orthanc]:
    """Orthanc with its DICOMweb plugin, HTTP only, refusing remote clients, every ``*.dcm`` file of
    each folder in ``studies`` uploaded; stopped at the end. ``settings``: more of its configuration
    (``LuaScripts=[...]``). Skips the test when the Debian packages ``orthanc`` and
    ``orthanc-dicomweb`` are missing (``make system-deps``)."""
    port = free_port()
    _orthanc_config(root, "unet-pipelines-test", port, DicomServerEnabled=False, **settings)
    with Orthanc(root, port).running(studies) as server:
        yield server


@contextlib.contextmanager
def orthanc(root: Path, studies: Iterable[Path] = ()) -> Iterator[str]:
    """:func:`orthanc_server`; yields its DICOMweb root URL."""
    with orthanc_server(root, studies) as server:
        yield server.url


@contextlib.contextmanager
def orthanc_dimse_server(root: Path, studies: Iterable[Path] = (), aet: str = "ORTHANC") -> Iterator[Orthanc]:
    """Orthanc with its DICOM port (C-FIND, C-GET, C-STORE for any calling AE title; the called AE
    title checked) and DICOMweb, in a network namespace of its own (:func:`network_namespace`):
    Orthanc cannot bind its DICOM port to one address, so it runs where only a loopback interface
    exists, and clients of that port run there too. Skips without Orthanc or without the right to
    make namespaces."""
    http_port, dicom_port = 8042, 4242  # the namespace's own ports: nothing else listens there
    _orthanc_config(root, "unet-pipelines-test-dimse", http_port, DicomServerEnabled=True, DicomAet=aet,
                    DicomPort=dicom_port, DicomCheckCalledAet=True, DicomAlwaysAllowEcho=True, DicomAlwaysAllowFind=True,
                    DicomAlwaysAllowGet=True, DicomAlwaysAllowStore=True)
    with network_namespace() as namespace, \
            Orthanc(root, http_port, f"dicom://{aet}@127.0.0.1:{dicom_port}", namespace).running(studies) as server:
        yield server


@contextlib.contextmanager
def orthanc_dimse(root: Path, studies: Iterable[Path] = (), aet: str = "ORTHANC") -> Iterator[tuple[str, str, NetworkNamespace]]:
    """:func:`orthanc_dimse_server`; yields ``("dicom://AET@127.0.0.1:<port>", DICOMweb URL, the namespace)``."""
    with orthanc_dimse_server(root, studies, aet) as server:
        yield server.dicom, server.url, server.namespace

"""MONAI Label fixtures: the label environment's Python and a real server started from it."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.servers import free_port, http_ok, stop_server, wait_for


def label_python() -> Path:
    """``$UNET_LABEL_PYTHON`` (set by ``make test``), by default ``.venv-label/bin/python``."""
    python = Path(os.environ.get("UNET_LABEL_PYTHON", REPO / ".venv-label" / "bin" / "python"))
    if not python.is_file():
        pytest.skip(f"the MONAI Label environment is missing: {python} (make label-venv)")
    return python


@contextlib.contextmanager
def label_server(root: Path, studies: str, *args: str) -> Iterator[tuple[str, Path, Path]]:
    """``unet-pipelines label-server`` on a free loopback port; yields (base URL, app folder, log file)."""
    port, app, log_path = free_port(), root / "app", root / "server.log"
    command = [str(label_python()), "-m", "pipelines", "label-server", "--studies", studies, "--port", str(port),
               "--app-dir", str(app), "--bundles-dir", str(REPO / "bundles"), *args]
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        cache = str(root / "cache")  # DICOMweb downloads, instead of ~/.cache/monailabel
        env = dict(os.environ, MONAI_LABEL_DICOMWEB_CACHE_PATH=cache, MONAI_LABEL_DATASTORE_CACHE_PATH=cache)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root, env=env)
        try:
            wait_for(lambda: http_ok(f"{base}/info/"), 180, "the MONAI Label server", process, log_path)
            yield base, app, log_path
        finally:
            stop_server(process)

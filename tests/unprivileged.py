"""Run Python code as an unprivileged user: root reads and writes everything regardless of
permissions, so permission errors can only be seen with privileges dropped (``setpriv``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NOBODY = 65534


def open_up(path: Path) -> None:
    """Let an unprivileged user reach ``path``: read and traverse it and every folder above it."""
    for folder in [path, *path.parents]:
        os.chmod(folder, os.stat(folder).st_mode | 0o005)


def run_unprivileged(code: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -c code`` as uid/gid 65534 (as this user itself when not root); skips the test
    when privileges cannot be dropped."""
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv to drop privileges")
        command = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    env = {**os.environ, "HOME": "/tmp", **kwargs.pop("env", {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def load_volume_unprivileged(path: Path) -> str:
    """What ``load_volume(path)`` does for an unprivileged user: ``"LOADED"`` or ``"REFUSED <message>"``."""
    code = (
        "from pipelines.io import load_volume, InputDataError\n"
        f"try:\n    load_volume({str(path)!r})\n    print('LOADED')\n"
        "except InputDataError as e:\n    print('REFUSED', e)\n"
    )
    result = run_unprivileged(code)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()

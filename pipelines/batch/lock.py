"""One batch run per output folder: an exclusive OS lock on ``<output>/.lock``.

Two runs on one folder (a cron job and a manual rerun) would write the same cases, and each would
remove the other's temporary files as the leftovers of a killed run. A run therefore holds
``fcntl.flock`` on the folder's lock file from before it looks at the cases until its reports are
written. The kernel releases the lock when the process ends, however it ends (``kill -9``
included): there is no stale lock to judge or remove. While it is held, the file says who holds it
(one JSON line: pid, host, start time, command), so that a refused run can name the holder; the
holder empties it on release. The file itself stays: removing it would let a run still waiting on
the old file and a run creating a new one both hold "the" lock.

A process forked while the lock is held (the batch job's loader processes) closes its copy of the
descriptor at once, so that the lock ends with the process that took it, not with the last of its
children. On NFS, Linux takes ``flock`` as a lock on the server, so runs on different hosts exclude
each other too.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.batch.errors import BatchInputError

__all__ = ["LOCK_NAME", "LockHolder", "OutputLockedError", "output_lock"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"

_NAMING_S = 0.5  # how long a refused run waits for a holder that has just taken the lock to write its name
_COMMAND_SHOWN = 200  # characters of the holder's command line in a message
_UNNAMED = "a process that has not written its name in the lock file"
_HELD: set[int] = set()  # descriptors of the locks this process holds
_fork_hook = False


@dataclass(frozen=True)
class LockHolder:
    """Who holds an output folder's lock, as its lock file says.

    Attributes:
        pid: the holder's process id.
        host: the host name it runs on.
        started: when it took the lock, ISO 8601 local time with its UTC offset.
        command: its command line.
    """

    pid: int
    host: str
    started: str
    command: str

    @classmethod
    def this_process(cls) -> LockHolder:
        """This process, now."""
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), started, shlex.join(sys.orig_argv))

    def __str__(self) -> str:
        command = " ".join(self.command.split())  # one line, whatever the arguments hold
        if len(command) > _COMMAND_SHOWN:
            command = command[:_COMMAND_SHOWN - 3] + "..."
        return f"pid {self.pid} on {self.host} since {self.started} ({command})"


class OutputLockedError(BatchInputError):
    """Another run holds the output folder's lock (the command line exits with 2).

    Attributes:
        folder: the output folder.
        holder: who holds it; None when its lock file did not say (yet).
    """

    def __init__(self, folder: str | os.PathLike, holder: LockHolder | None) -> None:
        who = str(holder) if holder else _UNNAMED
        super().__init__(f"output folder {folder} is in use by another batch run: {who}; "
                         "wait for it to end, or rerun with --wait")
        self.folder = Path(folder)
        self.holder = holder

    def __reduce__(self):  # pickled as its arguments: torchrun's rank 0 hands it to the other ranks
        return type(self), (self.folder, self.holder)


@contextmanager
def output_lock(folder: str | os.PathLike, *, wait: bool = False) -> Iterator[Path]:
    """Hold the exclusive lock on an output folder while inside (see the module docstring).

    Args:
        folder: the output folder (it must exist); its lock file, ``.lock``, is created if missing.
        wait: when another process holds the lock, wait until it ends (logged once at INFO, naming the
            holder) instead of raising.

    Yields:
        The lock file's path.

    Raises:
        OutputLockedError: another process holds the lock, and ``wait`` is False.
        BatchInputError: the lock file cannot be opened or written.
    """
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd programs
    except OSError as exc:
        raise BatchInputError(f"cannot open the lock file {path}: {exc.strerror or exc}") from exc
    try:
        _acquire(fd, Path(folder), wait)
        _HELD.add(fd)
        _close_in_forked_children()
        try:
            _write(fd, path, LockHolder.this_process())
            yield path
        finally:
            _HELD.discard(fd)
            try:
                os.ftruncate(fd, 0)  # nobody to name any more
            except OSError:
                pass
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, folder: Path, wait: bool) -> None:
    deadline = time.monotonic() + _NAMING_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = _holder(fd)
        if holder is None and time.monotonic() < deadline:
            time.sleep(0.02)  # it took the lock a moment ago and is writing its name
            continue
        if not wait:
            raise OutputLockedError(folder, holder)
        logger.info("output folder %s is in use by another batch run: %s; waiting for it to end", folder,
                    holder or _UNNAMED)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a signal handler's exception (Ctrl-C) ends the wait
        return


def _holder(fd: int) -> LockHolder | None:
    try:
        return LockHolder(**json.loads(os.pread(fd, 65536, 0)))
    except (OSError, ValueError, TypeError):
        return None


def _write(fd: int, path: Path, holder: LockHolder) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(holder)) + "\n").encode(), 0)
        os.fsync(fd)  # seen at once by a run on another host of a shared folder
    except OSError as exc:
        raise BatchInputError(f"cannot write the lock file {path}: {exc.strerror or exc}") from exc


def _close_in_forked_children() -> None:
    """Have every process forked from now on close the held locks' descriptors (closing, unlike
    ``LOCK_UN``, leaves the parent's lock alone)."""
    global _fork_hook
    if not _fork_hook:
        os.register_at_fork(after_in_child=_forget_held)
        _fork_hook = True


def _forget_held() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()

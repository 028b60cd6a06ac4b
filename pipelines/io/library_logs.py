"""Warnings that reading libraries log instead of raising, made into Python warnings.

pydicom reports some problems through its ``pydicom`` logger only, and others both through the
logger and as a warning (``pydicom.misc.warn_and_log``: a DICOMDIR's missing files, each with its
path). Code that keeps the warnings of a file with the case it belongs to (the DICOM scan, the batch
job's loaders and writers) catches warnings; inside :func:`library_logs_as_warnings` the logged ones
are warnings too, and never reach a log handler (which would print the path, possibly naming the
patient, on stderr).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["LIBRARY_LOGGERS", "library_logs_as_warnings"]

LIBRARY_LOGGERS = ("pydicom", "highdicom", "nibabel")  # their records name the files they read or write


class _ToWarnings(logging.Handler):
    """Raises a record of WARNING or above as a ``UserWarning`` (the category ``warn_and_log`` uses,
    so a message both logged and warned is caught twice with one text); hands the others on to the
    root logger's handlers, as propagation would."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            warnings.warn(record.getMessage(), UserWarning, stacklevel=2)
        else:
            logging.getLogger().handle(record)


_HANDLER = _ToWarnings()
_LOCK = threading.Lock()
_users = 0
_propagated: dict[str, bool] = {}


@contextmanager
def library_logs_as_warnings() -> Iterator[None]:
    """Meanwhile, in every thread, records of WARNING and above from :data:`LIBRARY_LOGGERS` and
    their child loggers are raised as ``UserWarning`` instead of reaching the root logger's handlers.
    Nests, and may be entered from several threads at once: the change stays until the last one
    leaves."""
    global _users
    with _LOCK:
        if _users == 0:
            for name in LIBRARY_LOGGERS:
                logger = logging.getLogger(name)
                _propagated[name] = logger.propagate
                logger.addHandler(_HANDLER)
                logger.propagate = False
        _users += 1
    try:
        yield
    finally:
        with _LOCK:
            _users -= 1
            if _users == 0:
                for name in LIBRARY_LOGGERS:
                    logger = logging.getLogger(name)
                    logger.removeHandler(_HANDLER)
                    logger.propagate = _propagated.pop(name, True)

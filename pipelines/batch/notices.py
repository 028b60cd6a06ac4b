"""Warnings a case raises go to its record: third-party messages (pydicom, nibabel, MONAI) often name
the file, which may name the patient, so they never reach the log or stderr during a batch run."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from pipelines.io.library_logs import library_logs_as_warnings

__all__ = ["MAX_WARNINGS", "CaseWarnings", "case_warnings", "distinct_warnings", "warning_text"]

MAX_WARNINGS = 50  # per record


def warning_text(message, category) -> str:
    return f"{category.__name__}: {message}"


def distinct_warnings(texts: list[str]) -> list[str]:
    """``texts`` without repeats, at most ``MAX_WARNINGS`` and a line saying how many more."""
    texts = list(dict.fromkeys(texts))
    if len(texts) > MAX_WARNINGS:
        texts = [*texts[:MAX_WARNINGS], f"... and {len(texts) - MAX_WARNINGS} more warnings"]
    return texts


def case_warnings(case, caught: Sequence[str]) -> list[str]:
    """A case's warnings: from the scan of its headers (``Case.warnings``), its loading and writing."""
    return distinct_warnings([*case.warnings, *caught])


class CaseWarnings:
    """Sends the warnings raised in a thread of this process to the case that thread works on, for its
    record: third-party messages (pydicom, nibabel, MONAI) often name the file, which may name the
    patient; those pydicom, highdicom and nibabel only log are warnings too
    (:func:`~pipelines.io.library_logs.library_logs_as_warnings`). Outside a case they are shown as
    before. The loader processes keep their own (pipelines.batch.loading)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._show_before = warnings.showwarning

    @contextmanager
    def installed(self) -> Iterator[None]:
        """For the run, from the main thread (``warnings.showwarning`` is process-wide)."""
        with warnings.catch_warnings(), library_logs_as_warnings():
            self._show_before = warnings.showwarning
            warnings.showwarning = self._show
            yield

    @contextmanager
    def into(self, sink: list[str]) -> Iterator[None]:
        """Warnings raised in this thread meanwhile are appended to ``sink``."""
        self._local.sink = sink
        try:
            yield
        finally:
            self._local.sink = None

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        sink = getattr(self._local, "sink", None)
        if sink is None:
            self._show_before(message, category, filename, lineno, file, line)
        else:
            sink.append(warning_text(message, category))

"""SIGINT and SIGTERM during a batch run: the run stops with :class:`BatchInterrupted` after ending
its loader processes and finishing the case being written, so that finished cases stay complete."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the runner, which imports this module, makes the summary
    from pipelines.batch.runner import BatchSummary

__all__ = ["BatchInterrupted", "stopped_by_signals"]


class BatchInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run (the command line exits with 128 + ``signum``: 130, 143).

    The loader processes were ended, the case being written finished, the reports written for the
    finished cases; a rerun resumes. Like :class:`KeyboardInterrupt`, not caught by ``except Exception``.

    Attributes:
        signum: the signal.
        summary: what the run did until then; None when it stopped before the first case.
    """

    def __init__(self, signum: int, summary: BatchSummary | None = None) -> None:
        super().__init__(signum)
        self.signum = signum
        self.summary = summary

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        done = self.summary
        if done is None:
            return f"stopped by {name} before the first case"
        left = done.cases - done.skipped - done.done - len(done.failed)
        return (f"stopped by {name}: {done.done} cases segmented, {len(done.failed)} failed, {left} not done "
                f"({done.skipped} complete from an earlier run); the finished cases are complete, rerun to resume")


@contextmanager
def stopped_by_signals() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise :class:`BatchInterrupted` in the main thread, so that the
    run ends its loader processes and finishes the case being written before it stops (SIGTERM would
    otherwise end this process at once and leave the loader processes behind). Only the first: a
    second signal acts as it would without the run; a rerun then cleans up as after ``kill -9``.
    Handlers the calling program installed are left alone, as is everything outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    replaced = {}

    def stop(signum, frame) -> None:
        signal.signal(signum, replaced[signum])
        raise BatchInterrupted(signum)

    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) is default:
            replaced[signum] = default
            signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)

"""Cases loaded and preprocessed by worker processes (a torch ``DataLoader``) while the network
runs on the previous one; a worker that dies fails the case it was loading, not the run.

Each item is a :class:`Loaded` case (its loaded inputs and preprocessed data) or a :class:`LoadFailed`
one (the reason); errors travel as data, never as exceptions. Warnings raised while a case loads
(third-party messages often name the file) travel with it, for its record.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import os
import pickle
import re
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.batch.bundle import BundleModel
from pipelines.batch.cases import Case
from pipelines.batch.errors import describe_error
from pipelines.batch.notices import distinct_warnings, warning_text
from pipelines.io.library_logs import library_logs_as_warnings
from pipelines.runtime import CoreShare

__all__ = ["LoadFailed", "Loaded", "Loading"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>


@dataclass
class Loaded:
    """A case loaded and preprocessed.

    Attributes:
        case: the case.
        sources: its inputs as loaded (key -> ``(C, *spatial)`` MetaTensor).
        data: the bundle's preprocessing of them.
        timings: ``load_s`` and ``preprocess_s``.
        warnings: what was warned of meanwhile (distinct).
    """

    case: Case
    sources: dict
    data: dict
    timings: dict
    warnings: list[str] = field(default_factory=list)


@dataclass
class LoadFailed:
    """A case that could not be loaded or preprocessed: ``error`` says why."""

    case: Case
    error: str
    warnings: list[str] = field(default_factory=list)


class _CaseLoader(torch.utils.data.Dataset):
    """Loads and preprocesses a case in a worker process; never raises (errors travel as data)."""

    def __init__(self, cases: list[Case], model: BundleModel, cache_dir: Path, cores: CoreShare | None = None) -> None:
        self.cases = cases
        self.preprocess = model.preprocess
        self.rules = dict(model.series_rules)
        # an image to segment must hold something: a blank one would fail deep in the preprocessing
        self.options = {**model.load_options, "allow_blank": False}
        self.cache_dir = cache_dir
        self.cores = cores
        # items being made now, across the worker processes: once they are ended, those a dead
        # worker left here still count in ``cores`` (see Loading._receive)
        self.at_work = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> bytes:
        with self.cores.working() if self.cores else nullcontext():
            with self.at_work.get_lock():
                self.at_work.value += 1
            try:
                item = self._item(index)
            finally:
                with self.at_work.get_lock():
                    self.at_work.value -= 1
            # pickled here, by value: torch's worker queue moves tensors to shared memory, which frees
            # memory that numpy views in MONAI's transform trace (e.g. Orientation's affine) still point to
            return pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)

    def _item(self, index: int) -> Loaded | LoadFailed:
        case = self.cases[index]
        start = time.perf_counter()
        # third-party warnings often name the file: they go to the case's record, not to stderr
        # (entering resets the once-per-location registries: each case gets its own warnings)
        with warnings.catch_warnings(record=True) as caught, library_logs_as_warnings():
            try:
                sources = case.load(self.rules, self.options, self.cache_dir)
                loaded = time.perf_counter()
                data = self.preprocess(sources)
                timings = {"load_s": loaded - start, "preprocess_s": time.perf_counter() - loaded}
                item: Loaded | LoadFailed = Loaded(case, sources, data, timings)
            except Exception as exc:  # one bad case never stops the run: recorded as failed
                item = LoadFailed(case, describe_error(exc))
        item.warnings = distinct_warnings([warning_text(w.message, w.category) for w in caught])
        return item


def _first(batch):
    return batch


class _LoaderDied(Exception):
    """A loader worker process died; ``how``: ``signal SIGABRT``, ``exit code 1``, ..."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class Loading:
    """The cases, loaded and preprocessed by ``workers`` processes (a torch DataLoader), in order.

    A worker process that dies (a decoder's ``abort()``, a segmentation fault, the out-of-memory
    killer) fails the study it was loading, not the run. With prefetching, several cases may be in
    flight when it dies, and one already sent may be lost with it; so the loader is replaced by a
    fresh one for the cases not yet received, the first of them alone: if that one dies too, the
    case is failed with the reason, else the rest follow as before.
    """

    def __init__(self, cases: list[Case], model: BundleModel, cache_dir: Path, workers: int,
                 cores: CoreShare | None) -> None:
        self.cases, self.model, self.cache_dir, self.workers, self.cores = cases, model, cache_dir, workers, cores

    def __iter__(self) -> Iterator[Loaded | LoadFailed]:
        remaining = deque(self.cases)
        alone = False
        while remaining:
            try:
                with closing(self._receive(list(remaining)[:1] if alone else list(remaining))) as items:
                    for item in items:
                        remaining.popleft()
                        alone = False
                        yield item
            except _LoaderDied as death:
                if not remaining:
                    return
                case = remaining[0]
                if alone:
                    remaining.popleft()
                    alone = False
                    yield LoadFailed(case, f"the loader process died ({death.how}) while reading this study")
                else:
                    logger.warning("%s: a loader process died (%s) with this case next; loading it again, alone",
                                   case.case_id, death.how)
                    alone = True

    def _receive(self, cases: list[Case]) -> Iterator[Loaded | LoadFailed]:
        dataset = _CaseLoader(cases, self.model, self.cache_dir, self.cores if self.workers else None)
        workers = min(self.workers, len(cases))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_first,
            prefetch_factor=2 if workers else None, persistent_workers=False,
            worker_init_fn=functools.partial(_end_with, os.getpid()) if workers else None,
        )
        batches = iter(loader)
        deaths = _WorkerDeaths()
        with deaths.watching():
            try:
                while (payload := deaths.next(batches)) is not None:
                    yield pickle.loads(payload)
            finally:
                _end_workers(batches)
                if self.cores is not None and dataset.at_work.value > 0:  # died at work
                    self.cores.forget(dataset.at_work.value)


class _WorkerDeaths:
    """Turns torch's report of a dead DataLoader worker into :class:`_LoaderDied`, raised from the
    loader only. Torch's SIGCHLD handler raises its RuntimeError in the main thread wherever that is:
    inside the next case's inference, say, which would then fail in place of the case being loaded."""

    def __init__(self) -> None:
        self.report: str | None = None
        self._waiting = False

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Wraps torch's SIGCHLD handler (installed by the first worker iterator in the main thread);
        elsewhere torch finds a dead worker when the loader has been silent for 5 s."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        torch_handler = signal.getsignal(signal.SIGCHLD)

        def on_child(signum, frame) -> None:
            if callable(torch_handler):
                try:
                    torch_handler(signum, frame)
                except RuntimeError as exc:
                    self.report = str(exc)
                    if self._waiting:
                        raise

        signal.signal(signal.SIGCHLD, on_child)
        try:
            yield
        finally:
            signal.signal(signal.SIGCHLD, torch_handler if torch_handler is not None else signal.SIG_DFL)

    def next(self, batches) -> bytes | None:
        """The next payload of ``batches``, None at its end."""
        if self.report:
            raise _LoaderDied(_how_it_died(self.report))
        self._waiting = True
        try:
            return next(batches)
        except StopIteration:
            return None
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            raise _LoaderDied(_how_it_died(self.report or str(exc))) from exc
        finally:
            self._waiting = False


def _how_it_died(report: str) -> str:
    """``signal SIGABRT`` from torch's "DataLoader worker (pid N) is killed by signal: Aborted." """
    killed = re.search(r"killed by signal: (.+?)\.", report)
    if killed:
        names = [s.name for s in signal.Signals if signal.strsignal(s) == killed.group(1)]
        if names == ["SIGKILL"]:
            return "signal SIGKILL, as the out-of-memory killer sends"
        return f"signal {names[0]}" if names else f"signal: {killed.group(1)}"
    code = re.search(r"exit code (-?\d+)", report)
    return f"exit code {code.group(1)}" if code else "cause unknown"


def _end_with(job: int, _worker: int) -> None:
    """In a loader process: end when the batch job ``job`` ends, however it ends. Killed with
    ``kill -9`` or by the out-of-memory killer, the job cannot end its loaders, and one blocked
    writing a prefetched case into the pipe no one reads would live on, holding its memory and the
    job's stdout and stderr. Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) ends it; it
    is sent when the thread that started the loader ends, the one that iterates :class:`Loading`
    for the whole run. Elsewhere nothing is set."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return
    if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0 and os.getppid() != job:  # the job ended before that
        os._exit(1)


def _end_workers(batches) -> None:
    """Ends a DataLoader iterator's worker processes now, as torch does when the iterator is garbage
    collected (its private ``_shutdown_workers``: asks them to stop, terminates those still busy after
    5 s). A run stopped by a signal must not leave that to chance: a worker left behind keeps the
    caller's stdout open."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()

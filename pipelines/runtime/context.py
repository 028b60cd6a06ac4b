"""One context for the process-wide settings of a long inference run: set on entry, restored on exit."""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from pipelines.runtime.cores import CoreShare

__all__ = ["SWITCH_INTERVAL_S", "cpu_runtime"]

# the interpreter's thread switch interval inside cpu_runtime; Python's default is 5 ms
SWITCH_INTERVAL_S = 0.0002

_lock = threading.Lock()
_open = 0  # cpu_runtime contexts open, over all threads
_saved: dict = {}  # what the first entry found: switch interval, torch threads, whether it froze the collector


def _set_switch_interval(seconds: float) -> None:
    """``sys.setswitchinterval`` that keeps a value read from ``sys.getswitchinterval``: Python stores
    whole microseconds and truncates, so ``1e-6 * n`` read back could become ``n - 1``."""
    sys.setswitchinterval(seconds + 5e-7)


@contextmanager
def cpu_runtime(network: torch.nn.Module | None = None, cores: CoreShare | None = None) -> Iterator[None]:
    """Process-wide settings for a run that keeps a network busy while helpers load and write.

    While inside:

    - the interpreter's thread switch interval is at most :data:`SWITCH_INTERVAL_S`: a helper thread
      running Python (a writer) holds the GIL, and the thread running the network needs it for a
      moment between operators; by default it waits up to 5 ms for it, with its cores idle;
    - what is alive at entry (libraries, the network, the list of cases) is frozen out of the cyclic
      garbage collector's full passes (``gc.freeze``), each of which would otherwise walk all of it
      on some thread beside the inference; not when something else froze objects before the first
      entry (the collector is then left as it is);
    - with ``cores``, ``network`` resizes torch's thread pool before each of its layers, leaving a
      core to each helper at work (:meth:`~pipelines.runtime.CoreShare.serving`).

    On exit the switch interval, the collector and torch's thread count are as they were at entry.
    Nested and concurrent uses share the process-wide settings: the first entry applies them, the
    last exit restores them; each use's ``cores`` serves its own ``network``. Two other process-wide
    settings live in this package and are not held here: :func:`~pipelines.runtime.keep_freed_memory`,
    which inferers enter for each call once their output is allocated (memory allocated inside must
    not outlive it), and :func:`~pipelines.runtime.memoise_iod_lookups`, a cache of highdicom's own
    answers that the DICOM SEG writer installs for good.

    Args:
        network: the network whose layers share the cores (needed with ``cores``).
        cores: the helpers' counter, created before the helper processes start; None on a GPU.
    """
    global _open
    if cores is not None and network is None:
        raise ValueError("`network` must be given with `cores`, got None")
    with _lock:
        _open += 1
        if _open == 1:
            _saved.update(interval=sys.getswitchinterval(), threads=torch.get_num_threads(),
                          froze=gc.get_freeze_count() == 0)
            _set_switch_interval(min(_saved["interval"], SWITCH_INTERVAL_S))
            if _saved["froze"]:
                gc.freeze()
    try:
        with ExitStack() as stack:
            if cores is not None:
                stack.enter_context(cores.serving(network))
            yield
    finally:
        with _lock:
            _open -= 1
            if _open == 0:
                if _saved["froze"]:
                    gc.unfreeze()
                _set_switch_interval(_saved["interval"])
                torch.set_num_threads(_saved["threads"])
                _saved.clear()

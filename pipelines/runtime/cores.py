"""CPU cores shared between the network and a job's helpers (case loaders, a writer thread).

On a CPU the network's operators run on ``torch.get_num_threads()`` threads that meet after each
operator. When a helper (a loader process decoding the next study, the thread writing the last one)
takes one of those cores, every operator waits for the thread it displaced, so each CPU-second of
helper work costs the network about as much as running the helper alone. Here the network gives up
one thread per working helper, checked before each of its layers, and takes it back when the helper
is done; the helper then has a core of its own, and the network, which slows much less than in
proportion to its threads, goes on at its speed on the rest. Figures: docs/benchmarks.md,
"The batch job's throughput".
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["CoreShare"]


class CoreShare:
    """Counts the helpers at work, across processes, and sizes the network's thread pool to match.

    Args:
        threads: the network's threads when no helper works (default: ``torch.get_num_threads()``).

    Create it before the loader processes start (they inherit its counter); wrap each helper's work
    in :meth:`working` and the network's run in :meth:`serving` (or in
    :func:`pipelines.runtime.cpu_runtime`, which enters it).
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = int(threads or torch.get_num_threads())
        if self.threads < 1:
            raise ValueError(f"`threads` must be at least 1, got {self.threads}")
        self._busy = multiprocessing.Value("i", 0)

    @property
    def busy(self) -> int:
        """Helpers at work now."""
        return self._busy.value

    def wanted_threads(self) -> int:
        """The network's share: one thread fewer per working helper, at least one."""
        return max(1, self.threads - self._busy.value)

    @contextmanager
    def working(self) -> Iterator[None]:
        """A helper's work: the network leaves it a core meanwhile."""
        with self._busy.get_lock():
            self._busy.value += 1
        try:
            yield
        finally:
            with self._busy.get_lock():
                self._busy.value -= 1

    def forget(self, helpers: int) -> None:
        """``helpers`` died inside :meth:`working` (a loader process killed by a signal): they hold no core."""
        with self._busy.get_lock():
            self._busy.value = max(0, self._busy.value - helpers)

    @contextmanager
    def serving(self, network: torch.nn.Module) -> Iterator[None]:
        """While inside, ``network`` resizes the thread pool before each of its layers; on exit the
        pool is back to ``threads``."""
        handles = [m.register_forward_pre_hook(self._before_layer) for m in network.modules() if not any(m.children())]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            torch.set_num_threads(self.threads)

    def _before_layer(self, module: torch.nn.Module, args: tuple) -> None:
        wanted = self.wanted_threads()
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)

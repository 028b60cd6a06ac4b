"""CPU cores shared between the network, a job's helpers (case loaders, a writer thread) and the
rest of the machine.

On a CPU the network's operators run on ``torch.get_num_threads()`` threads that meet after each
operator. When a helper (a loader process decoding the next study, the thread writing the last one)
takes one of those cores, every operator waits for the thread it displaced, so each CPU-second of
helper work costs the network about as much as running the helper alone. Here the network gives up
one thread per working helper, checked before each of its layers, and takes it back when the helper
is done; the helper then has a core of its own, and the network, which slows much less than in
proportion to its threads, goes on at its speed on the rest. Figures: docs/benchmarks.md,
"The batch job's throughput".

The same holds for work the job does not own: another process busy on the machine (a training run,
another job on a shared server) takes a core from the network's threads just as a helper does, and
torch's threads, meeting at every operator, then wait on the one it displaced (a window 3 to 4 times
slower with one competing process on 2 cores). :class:`MachineLoad` measures the cores the rest of
the machine kept busy over the last second, and the network gives those up too. Figures:
docs/benchmarks.md, "Runtimes".
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["CoreShare", "MachineLoad"]

_PROC = Path("/proc")


def _stat_fields(path: Path) -> list[str]:
    """The fields of a ``/proc/<pid>/stat`` after the command name (which may hold spaces)."""
    text = path.read_text()
    return text[text.rindex(")") + 2 :].split()


class MachineLoad:
    """The cores that processes other than this one and its descendants keep busy, on the CPUs this
    process may run on, averaged over the last ``interval`` seconds (Linux; 0 elsewhere).

    Read from ``/proc/stat`` (the busy time of each of this process's CPUs) less the CPU time of this
    process and of its descendants (their ``/proc/<pid>/stat``), so that the job's own helpers are
    not counted: :class:`CoreShare` counts them itself.

    Args:
        interval: the shortest span a measurement covers; asked more often, the last one is returned.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.available = (_PROC / "stat").is_file() and bool(self.cpus)
        self._last: tuple[float, int, int] | None = None
        self._cores = 0.0

    def cores(self) -> float:
        """The other processes' cores over the last ``interval`` seconds (0.0 until one has passed)."""
        if not self.available:
            return 0.0
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.interval:
            return self._cores
        try:
            busy, ours = self._busy_ticks(), self._own_ticks()
        except (OSError, ValueError, IndexError):  # /proc as a container may show it: no measure, no change
            return self._cores
        if self._last is not None:
            seconds, ticks = now - self._last[0], os.sysconf("SC_CLK_TCK")
            self._cores = max(0.0, ((busy - self._last[1]) - (ours - self._last[2])) / ticks / seconds)
        self._last = (now, busy, ours)
        return self._cores

    def _busy_ticks(self) -> int:
        """Clock ticks this process's CPUs spent on anything but idling and waiting for I/O."""
        wanted, total = {f"cpu{n}" for n in self.cpus}, 0
        for line in (_PROC / "stat").read_text().splitlines():
            fields = line.split()
            if fields and fields[0] in wanted:
                ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks) - ticks[3] - ticks[4] - ticks[7]
        return total

    def _own_ticks(self) -> int:
        """Clock ticks of CPU time of this process (all its threads) and of its descendants, living or
        ended (an ended child's time moves into its parent's once the parent has waited for it)."""
        total, pending = 0, [os.getpid()]
        while pending:
            pid = pending.pop()
            try:
                fields = _stat_fields(_PROC / str(pid) / "stat")
                total += sum(int(v) for v in fields[11:15])  # utime, stime, and of the children it reaped
                for task in (_PROC / str(pid) / "task").iterdir():
                    pending.extend(int(child) for child in (task / "children").read_text().split())
            except FileNotFoundError:  # a descendant that has just ended
                continue
        return total


class CoreShare:
    """Counts the helpers at work, across processes, and sizes the network's thread pool to match.

    Args:
        threads: the network's threads when no helper works (default: ``torch.get_num_threads()``).
        watch_machine: leave the network's threads also to the cores the rest of the machine keeps
            busy (:attr:`machine`, a :class:`MachineLoad`); False: count the job's helpers only.

    Create it before the loader processes start (they inherit its counter); wrap each helper's work
    in :meth:`working` and the network's run in :meth:`serving` (or in
    :func:`pipelines.runtime.cpu_runtime`, which enters it).
    """

    def __init__(self, threads: int | None = None, watch_machine: bool = True) -> None:
        self.threads = int(threads or torch.get_num_threads())
        if self.threads < 1:
            raise ValueError(f"`threads` must be at least 1, got {self.threads}")
        self._busy = multiprocessing.Value("i", 0)
        self.machine = MachineLoad() if watch_machine else None

    @property
    def busy(self) -> int:
        """Helpers at work now."""
        return self._busy.value

    def wanted_threads(self) -> int:
        """The network's share: one thread fewer per working helper and per core the rest of the
        machine kept busy (rounded), at least one."""
        others = round(self.machine.cores()) if self.machine is not None else 0
        return max(1, self.threads - self._busy.value - others)

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

"""The network gives up a thread to each helper at work, in any process, and to each core other
processes keep busy, and takes it back."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipelines.runtime import CoreShare, MachineLoad


class _Recorder(torch.nn.Module):
    """Two layers that note the thread pool's size when they run."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Conv3d(1, 2, 3), torch.nn.Conv3d(2, 1, 1)
        self.seen: list[int] = []
        self.first.register_forward_hook(lambda *_: self.seen.append(torch.get_num_threads()))
        self.second.register_forward_hook(lambda *_: self.seen.append(torch.get_num_threads()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield 3
    torch.set_num_threads(before)


def _helper(cores: CoreShare, started, release) -> None:
    with cores.working():
        started.set()
        release.wait(30)


def test_a_helper_in_another_process_takes_one_thread_while_it_works(threads):
    cores = CoreShare(threads, watch_machine=False)
    network, x = _Recorder(), torch.zeros(1, 1, 5, 6, 7)
    context = multiprocessing.get_context("fork")
    started, release = context.Event(), context.Event()
    with cores.serving(network):
        network(x)
        helper = context.Process(target=_helper, args=(cores, started, release))
        helper.start()
        assert started.wait(30) and cores.busy == 1
        network(x)
        with cores.working():  # and a second one, here (the writer thread's case)
            network(x)
        release.set()
        helper.join(30)
        assert helper.exitcode == 0 and cores.busy == 0
        network(x)
    assert network.seen == [3, 3, 2, 2, 1, 1, 3, 3]
    assert torch.get_num_threads() == 3
    assert not network.first._forward_pre_hooks and not network.second._forward_pre_hooks
    network(x)  # outside, nothing resizes the pool
    assert network.seen[-2:] == [3, 3]


def test_the_network_keeps_one_thread_however_many_helpers_work(threads):
    cores = CoreShare(2, watch_machine=False)
    with cores.working(), cores.working(), cores.working():
        assert cores.busy == 3 and cores.wanted_threads() == 1
    assert cores.busy == 0 and cores.wanted_threads() == 2


def test_a_failing_helper_gives_its_core_back():
    cores = CoreShare(2)
    with pytest.raises(RuntimeError), cores.working():
        raise RuntimeError("write failed")
    assert cores.busy == 0


def test_threads_must_be_positive():
    with pytest.raises(ValueError, match="`threads` must be at least 1, got -1"):
        CoreShare(-1)


_BUSY_LOOP = [sys.executable, "-c", "while True: pass"]


def _measured(load: MachineLoad, seconds: float, spin: bool = False) -> float:
    load.cores()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not spin:
            time.sleep(0.05)
    return load.cores()


@pytest.fixture
def two_cpus():
    if len(os.sched_getaffinity(0)) < 2 or not os.path.isfile("/proc/stat"):
        pytest.skip("needs Linux's /proc and two CPUs")


def test_a_process_outside_the_job_is_measured_as_one_busy_core(two_cpus):
    """Started by a shell that exits at once, the busy loop is no descendant of this process."""
    pid = int(subprocess.run(["sh", "-c", f"{' '.join(_BUSY_LOOP[:2])} '{_BUSY_LOOP[2]}' >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True).stdout)
    try:
        time.sleep(0.3)
        busy = _measured(MachineLoad(interval=0.5), 1.5)
    finally:
        os.kill(pid, signal.SIGKILL)
    assert 0.7 < busy < 1.5, busy
    quiet = _measured(MachineLoad(interval=0.5), 1.0)
    assert quiet < 0.5, quiet


def test_the_jobs_own_work_and_its_childrens_is_not_counted(two_cpus):
    """A loader process (a child) and the network's thread (this one) at work: nothing else is busy."""
    child = subprocess.Popen(_BUSY_LOOP)
    try:
        time.sleep(0.3)
        busy = _measured(MachineLoad(interval=0.5), 1.5, spin=True)
    finally:
        child.kill()
        child.wait()
    assert busy < 0.5, busy


def test_children_that_ended_are_still_the_jobs_own(two_cpus):
    """A header pool's processes that worked, then ended, within the span: not another process's load."""
    load = MachineLoad(interval=0.5)
    load.cores()
    for _ in range(3):
        subprocess.run([sys.executable, "-c", "import time\nend = time.time() + 0.4\nwhile time.time() < end: pass"],
                       check=True)
    busy = _measured(load, 0.0)
    assert busy < 0.4, busy


def test_the_network_leaves_the_cores_the_machine_keeps_busy(threads):
    class Busy:
        def cores(self) -> float:
            return 1.4

    cores = CoreShare(3)
    cores.machine = Busy()
    assert cores.wanted_threads() == 2
    with cores.working():
        assert cores.wanted_threads() == 1
    cores.threads = 1
    assert cores.wanted_threads() == 1


def test_a_first_measure_and_a_machine_without_proc_count_nothing(monkeypatch):
    load = MachineLoad(interval=10.0)
    assert load.cores() == 0.0 and load.cores() == 0.0  # one measure is no span
    load.available = False
    assert load.cores() == 0.0

"""The network gives up a thread to each helper at work, in any process, and takes it back."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from pipelines.runtime import CoreShare


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
    cores = CoreShare(threads)
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
    cores = CoreShare(2)
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

"""cpu_runtime sets the process-wide settings on entry and restores every one on exit, nested or concurrent."""

from __future__ import annotations

import gc
import sys
import threading

import pytest
import torch

from pipelines.runtime import SWITCH_INTERVAL_S, CoreShare, cpu_runtime


@pytest.fixture
def settings():
    """A known starting point (interval 3 ms, 2 threads, nothing frozen), put back afterwards."""
    interval, threads = sys.getswitchinterval(), torch.get_num_threads()
    gc.unfreeze()
    sys.setswitchinterval(0.003)
    torch.set_num_threads(2)
    yield {"interval": 0.003, "threads": 2}
    gc.unfreeze()
    sys.setswitchinterval(interval)
    torch.set_num_threads(threads)


def _state(network: torch.nn.Module | None = None) -> dict:
    state = {"interval": round(sys.getswitchinterval(), 6),  # Python keeps it in microseconds
             "threads": torch.get_num_threads(), "frozen": gc.get_freeze_count()}
    if network is not None:
        state["hooks"] = sum(len(m._forward_pre_hooks) for m in network.modules())
    return state


def _network() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv3d(2, 1, 1))


def test_every_setting_is_set_inside_and_restored_on_exit(settings):
    network, cores = _network(), CoreShare(3)  # serving ends at 3 threads; the context puts back 2
    before = _state(network)
    assert before == {"interval": 0.003, "threads": 2, "frozen": 0, "hooks": 0}
    seen = []
    network[2].register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    with cpu_runtime(network, cores):
        inside = _state(network)
        with cores.working():
            network(torch.zeros(1, 1, 5, 5, 5))
        torch.set_num_threads(1)  # anything may change it meanwhile
    assert inside["interval"] == SWITCH_INTERVAL_S and inside["frozen"] > 1000 and inside["hooks"] == 3
    assert seen == [2]  # a helper at work: the network left it one of its three threads
    assert _state(network) == before


def test_a_lower_interval_is_kept_and_exceptions_restore(settings):
    sys.setswitchinterval(0.0001)
    with pytest.raises(RuntimeError, match="inference failed"), cpu_runtime():
        assert _state()["interval"] == 0.0001
        raise RuntimeError("inference failed")
    assert _state() == {"interval": 0.0001, "threads": 2, "frozen": 0}


def _unfrozen(state: dict) -> dict:
    return {key: value for key, value in state.items() if key != "frozen"}


def test_nested_uses_share_the_settings_until_the_last_exit(settings):
    network, cores = _network(), CoreShare(2)
    with cpu_runtime():
        outer = _state(network)
        young = [[index] for index in range(10_000)]  # a second gc.freeze would freeze these too
        with cpu_runtime(network, cores):
            inner = _state(network)
        after_inner = _state(network)
        del young
    # The freeze count is exact only up to frozen objects that reference counting frees meanwhile
    # (a handful at most): a second freeze would add the 10 000 lists, an early unfreeze drop to 0.
    assert _unfrozen(after_inner) == _unfrozen(outer)  # the inner exit restores nothing process-wide, and drops its hooks
    assert _unfrozen(inner) == dict(_unfrozen(outer), hooks=3) and outer["interval"] == SWITCH_INTERVAL_S
    assert outer["frozen"] > 1000
    assert outer["frozen"] - 1000 < inner["frozen"] <= outer["frozen"]  # not frozen a second time
    assert outer["frozen"] - 1000 < after_inner["frozen"] <= outer["frozen"]  # not unfrozen by the inner exit
    assert _state(network) == {"interval": 0.003, "threads": 2, "frozen": 0, "hooks": 0}


def test_concurrent_uses_from_two_threads(settings):
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    states = {}

    def second() -> None:
        first_in.wait(30)
        with cpu_runtime():
            second_in.set()
            first_out.wait(30)
            states["after the first left"] = _state()

    thread = threading.Thread(target=second)
    thread.start()
    with cpu_runtime():
        first_in.set()
        second_in.wait(30)
    first_out.set()
    thread.join(30)
    assert states["after the first left"]["interval"] == SWITCH_INTERVAL_S
    assert states["after the first left"]["frozen"] > 0
    assert _state() == {"interval": 0.003, "threads": 2, "frozen": 0}


def test_objects_frozen_by_the_caller_stay_frozen(settings):
    gc.freeze()
    frozen = gc.get_freeze_count()
    young = [[index] for index in range(10_000)]  # freezing again would take these in
    with cpu_runtime():
        inside = gc.get_freeze_count()
    del young
    # frozen objects that reference counting frees meanwhile lower the count by a handful at most
    assert frozen - 1000 < inside <= frozen and frozen - 1000 < gc.get_freeze_count() <= frozen


def test_cores_need_a_network():
    with pytest.raises(ValueError, match="`network` must be given with `cores`, got None"), cpu_runtime(cores=CoreShare(1)):
        pass

"""Scenarios for test_heap.py, each run in a fresh interpreter: what the C library keeps depends on
everything the process allocated before, so only a new process gives counts that can be asserted.

``python -m tests.runtime.heap_probe SCENARIO`` prints a JSON object.
"""

from __future__ import annotations

import json
import resource
import sys
import threading

import torch

from pipelines.inference import BlendedSlidingWindowInferer, OverlapTileInferer
from pipelines.runtime import keep_freed_memory

MIB = 1 << 20


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def churn(rounds: int, mib: int = 64) -> list[int]:
    """Page faults of each round of allocating, touching and freeing ``mib`` MiB."""
    counts = []
    for _ in range(rounds):
        before = faults()
        torch.empty(mib * MIB // 4).fill_(1.0)
        counts.append(faults() - before)
    return counts


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / MIB


def kept(mib: int) -> bool:
    """Whether freeing a touched block of ``mib`` MiB leaves its pages with the process."""
    block = torch.ones(mib * MIB // 4)
    held = resident_mib()
    del block
    return resident_mib() > held - mib / 2


def reuse() -> dict:
    result = {"outside": churn(4)}
    with keep_freed_memory() as active:
        result["active"] = active
        result["inside"] = churn(8)
        result["kept_inside"] = kept(256)
        held = resident_mib()
    result["returned_mib"] = held - resident_mib()
    result["kept_after"] = kept(512)  # larger than any free block, so not served from one
    return result


def shared() -> dict:
    result = {}
    with keep_freed_memory():
        with keep_freed_memory():
            pass
        result["kept_after_inner_exit"] = kept(128)
        entered, leave = threading.Event(), threading.Event()

        def other() -> None:
            with keep_freed_memory():
                entered.set()
                leave.wait(30)

        thread = threading.Thread(target=other)
        thread.start()
        entered.wait(30)
    result["kept_while_other_thread_inside"] = kept(256)
    leave.set()
    thread.join()
    result["kept_after_all_exits"] = kept(512)
    with keep_freed_memory(enabled=False) as active:
        result["disabled_active"] = active
        result["kept_when_disabled"] = kept(1024)
    return result


class Churning(torch.nn.Module):
    """Doubles its input, allocating and freeing a 64 MiB intermediate on every call; for valid
    tiling its output is the input's centre, ``margin`` smaller on each side."""

    def __init__(self, margin: int = 0) -> None:
        super().__init__()
        self.margin = margin
        self.downsample_factor = 1

    def valid_input_shape(self, output_shape):
        return tuple(s + 2 * self.margin for s in output_shape)

    def output_shape(self, input_shape):
        return tuple(s - 2 * self.margin for s in input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.empty(64 * MIB // 4).fill_(1.0)
        m = self.margin
        return 2.0 * (x[:, :, m:-m, m:-m, m:-m] if m else x)


def inferers() -> dict:
    """Faults per call of each inferer, without reuse first (while the heap is fresh), then with."""
    x = torch.randn(1, 1, 40, 40, 40)
    result = {"windows": 27}
    for reuse_memory in (False, True):
        for name in ("blended", "overlap_tile"):
            if name == "blended":
                net, run = Churning(), BlendedSlidingWindowInferer(16, overlap=0.0, reuse_memory=reuse_memory)
            else:
                net, run = Churning(margin=2), OverlapTileInferer(16, sw_batch_size=1, reuse_memory=reuse_memory)
            before = faults()
            out = run(x, net)
            result[f"{name} {reuse_memory}"] = {"faults": faults() - before,
                                                "close": bool(torch.allclose(out, 2.0 * x, atol=1e-5))}
    return result


def output() -> dict:
    """The output outlives the call: its pages must go back to the system when it is freed."""
    out = BlendedSlidingWindowInferer(64, overlap=0.0)(torch.randn(1, 1, 256, 256, 160), Churning())
    held = resident_mib()
    size = out.numel() * out.element_size() / MIB
    del out
    return {"output_mib": size, "returned_mib": held - resident_mib()}


SCENARIOS = {"reuse": reuse, "shared": shared, "inferers": inferers, "output": output}

if __name__ == "__main__":
    print(json.dumps(SCENARIOS[sys.argv[1]]()))

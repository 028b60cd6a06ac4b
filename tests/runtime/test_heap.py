"""keep_freed_memory: freed blocks are reused without page faults inside, and given back on exit.

Each scenario runs in a fresh interpreter (tests/runtime/heap_probe.py): what the C library keeps
depends on everything the process allocated before.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.runtime.heap import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt is needed")

PAGES_PER_64_MIB = (64 << 20) // resource.getpagesize()
ROOT = Path(__file__).resolve().parents[2]


def _probe(scenario: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "tests.runtime.heap_probe", scenario], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_inside_and_returned_on_exit():
    result = _probe("reuse")
    assert min(result["outside"]) > PAGES_PER_64_MIB // 2  # every block is mapped and faulted in afresh
    assert result["active"]
    # 8 rounds inside: the first ones grow the heap, then the same pages serve the others
    assert sum(result["inside"]) < 3 * PAGES_PER_64_MIB
    assert result["kept_inside"]  # a freed 256 MiB block stays with the process
    assert result["returned_mib"] > 200  # and goes back to the system on exit
    assert not result["kept_after"]


def test_nested_and_concurrent_uses_share_one_setting():
    result = _probe("shared")
    assert result["kept_after_inner_exit"]
    assert result["kept_while_other_thread_inside"]
    assert not result["kept_after_all_exits"]
    assert not result["disabled_active"] and not result["kept_when_disabled"]


def test_inferers_reuse_memory_between_windows_on_the_cpu():
    """A network allocating 64 MiB per window, over 27 windows: with reuse, only the first windows
    fault pages in; without, every window does."""
    result = _probe("inferers")
    for name in ("blended", "overlap_tile"):
        reused, fresh = result[f"{name} True"], result[f"{name} False"]
        assert reused["close"] and fresh["close"], name
        assert reused["faults"] < 6 * PAGES_PER_64_MIB, name
        assert fresh["faults"] > (result["windows"] - 4) * PAGES_PER_64_MIB, name


def test_output_does_not_hold_kept_heap_pages():
    """The output is allocated before the memory is kept, so freeing it gives its pages back."""
    result = _probe("output")
    assert result["output_mib"] == 40
    assert result["returned_mib"] > 0.9 * result["output_mib"]

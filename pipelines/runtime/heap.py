"""Keep freed memory in the process for the next window instead of giving it back to the system.

A 3D network's window allocates and frees hundreds of megabytes of activations. glibc's ``malloc``
serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on
``free``, and trims the heap's top when more than its trim threshold is free. Every window then
writes to new pages, and the kernel zeroes and maps each 4 KiB page on first touch, a sizeable part
of a window's time (docs/benchmarks.md, "The network's CPU speed"). While
:func:`keep_freed_memory` is active, glibc serves large blocks from the heap and never trims it
(``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, ...)``), so the next window reuses pages
already mapped; on exit the freed memory goes back to the system (``malloc_trim(0)``). This is what
jemalloc or tcmalloc, which PyTorch's performance guide suggests preloading, do for the whole
process; here it lasts one inference call: the inferers enter it for each call, once their output
is allocated.

Caveats: the settings are process-wide (allocations of other threads are served the same way
meanwhile); glibc offers no way to read its thresholds or to restore their adaptation, so on exit
the mmap count limit is set back to glibc's default (65536) and the trim threshold to 64 MiB, the
value glibc's adaptation reaches once a 32 MiB block has been freed. Memory allocated inside and
kept after the exit (an inferer's output) would hold heap pages that cannot be returned, so
inferers allocate their output before they enter. Without glibc (macOS, Windows, musl) the context
does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

__all__ = ["keep_freed_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, glibc's malloc.h
_DEFAULT_MMAP_MAX = 65536  # glibc's DEFAULT_MMAP_MAX
_TRIM_AFTER = 64 << 20  # 2 * DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: glibc's adapted trim threshold
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int

_lock = threading.Lock()
_active = 0  # contexts open, over all threads


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    try:
        # the process's own symbols, libc's among them (ctypes.util.find_library runs ldconfig in a child)
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def _set(libc: ctypes.CDLL, parameter: int, value: int) -> None:
    if libc.mallopt(parameter, value) != 1:
        logger.warning("glibc mallopt(%d, %d) was refused", parameter, value)


@contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """While inside, large blocks come from the heap and freed memory stays there for reuse.

    Nested and concurrent uses share one setting: the first entry applies it, the last exit
    restores glibc's defaults (see the module docstring) and returns the freed memory.

    Args:
        enabled: False makes the context do nothing (for callers with an opt-out).

    Yields:
        Whether the setting is in effect (False without glibc or when not ``enabled``).
    """
    global _active
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _lock:
        _active += 1
        if _active == 1:
            _set(libc, _M_MMAP_MAX, 0)
            _set(libc, _M_TRIM_THRESHOLD, _NEVER_TRIM)
    try:
        yield True
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                _set(libc, _M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                _set(libc, _M_TRIM_THRESHOLD, _TRIM_AFTER)
                libc.malloc_trim(0)


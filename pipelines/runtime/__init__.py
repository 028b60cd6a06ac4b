"""Process-wide CPU settings: kept freed memory, cores shared with helpers, the switch interval, caches.

:func:`cpu_runtime` is the one context a long run (the batch job) enters to have the thread switch
interval, the garbage collector and the sharing of cores with its helpers set, and restored on exit.
:func:`keep_freed_memory` is entered by the inferers for each call; :func:`memoise_iod_lookups` by
the DICOM SEG writer, once. This package imports nothing from the batch job, the engines, the
MONAI Label app or the CLI.
"""

from __future__ import annotations

from .context import SWITCH_INTERVAL_S, cpu_runtime
from .cores import CoreShare, MachineLoad
from .heap import keep_freed_memory
from .iod_memo import memoise_iod_lookups

__all__ = ["SWITCH_INTERVAL_S", "CoreShare", "MachineLoad", "cpu_runtime", "keep_freed_memory", "memoise_iod_lookups"]

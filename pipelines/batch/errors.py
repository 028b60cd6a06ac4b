"""What stops a batch run as a whole (one bad case never does: it is recorded as failed)."""

from __future__ import annotations

__all__ = ["BatchAbortedError", "BatchInputError", "BundleContractError"]


class BatchInputError(ValueError):
    """The run cannot start: its input or output is unusable as a whole (not one bad case)."""


class BundleContractError(BatchInputError):
    """The bundle lacks what the batch job needs of it (a config id, a loading transform); the
    message names the id and the file."""


class BatchAbortedError(OSError):
    """The output cannot be written (disk full, read-only, permission denied): the run stops; finished
    cases stay."""

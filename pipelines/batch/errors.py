"""What stops a batch run as a whole (one bad case never does: it is recorded as failed), and how a
case's failure is described in its record."""

from __future__ import annotations

__all__ = ["BatchAbortedError", "BatchInputError", "BundleContractError", "describe_error"]


class BatchInputError(ValueError):
    """The run cannot start: its input or output is unusable as a whole (not one bad case)."""


class BundleContractError(BatchInputError):
    """The bundle lacks what the batch job needs of it (a config id, a loading transform); the
    message names the id and the file."""


class BatchAbortedError(OSError):
    """The output cannot be written (disk full, read-only, permission denied): the run stops; finished
    cases stay."""


def describe_error(exc: BaseException) -> str:
    """The reason a record gives: the error's own text (through MONAI's "applying transform ..."
    wrappers, to the error the transform raised), its type named unless it is a ValueError or
    OSError, whose texts name the file and the problem."""
    while isinstance(exc, RuntimeError) and str(exc).startswith("applying transform") and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, ValueError | OSError) else f"{type(exc).__name__}: {text}"

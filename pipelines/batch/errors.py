"""What stops a batch run as a whole (one bad case never does: it is recorded as failed), and how a
case's failure is described in its record."""

from __future__ import annotations

import re

__all__ = ["BatchAbortedError", "BatchInputError", "BundleContractError", "describe_error", "headline"]


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


# What to do, by what a reason says (the first that matches), for the loaders' reasons that do not say it.
_ADVICE = (
    ("no DICOM series matches the selection rules",
     ("check that the study holds that series, or widen its rule (the bundle's series_rules, or the batch "
      "job's series options)")),
    ("unreadable DICOM file", "export the study again, or remove the broken files"),
    ("no such file or folder", "correct the path in the manifest, or restore the file"),
    ("no decoder exists", "install the decoder (make venv), or export the study uncompressed"),
    ("not readable (permission denied)", "give the batch job read access"),
    ("manifest entry", "correct the manifest entry"),
)
_INPUT = re.compile(r"^input '([^']+)': |, input '([^']+)' \(rules ")  # studies.py names the input so
_PATH = re.compile(r"(?<![\w.])/(?:[^\s:()'\"]+/)+([^\s:()'\"]+)")  # an absolute path: its last part stays


def headline(reason: str) -> str:
    """One sentence for a failed case, a person's first reading of its record's ``error``: what is
    missing or wrong (the reason's first line, paths shortened to their last part), and what to do
    where the reason is a known one. The full reason stays in the record."""
    first = reason.strip().splitlines()[0].rstrip(" :") if reason.strip() else "failed, with no reason recorded"
    what = _PATH.sub(r"\1", first)
    found = _INPUT.search(what)
    if found and "no DICOM series matches the selection rules" in what:
        key, count = found.group(1) or found.group(2), reason.count("\n  - series ")
        what = f"No {key} series: none of the study's {count} series matches the {key} rule"
    advice = next((todo for phrase, todo in _ADVICE if phrase in reason), None)
    return f"{what[:1].upper()}{what[1:]}" + (f"; {advice}." if advice else ".")

"""Errors for input a user can get wrong. All derive from :class:`InputDataError` (a ``ValueError``),
so callers such as the batch job record any of them per case; each message names the file."""

from __future__ import annotations

__all__ = [
    "AmbiguousSeriesError",
    "CorruptFileError",
    "DuplicateInstanceError",
    "GeometryError",
    "GridMismatchError",
    "InputDataError",
    "InputNotFoundError",
    "InputPermissionError",
    "InvalidValuesError",
    "ManifestError",
    "MissingDecoderError",
    "NoImageDataError",
]


class InputDataError(ValueError):
    """Base class: the input (a file, a folder, a manifest) cannot be used as it is."""


class CorruptFileError(InputDataError):
    """A file is truncated, unreadable or not of the format its name or content claims."""


class DuplicateInstanceError(InputDataError):
    """Two files hold one DICOM instance (SOPInstanceUID) with different pixels or geometry."""


class NoImageDataError(InputDataError):
    """A path holds no usable image: an empty folder, no DICOM files, no pixel data."""


class AmbiguousSeriesError(InputDataError):
    """Several DICOM series qualify and no selection rule picks one; the message lists them."""


class GeometryError(InputDataError):
    """Slices that do not form a volume: missing slices, conflicting duplicates, mixed orientations,
    or (with ``strict=True``) gantry tilt or uneven spacing."""


class MissingDecoderError(InputDataError):
    """Pixel data in a transfer syntax no installed decoder handles; names the package to install."""


class InvalidValuesError(InputDataError):
    """Voxel values that cannot be used, such as NaN or infinity."""


class GridMismatchError(InputDataError):
    """A label whose grid (shape, affine) differs from its image's."""


class ManifestError(InputDataError):
    """A manifest that does not follow the schema, or a path that leaves its ``dataset_dir``."""


class InputNotFoundError(InputDataError, FileNotFoundError):
    """A path that does not exist (also a ``FileNotFoundError``)."""


class InputPermissionError(InputDataError, PermissionError):
    """A path this process may not read (also a ``PermissionError``)."""

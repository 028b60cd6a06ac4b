"""Reading medical images right: NIfTI, NRRD/MHA/MHD and DICOM (files, folders, DICOMDIR)."""

from __future__ import annotations

from .errors import (
    AmbiguousSeriesError,
    CorruptFileError,
    DuplicateInstanceError,
    GeometryError,
    GridMismatchError,
    InputDataError,
    InputNotFoundError,
    InputPermissionError,
    InvalidValuesError,
    ManifestError,
    MissingDecoderError,
    NoImageDataError,
)
from .load import load_series, load_volume, volume_format
from .metadata import dicom_references, geometry_corrections

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
    "dicom_references",
    "geometry_corrections",
    "load_series",
    "load_volume",
    "volume_format",
]

"""Reading medical images right: NIfTI, NRRD/MHA/MHD, PNG/TIFF sections and DICOM (files, folders,
DICOMDIR); writing results atomically.

The loaders (which need torch and MONAI) are imported on first use, so that the light helpers
(``pipelines.io.formats``, ``grid``, ``hashing``, ``writers.atomic_path``, the errors) cost nothing
to import, e.g. in the MONAI Label server or the command line's ``--help``.
"""

from __future__ import annotations

import importlib

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
from .formats import IMAGE_SUFFIXES, image_stem, is_image_file, volume_format
from .grid import LPS_TO_RAS, check_same_grid
from .hashing import content_hash
from .rules import SeriesRules

_LAZY = {
    "check_not_blank": "pipelines.io.load",
    "dicom_references": "pipelines.io.metadata",
    "geometry_corrections": "pipelines.io.metadata",
    "load_series": "pipelines.io.load",
    "load_volume": "pipelines.io.load",
}

__all__ = [
    "AmbiguousSeriesError",
    "CorruptFileError",
    "DuplicateInstanceError",
    "GeometryError",
    "GridMismatchError",
    "IMAGE_SUFFIXES",
    "InputDataError",
    "InputNotFoundError",
    "InputPermissionError",
    "InvalidValuesError",
    "LPS_TO_RAS",
    "ManifestError",
    "MissingDecoderError",
    "NoImageDataError",
    "SeriesRules",
    "check_not_blank",
    "check_same_grid",
    "content_hash",
    "dicom_references",
    "geometry_corrections",
    "image_stem",
    "is_image_file",
    "load_series",
    "load_volume",
    "volume_format",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

"""Synthetic DICOM series for tests: every pixel's value encodes its own patient position.

``value(P) = P_x + 2 P_y + 3 P_z + 500`` (LPS millimetres), stored as int16 with RescaleSlope 0.1,
so a loaded voxel must equal the function at the voxel's position to within 0.05 (quantisation),
and linear interpolation is exact for it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

SLOPE = 0.1
INTERCEPT = -1000.0
QUANTUM = SLOPE / 2


def position_value(points: np.ndarray) -> np.ndarray:
    """The encoded value at LPS points ``(..., 3)``."""
    return points[..., 0] + 2 * points[..., 1] + 3 * points[..., 2] + 500.0


ORIENTATIONS = {
    "axial": ((1, 0, 0), (0, 1, 0)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
    "oblique": (
        (np.cos(0.3), np.sin(0.3), 0.0),
        (-np.sin(0.3) * np.cos(0.4), np.cos(0.3) * np.cos(0.4), -np.sin(0.4)),
    ),
}


@dataclass
class SeriesSpec:
    rows: int = 12
    columns: int = 10
    pixel_spacing: tuple[float, float] = (0.8, 0.7)  # (between rows, between columns)
    orientation: str | tuple = "axial"
    origin: tuple[float, float, float] = (-20.0, -30.0, 40.0)
    slice_positions: Sequence[float] = field(default_factory=lambda: [2.5 * k for k in range(7)])  # along normal
    in_plane_shift: tuple[float, float] = (0.0, 0.0)  # mm per mm of slice position: (row dir, column dir)
    modality: str = "CT"
    series_description: str = "synthetic"
    series_number: int = 1
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL")
    series_uid: str | None = None
    study_uid: str | None = None
    acquisition_number: int | None = None
    temporal_position: int | None = None


def directions(orientation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row, col = ORIENTATIONS[orientation] if isinstance(orientation, str) else orientation
    row, col = np.asarray(row, float), np.asarray(col, float)
    return row, col, np.cross(row, col)


def slice_position(spec: SeriesSpec, s: float) -> np.ndarray:
    row, col, normal = directions(spec.orientation)
    return np.asarray(spec.origin) + s * normal + s * (spec.in_plane_shift[0] * row + spec.in_plane_shift[1] * col)


def pixel_positions(spec: SeriesSpec, ipp: np.ndarray) -> np.ndarray:
    """LPS position of every pixel ``(rows, columns, 3)`` of a slice whose first pixel is at ``ipp``."""
    row, col, _ = directions(spec.orientation)
    i, j = np.meshgrid(np.arange(spec.rows), np.arange(spec.columns), indexing="ij")
    return ipp + j[..., None] * spec.pixel_spacing[1] * row + i[..., None] * spec.pixel_spacing[0] * col


def make_slice(spec: SeriesSpec, s: float, index: int, series_uid: str, study_uid: str, frame_uid: str) -> FileDataset:
    sop_class = CTImageStorage if spec.modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.Modality = spec.modality
    ds.PatientName, ds.PatientID = "Doe^Jane", "PAT-0001"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "ACC1", "1"
    ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = spec.series_number, spec.series_description, index + 1
    ds.ImageType = list(spec.image_type)
    if spec.acquisition_number is not None:
        ds.AcquisitionNumber = spec.acquisition_number
    if spec.temporal_position is not None:
        ds.TemporalPositionIdentifier = spec.temporal_position
    row, col, _ = directions(spec.orientation)
    ipp = slice_position(spec, s)
    ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.PixelSpacing = [float(v) for v in spec.pixel_spacing]
    ds.SliceThickness = 99.0  # deliberately wrong: spacing must come from the positions
    ds.Rows, ds.Columns = spec.rows, spec.columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
    stored = np.rint((position_value(pixel_positions(spec, ipp)) - INTERCEPT) / SLOPE).astype(np.int16)
    ds.PixelData = stored.tobytes()
    return ds


def write_series(folder: Path, spec: SeriesSpec | None = None, shuffle: bool = False, seed: int = 0) -> list[Path]:
    """Write one file per slice into ``folder`` (file names in random order when ``shuffle``)."""
    spec = spec or SeriesSpec()
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid, frame_uid = spec.series_uid or generate_uid(), spec.study_uid or generate_uid(), generate_uid()
    order = list(range(len(spec.slice_positions)))
    if shuffle:
        random.Random(seed).shuffle(order)
    paths = []
    for n, k in enumerate(order):
        ds = make_slice(spec, spec.slice_positions[k], k, series_uid, study_uid, frame_uid)
        path = folder / f"IM{n:04d}_{series_uid[-6:]}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_slices(paths: Sequence[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]

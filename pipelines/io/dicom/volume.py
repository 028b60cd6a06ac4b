"""Assemble a DICOM stack into a volume on a regular grid, with its RAS affine and references.

Pixels are decoded one slice at a time straight into the output, per-slice
RescaleSlope/RescaleIntercept applied: int16 (or int32) when the rescaled values are integers, as in
CT, float32 otherwise. A stack with gantry tilt or uneven spacing is resampled
onto a regular grid whose every voxel sits at its true patient position: linear interpolation
between the two neighbouring slices along the normal, each shifted within its plane by its own
offset (bilinear). The grid keeps the slices' orientation and pixel spacing, runs from the first to
the last slice (at about the finest zone's spacing for uneven stacks), and grows in-plane to hold every
shifted slice; voxels no slice covers get the stack's minimum value.
"""

from __future__ import annotations

import math
import mmap

import numpy as np
from scipy import ndimage

from pipelines.io.dicom.decode import decode_slice
from pipelines.io.dicom.geometry import StackGeometry
from pipelines.io.dicom.scan import SliceRecord
from pipelines.io.errors import CorruptFileError
from pipelines.io.grid import LPS_TO_RAS

__all__ = ["assemble_volume", "source_geometry"]


def assemble_volume(geometry: StackGeometry, max_voxels: int | None = None,
                    source: object = "") -> tuple[np.ndarray, np.ndarray]:
    """The volume ``(X, Y, Z)`` (columns, rows, slices) and its 4x4 affine in RAS.

    Integer rescaling (integral slope and intercept, as in CT) gives int16 when the values fit and
    int32 otherwise; fractional rescaling, and resampled stacks, give float32.

    Raises:
        CorruptFileError: the stack holds more than ``max_voxels`` voxels (checked before anything
            is allocated).
    """
    records = geometry.records
    voxels = len(records) * records[0].rows * records[0].columns
    if max_voxels is not None and voxels > max_voxels:
        raise CorruptFileError(
            f"{source}: {len(records)} slices of {records[0].columns}x{records[0].rows} are {voxels:,} voxels, "
            f"more than the limit of {max_voxels:,} (max_voxels)"
        )
    integral = all(float(r.slope).is_integer() and float(r.intercept).is_integer() for r in records)
    stack = _read_stack(records, np.int16 if integral else np.float32)
    origin = np.asarray(records[0].position, dtype=float)
    x0 = y0 = 0
    if not geometry.regular:
        stack, (x0, y0) = _resample(stack, geometry)
    affine = np.eye(4)
    affine[:3, 0] = geometry.row * geometry.spacing_x
    affine[:3, 1] = geometry.col * geometry.spacing_y
    affine[:3, 2] = geometry.normal * geometry.slice_spacing
    affine[:3, 3] = origin + x0 * affine[:3, 0] + y0 * affine[:3, 1]
    return stack.transpose(2, 1, 0), LPS_TO_RAS @ affine


def _empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array in its own anonymous mapping, with ordinary pages.

    numpy asks the kernel for transparent huge pages on large arrays; when memory is fragmented the
    kernel then compacts memory on first touch, several times slower than faulting in ordinary pages
    (docs/benchmarks.md, "Loading").
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes < 2**22:
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)


def _read_stack(records: list[SliceRecord], dtype) -> np.ndarray:
    """Rescaled slices ``(Z, rows, columns)``; an int16 stack widens to int32 if a slice needs it."""
    stack = _empty((len(records), records[0].rows, records[0].columns), dtype)
    cache: dict = {}
    for k, record in enumerate(records):
        pixels = decode_slice(record, cache)
        if stack.dtype == np.float32:
            np.multiply(pixels, record.slope, out=stack[k], casting="unsafe")
            stack[k] += record.intercept
            continue
        slope, intercept = int(record.slope), int(record.intercept)
        raw = (int(pixels.min()), int(pixels.max()))
        ends = sorted((raw[0] * slope + intercept, raw[1] * slope + intercept))
        limits = np.iinfo(stack.dtype)
        if ends[0] < limits.min or ends[1] > limits.max:
            stack = stack.astype(np.int32 if stack.dtype == np.int16 else np.float32)
            limits = np.iinfo(stack.dtype) if stack.dtype != np.float32 else None
        if slope == 1 and limits is not None and limits.min <= raw[0] and raw[1] <= limits.max:
            np.copyto(stack[k], pixels, casting="unsafe")  # exact: the raw values fit (checked above)
            if intercept:
                stack[k] += stack.dtype.type(intercept)  # in the stack's own type: the results fit too
        else:
            stack[k] = pixels.astype(np.int64) * slope + intercept
    return stack


def _resample(stack: np.ndarray, geometry: StackGeometry) -> tuple[np.ndarray, tuple[int, int]]:
    """Regular-grid volume ``(Z, Y, X)`` and the grid's first pixel in the first slice's pixel grid."""
    positions, offsets, step = geometry.positions, geometry.offsets, geometry.slice_spacing
    count, rows, columns = stack.shape
    x0, y0 = math.floor(offsets[:, 0].min() + 1e-6), math.floor(offsets[:, 1].min() + 1e-6)
    width = math.ceil(offsets[:, 0].max() - 1e-6) + columns - x0
    height = math.ceil(offsets[:, 1].max() - 1e-6) + rows - y0
    fill = float(stack.min())
    planes = int(round((positions[-1] - positions[0]) / step)) + 1
    out = np.empty((planes, height, width), dtype=np.float32)

    def placed(k: int) -> np.ndarray:
        """Slice ``k`` on the output's in-plane grid (bilinear; ``fill`` outside the slice)."""
        if (height, width) == (rows, columns) and not offsets[k].any():
            return stack[k].astype(np.float32, copy=False)
        return ndimage.affine_transform(
            stack[k].astype(np.float32, copy=False),
            np.ones(2),
            offset=(y0 - offsets[k, 1], x0 - offsets[k, 0]),
            output_shape=(height, width),
            order=1,
            mode="constant",
            cval=fill,
        )

    for m in range(planes):
        z = positions[0] + m * step
        k = int(np.clip(np.searchsorted(positions, z, side="right") - 1, 0, count - 2)) if count > 1 else 0
        t = 0.0 if count == 1 else float(np.clip((z - positions[k]) / (positions[k + 1] - positions[k]), 0.0, 1.0))
        if t < 1e-6:
            out[m] = placed(k)
        elif t > 1 - 1e-6:
            out[m] = placed(k + 1)
        else:
            out[m] = (1 - t) * placed(k) + t * placed(k + 1)
    return out, (x0, y0)


def source_geometry(geometry: StackGeometry) -> dict:
    """The acquired slices' geometry (LPS), JSON-ready, to map results back onto the source grid."""
    first = geometry.records[0]
    return {
        "rows": first.rows,
        "columns": first.columns,
        "row_direction": geometry.row.tolist(),
        "column_direction": geometry.col.tolist(),
        "pixel_spacing": [geometry.spacing_y, geometry.spacing_x],
        "positions": [list(r.position) for r in geometry.records],
    }

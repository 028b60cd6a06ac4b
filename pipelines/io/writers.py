"""Writing results: NIfTI files written atomically, and label maps mapped back onto source DICOM slices."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipelines.io.grid import LPS_TO_RAS

__all__ = ["atomic_path", "labels_on_source_slices", "resample_labels", "save_nifti"]


class atomic_path:  # noqa: N801 - used as a context manager, like open()
    """Context manager giving a temporary path beside ``path``; renamed to ``path`` on success only.

    Readers never see a half-written file, and an interrupted write leaves the old file in place.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(self.path.suffixes) or ".tmp"
        tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex}.part{suffix}"
        # created with mode 0o666 so the umask applies, as for any new file (mkstemp would give 0o600)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        self.tmp = tmp
        return tmp

    def __exit__(self, kind, value, traceback) -> None:
        if self.tmp is None:
            return
        if kind is None:
            with open(self.tmp, "rb") as written:
                os.fsync(written.fileno())  # on disk before it takes the final name
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def save_nifti(data, affine, path: str | os.PathLike, dtype: np.dtype | str | None = None) -> Path:
    """Write ``data`` ``(X, Y, Z)`` or ``(C, X, Y, Z)`` with an RAS ``affine`` to a NIfTI file, atomically.

    Channels go to the fifth NIfTI axis ``(X, Y, Z, 1, C)``. The affine is stored as both sform and
    qform (code 1, scanner anatomical), in millimetres. A ``.gz`` file carries no timestamp: the
    same data give the same bytes.
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    array = np.asarray(data)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if array.ndim == 4:
        array = np.moveaxis(array, 0, -1)[:, :, :, None] if array.shape[0] > 1 else array[0]
    if array.ndim not in (3, 5):
        raise ValueError(f"`data` must have shape (X, Y, Z) or (C, X, Y, Z), got {np.asarray(data).shape}")
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    image.set_sform(np.asarray(affine, dtype=np.float64), code=1)
    image.set_qform(np.asarray(affine, dtype=np.float64), code=1)
    path = Path(path)
    # the file is opened here, so that it is closed when writing fails (a full disk): nib.save's open
    # file would live on in the error's traceback, and hold the space until that is dropped
    with atomic_path(path) as tmp, ImageOpener(tmp, "wb") as stream:
        image.to_file_map(image.make_file_map({"image": stream}))
    return path


_PLANE_CHUNK = 1 << 22  # voxels sampled per step: bounds the (n, rows, columns, 3) index arrays


def _labels_on_planes(labels: np.ndarray, origins: np.ndarray, step_i: np.ndarray, step_j: np.ndarray,
                      rows: int, columns: int) -> np.ndarray:
    """Nearest-neighbour labels at the voxel coordinates ``origins[k] + i * step_i + j * step_j`` of
    ``labels`` (``origins`` ``(planes, 3)``, ``i < rows``, ``j < columns``); 0 outside the grid.
    Returns ``(planes, rows, columns)``."""
    out = np.zeros((len(origins), rows, columns), dtype=labels.dtype)
    if _copy_aligned_planes(labels, origins, step_i, step_j, out):
        return out
    in_plane = (np.arange(rows)[:, None, None] * step_i + np.arange(columns)[None, :, None] * step_j)[None]
    limit = np.array(labels.shape)
    chunk = max(1, _PLANE_CHUNK // max(1, rows * columns))
    for first in range(0, len(origins), chunk):
        voxels = np.rint(origins[first : first + chunk, None, None, :] + in_plane).astype(np.int64)
        inside = np.all((voxels >= 0) & (voxels < limit), axis=-1)
        v = voxels[inside]
        out[first : first + chunk][inside] = labels[v[:, 0], v[:, 1], v[:, 2]]
    return out


def _copy_aligned_planes(labels: np.ndarray, origins: np.ndarray, step_i: np.ndarray, step_j: np.ndarray,
                         out: np.ndarray) -> bool:
    """The common case of :func:`_labels_on_planes`, by index instead of by coordinates: the planes
    are grid planes of ``labels`` (steps of one voxel along two distinct axes, origins on voxel
    centres, each within 0.01 voxel over the whole plane). Fills ``out`` and returns True then;
    otherwise leaves it and returns False. Same result without computing coordinates for every voxel,
    which on a large mask takes far longer than the copy (docs/benchmarks.md, "Writing results")."""
    rows, columns = out.shape[1:]
    units_i, units_j, corners = np.rint(step_i), np.rint(step_j), np.rint(origins)
    axis_i, axis_j = np.flatnonzero(units_i), np.flatnonzero(units_j)
    if len(axis_i) != 1 or len(axis_j) != 1 or axis_i[0] == axis_j[0]:
        return False
    a, b = int(axis_i[0]), int(axis_j[0])
    if not (abs(units_i[a]) == 1 and abs(units_j[b]) == 1
            and np.abs(step_i - units_i).max() * rows < 0.01 and np.abs(step_j - units_j).max() * columns < 0.01
            and np.abs(origins - corners).max() < 0.01):
        return False
    corners = corners.astype(np.int64)
    if np.any(corners[:, a] != corners[0, a]) or np.any(corners[:, b] != corners[0, b]):
        return False  # planes shifted within themselves: left to the general path
    in_plane = [_index_run(int(corners[0, axis]), int(unit), count, labels.shape[axis])
                for axis, unit, count in ((a, units_i[a], rows), (b, units_j[b], columns))]
    c = 3 - a - b
    planes_inside = np.flatnonzero((corners[:, c] >= 0) & (corners[:, c] < labels.shape[c]))
    if all(run is not None for run in in_plane) and len(planes_inside):
        (rows_out, rows_in), (columns_out, columns_in) = in_plane
        source = np.moveaxis(labels, (c, a, b), (0, 1, 2))[:, rows_in, columns_in]
        out[planes_inside, rows_out, columns_out] = source[corners[planes_inside, c]]
    return True


def _index_run(start: int, unit: int, count: int, size: int) -> tuple[slice, slice] | None:
    """Indices ``start + unit * t`` (``t < count``, ``unit`` 1 or -1) that fall in ``[0, size)``: the
    slice of ``t`` and the slice of the indices, or None when none do."""
    if unit > 0:
        first, stop = max(0, -start), min(count, size - start)
        indices = slice(start + first, start + stop)
    else:
        first, stop = max(0, start - size + 1), min(count, start + 1)
        indices = slice(start - first, start - stop if start - stop >= 0 else None, -1)
    return (slice(first, stop), indices) if first < stop else None


def _single_channel(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 4:
        if labels.shape[0] != 1:
            raise ValueError(f"`labels` must have one channel, got shape {labels.shape}")
        labels = labels[0]
    if labels.ndim != 3:
        raise ValueError(f"`labels` must have shape (X, Y, Z) or (1, X, Y, Z), got {labels.shape}")
    return labels


def resample_labels(labels, affine, shape, target_affine) -> np.ndarray:
    """A label map ``(X, Y, Z)`` with RAS ``affine`` read at every voxel centre of the grid
    ``(shape, target_affine)``: nearest neighbour, 0 outside. Puts a prediction made on a resampled
    grid back onto the source image's grid."""
    labels = _single_channel(labels)
    shape = tuple(int(s) for s in shape)
    # target voxel -> source voxel, one affine map: planes along the target's first axis
    target_to_source = np.linalg.inv(np.asarray(affine, float)) @ np.asarray(target_affine, float)
    linear, offset = target_to_source[:3, :3], target_to_source[:3, 3]
    origins = np.arange(shape[0])[:, None] * linear[:, 0] + offset
    return _labels_on_planes(labels, origins, linear[:, 1], linear[:, 2], shape[1], shape[2])


def labels_on_source_slices(labels, affine, source_geometry: Mapping) -> np.ndarray:
    """Label map ``(X, Y, Z)`` on a grid with RAS ``affine``, read at every source DICOM pixel centre.

    Nearest-neighbour, so labels stay labels; pixels outside the grid get 0. Returns
    ``(slices, rows, columns)`` in the source slice order of ``source_geometry``
    (``pipelines.io.dicom_references(meta)["source_geometry"]``).
    """
    labels = _single_channel(labels)
    rows, columns = int(source_geometry["rows"]), int(source_geometry["columns"])
    row_dir = np.asarray(source_geometry["row_direction"], float)
    col_dir = np.asarray(source_geometry["column_direction"], float)
    spacing_y, spacing_x = (float(v) for v in source_geometry["pixel_spacing"])
    # DICOM patient (LPS) millimetres -> voxels of the label grid, one affine map
    lps_to_voxel = np.linalg.inv(np.asarray(affine, float)) @ LPS_TO_RAS
    linear, offset = lps_to_voxel[:3, :3], lps_to_voxel[:3, 3]
    origins = np.asarray(source_geometry["positions"], float).reshape(-1, 3) @ linear.T + offset
    # pixel (i, j) lies at position + j * spacing_x * row direction + i * spacing_y * column direction
    return _labels_on_planes(labels, origins, linear @ col_dir * spacing_y, linear @ row_dir * spacing_x, rows, columns)

"""Images that store a whole stack of slices as tiles of one 2D frame: Siemens MOSAIC and UIH grids.

Siemens stores EPI, diffusion and perfusion series as MOSAIC images: the slices of one volume laid
out row by row in a square grid of tiles. ImagePositionPatient then describes the mosaic as if it
were one big slice; the true position of the first tile follows from it (nibabel's
``MosaicWrapper.image_position`` and dcm2niix do the same correction), and each next tile lies one
slice spacing further along the slice normal of the Siemens CSA image header (which can point
opposite to the cross product of the orientation's row and column directions, as in sagittal
series). The CSA header is parsed by ``nibabel.nicom.csareader``.

UIH ("SaveBySlc" grid) images keep one tile per slice too, with no ImagePositionPatient of their
own: the tile size is in the private element (0065,1004) (``"64*64"``) and each tile's position in
the private sequence (0065,1051), in tile order, row by row.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from pipelines.io.dicom.private import private_value
from pipelines.io.errors import CorruptFileError

__all__ = ["Tile", "tile_layout"]

_UIH_CREATOR = "Image Private Header"


@dataclass(frozen=True)
class Tile:
    """One slice stored as a tile: its place in the stored frame and its first pixel's position (LPS)."""

    index: int
    row: int
    column: int
    rows: int
    columns: int
    position: tuple[float, float, float]


def tile_layout(file: Path, ds: pydicom.Dataset, orientation: tuple[float, ...], spacing: tuple[float, float],
                image_type: tuple[str, ...], manufacturer: str = "") -> list[Tile] | None:
    """The tiles of a MOSAIC or UIH grid image, or None for an ordinary image.

    Args:
        file: names the file in errors.
        ds: its header.
        orientation: ImageOrientationPatient (row direction, column direction).
        spacing: PixelSpacing (between rows, between columns) in mm.
        image_type: ImageType values, upper case.
        manufacturer: Manufacturer (only UIH images are looked at for a grid).

    Raises:
        CorruptFileError: the image says it is tiled but its tile information is missing or does
            not fit the stored frame.
    """
    if "MOSAIC" in image_type:
        return _siemens_mosaic(file, ds, orientation, spacing)
    if manufacturer.upper().startswith("UIH") and "ImagePositionPatient" not in ds:
        return _uih_grid(file, ds)
    return None


def _csareader():
    with warnings.catch_warnings():  # nibabel.nicom warns on import that its DICOM *wrappers* are experimental
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader
    return csareader


def _siemens_mosaic(file: Path, ds, orientation, spacing) -> list[Tile]:
    csareader = _csareader()
    try:
        header = csareader.get_csa_header(ds, "image")
    except csareader.CSAReadError as exc:
        raise CorruptFileError(f"{file}: MOSAIC image with an unreadable Siemens CSA header ({exc})") from exc
    count = csareader.get_n_mosaic(header) if header else None
    if not count:
        raise CorruptFileError(f"{file}: MOSAIC image without NumberOfImagesInMosaic in its Siemens CSA header")
    count = int(count)
    per_side = math.ceil(math.sqrt(count))
    stored_rows, stored_columns = int(ds.Rows), int(ds.Columns)
    if stored_rows % per_side or stored_columns % per_side:
        raise CorruptFileError(
            f"{file}: MOSAIC of {count} images cannot tile a {stored_columns}x{stored_rows} frame in "
            f"{per_side}x{per_side}"
        )
    rows, columns = stored_rows // per_side, stored_columns // per_side
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = csareader.get_slice_normal(header)
    normal = np.cross(row_dir, col_dir) if normal is None else np.asarray(normal, dtype=float)
    step = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    if not step:
        raise CorruptFileError(f"{file}: MOSAIC image without SpacingBetweenSlices or SliceThickness")
    # ImagePositionPatient describes the whole frame as one slice: move to the centre tile's corner
    first = (
        np.asarray([float(v) for v in ds.ImagePositionPatient])
        + (stored_rows - rows) / 2 * spacing[0] * col_dir
        + (stored_columns - columns) / 2 * spacing[1] * row_dir
    )
    return [
        Tile(k, (k // per_side) * rows, (k % per_side) * columns, rows, columns,
             tuple(float(v) for v in first + k * float(step) * normal))
        for k in range(count)
    ]


def _uih_grid(file: Path, ds) -> list[Tile] | None:
    size, items = private_value(ds, 0x0065, _UIH_CREATOR, 0x04), private_value(ds, 0x0065, _UIH_CREATOR, 0x51)
    if size is None or items is None:
        return None  # no tile grid: an ordinary image (without patient geometry)
    try:
        rows, columns = (int(v) for v in str(size).split("*"))
        positions = [tuple(float(v) for v in item.ImagePositionPatient) for item in items]
    except (AttributeError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{file}: UIH grid image with unreadable tile size {size!r} or tile positions") from exc
    stored_rows, stored_columns = int(ds.Rows), int(ds.Columns)
    per_row = stored_columns // columns if columns else 0
    if not positions or not per_row or stored_rows % rows or stored_columns % columns or \
            len(positions) > per_row * (stored_rows // rows):
        raise CorruptFileError(
            f"{file}: UIH grid of {len(positions)} tiles of {size} does not fit its "
            f"{stored_columns}x{stored_rows} frame"
        )
    return [
        Tile(k, (k // per_row) * rows, (k % per_row) * columns, rows, columns, position)
        for k, position in enumerate(positions)
    ]

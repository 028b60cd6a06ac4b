"""``load_volume``: one entry point for NIfTI, NRRD/MHA/MHD, DICOM files, folders and DICOMDIRs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import SpaceKeys

from pipelines.io.formats import volume_format
from pipelines.io.grid import LPS_TO_RAS
from pipelines.io.metadata import uniform_metadata
from pipelines.io.errors import (
    CorruptFileError,
    GeometryError,
    InputNotFoundError,
    InputPermissionError,
    InvalidValuesError,
)

__all__ = ["DEFAULT_MAX_VOXELS", "check_not_blank", "load_series", "load_volume", "volume_format"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_VOXELS = 2**30  # 4 GiB as float32: beyond any CT or MR series; raise it for micro-CT
_GZIP_MAX_RATIO = 1100  # deflate expands at most about 1032 times: a smaller .gz cannot hold the data


def load_volume(
    path: str | os.PathLike,
    rules=None,
    *,
    strict: bool = False,
    allow_nonfinite: bool = False,
    allow_blank: bool = True,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
    dtype: np.dtype | str | None = None,
    **rule_options,
) -> MetaTensor:
    """Load an image volume as a channel-first ``MetaTensor`` ``(C, X, Y, Z)`` with an RAS affine
    (``(C, X, Y)`` for a single 2D picture).

    Args:
        path: a NIfTI file (``.nii``, ``.nii.gz``), an NRRD/MHA/MHD file, a PNG or TIFF picture (a
            multi-page TIFF is a stack), a DICOM file (one slice or a multi-frame image), a folder
            of DICOM files (any nesting; other files are skipped and counted) or a DICOMDIR.
        rules: a :class:`pipelines.io.SeriesRules` (DICOM series selection) or None.
        rule_options: rules given one by one (``modality="CT"``, ``volume=1``, ...; see
            :class:`~pipelines.io.SeriesRules`), over ``rules``. A path with several candidate
            volumes and no rule that picks one is an error listing them.
        strict: refuse DICOM stacks with gantry tilt or uneven slice spacing instead of resampling
            them onto a regular grid.
        allow_nonfinite: accept NaN or infinite voxels (refused by default).
        allow_blank: accept an image whose voxels all hold one value (a label may; an image to
            segment may not: pass False).
        max_voxels: refuse, before allocating anything, images with more voxels than this (a
            damaged header can promise terabytes); None for no limit.
        dtype: cast the voxels; by default they keep their type: DICOM gives int16 (int32 if
            needed) when the rescaled values are integers, as in CT, and float32 otherwise or when
            resampled; scaled NIfTI gives float32; other files keep their stored type, except
            unsigned 16-, 32- and 64-bit voxels, which torch cannot flip or resample: they widen to
            int32 or int64.

    Returns:
        The volume; ``.affine`` maps voxel indices to RAS millimetres. ``.meta`` holds, for every
        format and in types MONAI can batch: ``filename_or_obj``, ``source_format``, ``spacing``,
        ``original_affine``, ``spatial_shape``, ``modality``, ``study_instance_uid``,
        ``series_instance_uid``, ``series_description``, ``series_number`` (-1 when unknown),
        ``identifiers`` (patient and study identifiers for output references; never logged),
        ``geometry_corrections`` and ``dicom`` (JSON strings: read them with
        :func:`pipelines.io.geometry_corrections` and :func:`pipelines.io.dicom_references`; the
        latter gives the SOPInstanceUIDs and frame numbers in slice order and the source geometry).

    Raises:
        pipelines.io.errors.InputDataError: a subclass naming the file and the problem (a missing
            path is also a ``FileNotFoundError``, an unreadable one a ``PermissionError``):
            ``CorruptFileError`` for unreadable files and headers that promise more voxels than
            the file holds or than ``max_voxels``, ``GeometryError`` for a singular or non-finite
            affine, ``InvalidValuesError`` for non-finite or (``allow_blank=False``) blank images.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file or folder")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise InputPermissionError(f"{path}: not readable (permission denied)")
    from pipelines.io.dicom import SeriesRules, load_dicom

    rules = SeriesRules.of(rules, **rule_options)  # checked whatever the format: a typo is an error
    kind = volume_format(path)
    if kind == "nifti":
        array, affine, meta = _load_nifti(path, max_voxels)
    elif kind == "itk":
        array, affine, meta = _load_itk(path, max_voxels)
    elif kind == "picture":
        array, affine, meta = _load_picture(path, max_voxels)
    else:
        stack, affine, meta = load_dicom(path, rules, strict=strict, max_voxels=max_voxels)
        array = stack[None]
    return _as_metatensor(array, affine, meta, path, dtype, allow_nonfinite, allow_blank)


def load_series(
    chosen,
    path: str | os.PathLike,
    *,
    strict: bool = False,
    allow_nonfinite: bool = False,
    allow_blank: bool = True,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
    dtype: np.dtype | str | None = None,
) -> MetaTensor:
    """Like :func:`load_volume` for a DICOM series already found and selected
    (a :class:`pipelines.io.dicom.SeriesCandidate`, e.g. from a scan of a whole folder tree);
    ``path`` is recorded as ``filename_or_obj`` and names the source in errors."""
    from pipelines.io.dicom import load_series_records

    volume, affine, meta = load_series_records(chosen, path, strict=strict, max_voxels=max_voxels)
    return _as_metatensor(volume[None], affine, meta, Path(path), dtype, allow_nonfinite, allow_blank)


_WIDENED = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64, np.dtype(np.uint64): np.int64}


def _as_metatensor(array, affine, meta: dict, path: Path, dtype, allow_nonfinite: bool,
                   allow_blank: bool = True) -> MetaTensor:
    _check_affine(affine, path)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if not array.dtype.isnative:  # big-endian files (old NIfTI, ANALYZE heritage): torch needs native order
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype in _WIDENED:  # torch cannot flip or resample these (dcm2niix and ITK write uint16)
        wider = _WIDENED[array.dtype]
        if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
            raise InvalidValuesError(f"{path}: uint64 voxel values above {np.iinfo(np.int64).max} do not fit int64")
        array = array.astype(wider)
    if not allow_nonfinite and np.issubdtype(array.dtype, np.floating):
        _check_finite(array, path)
    if not allow_blank:
        check_not_blank(array, path)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    meta.update(
        {
            "filename_or_obj": str(path),
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(array.shape[1:]),
            "spacing": spacing,
            "space": SpaceKeys.RAS,
            "original_channel_dim": 0,
        }
    )
    meta = uniform_metadata(meta)
    if meta["geometry_corrections"] != "[]":  # the path may name the patient: debug only (callers log case ids)
        logger.debug("%s: geometry corrected: %s", path, meta["geometry_corrections"])
    # DICOM volumes are a transposed view of the slice stack: no copy (peak memory stays one volume)
    return MetaTensor(torch.from_numpy(array), affine=torch.as_tensor(affine), meta=meta)


def _check_affine(affine: np.ndarray, path: Path) -> None:
    """A voxel grid must map to space: finite, with no zero or collinear axes (spacing 0 would
    fail much later, deep inside a transform)."""
    affine = np.asarray(affine, dtype=np.float64)
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if not np.isfinite(affine).all() or spacing.min() <= 1e-6 or abs(np.linalg.det(linear)) <= 1e-9 * spacing.prod():
        raise GeometryError(
            f"{path}: the voxel-to-world affine is singular or not finite (voxel spacing "
            f"{np.round(spacing, 6).tolist()} mm): {np.round(affine, 4).tolist()}"
        )


def check_not_blank(array, path: object) -> None:
    """Raise :class:`InvalidValuesError` ("blank image") when every voxel holds one value (an empty
    export, a one-voxel image): nothing there to segment."""
    if array.size == 0:
        raise InvalidValuesError(f"{path}: blank image: it holds no voxels (shape {tuple(array.shape)})")
    low, high = array.min(), array.max()
    if low == high:
        raise InvalidValuesError(
            f"{path}: blank image: all {array.size:,} voxels hold the value {low.item():g} (shape {tuple(array.shape)})"
        )


def _check_finite(array: np.ndarray, path: Path) -> None:
    if np.isfinite(array).all():
        return
    nan = int(np.isnan(array).sum())
    inf = int(np.isinf(array).sum())
    raise InvalidValuesError(f"{path}: {nan} NaN and {inf} infinite voxels (pass allow_nonfinite=True to accept)")


def _channel_first(data: np.ndarray, path: Path) -> np.ndarray:
    """``(X, Y, Z[, 1][, C])`` or 2D ``(X, Y)`` to ``(C, X, Y, Z)``."""
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI stores vectors as (X, Y, Z, 1, C)
        data = data[:, :, :, 0]
    if data.ndim == 3:
        return data[None]
    if data.ndim == 4:
        return np.moveaxis(data, -1, 0)
    raise CorruptFileError(f"{path}: {data.ndim}-dimensional image of shape {data.shape}; expected 2 to 4 axes")


def _check_promise(path: Path, shape, itemsize: int, offset: int, compressed: bool, max_voxels: int | None,
                   what: str = "NIfTI file") -> None:
    """A header's voxel count against what the file can hold and the limit, before reading."""
    voxels = int(np.prod(shape, dtype=np.float64)) if len(shape) else 1
    need = voxels * itemsize
    size = path.stat().st_size
    if max_voxels is not None and voxels > max_voxels:
        raise CorruptFileError(
            f"{path}: the header promises {voxels:,} voxels (shape {tuple(shape)}), more than the limit of "
            f"{max_voxels:,} (max_voxels)"
        )
    if (compressed and need > size * _GZIP_MAX_RATIO) or (not compressed and offset + need > size):
        raise CorruptFileError(
            f"{path}: unreadable {what}: the header promises {voxels:,} voxels (shape {tuple(shape)}, {need:,} bytes) "
            f"but the {'compressed ' if compressed else ''}file holds {size:,} bytes"
        )


def _load_nifti(path: Path, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, np.ndarray, dict]:
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for truncated or broken files
        raise CorruptFileError(f"{path}: unreadable NIfTI file ({type(exc).__name__}: {exc})") from exc
    header = image.header
    _check_promise(path, header.get_data_shape(), header.get_data_dtype().itemsize,
                   int(header.get_data_offset()), path.name.lower().endswith(".gz"), max_voxels)
    try:
        proxy = image.dataobj
        scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
        data = np.asarray(proxy, dtype=np.float32) if scaled else np.asarray(proxy)
    except Exception as exc:  # nibabel raises many types for truncated or broken files
        raise CorruptFileError(f"{path}: unreadable NIfTI file ({type(exc).__name__}: {exc})") from exc
    return _channel_first(data, path), np.asarray(image.affine, dtype=np.float64), {"source_format": "nifti"}


def _load_picture(path: Path, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, np.ndarray, dict]:
    """A PNG or TIFF picture as ``(C, X, Y)`` (a multi-page TIFF as ``(C, X, Y, pages)``), x along
    its columns as MONAI's ``LoadImage`` gives it. Pictures carry no patient geometry: one unit per
    pixel, identity affine."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            pages = getattr(picture, "n_frames", 1)
            width, height = picture.size
            voxels = width * height * len(picture.getbands()) * pages
            if max_voxels is not None and voxels > max_voxels:
                raise CorruptFileError(f"{path}: {width}x{height} pixels x {pages} page(s) are {voxels:,} values, more "
                                       f"than the limit of {max_voxels:,} (max_voxels)")
            planes = []
            for page in range(pages):
                picture.seek(page)
                planes.append(np.asarray(picture))
    except CorruptFileError:
        raise
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CorruptFileError(f"{path}: unreadable picture ({type(exc).__name__}: {exc})") from exc
    data = np.stack(planes, axis=-1) if pages > 1 else planes[0]  # (H, W[, C][, pages])
    if data.ndim == 2 or (pages > 1 and data.ndim == 3):
        data = data[None]
    else:
        data = np.moveaxis(data, 2, 0)  # colour planes first
    data = np.swapaxes(data, 1, 2)  # (C, W, H[, pages]): x is the column
    return np.ascontiguousarray(data), np.eye(4), {"source_format": "picture"}


def _load_itk(path: Path, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, np.ndarray, dict]:
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        components = reader.GetNumberOfComponents()
        size = tuple(reader.GetSize()) + ((components,) if components > 1 else ())
        if max_voxels is not None and int(np.prod(size, dtype=np.float64)) > max_voxels:
            raise CorruptFileError(
                f"{path}: the header promises {int(np.prod(size, dtype=np.float64)):,} voxels (size {size}), more "
                f"than the limit of {max_voxels:,} (max_voxels)"
            )
        image = reader.Execute()
    except RuntimeError as exc:
        raise CorruptFileError(f"{path}: unreadable image file ({exc})") from exc
    dims = image.GetDimension()
    data = sitk.GetArrayFromImage(image)  # (Z, Y, X[, C]) for 3D
    spatial = data.ndim - (image.GetNumberOfComponentsPerPixel() > 1)
    data = np.transpose(data, (*reversed(range(spatial)), *range(spatial, data.ndim)))
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dims, dims)
    affine = np.eye(4)
    affine[:dims, :dims] = direction * np.asarray(image.GetSpacing())
    affine[:dims, 3] = image.GetOrigin()
    return _channel_first(data, path), LPS_TO_RAS @ affine, {"source_format": "itk"}

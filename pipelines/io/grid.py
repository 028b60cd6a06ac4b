"""Voxel grids in patient space: DICOM's LPS against the RAS of NIfTI and MONAI, and grid checks."""

from __future__ import annotations

import numpy as np

__all__ = ["AFFINE_TOLERANCE_MM", "LPS_TO_RAS", "check_same_grid"]

# DICOM patient coordinates (x to the left, y to the back) to RAS (x right, y front): its own inverse
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
AFFINE_TOLERANCE_MM = 1e-3  # affines this close describe one grid


def check_same_grid(reference, other, reference_name: str = "image", other_name: str = "label") -> None:
    """Raise :class:`pipelines.io.GridMismatchError` unless both volumes (``(C, *spatial)`` tensors
    with ``.affine`` and ``.meta``) share shape and affine (within :data:`AFFINE_TOLERANCE_MM`)."""
    from pipelines.io.errors import GridMismatchError

    ref_shape, other_shape = tuple(reference.shape[1:]), tuple(other.shape[1:])
    ref_affine, other_affine = np.asarray(reference.affine), np.asarray(other.affine)
    if ref_shape == other_shape and np.allclose(ref_affine, other_affine, atol=AFFINE_TOLERANCE_MM):
        return
    where = lambda volume: volume.meta.get("filename_or_obj", "?")  # noqa: E731
    detail = (
        f"shape {other_shape} vs {ref_shape}"
        if ref_shape != other_shape
        else f"affine differs by up to {np.abs(ref_affine - other_affine).max():.4g} mm"
    )
    raise GridMismatchError(
        f"{where(other)}: {other_name} grid differs from {reference_name} {where(reference)}: {detail}"
    )

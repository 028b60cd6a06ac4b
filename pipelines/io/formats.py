"""Which reader a path needs, from its name: the one list of image file suffixes."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "ITK_SUFFIXES", "NIFTI_SUFFIXES", "PICTURE_SUFFIXES", "image_stem", "is_image_file",
           "volume_format"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
PICTURE_SUFFIXES = (".png", ".tif", ".tiff")  # 2D sections (microscopy, EM), one grey or colour plane
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + PICTURE_SUFFIXES  # everything but DICOM


def volume_format(path: str | os.PathLike) -> str:
    """``"nifti"``, ``"itk"``, ``"picture"`` or ``"dicom"`` (folders, DICOMDIRs and any other file)."""
    name = Path(path).name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if name.endswith(PICTURE_SUFFIXES):
        return "picture"
    return "dicom"


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an image file that is not DICOM (NIfTI, NRRD, MHA/MHD, PNG, TIFF)."""
    return Path(path).name.lower().endswith(IMAGE_SUFFIXES)


def image_stem(path: str | os.PathLike) -> str:
    """The file name without its image suffix (``case_001.nii.gz`` -> ``case_001``)."""
    name = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name

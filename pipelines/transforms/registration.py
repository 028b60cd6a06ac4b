"""A study's channels on one grid: each resampled onto a reference channel's grid by patient
coordinates, then, optionally, rigidly registered to it.

The sequences of one MR study share the scanner's patient coordinates, so resampling by those
coordinates aligns them unless the patient moved between series. Rigid registration (SimpleITK:
Mattes mutual information, which compares sequences of different contrast, a regular-step gradient
descent over three resolutions of both volumes averaged to about 2 mm, rotation about the
reference's centre) finds such a movement. The
result is kept only when it raises the mutual information over patient coordinates by at least
``min_gain``; otherwise the channel stays as the coordinates place it, so aligned channels are not
moved by the optimiser's noise. A channel whose final mutual information is below
``min_mutual_information`` is refused (:class:`RegistrationError`): a series of another patient, or
one of another frame of reference that no rigid movement aligns.

What was done is written to each channel's metadata under ``registration``: the reference key, the
4x4 matrix (RAS, mm) that maps a reference point to the channel's point, the translation in mm and
the rotation in degrees it amounts to, the mutual information before and after, and whether it was
kept.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from pipelines.io.errors import InputDataError
from pipelines.io.grid import AFFINE_TOLERANCE_MM, LPS_TO_RAS

__all__ = ["RegisterToReferenced", "RegistrationError", "RigidRegistration", "register_rigid", "resample_to"]


class RegistrationError(InputDataError):
    """A channel that rigid registration cannot align with the reference."""


@dataclass(frozen=True)
class RigidRegistration:
    """The result of :func:`register_rigid`.

    Attributes:
        matrix: ``(4, 4)`` RAS matrix in mm mapping a point of the reference to the channel's point.
        mutual_information_before: at patient coordinates (nats; higher is better).
        mutual_information_after: at ``matrix``.
        kept: whether ``matrix`` is the registration's (else the identity: patient coordinates).
    """

    matrix: np.ndarray
    mutual_information_before: float
    mutual_information_after: float
    kept: bool

    @property
    def translation_mm(self) -> float:
        """How far the reference's centre moves."""
        return float(np.linalg.norm(self.matrix[:3, 3]))

    @property
    def rotation_deg(self) -> float:
        """The rotation's angle."""
        cosine = (np.trace(self.matrix[:3, :3]) - 1.0) / 2.0
        return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))

    def as_meta(self, reference_key: str) -> dict:
        return {
            "reference": reference_key,
            "matrix": np.round(self.matrix, 6).tolist(),
            "translation_mm": round(self.translation_mm, 3),
            "rotation_deg": round(self.rotation_deg, 3),
            "mutual_information_before": round(self.mutual_information_before, 4),
            "mutual_information_after": round(self.mutual_information_after, 4),
            "kept": self.kept,
            "registered": True,
        }


def _to_sitk(volume: torch.Tensor):
    """The first channel of a ``(C, X, Y, Z)`` volume with its RAS affine as a SimpleITK image (LPS)."""
    import SimpleITK as sitk

    if volume.ndim != 4:
        raise ValueError(f"volume must have shape (C, X, Y, Z), got {tuple(volume.shape)}")
    affine = LPS_TO_RAS @ np.asarray(volume.affine, dtype=np.float64)  # the same flip maps RAS to LPS
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    array = np.asarray(volume[0].detach().cpu().numpy(), dtype=np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    image.SetDirection((affine[:3, :3] / spacing).flatten().tolist())
    return image


def _euler(matrix_lps: np.ndarray, center: Sequence[float]):
    import SimpleITK as sitk

    transform = sitk.Euler3DTransform()
    transform.SetCenter(list(center))
    transform.SetMatrix(matrix_lps[:3, :3].flatten().tolist())
    rotation = matrix_lps[:3, :3]
    transform.SetTranslation((matrix_lps[:3, 3] - np.asarray(center) + rotation @ np.asarray(center)).tolist())
    return transform


def _matrix_lps(transform) -> np.ndarray:
    """The 4x4 of a SimpleITK Euler3DTransform (point of the fixed image -> point of the moving one)."""
    rotation = np.asarray(transform.GetMatrix()).reshape(3, 3)
    center, translation = np.asarray(transform.GetCenter()), np.asarray(transform.GetTranslation())
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = translation + center - rotation @ center
    return matrix


def _mutual_information(fixed, moving, transform, bins: int) -> float:
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(bins)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform)
    return -float(method.MetricEvaluate(fixed, moving))  # SimpleITK minimises minus the information


def _center(image) -> list[float]:
    return list(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()]))


def _binned(image, spacing_mm: float):
    """``image`` averaged over blocks of whole voxels to about ``spacing_mm`` along each axis (axes
    already at least that coarse are kept)."""
    import SimpleITK as sitk

    factors = [max(1, round(spacing_mm / s)) if s < spacing_mm else 1 for s in image.GetSpacing()]
    factors = [min(f, n) for f, n in zip(factors, image.GetSize())]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def register_rigid(reference: torch.Tensor, moving: torch.Tensor, bins: int = 32, sampling: float = 0.1,
                   iterations: int = 200, min_gain: float = 0.01, seed: int = 0,
                   finest_mm: float = 2.0) -> RigidRegistration:
    """Rigidly register ``moving`` to ``reference`` (both ``(C, X, Y, Z)`` with RAS affines, channel 0 used).

    Both volumes are first averaged over blocks of whole voxels to about ``finest_mm`` (the finest
    level), then registered over three levels, each twice as coarse as the next; the mutual
    information before and after is measured on those averaged volumes too, which is much faster than
    reading the full-resolution volumes at each level (docs/benchmarks.md, "A brain tumor study").

    Args:
        reference: the fixed volume.
        moving: the volume to align.
        bins: histogram bins of the mutual information.
        sampling: the fraction of the reference's voxels sampled at each step (random, ``seed``).
        iterations: most optimiser steps per resolution level.
        min_gain: the mutual information (nats) the registration must add over patient coordinates to
            be kept.
        seed: the sampling's seed: the same inputs give the same result.
        finest_mm: the finest level's voxel size.
    """
    import SimpleITK as sitk

    fixed, mov = _binned(_to_sitk(reference), finest_mm), _binned(_to_sitk(moving), finest_mm)
    center = _center(fixed)
    identity = _euler(np.eye(4), center)
    before = _mutual_information(fixed, mov, identity, bins)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=iterations,
                                                   relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    finest = max(min(fixed.GetSpacing()), 1.0)  # the smoothing's scale, in mm, as the finest level's voxels
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0 * finest, 1.0 * finest, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(identity, inPlace=False)  # the optimiser moves a copy
    result = method.Execute(fixed, mov)
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(result).GetNthTransform(0)) \
        if result.GetName() == "CompositeTransform" else sitk.Euler3DTransform(result)
    after = _mutual_information(fixed, mov, euler, bins)
    kept = after >= before + min_gain
    matrix_lps = _matrix_lps(euler) if kept else np.eye(4)
    return RigidRegistration(LPS_TO_RAS @ matrix_lps @ LPS_TO_RAS, before, after if kept else before, kept)


def resample_to(moving: torch.Tensor, reference: torch.Tensor, matrix: np.ndarray | None = None) -> MetaTensor:
    """``moving`` ``(C, X, Y, Z)`` on the grid of ``reference``, linearly interpolated, zero outside.

    Args:
        moving: the volume to resample (its metadata is kept, with the reference's affine).
        reference: the volume whose grid to take.
        matrix: RAS matrix mapping a reference point to a moving point; None for patient coordinates.
    """
    import SimpleITK as sitk

    fixed = _to_sitk(reference)
    lps = np.eye(4) if matrix is None else LPS_TO_RAS @ np.asarray(matrix, dtype=np.float64) @ LPS_TO_RAS
    transform = _euler(lps, _center(fixed))
    channels = []
    for c in range(moving.shape[0]):
        image = _to_sitk(moving[c : c + 1] if isinstance(moving, MetaTensor) else MetaTensor(moving[c : c + 1]))
        out = sitk.Resample(image, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        channels.append(sitk.GetArrayFromImage(out).transpose(2, 1, 0))
    meta = {k: v for k, v in moving.meta.items() if k != "affine"} if isinstance(moving, MetaTensor) else {}
    result = MetaTensor(torch.from_numpy(np.stack(channels)), affine=reference.affine.clone(), meta=meta)
    result.meta["spatial_shape"] = np.asarray(reference.shape[1:])
    return result


def _same_grid(volume, reference) -> bool:
    return tuple(volume.shape[1:]) == tuple(reference.shape[1:]) and np.allclose(
        np.asarray(volume.affine), np.asarray(reference.affine), atol=AFFINE_TOLERANCE_MM)


def _other_series(volume, reference) -> bool:
    """Two DICOM series: the patient may have moved between them, whatever their grids."""
    series = [getattr(v, "meta", {}).get("series_instance_uid") or "" for v in (volume, reference)]
    return all(series) and series[0] != series[1]


class RegisterToReferenced(MapTransform):
    """Every channel under ``keys`` onto the grid of ``reference_key``, rigidly registered when
    ``register`` (see the module docstring); the channel's metadata gains ``registration``.

    ``min_gain``, ``bins``, ``sampling``, ``iterations``, ``seed``: as in :func:`register_rigid`.

    Args:
        keys: the channels to align (the reference key among them is left as it is).
        reference_key: the channel whose grid the others take.
        register: register (True); only resample by patient coordinates (False); or ``"auto"``:
            register the channels that are other DICOM series than the reference (the patient may
            have moved between them, even on one grid) or lie on another grid, and keep files already
            on the reference grid as they are (BraTS-layout files, co-registered by their
            distributor). Without registering, a channel already on the reference grid is kept as it is.
        min_mutual_information: a registered channel with less mutual information (nats) is refused.
        allow_missing_keys: skip keys that are absent.
    """

    def __init__(self, keys: KeysCollection, reference_key: str, register: bool | str = True,
                 min_mutual_information: float = 0.05, min_gain: float = 0.01, bins: int = 32,
                 sampling: float = 0.1, iterations: int = 200, seed: int = 0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if register not in (True, False, "auto"):
            raise ValueError(f"`register` must be true, false or 'auto', got {register!r}")
        self.reference_key = reference_key
        self.register = register
        self.min_mutual_information = min_mutual_information
        self.options = {"min_gain": min_gain, "bins": bins, "sampling": sampling, "iterations": iterations,
                        "seed": seed}

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.reference_key not in d:
            raise KeyError(f"RegisterToReferenced: reference key {self.reference_key!r} is not in the data")
        reference = d[self.reference_key]
        for key in self.key_iterator(d):
            if key == self.reference_key:
                continue
            same = _same_grid(d[key], reference)
            if not self.register or (self.register == "auto" and same and not _other_series(d[key], reference)):
                if not same:
                    d[key] = resample_to(d[key], reference)
                d[key].meta["registration"] = {"reference": self.reference_key, "kept": False,
                                               "registered": False, "same_grid": same}
                continue
            found = register_rigid(reference, d[key], **self.options)
            if found.mutual_information_after < self.min_mutual_information:
                source = getattr(d[key], "meta", {}).get("filename_or_obj", "?")
                raise RegistrationError(
                    f"{source}: channel {key!r} cannot be aligned with {self.reference_key!r}: mutual information "
                    f"{found.mutual_information_after:.3f} after rigid registration, below "
                    f"{self.min_mutual_information} (another patient, or another frame of reference?)"
                )
            d[key] = resample_to(d[key], reference, found.matrix)
            d[key].meta["registration"] = found.as_meta(self.reference_key)
        return d

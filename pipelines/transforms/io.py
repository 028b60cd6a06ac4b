"""Loading transforms for bundle configs: ``LoadVolume`` and its dictionary wrapper ``LoadVolumed``."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = ["LoadVolume", "LoadVolumed", "check_same_grid"]

_AFFINE_TOLERANCE_MM = 1e-3


class LoadVolume(Transform):
    """Load a path with :func:`pipelines.io.load_volume`: ``(C, X, Y, Z)`` MetaTensor, RAS affine.

    Args:
        options: passed to ``load_volume``: DICOM series rules (``modality``, ``description``,
            ``image_type_include``, ``image_type_exclude``, ``min_slices``, ``orientation``,
            ``volume``), ``strict``, ``allow_nonfinite``, ``allow_blank``, ``max_voxels``, ``dtype``.
    """

    def __init__(self, **options) -> None:
        from pipelines.io.dicom import SeriesRules  # validate the rules now, not at the first case

        rule_keys = {"modality", "description", "image_type_include", "image_type_exclude", "min_slices", "orientation",
                     "volume"}
        unknown = set(options) - rule_keys - {"strict", "allow_nonfinite", "allow_blank", "max_voxels", "dtype"}
        if unknown:
            raise TypeError(f"LoadVolume got unknown option(s) {sorted(unknown)}")
        SeriesRules(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items() if k in rule_keys})
        self.options = options

    def __call__(self, path):
        from pipelines.io import load_volume

        return load_volume(path, **self.options)


def check_same_grid(reference, other, reference_name: str = "image", other_name: str = "label") -> None:
    """Raise :class:`pipelines.io.GridMismatchError` unless both volumes share shape and affine."""
    from pipelines.io import GridMismatchError

    ref_shape, other_shape = tuple(reference.shape[1:]), tuple(other.shape[1:])
    ref_affine, other_affine = np.asarray(reference.affine), np.asarray(other.affine)
    if ref_shape == other_shape and np.allclose(ref_affine, other_affine, atol=_AFFINE_TOLERANCE_MM):
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


class LoadVolumed(MapTransform):
    """Dictionary wrapper of :class:`LoadVolume`.

    Args:
        keys: keys holding paths, e.g. ``["image", "label"]``.
        check_grid: every loaded key must share the first key's grid (shape and affine within
            1 micrometre), else :class:`pipelines.io.GridMismatchError` names both files.
        allow_missing_keys: skip missing keys instead of raising.
        options: see :class:`LoadVolume`.
    """

    def __init__(self, keys: KeysCollection, check_grid: bool = True, allow_missing_keys: bool = False, **options) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadVolume(**options)
        self.check_grid = check_grid

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        reference_key = None
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
            if reference_key is None:
                reference_key = key
            elif self.check_grid:
                check_same_grid(d[reference_key], d[key], str(reference_key), str(key))
        return d

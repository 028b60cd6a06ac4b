"""Label maps in a bundle's convention, and label maps as region channels.

A reference label file from another source speaks its own convention (BraTS 2021 marks the
enhancing tumor 4, BraTS 2023 3); :class:`MapLabelsd` maps it into the bundle's values and refuses
a file holding any other value, naming the file and the values, instead of training on it.
:class:`LabelsToRegions` turns a label map into the nested region channels that region-based
training uses (BraTS: whole tumor, tumor core, enhancing tumor); :class:`~pipelines.transforms.RegionsToLabels`
is its inverse for nested regions.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from pipelines.io.errors import InputDataError
from pipelines.io.grid import check_same_grid

__all__ = ["LabelValueError", "LabelsToRegions", "LabelsToRegionsd", "MapLabels", "MapLabelsd"]


def _like(label, data: torch.Tensor):
    """``data`` with ``label``'s metadata and transform trace when ``label`` is a MetaTensor."""
    if hasattr(label, "meta"):
        return type(label)(data, meta=label.meta, applied_operations=label.applied_operations)
    return data


class LabelValueError(InputDataError):
    """A label map holding values outside the bundle's convention."""


class MapLabels(Transform):
    """Map a label map's values through ``label_map``, then check every value is one of ``values``.

    Args:
        values: the values the bundle's convention allows (background 0 among them).
        label_map: source value -> bundle value (``{4: 3}`` reads BraTS 2021 labels as BraTS 2023);
            keys may be strings, as JSON writes them; values not named stay as they are.
    """

    def __init__(self, values: Sequence[int], label_map: Mapping | None = None) -> None:
        self.values = sorted({int(v) for v in values})
        if not self.values:
            raise ValueError("`values` must list the allowed label values, got none")
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        unknown = sorted(set(self.label_map.values()) - set(self.values))
        if unknown:
            raise ValueError(f"`label_map` maps to {unknown}, which are not among the allowed values {self.values}")

    def __call__(self, label: torch.Tensor, source: str = "label") -> torch.Tensor:
        array = label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)
        if array.is_floating_point():
            rounded = torch.round(array)
            if not torch.equal(rounded, array):
                raise LabelValueError(f"{source}: label map holds non-integer values (a probability or an image?)")
            array = rounded
        array = array.to(torch.int64)
        if self.label_map:
            mapped = array.clone()
            for old, new in self.label_map.items():
                mapped[array == old] = new
            array = mapped
        found, counts = torch.unique(array, return_counts=True)
        outside = [(int(v), int(n)) for v, n in zip(found, counts) if int(v) not in self.values]
        if outside:
            listed = ", ".join(f"{v} ({n} voxels)" for v, n in outside)
            mapping = f" after label_map {self.label_map}" if self.label_map else ""
            raise LabelValueError(
                f"{source}: label values {listed} are outside the convention {self.values}{mapping}; "
                f"map them with `label_map` (e.g. BraTS 2021's enhancing tumor: {{\"4\": 3}})"
            )
        return _like(label, array.to(torch.uint8))


class MapLabelsd(MapTransform):
    """Dictionary wrapper of :class:`MapLabels`; with ``reference_key``, each label must also lie on
    that key's grid (:class:`pipelines.io.GridMismatchError` naming both files otherwise)."""

    def __init__(self, keys: KeysCollection, values: Sequence[int], label_map: Mapping | None = None,
                 reference_key: str | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = MapLabels(values, label_map)
        self.reference_key = reference_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = getattr(d[key], "meta", {}).get("filename_or_obj", key)
            if self.reference_key is not None:
                check_same_grid(d[self.reference_key], d[key], str(self.reference_key), str(key))
            d[key] = self.transform(d[key], str(source))
        return d


class LabelsToRegions(Transform):
    """A label map ``(1, *spatial)`` as region channels ``(R, *spatial)`` (uint8): channel ``r`` is 1
    where the label is one of ``regions[r]`` (BraTS 2023: ``[[1, 2, 3], [1, 3], [3]]`` for WT, TC, ET).
    """

    def __init__(self, regions: Sequence[Sequence[int]]) -> None:
        if not regions or any(len(r) == 0 for r in regions):
            raise ValueError(f"`regions` must list at least one region of label values, got {regions!r}")
        self.regions = [sorted(int(v) for v in r) for r in regions]

    def __call__(self, label: torch.Tensor) -> torch.Tensor:
        if label.ndim < 2 or label.shape[0] != 1:
            raise ValueError(f"label must have shape (1, *spatial), got {tuple(label.shape)}")
        array = label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)
        channels = torch.cat([torch.isin(array, torch.tensor(r, device=array.device)) for r in self.regions])
        return _like(label, channels.to(torch.uint8))


class LabelsToRegionsd(MapTransform):
    """Dictionary wrapper of :class:`LabelsToRegions`."""

    def __init__(self, keys: KeysCollection, regions: Sequence[Sequence[int]], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = LabelsToRegions(regions)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d

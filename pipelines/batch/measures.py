"""What a report needs from a label map: volumes in mL, lesions, the largest lesion's diameter for a
3D volume; pixel counts, fractions and objects for a 2D section (a picture has no physical size)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

__all__ = ["Lesion", "SectionMeasures", "VolumeMeasures", "dice_scores", "lesion_map", "lesion_measurements",
           "max_diameter_mm", "measure_section", "measure_volume", "region_volumes", "section_measurements", "voxel_ml"]


def voxel_ml(affine) -> float:
    """The volume of one voxel of a grid with RAS ``affine`` (mm), in mL."""
    return abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0


def max_diameter_mm(mask: np.ndarray, affine) -> float:
    """Largest distance in mm between the centres of two voxels of ``mask`` ``(X, Y, Z)`` (its
    maximum Feret diameter, measured between voxel centres: 0 for a single voxel)."""
    surface = mask & ~ndimage.binary_erosion(mask)  # the farthest pair lies on the surface
    voxels = np.argwhere(surface)
    if len(voxels) < 2:
        return 0.0
    affine = np.asarray(affine, float)
    points = voxels @ affine[:3, :3].T + affine[:3, 3]
    if len(points) > 64:
        try:
            points = points[ConvexHull(points).vertices]  # the farthest pair are hull vertices
        except QhullError:  # flat (one slice thick) or degenerate: all surface points
            pass
    return float(pdist(points).max())


MAX_LESIONS_LISTED = 20  # a record lists this many lesions, the largest; lesion_count counts them all


def lesion_map(labels: np.ndarray, lesion_labels: Sequence[int] | None = None) -> tuple[np.ndarray, int]:
    """The lesions of a label map ``(X, Y, Z)``: connected components (26-connectivity) of the
    ``lesion_labels`` together (default: every foreground label), numbered by volume: 1 is the
    largest (ties in scan order). Returns the map (``uint16``, 0 outside lesions) and the count."""
    # pipelines.metrics imports MONAI (its BraTS metrics), and with it Ignite: see pipelines.batch.bundle
    from pipelines.metrics.components import number_components

    labels = np.asarray(labels)
    return number_components(labels > 0 if lesion_labels is None else np.isin(labels, list(lesion_labels)))


def lesion_measurements(labels: np.ndarray, affine, names: Mapping[int, str],
                        lesion_labels: Sequence[int] | None = None, lesions: tuple[np.ndarray, int] | None = None) -> dict:
    """Volumes and lesions of a label map ``(X, Y, Z)`` with an RAS ``affine`` in mm.

    A lesion is a connected component (26-connectivity) of the ``lesion_labels`` together (default:
    every foreground label, so a tumor with its surrounding edema is one lesion). A bundle whose
    lesions are its tumor cores names those labels, so two tumors in one edema count as two.

    Args:
        lesions: :func:`lesion_map` of ``labels`` when the caller has it already.

    Returns:
        ``volumes_ml`` per label name, ``lesion_count``, ``lesions``: the largest
        :data:`MAX_LESIONS_LISTED` lesions by volume (lesion ``i`` of :func:`lesion_map` is the
        ``i``-th), each with ``volume_ml``, ``diameter_mm`` (maximum Feret diameter),
        ``centre_voxel`` (index of its centre of mass, used to place the QC slices) and
        ``volumes_ml`` of each label within it, and ``largest_lesion``, the first of them (``None``
        without lesions).
    """
    labels = np.asarray(labels)
    per_voxel = voxel_ml(affine)
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=max(names, default=0) + 1)
    volumes = {name: round(float(counts[value]) * per_voxel, 3) for value, name in sorted(names.items())}
    components, count = lesion_map(labels, lesion_labels) if lesions is None else lesions
    result = {"volumes_ml": volumes, "lesion_count": int(count), "lesions": [], "largest_lesion": None}
    if count:
        sizes = np.bincount(components.ravel())[1:]
        boxes = ndimage.find_objects(components)
        for index in range(min(count, MAX_LESIONS_LISTED)):
            box = boxes[index]
            mask = np.zeros(labels.shape, bool)
            mask[box] = components[box] == index + 1
            inside = np.bincount(labels[box][mask[box]].astype(np.int64), minlength=max(names, default=0) + 1)
            result["lesions"].append({
                "volume_ml": round(float(sizes[index]) * per_voxel, 3),
                "diameter_mm": round(max_diameter_mm(mask, affine), 2),
                "centre_voxel": [int(round(c)) for c in ndimage.center_of_mass(mask)],
                "volumes_ml": {name: round(float(inside[value]) * per_voxel, 3)
                               for value, name in sorted(names.items()) if inside[value]},
            })
        result["largest_lesion"] = result["lesions"][0]
    return result


def region_volumes(labels: np.ndarray, affine, regions: Mapping[str, list[int]]) -> dict[str, float]:
    """Volume in mL of each region (a name and the label values it covers, e.g. a whole tumor)."""
    per_voxel = voxel_ml(affine)
    return {name: round(float(np.isin(labels, values).sum()) * per_voxel, 3) for name, values in regions.items()}


def section_measurements(labels: np.ndarray, names: Mapping[int, str]) -> dict:
    """Per label of a 2D label map ``(X, Y)``: ``areas_px`` (pixel count), ``area_fractions`` (of the
    section) and ``objects`` (connected components, 8-connectivity: cells in a membrane map)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=max(names, default=0) + 1)
    result = {"areas_px": {}, "area_fractions": {}, "objects": {}}
    for value, name in sorted(names.items()):
        result["areas_px"][name] = int(counts[value])
        result["area_fractions"][name] = round(float(counts[value]) / max(labels.size, 1), 4)
        result["objects"][name] = int(ndimage.label(labels == value, structure=np.ones((3, 3), bool))[1])
    return result


def dice_scores(prediction: np.ndarray, reference: np.ndarray, names: Mapping[int, str]) -> dict[str, float | None]:
    """Dice per label name on one grid; ``None`` where both are empty (undefined)."""
    scores: dict[str, float | None] = {}
    for value, name in sorted(names.items()):
        p, r = prediction == value, reference == value
        total = int(p.sum()) + int(r.sum())
        scores[name] = None if total == 0 else round(2.0 * float((p & r).sum()) / total, 4)
    return scores


@dataclass(frozen=True)
class Lesion:
    """One listed lesion: its volume, largest diameter (mm), centre voxel and volume per label."""

    volume_ml: float
    diameter_mm: float
    centre_voxel: list[int]
    volumes_ml: dict[str, float]

    def as_record(self) -> dict:
        return {"volume_ml": self.volume_ml, "diameter_mm": self.diameter_mm, "centre_voxel": self.centre_voxel,
                "volumes_ml": self.volumes_ml}


@dataclass(frozen=True)
class VolumeMeasures:
    """What a 3D label map measures (:func:`measure_volume`).

    Attributes:
        volumes_ml: per label name.
        lesion_count: all lesions.
        lesions: the listed ones, largest first (lesion ``i`` of ``lesion_map`` is the ``i``-th).
        lesion_map: the lesions numbered by volume (:func:`lesion_map`), on the label map's grid.
        regions_ml: per region the bundle declares; None when it declares none.
    """

    volumes_ml: dict[str, float]
    lesion_count: int
    lesions: list[Lesion]
    lesion_map: np.ndarray = field(repr=False)
    regions_ml: dict[str, float] | None = None

    @property
    def largest(self) -> Lesion | None:
        return self.lesions[0] if self.lesions else None

    def as_record(self) -> dict:
        """The record's ``volumes_ml``, ``lesion_count``, ``lesions``, ``largest_lesion`` (and ``regions_ml``)."""
        listed = [lesion.as_record() for lesion in self.lesions]
        out = {"volumes_ml": self.volumes_ml, "lesion_count": self.lesion_count, "lesions": listed,
               "largest_lesion": listed[0] if listed else None}
        return {**out, "regions_ml": self.regions_ml} if self.regions_ml is not None else out


@dataclass(frozen=True)
class SectionMeasures:
    """What a 2D label map measures (:func:`section_measurements`), per label name."""

    areas_px: dict[str, int]
    area_fractions: dict[str, float]
    objects: dict[str, int]

    def as_record(self) -> dict:
        return {"areas_px": self.areas_px, "area_fractions": self.area_fractions, "objects": self.objects}


def measure_volume(labels: np.ndarray, affine, names: Mapping[int, str], lesion_labels: Sequence[int] | None = None,
                   regions: Mapping[str, Sequence[int]] | None = None) -> VolumeMeasures:
    """:func:`lesion_measurements` (and :func:`region_volumes` when ``regions``) of a 3D label map, typed."""
    lesions = lesion_map(labels, lesion_labels)
    found = lesion_measurements(labels, affine, names, lesion_labels, lesions)
    return VolumeMeasures(
        volumes_ml=found["volumes_ml"], lesion_count=found["lesion_count"],
        lesions=[Lesion(**lesion) for lesion in found["lesions"]], lesion_map=lesions[0],
        regions_ml=region_volumes(labels, affine, {k: list(v) for k, v in regions.items()}) if regions else None,
    )


def measure_section(labels: np.ndarray, names: Mapping[int, str]) -> SectionMeasures:
    """:func:`section_measurements` of a 2D label map, typed."""
    return SectionMeasures(**section_measurements(labels, names))

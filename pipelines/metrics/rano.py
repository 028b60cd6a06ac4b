"""RANO measurements of enhancing tumor from a segmentation, and the response category they give.

Brain tumor response is read by RANO (Wen et al. 2010; RANO 2.0, Wen et al. 2023), not by volume:

- **Diameters**: per enhancing lesion (a 3D connected component of the enhancing labels), on each
  axial slice of the grid (the voxel axis closest to the patient's head-foot axis), the longest
  in-plane diameter of the lesion's outline and the longest diameter perpendicular to it on the same
  slice, both in mm. The outline is the boundary of the voxels (marching squares at half height, so
  a diameter spans voxel edges, not voxel centres), holes filled: a ring-enhancing lesion is measured
  across its necrotic core. The slice with the largest product is the lesion's.
- **Measurable** (RANO 2010 and 2.0): both diameters at least 10 mm, and the lesion seen on two or
  more axial slices.
- **Targets**: the measurable lesions with the largest products, at most :data:`TARGETS` (RANO 2.0),
  and the sum of their products (SPD).
- **Category** against earlier studies: progression (PD) at a 25 % increase of the sum over the
  smallest earlier sum (the nadir, the baseline included), or a new measurable lesion, or lesions
  reappearing after the sum reached 0; complete response (CR) when the sum is 0; partial response
  (PR) at a 50 % decrease from the baseline; stable disease (SD) otherwise. An automated,
  unconfirmed assessment: RANO's clinical criteria (steroid dose, clinical status, non-enhancing
  disease on FLAIR, confirmation scans) are the clinician's.
- **Volumetric** (RANO 2.0's alternative to the diameters): the enhancing volume, PD at a 40 %
  increase over the smallest earlier volume, PR at a 65 % decrease from the baseline, CR at none left
  (:func:`assess_volume`).
- **Non-enhancing disease** (RANO-LGG style, for the FLAIR/T2 hyperintensity): the same diameters and
  sum on the non-enhancing labels, with a minor response (MR) at a 25 % decrease between PR and SD
  (``assess(..., minor=True)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from skimage.measure import find_contours

from pipelines.metrics.components import number_components

__all__ = ["MIN_DIAMETER_MM", "TARGETS", "Assessment", "LesionDiameters", "VolumeAssessment", "assess", "assess_volume",
           "axial_axis", "measure_lesions", "target_sum"]

MIN_DIAMETER_MM = 10.0  # both diameters, for a measurable lesion
MIN_SLICES = 2  # axial slices a measurable lesion is seen on
TARGETS = 3  # RANO 2.0's most target lesions (RANO 2010: 5)
PR_DECREASE = 0.50  # of the baseline sum
PD_INCREASE = 0.25  # over the nadir
MR_DECREASE = 0.25  # of the baseline sum: RANO-LGG's minor response (non-enhancing disease)
VOLUME_PR_DECREASE = 0.65  # RANO 2.0 volumetric: of the baseline volume
VOLUME_PD_INCREASE = 0.40  # RANO 2.0 volumetric: over the smallest earlier volume
MEASURABLE_RULE = (f"RANO: both perpendicular diameters at least {MIN_DIAMETER_MM:g} mm on an axial slice, the lesion "
                   f"seen on at least {MIN_SLICES} axial slices; at most {TARGETS} target lesions (RANO 2.0), the "
                   f"largest products")
AUTOMATED = ("automated assessment from the segmentation of enhancing tumor alone, not confirmed: RANO's clinical "
             "criteria (steroids, clinical status, non-enhancing disease, confirmation scans) are the clinician's")


@dataclass(frozen=True)
class LesionDiameters:
    """One enhancing lesion's bidimensional measurement.

    Attributes:
        lesion: its number (1 the largest by volume).
        slice_index: the axial slice (index along ``axis``) the diameters were measured on.
        axis: the grid's axial axis.
        longest_mm: the longest in-plane diameter.
        perpendicular_mm: the longest diameter perpendicular to it on the same slice.
        ends: the two diameters' end points in voxel coordinates of the slice's plane (a ``(2, 2, 2)``
            array: diameter, end, in-plane index), for drawing them.
        slices: how many axial slices the lesion is seen on.
        measurable: by :data:`MEASURABLE_RULE`.
        why: why not, when not measurable.
    """

    lesion: int
    slice_index: int
    axis: int
    longest_mm: float
    perpendicular_mm: float
    ends: np.ndarray
    slices: int
    measurable: bool
    why: str = ""

    def voxels(self, diameter: int = 0) -> np.ndarray:
        """The ends of the longest (0) or the perpendicular (1) diameter as voxel coordinates of the
        grid, ``(2, 3)``."""
        index = np.zeros((2, 3))
        index[:, self.axis] = self.slice_index
        index[:, [a for a in range(3) if a != self.axis]] = self.ends[diameter]
        return index

    @property
    def product_mm2(self) -> float:
        return self.longest_mm * self.perpendicular_mm

    def as_record(self) -> dict:
        out = {"lesion": self.lesion, "slice": self.slice_index, "longest_mm": round(self.longest_mm, 2),
               "perpendicular_mm": round(self.perpendicular_mm, 2), "product_mm2": round(self.product_mm2, 1),
               "slices": self.slices, "measurable": self.measurable,
               "ends_voxel": np.round(self.ends, 2).tolist()}
        return {**out, "why": self.why} if self.why else out


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the patient's head-foot (RAS S) axis."""
    directions = np.asarray(affine, float)[:3, :3]
    return int(np.argmax(np.abs(directions[2]) / np.linalg.norm(directions, axis=0)))


def _outline(section: np.ndarray) -> np.ndarray:
    """Points of the outer outline of a 2D mask, holes filled, in voxel coordinates ``(N, 2)``."""
    filled = ndimage.binary_fill_holes(section)
    padded = np.pad(filled.astype(np.float32), 1)
    contours = find_contours(padded, 0.5)
    return np.concatenate(contours) - 1.0 if contours else np.zeros((0, 2))


def _diameters(points: np.ndarray, to_mm: np.ndarray, pair: tuple[int, int]) -> tuple[float, float, np.ndarray]:
    """Longest diameter of an outline and the longest chord perpendicular to it (mm), and their end
    points in voxel coordinates (``(2, 2, 2)``: diameter, end, in-plane index). ``to_mm``: ``(3, 2)``,
    a voxel step along each in-plane axis in mm (anisotropic, oblique: as the grid has it); ``pair``:
    the indices of the outline's two points farthest apart (:func:`_farthest_pair`)."""
    mm = points @ to_mm.T
    a, b = pair
    longest = float(np.linalg.norm(mm[b] - mm[a]))
    ends = np.zeros((2, 2, 2))
    ends[0] = points[[a, b]]
    if longest == 0.0:
        return 0.0, 0.0, ends
    along = (mm[b] - mm[a]) / longest
    across = np.cross(np.cross(to_mm[:, 0], to_mm[:, 1]), along)
    across /= np.linalg.norm(across)
    chord, where = _longest_chord(mm @ along, mm @ across)
    if chord is None:
        return longest, 0.0, ends
    ends_mm = np.array([where * along + chord[0] * across, where * along + chord[1] * across])
    ends[1] = np.linalg.lstsq(to_mm, ends_mm.T, rcond=None)[0].T
    return longest, chord[1] - chord[0], ends


def _farthest_pair(mm: np.ndarray) -> tuple[int, int]:
    """Indices of the two points of ``mm`` ``(N, 3)`` farthest apart (on the convex hull)."""
    try:
        hull = ConvexHull(_in_plane(mm)).vertices
    except (QhullError, ValueError):  # a line of voxels: every point
        hull = np.arange(len(mm))
    gaps = np.linalg.norm(mm[hull][:, None] - mm[hull][None], axis=-1)
    a, b = (hull[i] for i in np.unravel_index(np.argmax(gaps), gaps.shape))
    return int(a), int(b)


def _in_plane(mm: np.ndarray) -> np.ndarray:
    """3D points on a plane as 2D coordinates in it (for the hull of an oblique slice)."""
    centred = mm - mm.mean(0)
    basis = np.linalg.svd(centred, full_matrices=False)[2][:2]
    return centred @ basis.T


def _longest_chord(u: np.ndarray, v: np.ndarray, samples: int = 512):
    """The longest segment inside the closed polygon ``(u, v)`` along a line ``u = c``: ``((v0, v1), c)``,
    over ``samples`` lines across the polygon (the first longest when several are as long)."""
    u1, v1, u2, v2 = u, v, np.roll(u, -1), np.roll(v, -1)
    positions = np.linspace(u.min(), u.max(), samples)[1:-1]
    best, where, length = None, None, -np.inf
    block = max(1, (1 << 21) // max(len(u), 1))  # lines per step: bounds the (lines, edges) arrays
    for first in range(0, len(positions), block):
        c = positions[first : first + block, None]
        crossing = (u1 - c) * (u2 - c) < 0  # edges each line crosses
        with np.errstate(divide="ignore", invalid="ignore"):
            at = np.where(crossing, v1 + (c - u1) * (v2 - v1) / (u2 - u1), np.inf)
        at.sort(axis=1)
        count = crossing.sum(axis=1)
        pairs = int(count.max()) // 2
        if pairs == 0:
            continue
        starts, ends = at[:, 0 : 2 * pairs : 2], at[:, 1 : 2 * pairs : 2]
        inside = 2 * np.arange(pairs)[None] + 1 < count[:, None]  # (enter, leave) pairs of crossings
        with np.errstate(invalid="ignore"):  # inf - inf where a line crosses fewer edges: masked
            lengths = np.where(inside, ends - starts, -np.inf)
        row, k = np.unravel_index(np.argmax(lengths), lengths.shape)
        if lengths[row, k] > length:
            length = lengths[row, k]
            best, where = (float(starts[row, k]), float(ends[row, k])), float(c[row, 0])
    return best, where


def measure_lesions(enhancing: np.ndarray, affine: np.ndarray,
                    lesions: tuple[np.ndarray, int] | None = None) -> list[LesionDiameters]:
    """The bidimensional measurement of each enhancing lesion of a mask ``(X, Y, Z)`` with RAS ``affine``
    (mm), numbered by :func:`~pipelines.metrics.components.number_components` (see the module
    docstring); ``lesions``: that numbering when the caller has it."""
    affine = np.asarray(affine, float)
    axis = axial_axis(affine)
    plane = [a for a in range(3) if a != axis]
    to_mm = affine[:3, plane]
    components, count = number_components(enhancing) if lesions is None else lesions
    found = []
    # each lesion within its bounding box: a noisy mask's hundreds of specks each cost their own size,
    # not the volume's
    for number, box in enumerate(ndimage.find_objects(components, max_label=count), start=1):
        if box is None:  # a number no voxel carries (a numbering handed in)
            continue
        lesion = np.moveaxis(components[box] == number, axis, 0)
        first, offset = box[axis].start, np.array([box[a].start for a in plane], float)
        present = np.flatnonzero(lesion.any(axis=(1, 2)))
        slices = []  # (longest diameter, slice, outline): the perpendicular is never longer, so a slice
        for index in present:  # whose longest squared is under the best product found cannot win
            points = _outline(lesion[index]) + offset
            if len(points) >= 2:
                mm = points @ to_mm.T
                pair = _farthest_pair(mm)
                slices.append((float(np.linalg.norm(mm[pair[1]] - mm[pair[0]])), int(index), points, pair))
        best = None
        for bound, index, points, pair in sorted(slices, key=lambda s: (-s[0], s[1])):
            if best is not None and bound * bound < best[1] * best[2]:
                break
            longest, perpendicular, ends = _diameters(points, to_mm, pair)
            product = longest * perpendicular
            if best is None or product > best[1] * best[2] or (product == best[1] * best[2] and index + first < best[0]):
                best = (index + first, longest, perpendicular, ends)
        index, longest, perpendicular, ends = best
        why = []
        if min(longest, perpendicular) < MIN_DIAMETER_MM:
            why.append(f"a diameter under {MIN_DIAMETER_MM:g} mm")
        if len(present) < MIN_SLICES:
            why.append(f"seen on {len(present)} axial slice, fewer than {MIN_SLICES}")
        found.append(LesionDiameters(number, index, axis, longest, perpendicular, ends, len(present), not why,
                                     "; ".join(why)))
    return found


def target_sum(lesions: Sequence[LesionDiameters]) -> tuple[list[int], float]:
    """The target lesions (measurable, largest products, at most :data:`TARGETS`) and the sum of their
    products in mm²."""
    targets = sorted((lesion for lesion in lesions if lesion.measurable), key=lambda lesion: -lesion.product_mm2)
    targets = targets[:TARGETS]
    return [lesion.lesion for lesion in targets], float(sum(lesion.product_mm2 for lesion in targets))


@dataclass(frozen=True)
class Assessment:
    """The response category of a study against earlier ones, and the rule that decided it."""

    category: str
    rule: str
    baseline_mm2: float
    nadir_mm2: float
    now_mm2: float
    new_measurable: int

    def change(self, reference: float) -> float | None:
        return round(100.0 * (self.now_mm2 - reference) / reference, 1) if reference > 0 else None

    def as_record(self) -> dict:
        return {"category": self.category, "rule": self.rule, "baseline_sum_mm2": round(self.baseline_mm2, 1),
                "nadir_sum_mm2": round(self.nadir_mm2, 1), "change_from_baseline_pct": self.change(self.baseline_mm2),
                "change_from_nadir_pct": self.change(self.nadir_mm2), "new_measurable_lesions": self.new_measurable,
                "note": AUTOMATED}


def assess(now_mm2: float, earlier_mm2: Sequence[float], new_measurable: int = 0, minor: bool = False) -> Assessment:
    """The category of a study whose target sum is ``now_mm2`` against the sums of the patient's earlier
    studies in time order (the first is the baseline; the nadir is the smallest of them), with
    ``new_measurable`` new measurable lesions; ``minor``: RANO-LGG's minor response (MR) at a
    :data:`MR_DECREASE` decrease, for non-enhancing disease.

    Raises:
        ValueError: no earlier study.
    """
    if not earlier_mm2:
        raise ValueError("`earlier_mm2` must hold the sums of the earlier studies, got none")
    baseline, nadir = float(earlier_mm2[0]), float(min(earlier_mm2))

    def decided(category: str, rule: str) -> Assessment:
        return Assessment(category, rule, baseline, nadir, float(now_mm2), int(new_measurable))

    progression = []  # every reason met, the first decides
    if new_measurable:
        progression.append(f"{new_measurable} new measurable enhancing lesion(s)")
    if nadir == 0 and now_mm2 > 0:
        progression.append("measurable enhancing disease after the sum of products had reached 0")
    if nadir > 0 and now_mm2 >= nadir * (1 + PD_INCREASE):
        progression.append(f"sum of products {100 * (now_mm2 / nadir - 1):.1f} % over the nadir ({nadir:.1f} mm2), "
                           f"at least {100 * PD_INCREASE:g} %")
    if progression:
        return decided("PD", "; ".join(progression))
    if now_mm2 == 0 and baseline > 0:
        return decided("CR", "no measurable enhancing disease left (sum of products 0)")
    if baseline > 0 and now_mm2 <= baseline * (1 - PR_DECREASE):
        return decided("PR", f"sum of products {100 * (1 - now_mm2 / baseline):.1f} % under the baseline "
                             f"({baseline:.1f} mm2), at least {100 * PR_DECREASE:g} %")
    if minor and baseline > 0 and now_mm2 <= baseline * (1 - MR_DECREASE):
        return decided("MR", f"sum of products {100 * (1 - now_mm2 / baseline):.1f} % under the baseline "
                             f"({baseline:.1f} mm2), at least {100 * MR_DECREASE:g} % and under {100 * PR_DECREASE:g} %")
    if baseline == 0 and now_mm2 == 0:
        return decided("SD", "no measurable enhancing disease at baseline or now")
    return decided("SD", f"sum of products neither {100 * PR_DECREASE:g} % under the baseline nor "
                         f"{100 * PD_INCREASE:g} % over the nadir")


@dataclass(frozen=True)
class VolumeAssessment:
    """RANO 2.0's volumetric category of a study: its enhancing volume against earlier ones (mL)."""

    category: str
    rule: str
    baseline_ml: float
    nadir_ml: float
    now_ml: float

    def as_record(self) -> dict:
        def change(reference: float) -> float | None:
            return round(100.0 * (self.now_ml - reference) / reference, 1) if reference > 0 else None

        return {"category": self.category, "rule": self.rule, "baseline_ml": round(self.baseline_ml, 3),
                "nadir_ml": round(self.nadir_ml, 3), "now_ml": round(self.now_ml, 3),
                "change_from_baseline_pct": change(self.baseline_ml), "change_from_nadir_pct": change(self.nadir_ml)}


def assess_volume(now_ml: float, earlier_ml: Sequence[float]) -> VolumeAssessment:
    """RANO 2.0's volumetric category of a study whose enhancing volume is ``now_ml`` against the
    volumes of the patient's earlier studies in time order (the first the baseline): PD at a
    :data:`VOLUME_PD_INCREASE` increase over the smallest, or enhancing disease back after none; CR at
    none left; PR at a :data:`VOLUME_PR_DECREASE` decrease from the baseline; SD otherwise.

    Raises:
        ValueError: no earlier study.
    """
    if not earlier_ml:
        raise ValueError("`earlier_ml` must hold the volumes of the earlier studies, got none")
    baseline, nadir, now = float(earlier_ml[0]), float(min(earlier_ml)), float(now_ml)

    def decided(category: str, rule: str) -> VolumeAssessment:
        return VolumeAssessment(category, rule, baseline, nadir, now)

    if nadir > 0 and now >= nadir * (1 + VOLUME_PD_INCREASE):
        return decided("PD", f"enhancing volume {100 * (now / nadir - 1):.1f} % over the smallest earlier volume "
                             f"({nadir:.2f} mL), at least {100 * VOLUME_PD_INCREASE:g} %")
    if nadir == 0 and now > 0:
        return decided("PD", "enhancing disease after the volume had reached 0")
    if now == 0 and baseline > 0:
        return decided("CR", "no enhancing disease left (volume 0)")
    if baseline > 0 and now <= baseline * (1 - VOLUME_PR_DECREASE):
        return decided("PR", f"enhancing volume {100 * (1 - now / baseline):.1f} % under the baseline "
                             f"({baseline:.2f} mL), at least {100 * VOLUME_PR_DECREASE:g} %")
    return decided("SD", f"enhancing volume neither {100 * VOLUME_PR_DECREASE:g} % under the baseline nor "
                         f"{100 * VOLUME_PD_INCREASE:g} % over the smallest earlier volume")

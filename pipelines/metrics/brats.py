"""Brain tumor scores as the BraTS challenge computes them: per region Dice and 95th-percentile
Hausdorff distance in mm, and the BraTS 2023 lesion-wise Dice and HD95.

Regions are unions of labels; in the BraTS 2023 convention (1 necrotic core, 2 edema, 3 enhancing
tumor) the whole tumor (WT) is 1, 2 and 3, the tumor core (TC) 1 and 3, the enhancing tumor (ET) 3
(:data:`BRATS_REGIONS`).

Lesion-wise scores follow the challenge's own evaluation (BraTS 2023 lesion-wise metrics, Saluja et
al.):

1. the reference's connected components (full connectivity) that lie within one connected component
   of the reference dilated ``dilation`` times (18-connected structure in 3D) are one lesion, so a
   lesion broken by a thin gap counts once;
2. the prediction's connected components that touch a lesion dilated ``dilation`` times are that
   lesion's prediction (a component may serve several lesions); Dice and HD95 are taken between the
   lesion and the union of those components;
3. a prediction component that touches no dilated lesion is a false positive; it scores Dice 0 and
   ``max_distance``, as does a lesion nothing predicts (a false negative);
4. lesions of ``min_lesion_mm3`` or less are left out of the means (a prediction of them is not a
   false positive either); the lesion-wise score is the sum over the lesions kept divided by their
   number plus the false positives. With neither, the score is Dice 1 and HD95 0.

HD95 is computed as MONAI's ``compute_hausdorff_distance(percentile=95)`` computes it: the border
voxels of each mask (those with a background face neighbour, the image's edge counting as
background), the exact Euclidean distance in mm from each border voxel of one mask to the nearest of
the other's, the 95th percentile of each direction (linear interpolation), the larger of the two. The
challenge's own code weights border points by their surface area (DeepMind's ``surface-distance``),
which gives slightly different values on the same masks; the matching, thresholds and penalties
above are the challenge's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from scipy import ndimage

__all__ = [
    "BRATS_REGIONS",
    "MAX_DISTANCE_MM",
    "BratsRegionMetric",
    "RegionScores",
    "brats_scores",
    "dice",
    "hd95",
    "lesion_wise",
]

# BraTS 2023 labels: 1 necrotic core (NCR), 2 edema (ED), 3 enhancing tumor (ET)
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}

# the challenge's distance for a missed or false lesion (the diagonal of its 240x240x155 1 mm grid, rounded up)
MAX_DISTANCE_MM = 374.0


@dataclass(frozen=True)
class RegionScores:
    """One region's scores.

    Attributes:
        dice: Dice of the whole region (1.0 when both masks are empty).
        hd95: HD95 in mm of the whole region (0.0 when both are empty, ``max_distance`` when one is).
        lesion_dice: BraTS 2023 lesion-wise Dice.
        lesion_hd95: BraTS 2023 lesion-wise HD95 in mm.
        lesions: reference lesions larger than the volume threshold.
        detected: of those, the ones some prediction component touches.
        false_positives: prediction components that touch no reference lesion.
    """

    dice: float
    hd95: float
    lesion_dice: float
    lesion_hd95: float
    lesions: int
    detected: int
    false_positives: int

    def as_dict(self) -> dict:
        return asdict(self)


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    values = (1.0,) * ndim if spacing is None else (
        (float(spacing),) * ndim if np.isscalar(spacing) else tuple(float(s) for s in spacing))
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"`spacing` must be {ndim} positive numbers, got {spacing!r}")
    return values


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"`pred` and `ref` must have the same shape, got {pred.shape} and {ref.shape}")
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two masks ``(*spatial)``; 1.0 when both are empty."""
    pred, ref = _pair(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total


def _border(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the image's edge counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float] | None = None,
         max_distance: float = MAX_DISTANCE_MM) -> float:
    """95th-percentile Hausdorff distance in mm between two masks ``(*spatial)``.

    Args:
        pred: the predicted mask.
        ref: the reference mask.
        spacing: voxel size in mm per axis (or one number); None for 1.
        max_distance: returned when exactly one mask is empty.

    Returns:
        The larger of the two directed 95th percentiles; 0.0 when both masks are empty.
    """
    pred, ref = _pair(pred, ref)
    sampling = _spacing(spacing, pred.ndim)
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return float(max_distance)
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]  # nearest border points lie inside the union's box
    pred_border, ref_border = _border(pred)[box], _border(ref)[box]
    to_ref = ndimage.distance_transform_edt(~ref_border, sampling=sampling)[pred_border]
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=sampling)[ref_border]
    return float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))


def _structures(ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """(full connectivity for components, the challenge's dilation structure: 18-connected in 3D)."""
    return (ndimage.generate_binary_structure(ndim, ndim),
            ndimage.generate_binary_structure(ndim, max(ndim - 1, 1)))


def _dilate(mask: np.ndarray, structure: np.ndarray, iterations: int) -> np.ndarray:
    return ndimage.binary_dilation(mask, structure=structure, iterations=iterations) if iterations > 0 else mask


def lesion_wise(pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float] | None = None,
                dilation: int = 3, min_lesion_mm3: float = 50.0,
                max_distance: float = MAX_DISTANCE_MM) -> tuple[float, float, int, int, int]:
    """BraTS 2023 lesion-wise Dice and HD95 of one region (see the module docstring).

    Args:
        pred: the predicted mask ``(*spatial)``.
        ref: the reference mask.
        spacing: voxel size in mm per axis; None for 1.
        dilation: dilation iterations that join a lesion's parts and reach its prediction (BraTS
            glioma: 3; meningioma and metastases: 1).
        min_lesion_mm3: lesions of this volume or less are left out (BraTS glioma: 50; metastases: 2).
        max_distance: the distance a missed or false lesion scores.

    Returns:
        ``(lesion_dice, lesion_hd95, lesions, detected, false_positives)``.
    """
    pred, ref = _pair(pred, ref)
    sampling = _spacing(spacing, pred.ndim)
    if dilation < 0:
        raise ValueError(f"`dilation` must be >= 0, got {dilation}")
    voxel_mm3 = float(np.prod(sampling))
    full, grow = _structures(pred.ndim)
    pred_parts, _ = ndimage.label(pred, structure=full)
    extent, count = ndimage.label(_dilate(ref, grow, dilation), structure=full)
    lesions = np.where(ref, extent, 0)  # reference voxels labelled by the dilated component they lie in
    touched: set[int] = set()
    dices, distances, detected = [], [], 0
    margin = dilation + 1
    for index, box in enumerate(ndimage.find_objects(lesions, max_label=count), start=1):
        if box is None:
            continue
        box = tuple(slice(max(s.start - margin, 0), s.stop + margin) for s in box)
        lesion = lesions[box] == index
        reach = _dilate(lesion, grow, dilation)
        parts = np.unique(pred_parts[box][reach])
        parts = parts[parts != 0]
        touched.update(int(p) for p in parts)
        if lesion.sum() * voxel_mm3 <= min_lesion_mm3:
            continue
        matched = np.isin(pred_parts, parts)  # whole components, which may reach beyond the box
        lesion_full = np.zeros_like(ref)
        lesion_full[box] = lesion
        dices.append(dice(matched, lesion_full))
        distances.append(hd95(matched, lesion_full, sampling, max_distance))
        detected += bool(parts.size)
    false_positives = len(set(range(1, int(pred_parts.max()) + 1)) - touched)
    cases = len(dices) + false_positives
    if cases == 0:
        return 1.0, 0.0, 0, 0, 0
    return (float(sum(dices) / cases), float((sum(distances) + false_positives * max_distance) / cases),
            len(dices), detected, false_positives)


def brats_scores(pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float] | None = None,
                 regions: Mapping[str, Sequence[int]] = BRATS_REGIONS, dilation: int = 3,
                 min_lesion_mm3: float = 50.0, max_distance: float = MAX_DISTANCE_MM) -> dict[str, RegionScores]:
    """Per region scores of a predicted label map against a reference.

    ``dilation``, ``min_lesion_mm3``, ``max_distance``: as in :func:`lesion_wise`.

    Args:
        pred: predicted labels ``(*spatial)``.
        ref: reference labels, the same shape, on the same grid.
        spacing: voxel size in mm per spatial axis; None for 1.
        regions: region name -> the label values it covers (default BraTS 2023 WT, TC, ET).

    Returns:
        region name -> :class:`RegionScores`.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"`pred` and `ref` must have the same shape, got {pred.shape} and {ref.shape}")
    scores = {}
    for name, values in regions.items():
        p, r = np.isin(pred, values), np.isin(ref, values)
        lesion_dice, lesion_hd, lesions, detected, fps = lesion_wise(p, r, spacing, dilation, min_lesion_mm3,
                                                                     max_distance)
        scores[name] = RegionScores(dice(p, r), hd95(p, r, spacing, max_distance), lesion_dice, lesion_hd,
                                    lesions, detected, fps)
    return scores


class BratsRegionMetric(CumulativeIterationMetric):
    """One BraTS score of one region, per image, for Ignite evaluation (``IgniteMetricHandler``).

    Takes region channel maps ``(B, R, *spatial)`` (a region-based network's thresholded output and
    the reference as :class:`pipelines.transforms.LabelsToRegionsd` gives it) and scores channel
    ``channel``; the voxel size in mm comes from the reference's affine (a MetaTensor), else 1.
    ``aggregate`` is the mean over images.

    ``dilation``, ``min_lesion_mm3``, ``max_distance``: as in :func:`lesion_wise`.

    Args:
        channel: the region channel (BraTS: 0 WT, 1 TC, 2 ET).
        score: ``"dice"``, ``"hd95"`` (mm), ``"lesion_dice"`` or ``"lesion_hd95"`` (BraTS 2023
            lesion-wise, see :func:`lesion_wise`).
    """

    SCORES = ("dice", "hd95", "lesion_dice", "lesion_hd95")

    def __init__(self, channel: int, score: str = "dice", dilation: int = 3, min_lesion_mm3: float = 50.0,
                 max_distance: float = MAX_DISTANCE_MM) -> None:
        super().__init__()
        if score not in self.SCORES:
            raise ValueError(f"`score` must be one of {self.SCORES}, got {score!r}")
        self.channel, self.score = int(channel), score
        self.dilation, self.min_lesion_mm3, self.max_distance = dilation, min_lesion_mm3, max_distance

    def _item_spacing(self, y: torch.Tensor, index: int) -> tuple[float, ...] | None:
        affine = getattr(y, "affine", None)
        if affine is None:
            return None
        affine = np.asarray(affine.detach().cpu() if torch.is_tensor(affine) else affine, dtype=np.float64)
        if affine.ndim == 3:
            affine = affine[index]
        ndim = y.ndim - 2
        return tuple(float(v) for v in np.linalg.norm(affine[:ndim, :ndim], axis=0))

    def _one(self, pred: np.ndarray, ref: np.ndarray, spacing) -> float:
        if self.score == "dice":
            return dice(pred, ref)
        if self.score == "hd95":
            return hd95(pred, ref, spacing, self.max_distance)
        lesion_dice, lesion_hd, *_ = lesion_wise(pred, ref, spacing, self.dilation, self.min_lesion_mm3,
                                                  self.max_distance)
        return lesion_dice if self.score == "lesion_dice" else lesion_hd

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError("BratsRegionMetric needs the reference `y`")
        if y_pred.shape != y.shape or y_pred.ndim < 4 or not 0 <= self.channel < y_pred.shape[1]:
            raise ValueError(f"BratsRegionMetric expects region maps (B, R, *spatial) of one shape with channel "
                             f"{self.channel}, got {tuple(y_pred.shape)} and {tuple(y.shape)}")
        scores = []
        for index in range(y_pred.shape[0]):
            pred = np.asarray(y_pred[index, self.channel].detach().cpu()) > 0.5
            ref = np.asarray(y[index, self.channel].detach().cpu()) > 0.5
            scores.append(self._one(pred, ref, self._item_spacing(y, index)))
        return torch.tensor(scores, dtype=torch.float64)[:, None]

    def aggregate(self) -> torch.Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("BratsRegionMetric has no values to aggregate")
        return data.float().nanmean()

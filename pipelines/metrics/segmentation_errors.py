"""Error measures of the ISBI 2012 EM challenge, the U-Net paper's benchmark, on class-index maps.

Maps hold class indices ``(B, 1, *spatial)``: ``foreground`` (cells, 1) and background (membrane, 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from monai.utils import convert_to_numpy
from scipy import ndimage
from skimage.metrics import adapted_rand_error

__all__ = [
    "AdaptedRandErrorMetric",
    "ClassDiceMetric",
    "PixelErrorMetric",
    "class_dice",
    "pixel_error",
    "rand_error",
]


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = convert_to_numpy(pred), convert_to_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction and target must have the same shape, got {p.shape} and {t.shape}")
    return np.rint(p).astype(np.int64), np.rint(t).astype(np.int64)


def pixel_error(pred, target) -> float:
    """Fraction of pixels whose class differs between ``pred`` and ``target`` (same shape, any axes)."""
    p, t = _pair(pred, target)
    return float(np.mean(p != t))


def rand_error(pred, target, foreground: int = 1, connectivity: int = 1) -> float:
    """Adapted Rand error between the cells of two class maps without channel axis ``(*spatial)``.

    Cells are the connected components of ``foreground`` (connectivity 1: 4-connected in 2D);
    background pixels of the target are ignored, as in ``skimage.metrics.adapted_rand_error``.
    """
    p, t = _pair(pred, target)
    structure = ndimage.generate_binary_structure(t.ndim, connectivity)
    true_cells = ndimage.label(t == foreground, structure=structure)[0]
    pred_cells = ndimage.label(p == foreground, structure=structure)[0]
    if not true_cells.any():
        raise ValueError("target has no foreground pixels: the Rand error is undefined")
    return float(adapted_rand_error(true_cells, pred_cells)[0])


def class_dice(pred, target, class_index: int = 0) -> float:
    """Dice coefficient of one class; 1.0 when the class is absent from both maps."""
    p, t = _pair(pred, target)
    p, t = p == class_index, t == class_index
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(p, t).sum() / total)


class _PerImageMetric(CumulativeIterationMetric):
    """Applies a per-image function to each item of a batch ``(B, 1, *spatial)``; aggregate is the mean."""

    def _score(self, pred: np.ndarray, target: np.ndarray) -> float:
        raise NotImplementedError

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError(f"{type(self).__name__} needs the target `y`")
        if y_pred.ndim < 4 or y_pred.shape[1] != 1:
            raise ValueError(
                f"{type(self).__name__} expects class-index maps (B, 1, *spatial), got {tuple(y_pred.shape)}"
            )
        scores = [self._score(p[0], t[0]) for p, t in zip(y_pred, y)]
        return torch.tensor(scores, dtype=torch.float64)[:, None]

    def aggregate(self) -> torch.Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError(f"{type(self).__name__} has no values to aggregate")
        return data.float().nanmean()  # images a metric does not apply to score NaN (ignore_empty)


class PixelErrorMetric(_PerImageMetric):
    """Mean over images of :func:`pixel_error`."""

    def _score(self, pred, target) -> float:
        return pixel_error(pred, target)


class AdaptedRandErrorMetric(_PerImageMetric):
    """Mean over images of :func:`rand_error` (4-connected cells by default)."""

    def __init__(self, foreground: int = 1, connectivity: int = 1) -> None:
        super().__init__()
        self.foreground = foreground
        self.connectivity = connectivity

    def _score(self, pred, target) -> float:
        return rand_error(pred, target, self.foreground, self.connectivity)


class ClassDiceMetric(_PerImageMetric):
    """Mean over images of :func:`class_dice` of ``class_index`` (0: membrane, the class ISBI scores).

    A sequence of classes scores each image by the mean of their Dice coefficients (the mean lesion
    Dice of a tumor bundle: ``class_index=[1, 2]``).

    ``ignore_empty=True`` follows MONAI's ``DiceMetric``: an image whose reference lacks a class
    does not count for that class (its Dice is undefined: 1 or 0 depending only on whether anything
    was predicted), and images lacking all the classes are left out of the mean. With the default
    ``False`` such an image scores 1 for the class when nothing is predicted and 0 otherwise.
    """

    def __init__(self, class_index: int | Sequence[int] = 0, ignore_empty: bool = False) -> None:
        super().__init__()
        self.classes = (class_index,) if isinstance(class_index, int) else tuple(int(c) for c in class_index)
        if not self.classes:
            raise ValueError("class_index must name at least one class, got an empty sequence")
        self.ignore_empty = ignore_empty

    def _score(self, pred, target) -> float:
        scores = [
            float("nan") if self.ignore_empty and not (np.asarray(target) == c).any() else class_dice(pred, target, c)
            for c in self.classes
        ]
        return float("nan") if np.isnan(scores).all() else float(np.nanmean(scores))

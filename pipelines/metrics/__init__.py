"""Segmentation metrics: MONAI/Ignite metrics (``IgniteMetricHandler(metric_fn=...)``) for the EM challenge
measures, and BraTS region and lesion-wise scores (:mod:`pipelines.metrics.brats`)."""

from __future__ import annotations

from .brats import BRATS_REGIONS, BratsRegionMetric, RegionScores, brats_scores
from .segmentation_errors import (
    AdaptedRandErrorMetric,
    ClassDiceMetric,
    PixelErrorMetric,
    class_dice,
    pixel_error,
    rand_error,
)

__all__ = [
    "BRATS_REGIONS",
    "AdaptedRandErrorMetric",
    "BratsRegionMetric",
    "ClassDiceMetric",
    "PixelErrorMetric",
    "RegionScores",
    "brats_scores",
    "class_dice",
    "pixel_error",
    "rand_error",
]

"""Segmentation metrics usable as MONAI/Ignite metrics (``IgniteMetricHandler(metric_fn=...)``)."""

from __future__ import annotations

from .segmentation_errors import (
    AdaptedRandErrorMetric,
    ClassDiceMetric,
    PixelErrorMetric,
    class_dice,
    pixel_error,
    rand_error,
)

__all__ = [
    "AdaptedRandErrorMetric",
    "ClassDiceMetric",
    "PixelErrorMetric",
    "class_dice",
    "pixel_error",
    "rand_error",
]

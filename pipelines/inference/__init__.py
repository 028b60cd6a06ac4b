"""Tiled inference: the paper's overlap-tile strategy, blended sliding windows, test-time augmentation."""

from __future__ import annotations

from .overlap_tile import OverlapTileInferer, TilePlan
from .sliding_window import BlendedSlidingWindowInferer
from .tta import TTAInferer, tta_transforms
from .windows import even_starts, gather_window, mirror_indices

__all__ = [
    "BlendedSlidingWindowInferer",
    "OverlapTileInferer",
    "TTAInferer",
    "TilePlan",
    "even_starts",
    "gather_window",
    "mirror_indices",
    "tta_transforms",
]

"""Tiled inference: the paper's overlap-tile strategy, blended sliding windows, test-time augmentation;
the runtimes the network runs on (torch, OpenVINO float32 and int8)."""

from __future__ import annotations

from .overlap_tile import OverlapTileInferer, TilePlan
from .runtimes import bundle_runner
from .sliding_window import BlendedSlidingWindowInferer
from .tta import TTAInferer, tta_transforms
from .windows import even_starts, gather_window, mirror_indices

__all__ = [
    "BlendedSlidingWindowInferer",
    "OverlapTileInferer",
    "TTAInferer",
    "TilePlan",
    "bundle_runner",
    "even_starts",
    "gather_window",
    "mirror_indices",
    "tta_transforms",
]

"""Tiled inference: the U-Net paper's overlap-tile strategy for valid networks, test-time augmentation."""

from __future__ import annotations

from .overlap_tile import OverlapTileInferer, TilePlan, mirror_indices
from .tta import TTAInferer, tta_transforms

__all__ = ["OverlapTileInferer", "TTAInferer", "TilePlan", "mirror_indices", "tta_transforms"]

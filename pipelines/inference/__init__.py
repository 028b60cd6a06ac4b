"""Tiled inference: the U-Net paper's overlap-tile strategy for valid networks."""

from __future__ import annotations

from .overlap_tile import OverlapTileInferer, TilePlan, mirror_indices

__all__ = ["OverlapTileInferer", "TilePlan", "mirror_indices"]

"""Dictionary and array transforms of the U-Net paper's training recipe."""

from __future__ import annotations

from .elastic import RandCoarseElastic, RandCoarseElasticd
from .weight_map import UNetWeightMap, UNetWeightMapd, unet_weight_map

__all__ = [
    "RandCoarseElastic",
    "RandCoarseElasticd",
    "UNetWeightMap",
    "UNetWeightMapd",
    "unet_weight_map",
]

"""Transforms: loading volumes, and the U-Net paper's training recipe (weight map, elastic deformation)."""

from __future__ import annotations

from .elastic import RandCoarseElastic, RandCoarseElasticd
from .io import LoadVolume, LoadVolumed, check_same_grid
from .weight_map import UNetWeightMap, UNetWeightMapd, unet_weight_map

__all__ = [
    "LoadVolume",
    "LoadVolumed",
    "RandCoarseElastic",
    "RandCoarseElasticd",
    "UNetWeightMap",
    "UNetWeightMapd",
    "check_same_grid",
    "unet_weight_map",
]

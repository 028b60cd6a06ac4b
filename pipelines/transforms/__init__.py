"""Transforms: loading volumes, the U-Net paper's training recipe (weight map, elastic deformation),
and membrane post-processing."""

from __future__ import annotations

from .elastic import RandCoarseElastic, RandCoarseElasticd
from .intensity import ModalityNormalize, ModalityNormalized
from .io import LoadVolume, LoadVolumed
from .membrane import MembraneWatershed, MembraneWatershedd, membrane_watershed
from .weight_map import UNetWeightMap, UNetWeightMapd, unet_weight_map

__all__ = [
    "LoadVolume",
    "LoadVolumed",
    "MembraneWatershed",
    "MembraneWatershedd",
    "ModalityNormalize",
    "ModalityNormalized",
    "RandCoarseElastic",
    "RandCoarseElasticd",
    "UNetWeightMap",
    "UNetWeightMapd",
    "membrane_watershed",
    "unet_weight_map",
]

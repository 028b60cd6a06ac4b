"""Transforms: loading volumes, a study's channels on one grid (registration), labels in a bundle's
convention and as regions, the U-Net paper's
training recipe (weight map, elastic deformation), and post-processing (membranes, probabilities)."""

from __future__ import annotations

from .brain import BrainExtractionError, ExtractBraind, brain_mask
from .elastic import RandCoarseElastic, RandCoarseElasticd
from .intensity import ChannelsNormalize, ChannelsNormalized, ModalityNormalize, ModalityNormalized
from .io import LoadVolume, LoadVolumed
from .labels import LabelsToRegions, LabelsToRegionsd, LabelValueError, MapLabels, MapLabelsd
from .membrane import MembraneWatershed, MembraneWatershedd, membrane_watershed
from .probabilities import FillBackground, FillBackgroundd, RegionsToLabels, RegionsToLabelsd
from .registration import RegisterToReferenced, RegistrationError, register_rigid, resample_to
from .weight_map import UNetWeightMap, UNetWeightMapd, unet_weight_map

__all__ = [
    "BrainExtractionError",
    "ChannelsNormalize",
    "ChannelsNormalized",
    "ExtractBraind",
    "FillBackground",
    "FillBackgroundd",
    "LabelValueError",
    "LabelsToRegions",
    "LabelsToRegionsd",
    "LoadVolume",
    "LoadVolumed",
    "MapLabels",
    "MapLabelsd",
    "MembraneWatershed",
    "MembraneWatershedd",
    "ModalityNormalize",
    "ModalityNormalized",
    "RandCoarseElastic",
    "RandCoarseElasticd",
    "RegionsToLabels",
    "RegionsToLabelsd",
    "RegisterToReferenced",
    "RegistrationError",
    "UNetWeightMap",
    "UNetWeightMapd",
    "brain_mask",
    "membrane_watershed",
    "register_rigid",
    "resample_to",
    "unet_weight_map",
]

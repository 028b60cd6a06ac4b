"""Helpers for MONAI's Ignite engines (``SupervisedTrainer``/``SupervisedEvaluator``)."""

from __future__ import annotations

from .checkpoints import ResumeTraining, latest_checkpoint
from .distributed import end_process_group
from .overlays import ValidationOverlays, overlay_slice
from .prepare_batch import PrepareBatchWithWeights
from .tracking import flatten_params, tracked_handlers
from .tuning import tune_membrane_watershed
from .weights import load_weights, save_weights

__all__ = [
    "PrepareBatchWithWeights",
    "ResumeTraining",
    "ValidationOverlays",
    "end_process_group",
    "flatten_params",
    "latest_checkpoint",
    "load_weights",
    "overlay_slice",
    "save_weights",
    "tracked_handlers",
    "tune_membrane_watershed",
]
